"""Photo editing on the pipelines: :class:`PhotoEditingMixin` (``invert``, ``edit``) and the ``FaceEditPipeline`` name.

Editing needs networks that generating faces does not: the photo inverter (pSp / e4e), the face parser, the
identity network, LPIPS and CLIP. They are optional components of every pipeline
(:class:`~mm2latent.pipelines.base.FacePipelineBase`; ``from_pretrained(..., editing=True)`` loads them), so one
object serves a Space with generation and editing, and generating faces never loads them. Editing = align +
invert the photo (:meth:`PhotoEditingMixin.invert`), then apply T's modulation (or M's latent) from a text and an
edited mask (:meth:`PhotoEditingMixin.edit`, METHOD.md); untrained T: a CLIP-guided optimisation instead. The
training-free generation mode (``mode="invert"``) is the DDGI engine's
(:meth:`~mm2latent.pipelines.ddgi.FacePipeline.draw_and_invert`).

``FaceEditPipeline`` is kept as a name: ``FaceEditPipeline.from_pretrained(name)`` is
``FacePipeline.from_pretrained(name, editing=True)``, and ``FaceEditPipeline(pipe, inverter=..., ...)`` is
``pipe.from_pipe(pipe, inverter=..., ...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..editing.inversion import InversionResult, invert
from ..editing.methods import (
    LATENT_METHODS,
    METHODS,
    EditResult,
    LatentEdit,
    apply_edit,
    check_layers,
    check_strength,
    clip_refine,
    identity_similarity,
)
from ..errors import EmptyPromptError, InvalidSettingError
from ..inputs.conditions import parse_mask
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..inputs.scribbles import scribble_from_photo
from .base import FacePipelineBase
from .components import EDITING_COMPONENTS
from .request import check_seed

__all__ = ["EDITING_COMPONENTS", "FaceEditPipeline", "PhotoEditingMixin"]

#: Invert mode's optimisation: learning rate, the mask term's weight and the latent regulariser's (pSp's 0.005
#: is for training; refinement keeps w near the encoder's answer through few steps instead).
REFINE_LR = 0.01
REFINE_MASK_WEIGHT = 0.1
REFINE_W_REG = 0.0005
#: Line width, at the ControlNet's 512², of the class boundaries that stand in for a mask on a scribble ControlNet.
MASK_AS_SCRIBBLE_WIDTH = 3
#: Steps of the training-free "guided" edit when none are asked for.
DEFAULT_GUIDED_STEPS = 40
#: Smallest side scribble_from_photo accepts (the photo's sketch for an MM2Latent edit is drawn at the autoencoder's).
EDGE_MIN_SIZE = 16
#: Side of the masks the guided edit compares (the mask editor's canvas and the photo's parsed mask).
PARSER_MASK_SIZE = 512


class PhotoEditingMixin:
    """Real-photo editing, for a :class:`~mm2latent.pipelines.base.FacePipelineBase` with editing components.

    Uses the pipeline's engine and G, and its optional ``inverter``, ``face_parser``, ``identity``, ``lpips``
    and ``clip``; a method that needs a missing one says so with :class:`~mm2latent.errors.InvalidSettingError`.
    """

    # ------------------------------------------------------------------ 1. invert
    def invert(self, photo: Any, refine_steps: int = 0, progress: bool | None = None,
               callback: Callable[[int, float], None] | None = None) -> InversionResult:
        """Align a photo FFHQ-style, invert it to W+ (optionally refined by optimisation), parse its mask.

        Args:
            photo: path, PIL image or array of a photo with one clearly visible face.
            refine_steps: L2 + LPIPS optimisation steps after the encoder (0 = encoder only).
            progress: tqdm bar for the refinement (default: the pipeline's ``show_progress``).
            callback: (step, loss) after each refinement step.

        Returns an :class:`~mm2latent.editing.inversion.InversionResult` (latent [1, L, D], reconstruction,
        aligned photo, mask ids, messages).
        """
        if self.inverter is None:
            raise InvalidSettingError("this model has no photo encoder (inverter); photo editing is unavailable")
        with self.lock:
            return invert(self.generator, self.inverter, photo, face_parser=self.face_parser, lpips=self.lpips,
                          refine_steps=refine_steps, progress=self._progress(progress), callback=callback)

    # ------------------------------------------------------------------ 2. edit the latent
    @torch.no_grad()
    def edit_latent(
        self,
        w_real: torch.Tensor,
        prompt: str | None,
        mask=None,
        scribble=None,
        seed: int = 0,
        strength: float = 1.0,
        layers: str | list[int] = "all",
        method: str = "modulate",
    ) -> LatentEdit:
        """One U-Net pass on (prompt, mask/scribble), then M/T applied to the real latent.

        Args:
            w_real: the photo's W+ latent, [1, L, D].
            prompt: the wanted description (may be empty when a mask or a sketch is given).
            mask: an edited 19-class mask (any form :func:`~mm2latent.inputs.conditions.parse_mask` reads).
            scribble: a sketch.
            seed: the diffusion noise seed.
            strength: 0 keeps w_real, 1 applies the edit fully (up to 2 exaggerates it).
            layers: "coarse", "middle", "fine", "all" or a list of layer indices.
            method: "modulate" (T's γ, β on w_real) or "mix" (M's w^m mixed into the layers). With the MM2Latent
                engine only "mix": w_edit[l] = w_real[l] + strength · (mapper(text, mask, sketch)[l] − w_real[l]) on
                the chosen layers (the mapper is deterministic: ``seed`` is unused).
        """
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidSettingError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if not prompt and mask is None and scribble is None:
            raise EmptyPromptError("describe the change, or edit the mask or the sketch")
        seed = check_seed(seed)
        check_strength(strength)  # every setting is checked before the diffusion pass
        index = check_layers(layers, w_real.shape[1])
        if method not in LATENT_METHODS:
            raise InvalidSettingError(f"the method must be one of {', '.join(LATENT_METHODS)}, got {method!r}")
        if self.engine == "mm2latent":
            if method != "mix":
                raise InvalidSettingError("the MM2Latent engine has no modulation network T: use method='mix' (its "
                                          "mapper's latent blended into the chosen layers) or 'guided'")
            # The mapper is deterministic (no seed): the latent of (text, mask, sketch), blended in by apply_edit.
            codes, _ = self.prepare_conditions(mask, scribble)
            w_new = self.predict_latents(self.encode_prompts([prompt]), codes).float()
            w_edit = apply_edit(w_real.to(w_new.device, torch.float32), w_new, None, strength, layers, "mix")
            return LatentEdit(w_edit, w_new, w_new, None, index)
        controls, _ = self.prepare_conditions(mask, scribble)
        prediction = self.predict_latents(self.encode_prompts([prompt]), controls, self.prepare_noise([seed]))
        w_m, modulation = prediction.w_m[0].float(), prediction.modulation(0)
        w_real = w_real.to(w_m.device, torch.float32)
        w_edit = apply_edit(w_real, w_m, modulation, strength, layers, method)
        return LatentEdit(w_edit, prediction.latents.float(), w_m, modulation, index)

    # ------------------------------------------------------------------ 3. the whole edit
    @property
    def default_edit_method(self) -> str:
        """"modulate" with a trained T; "guided" (CLIP + identity + mask, training-free) when T is untrained.

        An untrained T is the identity modulation (w^γ = 1, w^β = 0), so "modulate" could not change anything.
        With the MM2Latent engine: "mix" (its mapper's latent) when trained, else "guided".
        """
        if self.engine == "mm2latent":
            return "mix" if self.trained else "guided"
        return "modulate" if self.trained else "guided"

    def edit(
        self,
        latent_or_inversion: torch.Tensor | InversionResult,
        prompt: str | None = "",
        mask=None,
        scribble=None,
        strength: float = 1.0,
        layers: str | list[int] = "all",
        method: str | None = None,
        seed: int = 0,
        clip_steps: int | None = None,
        id_weight: float = 0.1,
        progress: bool | None = None,
        callback: Callable[[int, float], None] | None = None,
    ) -> EditResult:
        """Edit a real photo's latent with text and/or an edited mask or sketch (METHOD.md).

        Args:
            latent_or_inversion: :meth:`invert`'s result, or a W+ latent [1, L, D].
            prompt, mask, scribble, strength, layers, seed: as :meth:`edit_latent`.
            method: "modulate" / "mix" (E's features through T or M, :meth:`edit_latent`), "guided" (CLIP-guided
                optimisation with an identity term and, when the mask was repainted, the face parser's
                cross-entropy against it; strength blends the result in), or None for
                :attr:`default_edit_method`.
            clip_steps: "modulate"/"mix": > 0 adds CLIP-guided steps after the edit; "guided": its steps
                (default 40).
            id_weight: weight of the identity term.
            progress: tqdm bar for the optimisation (default: the pipeline's ``show_progress``).
            callback: (step, loss) after each optimisation step.

        The result's ``settings["method"]`` says which method ran and ``message`` why.
        """
        inversion = latent_or_inversion if isinstance(latent_or_inversion, InversionResult) else None
        w_real = inversion.latent if inversion is not None else latent_or_inversion
        generator = self.generator
        if not isinstance(w_real, torch.Tensor) or w_real.ndim != 3 or w_real.shape[1:] != (
                generator.num_ws, generator.style_dim):
            shape = tuple(w_real.shape) if isinstance(w_real, torch.Tensor) else type(w_real).__name__
            raise InvalidSettingError(f"the latent must be [1, {generator.num_ws}, {generator.style_dim}], got {shape}")
        chosen = method or self.default_edit_method
        if chosen not in METHODS:
            raise InvalidSettingError(f"the method must be one of {', '.join(METHODS)}, got {chosen!r}")
        message = ("T's modulation of the photo's latent" if chosen == "modulate" else
                   "M's latent mixed into the photo's" if chosen == "mix" else
                   "CLIP-guided optimisation with an identity term (training-free)")
        if method is None and chosen == "guided":
            message += (": the MM2Latent engine is untrained here" if self.engine == "mm2latent" else
                        ": T is untrained here, so its modulation would not change the photo")
        reference = image_to_tensor(inversion.aligned) if inversion is not None else None
        clip_losses: list[dict[str, float]] = []
        mapped_inputs: list[str] | None = None
        if chosen == "guided":
            steps = DEFAULT_GUIDED_STEPS if clip_steps is None else clip_steps
            latent, clip_losses, layer_index = self._guided_edit(
                w_real, inversion, prompt, mask, strength, layers, steps, id_weight, reference, progress, callback)
        else:
            if self.engine == "mm2latent" and chosen == "mix":
                message = "the MM2Latent mapper's latent mixed into the photo's"
                mapper_mask, mapper_scribble = self.photo_conditions(inversion, prompt, mask, scribble)
            else:
                mapper_mask, mapper_scribble = mask, scribble
            edit = self.edit_latent(w_real, prompt, mapper_mask, mapper_scribble, seed, strength, layers, chosen)
            latent, layer_index = edit.latent, edit.layers
            if self.engine == "mm2latent":
                mapped_inputs = [n for n, v in (("mask", mapper_mask), ("scribble", mapper_scribble)) if v is not None]
            if clip_steps:
                refined = self._refine(latent, prompt, layers, clip_steps, id_weight, reference, progress, callback)
                latent, clip_losses = refined.latent, refined.losses
        images = self.render(latent)
        # The inversion already drew the reconstruction; only a bare latent needs rendering.
        reconstruction = (inversion.reconstruction if inversion is not None
                          else tensor_to_pil(self.render(w_real))[0])
        similarity = None
        if self.identity is not None:
            before = inversion.aligned if inversion is not None else reconstruction
            similarity = identity_similarity(self.identity, before, images.float())
        settings = {"prompt": (prompt or "").strip(), "seed": int(seed), "strength": float(strength),
                    "layers": layers if isinstance(layers, str) else list(layer_index), "method": chosen,
                    "clip_steps": int(clip_steps or 0) if chosen != "guided" else len(clip_losses),
                    "inputs": [n for n, v in (("mask", mask), ("scribble", scribble)) if v is not None],
                    "model": self.name, "engine": self.engine}
        if mapped_inputs is not None:  # what the MM2Latent mapper read: edited inputs or the photo's own
            settings["mapped_inputs"] = mapped_inputs
        return EditResult(tensor_to_pil(images[:1])[0], latent.float().cpu(), similarity, reconstruction, settings,
                          clip_losses, message=message)

    def photo_conditions(self, inversion: InversionResult | None, prompt: str | None, mask=None,
                         scribble=None) -> tuple[Any, Any]:
        """(mask, sketch) an MM2Latent edit maps: the edited ones where given, else the photo's own.

        MM2Latent edits a photo by mapping the new text with the photo's mask and sketch codes (or an edited
        mask / sketch in their place), so what the user did not change keeps the photo's layout: the photo's
        parsed mask (``inversion.mask``) and the edge sketch of the aligned photo. A bare latent has neither.

        Raises:
            EmptyPromptError: no new text and no edited mask or sketch (nothing to edit).
        """
        if not (prompt or "").strip() and mask is None and scribble is None:
            raise EmptyPromptError("describe the change, or edit the mask or the sketch")
        if inversion is None:
            return mask, scribble
        if mask is None and inversion.mask is not None:
            mask = inversion.mask
        if scribble is None:
            size = self.mm2latent_engine.sketch_autoencoder.image_size
            scribble = scribble_from_photo(inversion.aligned, size=max(size, EDGE_MIN_SIZE)).astype(np.uint8) * 255
        return mask, scribble

    def _refine(self, latent, prompt, layers, steps, id_weight, reference, progress, callback, mask_ids=None):
        if self.clip is None and (prompt or "").strip():
            raise InvalidSettingError("this model has no CLIP network; CLIP-guided refinement is unavailable")
        with self.lock:
            return clip_refine(self.generator, latent, prompt or "", self.clip, steps, identity_net=self.identity,
                               id_weight=id_weight, layers=layers, reference=reference,
                               progress=self._progress(progress), callback=callback,
                               face_parser=self.face_parser if mask_ids is not None else None, mask_ids=mask_ids)

    def _guided_edit(self, w_real, inversion, prompt, mask, strength, layers, steps, id_weight, reference, progress,
                     callback):
        """The training-free edit: optimise toward the text and a repainted mask, then blend by ``strength``."""
        strength = check_strength(strength)
        index = check_layers(layers, w_real.shape[1])
        mask_ids = None
        if mask is not None and self.face_parser is not None:
            ids = parse_mask(mask, size=PARSER_MASK_SIZE)
            unchanged = inversion is not None and inversion.mask is not None and np.array_equal(
                ids, parse_mask(inversion.mask, size=PARSER_MASK_SIZE))
            if not unchanged:  # the photo's own mask adds nothing to aim for
                mask_ids = torch.from_numpy(ids.astype(np.int64))[None]
        if not (prompt or "").strip() and mask_ids is None:
            raise EmptyPromptError("describe the change, or repaint the mask")
        refined = self._refine(w_real, prompt, layers, steps, id_weight, reference, progress, callback, mask_ids)
        start = w_real.float().cpu()
        return start + strength * (refined.latent - start), refined.losses, index

    def _progress(self, progress: bool | None) -> bool:
        return self.show_progress if progress is None else progress


class FaceEditPipeline:
    """The name of a pipeline with its editing components (kept for code and docs that use it).

    ``FaceEditPipeline.from_pretrained(name, ...)`` returns ``FacePipeline.from_pretrained(name, ..., editing=True)``
    (the engine's class, with the editing components the preset or manifest has); ``FaceEditPipeline(pipe,
    inverter=..., face_parser=..., identity=..., lpips=..., clip=...)`` returns ``pipe.from_pipe(pipe, ...)``: a
    pipeline sharing ``pipe``'s networks with those components added. Either way the object is the engine's own
    pipeline class: there is one pipeline API.
    """

    def __new__(cls, generation: FacePipelineBase, **editing) -> FacePipelineBase:  # type: ignore[misc]
        return generation.from_pipe(generation, **editing)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "tiny", **options) -> FacePipelineBase:
        """``FacePipelineBase.from_pretrained(name_or_path, editing=True, **options)``."""
        return FacePipelineBase.from_pretrained(name_or_path, editing=True, **options)
