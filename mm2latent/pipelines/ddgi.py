"""``FacePipeline``: the DDGI engine — text + mask/scribble -> diffusion features -> M and T -> W+ -> the GAN's face.

The method is written once, as public stages that every caller composes (``__call__``, batched requests,
photo editing, the benchmark, training):

1. :meth:`FacePipeline.prepare_conditions` — mask / scribble -> ControlNet images;
2. :meth:`FacePipeline.encode_prompts` — prompts -> CLIP embeddings (batched, cached);
3. :meth:`FacePipeline.prepare_noise` — seeds -> initial latents z_T;
4. :meth:`FacePipeline.predict_latents` — one U-Net(+ControlNet) pass per feature step, then M and T:
   w = w^m ⊙ w^γ + w^β (:meth:`FacePipeline.latents_from_features` on given features);
5. :meth:`~mm2latent.pipelines.base.FacePipelineBase.render` — truncation and the generator.

The diffusion model's own drawing I^d_0 (the training-free mode's stage 4, training's target) is
:meth:`FacePipeline.draw`. Both it and stage 4 run the pipeline's denoising loop, :meth:`FacePipeline.denoise`
(any diffusers scheduler, a per-step ``callback_on_step_end``; :mod:`.sampling`).

``FacePipeline.from_pretrained`` is the entry point of every engine: it returns the class the preset or manifest
names (see :meth:`~mm2latent.pipelines.base.FacePipelineBase.from_pretrained`).

Why this module is just over 600 lines: it is one class, the DDGI engine's numbered stages plus the denoising
loop and the training-free mode that compose them; the loop's scheduler plumbing is in :mod:`.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import SchedulerMixin
from PIL import Image
from torch.profiler import record_function
from tqdm.auto import tqdm

from ..editing.closeness import measure_closeness
from ..editing.drawing_alignment import align_drawing
from ..editing.inversion import encode_images, refine_latent
from ..errors import InvalidSettingError, InvalidStepsError, UnsupportedConditionError
from ..inputs.conditions import mask_to_color, parse_mask, parse_scribble
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..inputs.templates import mask_edges
from ..models.diffusion_encoder import MODALITIES, DiffusionEncoder, EncoderFeatures, PromptBatch
from ..models.few_step import FewStepLoRA, make_scheduler, step_generators
from ..models.generator import Generator
from ..models.mapping import MappingNetwork, Modulation, StyleModulationNetwork, word_attention_maps
from .base import FacePipelineBase, movable, parse_visual_inputs
from .components import EDITING_COMPONENTS
from .editing import MASK_AS_SCRIBBLE_WIDTH, REFINE_LR, REFINE_MASK_WEIGHT, REFINE_W_REG, PhotoEditingMixin
from .outputs import DiffusionDrawing, FacePipelineOutput, LatentPrediction, word_maps
from .request import COMBINE, GenerationRequest
from .sampling import (
    DEFAULT_STEP_TENSORS,
    STOP,
    DenoisingOutput,
    StepCallback,
    check_step_tensors,
    predicted_clean_latents,
    schedule_timesteps,
    step_kwargs,
)

__all__ = ["FacePipeline", "combine_steps"]


def combine_steps(step_latents: torch.Tensor, combine: str = "mean") -> torch.Tensor:
    """[S, B, L, D] per-step latents -> [B, L, D].

    ``mean`` averages the steps. ``coarse-to-fine`` gives layer l the step ⌊l·S/L⌋: early, text-heavy
    steps feed the coarse layers, late, structure-heavy steps the fine ones.
    """
    if combine not in COMBINE:
        raise InvalidSettingError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    if combine == "mean":
        return step_latents.mean(dim=0)
    steps, _, layers, _ = step_latents.shape
    pick = torch.arange(layers) * steps // layers
    return step_latents[pick, :, torch.arange(layers)].permute(1, 0, 2)


class FacePipeline(PhotoEditingMixin, FacePipelineBase):
    """The DDGI engine: text + mask/scribble -> diffusion features -> M and T -> W+ -> G (``engine = "ddgi"``).

    ``FacePipeline.from_pretrained`` is also the entry point of every engine: it returns the class the preset or
    manifest names (see :meth:`FacePipelineBase.from_pretrained`). With an inverter among its editing components
    it also runs the training-free mode (``mode="invert"``, :meth:`draw_and_invert`) and edits photos
    (:class:`~mm2latent.pipelines.editing.PhotoEditingMixin`).

    Args:
        encoder: the frozen diffusion encoder E (U-Net, ControlNets, text encoder, VAE, scheduler).
        generator: the frozen GAN G (any :class:`~mm2latent.models.generator.Generator`: StyleGAN2, EG3D).
        mapper: the mapping network M.
        modulator: the style modulation network T (AbSMNet).
        trained: whether M and T carry trained weights (False for the tiny preset and fresh models).
        name: where the pipeline was loaded from (for messages and metadata).
        editing: the optional editing components (``inverter``, ``face_parser``, ``identity``, ``lpips``,
            ``clip``; see :class:`~mm2latent.pipelines.base.FacePipelineBase`).
    """

    engine = "ddgi"
    can_invert = True

    def __init__(
        self,
        encoder: DiffusionEncoder,
        generator: Generator,
        mapper: MappingNetwork,
        modulator: StyleModulationNetwork,
        trained: bool = False,
        name: str = "custom",
        **editing,
    ):
        if mapper.num_ws != generator.num_ws or mapper.style_dim != generator.style_dim:
            raise ValueError(f"M outputs {mapper.num_ws}x{mapper.style_dim} latents but G expects "
                             f"{generator.num_ws}x{generator.style_dim}")
        super().__init__(generator, trained, name, **editing)
        self.encoder, self.mapper, self.modulator = encoder, mapper, modulator
        for module in (mapper, modulator):
            module.requires_grad_(False).eval()

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> FacePipeline:
        """Assemble a pipeline from loaded manifest components ({"unet": ..., "mapper": ..., ...}; editing ones
        optional)."""
        encoder = DiffusionEncoder(
            unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"], vae=parts.get("vae"),
            controlnets={m: parts[f"controlnet_{m}"] for m in MODALITIES if f"controlnet_{m}" in parts},
        )
        editing = {name: parts[name] for name in EDITING_COMPONENTS if name in parts}
        return cls(encoder=encoder, generator=parts["generator"], mapper=parts["mapper"],
                   modulator=parts["modulator"], trained=trained, name=name, **editing)

    def engine_components(self) -> dict:
        """The engine's networks by manifest name (parts not loaded yet appear as their lazy loaders)."""
        return {**self.encoder.parts(), "tokenizer": self.encoder.tokenizer, "scheduler": self.encoder.make_scheduler(),
                "generator": self.generator, "mapper": self.mapper, "modulator": self.modulator}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FacePipeline:
        """Move every network to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        # The encoder moves its own parts (and remembers where lazily loaded ones go): diffusers warns when
        # its models are cast one by one.
        self.encoder.to(device=device, dtype=dtype)
        inside = {id(part) for part in self.encoder.parts().values()}
        for part in self.components().values():
            if movable(part) and id(part) not in inside:
                part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def modalities(self) -> list[str]:
        """Visual inputs this model has a ControlNet for."""
        return self.encoder.modalities

    # ------------------------------------------------------------------ 1. conditions
    def check_request(self, request: GenerationRequest) -> None:
        """What depends on the loaded model: a ControlNet for each visual input, a VAE for the preview, an inverter
        for invert mode."""
        wanted = request.inputs
        if request.mode == "invert":
            if self.inverter is None:
                raise UnsupportedConditionError(
                    "mode='invert' (training-free) needs the photo inverter: load the pipeline with its editing "
                    "components (FacePipeline.from_pretrained(..., editing=True), or FaceEditPipeline.from_pretrained"
                    "(...)), or use mode='fast' / 'quality' with trained M and T")
            if "mask" in wanted and "mask" not in self.modalities and "scribble" in self.modalities:
                wanted = sorted(set(wanted) - {"mask"} | {"scribble"})  # as its class boundaries (draw_and_invert)
        if len(wanted) == 2 and not all(m in self.modalities for m in wanted):
            raise UnsupportedConditionError(
                f"both a mask and a scribble were given, but this model has only a {self.modalities[0]} "
                "ControlNet: pass one of them")
        for name in wanted:
            if name not in self.modalities:
                available = ", ".join(self.modalities) or "none"
                raise UnsupportedConditionError(f"this model has no ControlNet for a {name} (available: {available})")
        if (request.return_diffusion_image or request.mode == "invert") and not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        self.resolve_render_kwargs(request.render_kwargs, [request.num_images])

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Visual inputs, mode, steps, guidance, preview, noise mode and rendering options."""
        return (tuple(request.inputs), request.mode, request.sampling_steps, request.feature_steps, request.combine,
                request.guidance_scale, request.return_diffusion_image, request.noise_mode,
                repr(sorted(request.render_kwargs.items())))

    def prepare_conditions(self, mask=None, scribble=None) -> tuple[dict[str, torch.Tensor], dict[str, Image.Image]]:
        """Stage 1: user inputs -> ControlNet images ([1, 3, H, W] in [0, 1]) and their previews.

        Args:
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map), or None.
            scribble: a sketch (white-on-black or black-on-white), or None. A sketch without strokes is
                ignored with a warning.
        """
        self.check_request(GenerationRequest(mask=mask, scribble=scribble))
        with record_function("mm2latent.prepare_conditions"):
            _, _, previews = parse_visual_inputs(mask, scribble, self.encoder.image_size)
            controls = {
                name: torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                .to(self.device, self.dtype)
                for name, image in previews.items()
            }
        return controls, previews

    # ------------------------------------------------------------------ 2. text
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Stage 2: CLIP embeddings and word masks of one prompt per sample (cached, new ones batched)."""
        with record_function("mm2latent.encode_prompts"):
            return PromptBatch.stack(self.encoder.encode_prompts(list(prompts)))

    # ------------------------------------------------------------------ 3. noise
    def prepare_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Stage 3: seeded initial latents z_T, one seed per sample, drawn on the CPU so every device agrees."""
        with record_function("mm2latent.prepare_noise"):
            return self.encoder.initial_noise(list(seeds))

    # ------------------------------------------------------------------ 4. latents
    def latents_from_features(
        self,
        features: EncoderFeatures,
        word_mask: torch.Tensor,
        mapper: torch.nn.Module | None = None,
        modulator: torch.nn.Module | None | bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, Modulation | None]:
        """M and T on one step's features: (w, w^m, modulation) with w = w^m ⊙ w^γ + w^β.

        Args:
            features: one U-Net pass's features (batch B).
            word_mask: [B, 77] word-token mask of the prompts.
            mapper: M to use (default the pipeline's; training passes the module it optimises).
            modulator: T to use (True: the pipeline's; None: T at identity, w = w^m, as in stage 1).
        """
        mapper = self.mapper if mapper is None else mapper
        modulator = self.modulator if modulator is True else modulator
        mapper_dtype = next(mapper.parameters()).dtype
        w_m = mapper(features.h.to(mapper_dtype), self.generator.latent_avg)
        if modulator is None:
            return w_m, w_m, None
        modulation = modulator(features, word_mask.expand(features.h.shape[0], -1))
        return w_m * modulation.gamma + modulation.beta, w_m, modulation

    @torch.no_grad()
    def predict_latents(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 1,
        feature_steps: Sequence[int] = (0,),
        combine: str = "mean",
        guidance_scale: float = 1.0,
        decode: bool = False,
        return_attention: bool = False,
        return_features: bool = False,
    ) -> LatentPrediction:
        """Stage 4: the encoder's features at the feature steps, then M and T.

        Args:
            prompts: stage 2's output, one row per sample (B).
            controls: modality -> [B or 1, 3, H, W] ControlNet images (stage 1; a single row is broadcast).
            noise: [B, 4, h, w] initial latents (stage 3).
            num_steps: DDIM steps of the schedule (1 = fast mode: one pass at t = T).
            feature_steps: the step indices whose features feed the latent.
            combine: how per-step latents merge ("mean" or "coarse-to-fine").
            guidance_scale: classifier-free guidance of the denoising (> 1 runs the unconditional pass too).
            decode: also denoise to the end and decode I^d_0.
            return_attention: also return the per-token attention maps (averaged over the steps).
            return_features: also return the encoder's features.
        """
        if not feature_steps:
            raise InvalidStepsError("feature steps must name at least one step")
        with self.lock, record_function("mm2latent.predict_latents"):
            denoised = self.denoise(prompts, controls, noise, num_steps=num_steps, guidance_scale=guidance_scale,
                                    feature_steps=feature_steps, run_to_end=decode)
            per_step = [self.latents_from_features(f, prompts.word_mask) for f in denoised.features]
            images = self.decode(denoised.latents) if decode else None
        step_latents = torch.stack([w for w, _, _ in per_step])
        token_maps = None
        if return_attention:
            size = self.modulator.feature_size
            token_maps = torch.stack([word_attention_maps(f.attn_probs, size) for f in denoised.features]).mean(dim=0)
            token_maps = token_maps.float().cpu()
        return LatentPrediction(
            latents=combine_steps(step_latents, combine),
            step_latents=step_latents,
            w_m=torch.stack([w_m for _, w_m, _ in per_step]),
            gamma=torch.stack([m.gamma for _, _, m in per_step]),
            beta=torch.stack([m.beta for _, _, m in per_step]),
            attention=torch.stack([m.attention for _, _, m in per_step]),
            timesteps=denoised.timesteps,
            token_maps=token_maps,
            features=denoised.features if return_features else None,
            diffusion_images=images,
        )

    @torch.no_grad()
    def denoise(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        feature_steps: Sequence[int] = (),
        run_to_end: bool = True,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = DEFAULT_STEP_TENSORS,
    ) -> DenoisingOutput:
        """The denoising loop that stage 4 (:meth:`predict_latents`) and the drawing (:meth:`draw`) share.

        Runs the scheduler's steps from seeded noise (or from ``init_latents`` noised to t ≈ ``strength``·T),
        one U-Net(+ControlNet) pass each, the unconditional pass batched with the conditional one when
        ``guidance_scale > 1``; the passes at ``feature_steps`` record the encoder's features. Without
        ``run_to_end`` it stops after the last feature step's pass (fast mode: one pass at t = T).

        Args:
            prompts, controls, noise: stages 2, 1 (a single row is broadcast) and 3; B samples.
            num_steps: steps of the schedule (1..1000).
            guidance_scale: classifier-free guidance (<= 1: off, no unconditional pass).
            feature_steps: indices, into the steps that run, of the passes whose features are recorded.
            run_to_end: denoise through the last step (else stop after the last feature step's pass).
            init_latents: [B, 4, h, w] clean VAE latents to start from (img2img), or None.
            strength: how far ``init_latents`` are noised (1 = pure noise); only the last
                ``round(strength·num_steps)`` steps of the schedule run.
            scheduler: any diffusers scheduler (e.g. ``LCMScheduler`` for an LCM-LoRA); default a fresh DDIM of
                the model's config. It is configured in place (``set_timesteps``): give each thread its own.
            generator: random source of schedulers that add noise in their step (LCM).
            callback_on_step_end: ``callback(pipe, step_index, timestep, state) -> dict | None`` after each
                scheduler step (see :mod:`~mm2latent.pipelines.sampling`): a returned ``"latents"`` replaces the
                latents, ``{"stop": True}`` ends the loop after this step.
            callback_on_step_end_tensor_inputs: the tensors ``state`` carries (of
                :data:`~mm2latent.pipelines.sampling.STEP_TENSORS`).

        Raises:
            InvalidStepsError: bad ``num_steps``, ``strength`` or feature step indices.
            UnsupportedConditionError: a visual input there is no ControlNet for.
        """
        # 1. check inputs
        batch = noise.shape[0]
        assert len(prompts) == batch, f"{len(prompts)} prompts for {batch} noise samples"
        tensor_inputs = check_step_tensors(callback_on_step_end_tensor_inputs)
        controls = {k: v.expand(batch, -1, -1, -1) if v.shape[0] == 1 else v for k, v in controls.items()}
        self.encoder.check_controls(controls)
        # 2. text: guidance runs the unconditional prompt as the first half of one batch
        use_guidance = guidance_scale > 1.0
        embeds = prompts.embeds
        if use_guidance:
            embeds = torch.cat([self.encode_prompts([""] * batch).embeds, embeds])
            controls = {k: torch.cat([v, v]) for k, v in controls.items()}
        conditional = slice(batch, None) if use_guidance else slice(None)
        # 3. timesteps
        scheduler = self.encoder.make_scheduler() if scheduler is None else scheduler
        timesteps = schedule_timesteps(scheduler, num_steps, strength, self.device, init_latents is not None)
        capture = sorted(set(feature_steps))
        if (capture and (capture[0] < 0 or capture[-1] >= len(timesteps))) or (not capture and not run_to_end):
            raise InvalidStepsError(f"feature steps must be indices in [0, {len(timesteps) - 1}] of the "
                                    f"{len(timesteps)} steps that run, got {list(feature_steps)}")
        last = len(timesteps) - 1 if run_to_end else capture[-1]
        # 4. initial latents
        if init_latents is not None and strength < 1.0:
            latents = scheduler.add_noise(init_latents.to(noise.dtype), noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * scheduler.init_noise_sigma
        # 5. the loop
        out = DenoisingOutput(latents=latents)
        extra = step_kwargs(scheduler, generator)
        steps = timesteps[: last + 1]
        with self.lock:
            for i, t in enumerate(tqdm(steps, desc="diffusion encoder", leave=False,
                                       disable=not (self.show_progress and len(steps) > 1))):
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if use_guidance else latents, t)
                if i in capture:
                    features, noise_pred = self.encoder.extract(model_input, t, embeds, controls, rows=conditional)
                    out.features.append(features)
                    out.timesteps.append(int(t))
                else:
                    noise_pred, _ = self.encoder.predict_noise(model_input, t, embeds, controls)
                out.steps_run.append(int(t))
                if i == last and not run_to_end:
                    break
                if use_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                stepped = scheduler.step(noise_pred, t, latents, **extra)
                latents = stepped.prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "pred_original_sample": predicted_clean_latents(stepped),
                               "noise_pred": noise_pred}
                    state = {"num_steps": len(timesteps), **{name: tensors[name] for name in tensor_inputs}}
                    returned = callback_on_step_end(self, i, int(t), state) or {}
                    latents = returned.get("latents", latents)
                    if returned.get(STOP):
                        out.stopped = True
                        break
        out.latents = latents
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode clean latents [B, 4, h, w] to images [B, 3, H, W] in [-1, 1]."""
        if not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        return self.encoder.decode_latents(latents)

    @torch.no_grad()
    def draw(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 20,
        guidance_scale: float = 7.5,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        return_attention: bool = False,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = DEFAULT_STEP_TENSORS,
    ) -> DiffusionDrawing:
        """Stage 4 of the training-free mode (and stage 2's training target): I^d_0, what the diffusion model draws.

        Sampling with classifier-free guidance (the unconditional pass batched with the conditional one)
        from seeded noise, or from ``init_latents`` noised to t ≈ ``strength``·T, to the end; VAE-decoded.
        A callback sees every step (e.g. :func:`~mm2latent.pipelines.sampling.preview_callback` shows the
        drawing forming) and may stop the loop: the images are then the decoded latents after that step.

        Args:
            prompts, controls, noise: stages 2, 1 and 3.
            num_steps: steps of the schedule.
            guidance_scale: classifier-free guidance (<= 1: off, no unconditional pass).
            init_latents: [B, 4, h, w] clean VAE latents to start from (a training photo's), or None.
            strength: how far ``init_latents`` are noised (1 = pure noise).
            return_attention: also return the per-token attention maps of the first step.
            scheduler, generator, callback_on_step_end, callback_on_step_end_tensor_inputs: as :meth:`denoise`.
        """
        if not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        with self.lock, record_function("mm2latent.draw"):
            # 1-5. denoise to the end. The first pass records features (its attention maps are what
            # return_attention shows); it always does, so I^d_0 does not depend on return_attention.
            denoised = self.denoise(
                prompts, controls, noise, num_steps=num_steps, guidance_scale=guidance_scale, feature_steps=[0],
                init_latents=init_latents, strength=strength, scheduler=scheduler, generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
            # 6. decode
            images = self.decode(denoised.latents)
        token_maps = None
        if return_attention:
            token_maps = word_attention_maps(denoised.features[0].attn_probs, self.modulator.feature_size).float().cpu()
        return DiffusionDrawing(images=images, token_maps=token_maps, timesteps=denoised.timesteps,
                                latents=denoised.latents, stopped=denoised.stopped)

    # ------------------------------------------------------------------ the training-free mode
    def _diffusion_inputs(self, request: GenerationRequest) -> tuple[object, object, np.ndarray | None]:
        """(mask for a mask ControlNet, scribble for the scribble ControlNet, mask ids for the parser loss).

        Without a face-mask ControlNet (the public weights have none) a mask reaches the scribble ControlNet
        as the boundaries between its classes (``mask_edges``: what a person sketching that layout draws),
        joined with the user's own strokes; the mask itself still steers the refinement through the parser.
        """
        size = self.encoder.image_size
        ids = parse_mask(request.mask, size=size) if request.mask is not None else None
        if ids is None or "mask" in self.modalities:
            return request.mask, request.scribble, ids
        if "scribble" not in self.modalities:
            return request.mask, request.scribble, ids  # prepare_conditions explains what is missing
        strokes = mask_edges(ids, MASK_AS_SCRIBBLE_WIDTH)
        if request.scribble is not None:
            strokes = strokes | parse_scribble(request.scribble, size=size)
        return None, strokes.astype("uint8") * 255, ids

    #: The training-free mode's few-step drawing (LCM-LoRA), fused into the U-Net while "fast" drawings run and
    #: unfused before any other U-Net pass; None: only the "quality" drawing.
    few_step: FewStepLoRA | None = None

    @property
    def default_drawing(self) -> str:
        """The training-free mode's drawing: "fast" (4 LCM steps) with an LCM-LoRA loaded, else "quality"."""
        return "fast" if self.few_step is not None else "quality"

    def plain_unet(self) -> None:
        """Unfuse the few-step LoRA if it is fused (for a pass that needs SD-1.5's own U-Net)."""
        if self.few_step is not None:
            with self.lock:
                self.few_step.unfuse(self.encoder.unet)

    def _sampler(self, request: GenerationRequest, noise: torch.Tensor) -> dict:
        """The scheduler and step noise of the request's drawing, with the U-Net fused or unfused to match."""
        if request.drawing == "quality":
            self.plain_unet()
            return {}
        if self.few_step is None:
            raise InvalidSettingError("the fast drawing needs the LCM-LoRA (few_step), which this model has not "
                                      "loaded: use drawing='quality'")
        self.few_step.fuse(self.encoder.unet)
        return {"scheduler": make_scheduler(self.few_step.sampler, self.encoder.scheduler_config),
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

    @torch.no_grad()
    def draw_and_invert(self, request: GenerationRequest,
                        callback_on_step_end: StepCallback | None = None) -> FacePipelineOutput:
        """``mode="invert"``: I^d_0 from the diffusion model, the photo encoder's W+ of it, refinement.

        1. the diffusion model draws I^d_0 from the text and the visual input (:meth:`draw`; ``request.drawing``:
           "quality" = DDIM with classifier-free guidance, "fast" = LCM steps with the fused LCM-LoRA;
           ``callback_on_step_end`` watches and may stop it);
        2. the face in I^d_0 is put on the FFHQ template when it is off it (the mask is warped alike);
        3. the inverter maps I^d_0 to W+ (w0);
        4. ``request.refine_steps`` of Adam on L2 + LPIPS(G(w), I^d_0) [+ the face parser's cross-entropy of
           G(w) against the mask] [+ ‖w − w̄‖] (METHOD.md, training-free mode), early stop after
           ``request.refine_patience`` steps without improvement;
        5. truncation and G, as every mode (:meth:`render_requests`), and the closeness of G(w) to I^d_0.
        """
        self.check_request(request)
        mask, scribble, ids = self._diffusion_inputs(request)
        controls, previews = self.prepare_conditions(mask, scribble)
        if ids is not None:
            previews["mask"] = mask_to_color(ids)
        n = request.num_images
        prompts = self.encode_prompts([request.prompt] * n)
        noise = self.prepare_noise(request.seeds)
        with self.lock:  # the U-Net stays as the drawing needs it until the drawing is done
            drawing = self.draw(prompts, controls, noise, num_steps=request.num_steps,
                                guidance_scale=request.guidance_scale, return_attention=request.return_intermediates,
                                callback_on_step_end=callback_on_step_end, **self._sampler(request, noise))
        targets, mask_ids, notes = self.align_drawings(drawing.images, ids)
        with self.lock:
            latents = encode_images(self.inverter, targets, self.generator)
            losses: list[float] = []
            if request.refine_steps:
                refined = refine_latent(
                    self.generator, latents, targets, steps=request.refine_steps, lr=REFINE_LR, lpips=self.lpips,
                    patience=request.refine_patience, face_parser=self.face_parser, mask_ids=mask_ids,
                    mask_weight=REFINE_MASK_WEIGHT, w_reg_weight=REFINE_W_REG,
                    latent_avg=self.generator.latent_avg, progress=self.show_progress)
                latents, losses = refined.latent, refined.losses
        output = self.render_requests([request], latents.to(self.device), [previews])[0]
        output.timesteps = drawing.timesteps
        output.diffusion_images = tensor_to_pil(drawing.images)
        faces = torch.cat([image_to_tensor(image) for image in output.images])
        output.closeness = [c.as_dict() for c in measure_closeness(faces, targets, self.lpips, self.face_parser,
                                                                   mask_ids)]
        output.warnings.extend(dict.fromkeys(notes))
        if losses:
            output.settings["refine_loss"] = [losses[0], min(losses)]
        if drawing.stopped:
            output.warnings.append("The drawing was stopped early; the face is the inverter's answer to what was "
                                   "drawn so far.")
        if prompts.truncated[0]:
            output.warnings.append("The prompt is longer than the 77 tokens CLIP reads; only its first part was used.")
        if request.return_intermediates:
            output.attention_words = prompts.words[0]
            output.attention_maps = word_maps(drawing.token_maps, prompts.word_tokens[0])
        return output

    # ------------------------------------------------------------------ the whole call
    def _generate_group(self, requests: list[GenerationRequest],
                        callback_on_step_end: StepCallback | None = None) -> list[FacePipelineOutput]:
        if requests[0].mode == "invert":  # one at a time: the inverter and refinement run per request
            return [self.draw_and_invert(request, callback_on_step_end) for request in requests]
        self.plain_unet()  # M and T read SD-1.5's own features
        first = requests[0]
        prepared = [self.prepare_conditions(r.mask, r.scribble) for r in requests]
        counts = [r.num_images for r in requests]
        prompts = self.encode_prompts([r.prompt for r, n in zip(requests, counts) for _ in range(n)])
        controls = {kind: torch.cat([c[kind].expand(n, -1, -1, -1) for (c, _), n in zip(prepared, counts)])
                    for kind in prepared[0][0]}
        seeds = [s for r in requests for s in r.seeds]
        want_maps = any(r.return_intermediates for r in requests)
        prediction = self.predict_latents(
            prompts, controls, self.prepare_noise(seeds), num_steps=first.sampling_steps,
            feature_steps=first.feature_steps, combine=first.combine, guidance_scale=first.guidance_scale,
            decode=first.return_diffusion_image, return_attention=want_maps)
        outputs = self.render_requests(requests, prediction.latents, [previews for _, previews in prepared])
        start = 0
        for request, output, count in zip(requests, outputs, counts):
            rows = slice(start, start + count)
            output.timesteps = prediction.timesteps
            if prompts.truncated[start]:
                output.warnings.append("The prompt is longer than the 77 tokens CLIP reads; only its first part "
                                       "was used.")
            if request.return_intermediates:
                output.step_latents = prediction.step_latents[:, rows].float().cpu()
                output.attention_words = prompts.words[start]
                output.attention_maps = word_maps(prediction.token_maps[rows], prompts.word_tokens[start])
            if request.return_diffusion_image:
                output.diffusion_images = tensor_to_pil(prediction.diffusion_images[rows])
            start += count
        return outputs
