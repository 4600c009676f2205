"""``FaceEditPipeline``: real-photo editing composed on a :class:`~mm2latent.pipelines.generation.FacePipeline`.

It holds the generation pipeline (E, M, T, G) and the networks only editing needs — the photo inverter
(pSp / e4e), the face parser, the identity network, LPIPS and CLIP — so generating faces never loads or
imports editing code. Editing = align + invert the photo (:meth:`FaceEditPipeline.invert`), then apply T's
modulation (or M's latent) from a text and an edited mask (:meth:`FaceEditPipeline.edit`, METHOD.md). Calling
the edit pipeline like the generation pipeline (``editor(prompt, mask=...)``) generates, so one object serves
a Space with both; it also runs the training-free mode (``mode="invert"``, METHOD.md's Eq. 1 at inference:
the diffusion model draws I^d_0, the photo encoder inverts it, an optional optimisation refines it), which
needs no trained M or T — the default when M and T are untrained (the public preset).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..editing.clip import ClipGuide
from ..editing.closeness import DEFAULT_FAITHFULNESS, measure_closeness
from ..editing.drawing_alignment import align_drawing
from ..editing.inversion import InversionResult, encode_images, invert, refine_latent
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
from ..inputs.conditions import edges_from_photo, mask_to_color, parse_mask, parse_scribble
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..inputs.templates import mask_edges
from ..models.few_step import FewStepLoRA, make_scheduler, step_generators
from .components import COMPONENTS, load_components, save_components, write_manifest
from .generation import PRESETS, FacePipeline, FacePipelineOutput, word_maps
from .request import GenerationRequest, check_seed
from .sampling import StepCallback

#: Invert mode's optimisation: learning rate, the mask term's weight and the latent regulariser's (pSp's 0.005
#: is for training; refinement keeps w near the encoder's answer through few steps instead).
REFINE_LR = 0.01
REFINE_MASK_WEIGHT = 0.1
REFINE_W_REG = 0.0005
#: Line width, at the ControlNet's 512², of the class boundaries that stand in for a mask on a scribble ControlNet.
MASK_AS_SCRIBBLE_WIDTH = 3
#: Steps of the training-free "guided" edit when none are asked for.
DEFAULT_GUIDED_STEPS = 40
#: Smallest side edges_from_photo accepts (the photo's sketch for an MM2Latent edit is drawn at the autoencoder's).
EDGE_MIN_SIZE = 16
#: Side of the masks the guided edit compares (the mask editor's canvas and the photo's parsed mask).
PARSER_MASK_SIZE = 512

__all__ = ["EDITING_COMPONENTS", "FaceEditPipeline"]

#: Presets that come with toy editing networks (their generator is the tiny 2D StyleGAN2 the toy inverter fits).
TINY_EDITING_PRESETS = ("tiny", "tiny-mm2latent")
#: The editing networks, in manifest order (all optional).
EDITING_COMPONENTS = tuple(name for name, kind in COMPONENTS.items() if kind.pipeline == "editing")


class FaceEditPipeline:
    """Edit real photos with text and masks, on top of a generation pipeline.

    Args:
        generation: the pipeline whose engine and G the edits use (DDGI's E, M, T, or the MM2Latent engine).
        inverter: the photo -> W+ encoder (pSp / e4e); without it photos cannot be inverted.
        face_parser: BiSeNet, for the photo's own mask.
        identity: ArcFace IR-SE50, for the identity score and the CLIP refinement's identity term.
        lpips: LPIPS, for the inversion's refinement.
        clip: a :class:`~mm2latent.editing.clip.ClipGuide`, for text-guided refinement.
        few_step: a :class:`~mm2latent.models.few_step.FewStepLoRA` (LCM-LoRA), for the training-free mode's
            "fast" drawing of I^d_0 (fused into the U-Net on first use, unfused before any other U-Net pass).
    """

    def __init__(
        self,
        generation: FacePipeline,
        inverter: nn.Module | None = None,
        face_parser: nn.Module | None = None,
        identity: nn.Module | None = None,
        lpips: nn.Module | None = None,
        clip: ClipGuide | None = None,
        few_step: FewStepLoRA | None = None,
    ):
        self.generation = generation
        self.inverter, self.face_parser, self.identity, self.lpips, self.clip = (
            inverter, face_parser, identity, lpips, clip)
        self.few_step = few_step
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
        if str(name_or_path) in TINY_EDITING_PRESETS:
            from .presets import build_tiny_editing_components

            parts = build_tiny_editing_components(generation.generator)
        elif str(name_or_path) == "public":
            from .presets import public_manifest

            _, parts = load_components(public_manifest("editing"), pipeline="editing")
            parts["few_step"] = _public_few_step()
        elif str(name_or_path) in PRESETS:
            parts = {}
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
        self._plain_unet()  # the U-Net is saved without the few-step LoRA
        entries = save_components(self.components(), root)
        write_manifest(root, entries, {"trained": self.trained, "source": self.name}, engine=self.generation.engine)
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

    @property
    def engine(self) -> str:
        """The generation pipeline's engine: "ddgi" or "mm2latent"."""
        return self.generation.engine

    @property
    def default_mode(self) -> str:
        """"fast" with trained M and T; "invert" (training-free) when they are untrained and an inverter is loaded.

        Always "fast" with the MM2Latent engine (it has no diffusion model to draw I^d_0 with)."""
        if self.engine == "mm2latent":
            return "fast"
        return "fast" if self.trained or self.inverter is None else "invert"

    @property
    def default_drawing(self) -> str:
        """The training-free mode's drawing: "fast" (4 LCM steps) with an LCM-LoRA loaded, else "quality"."""
        return "fast" if self.few_step is not None else "quality"

    def __call__(
        self,
        prompt: str | None = None,
        mask=None,
        scribble=None,
        seed: int | None = None,
        mode: str | None = None,
        num_steps: int | None = None,
        feature_steps: list[int] | None = None,
        truncation: float = 1.0,
        num_images: int = 1,
        return_intermediates: bool = False,
        return_diffusion_image: bool = False,
        combine: str = "mean",
        guidance_scale: float | None = None,
        noise_mode: str = "const",
        refine_steps: int | None = None,
        callback_on_step_end: StepCallback | None = None,
        drawing: str | None = None,
        faithfulness: str | None = None,
        **render_kwargs,
    ) -> FacePipelineOutput:
        """Generate faces: :meth:`FacePipeline.__call__`'s arguments, plus the training-free mode.

        Args:
            mode: "fast", "quality" or "invert"; default :attr:`default_mode`.
            refine_steps: invert mode: optimisation steps after the encoder (L2 + LPIPS to I^d_0, the mask's
                cross-entropy through the face parser, a latent regulariser); 0 = the encoder's answer; None = the
                ``faithfulness`` budget.
            drawing: invert mode: "fast" (4 LCM steps, needs ``few_step``) or "quality" (20 DDIM steps with
                guidance); default :attr:`default_drawing`. It sets the defaults of ``num_steps`` and
                ``guidance_scale``.
            faithfulness: invert mode: a refinement budget of :data:`~mm2latent.editing.closeness.FAITHFULNESS`
                ("encoder", "balanced", "close"); default "balanced" unless ``refine_steps`` is given.
            guidance_scale: default the drawing's in invert mode (7.5 for "quality", 1 for "fast"), else 1.
            callback_on_step_end: invert mode: called after each step of the drawing of I^d_0 (see
                :meth:`FacePipeline.denoise`; :func:`~mm2latent.pipelines.sampling.preview_callback` shows it
                forming); ``{"stop": True}`` ends the drawing there and inverts what was drawn so far.
            (The other arguments as :meth:`FacePipeline.__call__`.)
        """
        mode = mode or self.default_mode
        if mode == "invert":
            drawing = drawing or self.default_drawing
            faithfulness = faithfulness or (DEFAULT_FAITHFULNESS if refine_steps is None else None)
        request = GenerationRequest.create(
            prompt, mask, scribble, seed, mode, num_steps, feature_steps, truncation, num_images,
            combine, guidance_scale, noise_mode, return_intermediates, return_diffusion_image, render_kwargs,
            refine_steps or 0, drawing=drawing, faithfulness=faithfulness)
        return self.generate(request, callback_on_step_end=callback_on_step_end)

    def generate(self, request: GenerationRequest,
                 callback_on_step_end: StepCallback | None = None) -> FacePipelineOutput:
        """Run one validated request (invert mode here, the others on the generation pipeline); the callback
        watches invert mode's drawing."""
        return self.generate_batch([request], callback_on_step_end=callback_on_step_end)[0]

    def generate_batch(self, requests: list[GenerationRequest],
                       callback_on_step_end: StepCallback | None = None) -> list[FacePipelineOutput]:
        """Several requests; fast / quality ones batched by :meth:`FacePipeline.generate_batch`; the callback
        watches the drawing of each invert-mode request."""
        results: list[FacePipelineOutput | None] = [None] * len(requests)
        others = [i for i, r in enumerate(requests) if r.mode != "invert"]
        if others:
            self._plain_unet()  # M and T read the plain U-Net's features
        for index, output in zip(others, self.generation.generate_batch([requests[i] for i in others])):
            results[index] = output
        for index, request in enumerate(requests):
            if request.mode == "invert":
                results[index] = self.draw_and_invert(request, callback_on_step_end=callback_on_step_end)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ the training-free mode
    def _diffusion_inputs(self, request: GenerationRequest) -> tuple[object, object, object]:
        """(mask for a mask ControlNet, scribble for the scribble ControlNet, mask ids for the parser loss).

        Without a face-mask ControlNet (the public weights have none) a mask reaches the scribble ControlNet
        as the boundaries between its classes (``mask_edges``: what a person sketching that layout draws),
        joined with the user's own strokes; the mask itself still steers the refinement through the parser.
        """
        pipe = self.generation
        size = pipe.encoder.image_size
        ids = parse_mask(request.mask, size=size) if request.mask is not None else None
        if ids is None or "mask" in pipe.modalities:
            return request.mask, request.scribble, ids
        if "scribble" not in pipe.modalities:
            return request.mask, request.scribble, ids  # prepare_conditions explains what is missing
        strokes = mask_edges(ids, MASK_AS_SCRIBBLE_WIDTH)
        if request.scribble is not None:
            strokes = strokes | parse_scribble(request.scribble, size=size)
        return None, strokes.astype("uint8") * 255, ids

    @torch.no_grad()
    def draw_and_invert(self, request: GenerationRequest,
                        callback_on_step_end: StepCallback | None = None) -> FacePipelineOutput:
        """``mode="invert"``: I^d_0 from the diffusion model, the photo encoder's W+ of it, optional refinement.

        1. the diffusion model draws I^d_0 from the text and the visual input (``request.drawing``: "quality" =
           DDIM with classifier-free guidance, "fast" = LCM steps with the fused LCM-LoRA);
        2. the face in I^d_0 is put on the FFHQ template when it is off it (the mask is warped alike);
        3. the inverter maps I^d_0 to W+ (w0);
        4. ``request.refine_steps`` of Adam on L2 + LPIPS(G(w), I^d_0) [+ the face parser's cross-entropy of
           G(w) against the mask] [+ ‖w − w̄‖] (METHOD.md, training-free mode), early stop after
           ``request.refine_patience`` steps without improvement;
        5. truncation and G, as every mode, and the closeness of G(w) to I^d_0 (``output.closeness``).

        ``callback_on_step_end`` watches (and may stop) step 1, as in :meth:`FacePipeline.denoise`.
        """
        if self.engine != "ddgi":
            raise InvalidSettingError(f"mode='invert' draws I^d_0 with the diffusion model; this model runs the "
                                      f"{self.engine} engine, which has none: use mode='fast'")
        if self.inverter is None:
            raise InvalidSettingError("mode='invert' needs a photo encoder (inverter); this model has none")
        pipe, generator = self.generation, self.generator
        mask, scribble, ids = self._diffusion_inputs(request)
        diffusion_request = GenerationRequest(prompt=request.prompt, mask=mask, scribble=scribble, mode="invert",
                                              return_diffusion_image=True)
        pipe.check_request(diffusion_request)
        controls, previews = pipe.prepare_conditions(mask, scribble)
        if ids is not None:
            previews["mask"] = mask_to_color(ids)
        n = request.num_images
        prompts = pipe.encode_prompts([request.prompt] * n)
        noise = pipe.prepare_noise(request.seeds)
        with pipe.lock:  # the U-Net stays as the drawing needs it until the drawing is done
            drawing = pipe.draw(prompts, controls, noise, num_steps=request.num_steps,
                                guidance_scale=request.guidance_scale, return_attention=request.return_intermediates,
                                callback_on_step_end=callback_on_step_end, **self._sampler(request, noise))
        targets, mask_ids, notes = self.align_drawings(drawing.images, ids)
        with pipe.lock:
            latents = encode_images(self.inverter, targets, generator)
            losses: list[float] = []
            if request.refine_steps:
                refined = refine_latent(
                    generator, latents, targets, steps=request.refine_steps, lr=REFINE_LR, lpips=self.lpips,
                    patience=request.refine_patience, face_parser=self.face_parser, mask_ids=mask_ids,
                    mask_weight=REFINE_MASK_WEIGHT, w_reg_weight=REFINE_W_REG, latent_avg=generator.latent_avg,
                    progress=pipe.show_progress)
                latents, losses = refined.latent, refined.losses
        truncated = generator.truncate(latents.to(pipe.device), request.truncation)
        rendered = pipe.render(truncated, 1.0, request.noise_mode, **request.render_kwargs)
        images = tensor_to_pil(rendered)
        settings = {**request.settings(), "inputs": sorted(previews), "model": self.name, "trained": self.trained}
        output = FacePipelineOutput(images=images, latents=truncated.float().cpu(), seeds=request.seeds,
                                    settings=settings, condition_images=previews, timesteps=drawing.timesteps,
                                    diffusion_images=tensor_to_pil(drawing.images))
        if losses:
            output.settings["refine_loss"] = [losses[0], min(losses)]
        output.closeness = [c.as_dict() for c in measure_closeness(rendered, targets, self.lpips, self.face_parser,
                                                                   mask_ids)]
        output.warnings.extend(dict.fromkeys(notes))
        if prompts.truncated[0]:
            output.warnings.append("The prompt is longer than the 77 tokens CLIP reads; only its first part was used.")
        if request.return_intermediates:
            output.attention_words = prompts.words[0]
            output.attention_maps = word_maps(drawing.token_maps, prompts.word_tokens[0])
        return output

    def _plain_unet(self) -> None:
        """Unfuse the few-step LoRA if it is fused (for a pass that needs SD-1.5's own U-Net)."""
        if self.few_step is not None:
            with self.generation.lock:
                self.few_step.unfuse(self.generation.encoder.unet)

    def _sampler(self, request: GenerationRequest, noise: torch.Tensor) -> dict:
        """The scheduler and step noise of the request's drawing, with the U-Net fused or unfused to match."""
        encoder = self.generation.encoder
        if request.drawing == "quality":
            self._plain_unet()
            return {}
        if self.few_step is None:
            raise InvalidSettingError("the fast drawing needs the LCM-LoRA (few_step), which this model has not "
                                      "loaded: use drawing='quality'")
        self.few_step.fuse(encoder.unet)
        return {"scheduler": make_scheduler(self.few_step.sampler, encoder.scheduler_config),
                "generator": step_generators(request.seeds, tuple(noise.shape[1:]))}

    def align_drawings(self, images: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Step 2 of the training-free mode: (what to invert [B, 3, H, W], the mask ids in its frame [B, h, w]
        or None, notes). A drawing already on the FFHQ template is used as drawn, bit for bit."""
        targets, masks, notes = [], [], []
        for image in images:
            aligned = align_drawing(tensor_to_pil(image[None])[0], ids)
            targets.append(image_to_tensor(aligned.image, image.shape[-1]).to(images) if aligned.moved else image[None])
            masks.append(aligned.mask_ids)
            notes += [m for m in aligned.messages if aligned.moved]
        mask_ids = None if ids is None else torch.from_numpy(np.stack(masks).astype(np.int64))
        return torch.cat(targets), mask_ids, notes

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
        pipe = self.generation
        if self.engine == "mm2latent":
            if method != "mix":
                raise InvalidSettingError("the MM2Latent engine has no modulation network T: use method='mix' (its "
                                          "mapper's latent blended into the chosen layers) or 'guided'")
            # The mapper is deterministic (no seed): the latent of (text, mask, sketch), blended in by apply_edit.
            codes, _ = pipe.prepare_conditions(mask, scribble)
            w_new = pipe.predict_latents(pipe.encode_prompts([prompt]), codes).float()
            w_edit = apply_edit(w_real.to(w_new.device, torch.float32), w_new, None, strength, layers, "mix")
            return LatentEdit(w_edit, w_new, w_new, None, index)
        controls, _ = pipe.prepare_conditions(mask, scribble)
        prediction = pipe.predict_latents(pipe.encode_prompts([prompt]), controls, pipe.prepare_noise([seed]))
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
            progress: tqdm bar for the optimisation (default: the generation pipeline's setting).
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
        images = self.generation.render(latent)
        # The inversion already drew the reconstruction; only a bare latent needs rendering.
        reconstruction = (inversion.reconstruction if inversion is not None
                          else tensor_to_pil(self.generation.render(w_real))[0])
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
            size = self.generation.mm2latent_engine.sketch_autoencoder.image_size
            scribble = edges_from_photo(inversion.aligned, size=max(size, EDGE_MIN_SIZE)).astype(np.uint8) * 255
        return mask, scribble

    def _refine(self, latent, prompt, layers, steps, id_weight, reference, progress, callback, mask_ids=None):
        if self.clip is None and (prompt or "").strip():
            raise InvalidSettingError("this model has no CLIP network; CLIP-guided refinement is unavailable")
        with self.generation.lock:
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
        return self.generation.show_progress if progress is None else progress


def _public_few_step() -> FewStepLoRA | None:
    """The published LCM-LoRA for the public preset's fast drawing (None, with a warning, when it cannot be read)."""
    import warnings

    from ..errors import WeightsNotFoundError

    try:
        return FewStepLoRA.from_pretrained()
    except WeightsNotFoundError as error:
        warnings.warn(f"the fast drawing is unavailable ({error}); the training-free mode draws with 20 DDIM steps",
                      stacklevel=3)
        return None
