"""``FaceEditPipeline``: real-photo editing composed on a :class:`~mm2latent.pipelines.generation.FacePipeline`.

It holds the generation pipeline (E, M, T, G) and the networks only editing needs — the photo inverter
(pSp / e4e), the face parser, the identity network, LPIPS and CLIP — so generating faces never loads or
imports editing code. Editing = align + invert the photo (:meth:`FaceEditPipeline.invert`), then apply T's
modulation (or M's latent) from a text and an edited mask (:meth:`FaceEditPipeline.edit`, METHOD.md). Calling
the edit pipeline like the generation pipeline (``editor(prompt, mask=...)``) generates, so one object serves
a Space with both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..editing.clip import ClipGuide
from ..editing.inversion import InversionResult, invert
from ..editing.methods import (
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
from ..inputs.images import image_to_tensor, tensor_to_pil
from .components import COMPONENTS, load_components, save_components, write_manifest
from .generation import PRESETS, FacePipeline, FacePipelineOutput
from .request import check_seed

__all__ = ["EDITING_COMPONENTS", "FaceEditPipeline"]

#: The editing networks, in manifest order (all optional).
EDITING_COMPONENTS = tuple(name for name, kind in COMPONENTS.items() if kind.pipeline == "editing")


class FaceEditPipeline:
    """Edit real photos with text and masks, on top of a generation pipeline.

    Args:
        generation: the pipeline whose E, M, T and G the edits use.
        inverter: the photo -> W+ encoder (pSp / e4e); without it photos cannot be inverted.
        face_parser: BiSeNet, for the photo's own mask.
        identity: ArcFace IR-SE50, for the identity score and the CLIP refinement's identity term.
        lpips: LPIPS, for the inversion's refinement.
        clip: a :class:`~mm2latent.editing.clip.ClipGuide`, for text-guided refinement.
    """

    def __init__(
        self,
        generation: FacePipeline,
        inverter: nn.Module | None = None,
        face_parser: nn.Module | None = None,
        identity: nn.Module | None = None,
        lpips: nn.Module | None = None,
        clip: ClipGuide | None = None,
    ):
        self.generation = generation
        self.inverter, self.face_parser, self.identity, self.lpips, self.clip = (
            inverter, face_parser, identity, lpips, clip)
        for module in (inverter, face_parser, identity, lpips):
            if module is not None:
                module.eval().requires_grad_(False)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "tiny",
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        load_vae: bool = True,
    ) -> FaceEditPipeline:
        """Load the generation pipeline and the editing networks the manifest names (arguments as
        :meth:`FacePipeline.from_pretrained`; ``"tiny"`` adds toy editing networks)."""
        generation = FacePipeline.from_pretrained(name_or_path, revision=revision, device=device, dtype=dtype,
                                                  load_vae=load_vae)
        if str(name_or_path) in PRESETS:
            from .presets import build_tiny_editing_components

            parts = build_tiny_editing_components(generation.generator) if str(name_or_path) == "tiny" else {}
        else:
            _, parts = load_components(name_or_path, revision, pipeline="editing")
        return cls(generation, **parts).to(generation.device, generation.dtype)

    def components(self) -> dict[str, Any]:
        """Every network by manifest name: the generation pipeline's and the editing ones that are loaded."""
        editing = {name: getattr(self, name) for name in EDITING_COMPONENTS if getattr(self, name) is not None}
        return {**self.generation.components(), **editing}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write every component and one manifest naming them all."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        entries = save_components(self.components(), root)
        write_manifest(root, entries, {"trained": self.trained, "source": self.name})
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FaceEditPipeline:
        """Move every network (in place; returns self)."""
        self.generation.to(device, dtype)
        for name in EDITING_COMPONENTS:
            part = getattr(self, name)
            if part is not None:
                part.to(device=device, dtype=dtype)
        return self

    @property
    def name(self) -> str:
        return self.generation.name

    @property
    def trained(self) -> bool:
        return self.generation.trained

    @property
    def device(self) -> torch.device:
        return self.generation.device

    @property
    def generator(self):
        return self.generation.generator

    def __call__(self, *args, **kwargs) -> FacePipelineOutput:
        """Generate faces: the same call as :meth:`FacePipeline.__call__`."""
        return self.generation(*args, **kwargs)

    # ------------------------------------------------------------------ 1. invert
    def invert(self, photo: Any, refine_steps: int = 0, progress: bool | None = None,
               callback: Callable[[int, float], None] | None = None) -> InversionResult:
        """Align a photo FFHQ-style, invert it to W+ (optionally refined by optimisation), parse its mask.

        Args:
            photo: path, PIL image or array of a photo with one clearly visible face.
            refine_steps: L2 + LPIPS optimisation steps after the encoder (0 = encoder only).
            progress: tqdm bar for the refinement (default: the generation pipeline's setting).
            callback: (step, loss) after each refinement step.

        Returns an :class:`~mm2latent.editing.inversion.InversionResult` (latent [1, L, D], reconstruction,
        aligned photo, mask ids, messages).
        """
        if self.inverter is None:
            raise InvalidSettingError("this model has no photo encoder (inverter); photo editing is unavailable")
        with self.generation.lock:
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
            method: "modulate" (T's γ, β on w_real) or "mix" (M's w^m mixed into the layers).
        """
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidSettingError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if not prompt and mask is None and scribble is None:
            raise EmptyPromptError("describe the change, or edit the mask or the sketch")
        seed = check_seed(seed)
        check_strength(strength)  # every setting is checked before the diffusion pass
        index = check_layers(layers, w_real.shape[1])
        if method not in METHODS:
            raise InvalidSettingError(f"the method must be one of {', '.join(METHODS)}, got {method!r}")
        pipe = self.generation
        controls, _ = pipe.prepare_conditions(mask, scribble)
        prediction = pipe.predict_latents(pipe.encode_prompts([prompt]), controls, pipe.prepare_noise([seed]))
        w_m, modulation = prediction.w_m[0].float(), prediction.modulation(0)
        w_real = w_real.to(w_m.device, torch.float32)
        w_edit = apply_edit(w_real, w_m, modulation, strength, layers, method)
        return LatentEdit(w_edit, prediction.latents.float(), w_m, modulation, index)

    # ------------------------------------------------------------------ 3. the whole edit
    def edit(
        self,
        latent_or_inversion: torch.Tensor | InversionResult,
        prompt: str | None = "",
        mask=None,
        scribble=None,
        strength: float = 1.0,
        layers: str | list[int] = "all",
        method: str = "modulate",
        seed: int = 0,
        clip_steps: int = 0,
        id_weight: float = 0.1,
        progress: bool | None = None,
        callback: Callable[[int, float], None] | None = None,
    ) -> EditResult:
        """Edit a real photo's latent with text and/or an edited mask or sketch (METHOD.md).

        Args:
            latent_or_inversion: :meth:`invert`'s result, or a W+ latent [1, L, D].
            prompt, mask, scribble, strength, layers, method, seed: as :meth:`edit_latent`.
            clip_steps: > 0 adds a text-only CLIP-guided refinement with an identity term.
            id_weight: weight of that identity term.
            progress: tqdm bar for the CLIP refinement (default: the generation pipeline's setting).
            callback: (step, loss) after each CLIP step.
        """
        inversion = latent_or_inversion if isinstance(latent_or_inversion, InversionResult) else None
        w_real = inversion.latent if inversion is not None else latent_or_inversion
        generator = self.generator
        if not isinstance(w_real, torch.Tensor) or w_real.ndim != 3 or w_real.shape[1:] != (
                generator.num_ws, generator.style_dim):
            shape = tuple(w_real.shape) if isinstance(w_real, torch.Tensor) else type(w_real).__name__
            raise InvalidSettingError(f"the latent must be [1, {generator.num_ws}, {generator.style_dim}], got {shape}")
        edit = self.edit_latent(w_real, prompt, mask, scribble, seed, strength, layers, method)
        latent, clip_losses = edit.latent, []
        if clip_steps:
            if self.clip is None:
                raise InvalidSettingError("this model has no CLIP network; CLIP-guided refinement is unavailable")
            reference = image_to_tensor(inversion.aligned) if inversion is not None else None
            with self.generation.lock:
                refined = clip_refine(generator, latent, prompt or "", self.clip, clip_steps, identity_net=self.identity,
                                      id_weight=id_weight, layers=layers, reference=reference,
                                      progress=self._progress(progress), callback=callback)
            latent, clip_losses = refined.latent, refined.losses
        images = self.generation.render(latent)
        # The inversion already drew the reconstruction; only a bare latent needs rendering.
        reconstruction = (inversion.reconstruction if inversion is not None
                          else tensor_to_pil(self.generation.render(w_real))[0])
        similarity = None
        if self.identity is not None:
            before = inversion.aligned if inversion is not None else reconstruction
            similarity = identity_similarity(self.identity, before, images.float())
        settings = {"prompt": (prompt or "").strip(), "seed": int(seed), "strength": float(strength),
                    "layers": layers if isinstance(layers, str) else list(edit.layers), "method": method,
                    "clip_steps": int(clip_steps), "inputs": [n for n, v in (("mask", mask), ("scribble", scribble))
                                                              if v is not None], "model": self.name}
        return EditResult(tensor_to_pil(images[:1])[0], latent.float().cpu(), similarity, reconstruction, settings,
                          clip_losses)

    def _progress(self, progress: bool | None) -> bool:
        return self.generation.show_progress if progress is None else progress
