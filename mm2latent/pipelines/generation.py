"""``FacePipeline``: text + mask/scribble -> diffusion features -> M and T -> W+ -> the GAN's face.

The method is written once, as public stages that every caller composes (``__call__``, batched requests,
photo editing, the benchmark, training):

1. :meth:`FacePipeline.prepare_conditions` — mask / scribble -> ControlNet images;
2. :meth:`FacePipeline.encode_prompts` — prompts -> CLIP embeddings (batched, cached);
3. :meth:`FacePipeline.prepare_noise` — seeds -> initial latents z_T;
4. :meth:`FacePipeline.predict_latents` — one U-Net(+ControlNet) pass per feature step, then M and T:
   w = w^m ⊙ w^γ + w^β (:meth:`FacePipeline.latents_from_features` on given features);
5. :meth:`FacePipeline.render` — truncation and the generator.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.profiler import record_function

from ..errors import InvalidSettingError, UnsupportedConditionError
from ..inputs.conditions import (
    mask_to_color,
    parse_mask,
    parse_scribble,
    scribble_is_empty,
    scribble_to_image,
)
from ..inputs.images import tensor_to_pil
from ..models.diffusion_encoder import MODALITIES, DiffusionEncoder, EncoderFeatures, PromptBatch
from ..models.generator import Generator
from ..models.mapping import MappingNetwork, Modulation, StyleModulationNetwork, word_attention_maps
from .components import load_components, save_components, write_manifest
from .request import COMBINE, MAX_IMAGES, MAX_SEED, MAX_STEPS, MODES, GenerationRequest

__all__ = [
    "COMBINE", "MAX_IMAGES", "MAX_SEED", "MAX_STEPS", "MODES", "PRESETS", "FacePipeline", "FacePipelineOutput",
    "GenerationRequest", "LatentPrediction", "resolve_dtype",
]

# Built-in presets: name -> builder in presets.py. "tiny" and "full-random" have deterministic random
# (untrained) weights; "public" gathers the public networks (untrained M and T: use the training-free mode).
PRESETS = {"tiny": "build_tiny_components", "full-random": "build_full_size_components",
           "public": "build_public_components"}


@dataclass
class FacePipelineOutput:
    """What one call returns.

    Attributes:
        images: the generated faces.
        latents: their W+ latents, [B, L, style_dim] (float32, CPU).
        seeds: the seed of each image (image i of a call with seed s uses s + i).
        settings: everything needed to reproduce the call (also written into PNG metadata).
        condition_images: the visual inputs as the model saw them ("mask" colour map, "scribble").
        step_latents: with ``return_intermediates``: w_t of each feature step, [S, B, L, D].
        timesteps: the diffusion timestep of each feature step.
        attention_words: with ``return_intermediates``: the prompt's words (sub-word pieces merged).
        attention_maps: per-word cross-attention maps Ā, [B, n_words, H, W], each scaled to peak 1.
        diffusion_images: with ``return_diffusion_image``: I^d_0, what the diffusion model itself draws.
        warnings: notes for the user (e.g. the prompt was truncated to what CLIP reads).
    """

    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    settings: dict
    condition_images: dict[str, Image.Image] = field(default_factory=dict)
    step_latents: torch.Tensor | None = None
    timesteps: list[int] = field(default_factory=list)
    attention_words: list[str] = field(default_factory=list)
    attention_maps: torch.Tensor | None = None
    diffusion_images: list[Image.Image] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class LatentPrediction:
    """Stage 4's output for a batch of B samples and S feature steps.

    Attributes:
        latents: the latent of each sample, the per-step latents combined, [B, L, D] (not truncated).
        step_latents: w_t = w^m_t ⊙ w^γ_t + w^β_t of each step, [S, B, L, D].
        w_m: M's latents w^m_t, [S, B, L, D].
        gamma: T's scales w^γ_t, [S, B, L, D].
        beta: T's shifts w^β_t, [S, B, L, D].
        attention: T's word-averaged attention Ā_t, [S, B, 1, H, W].
        timesteps: the diffusion timestep of each step.
        token_maps: with ``return_attention``: per-token cross-attention maps averaged over the steps,
            [B, 77, H, W] (float32, CPU).
        features: with ``return_features``: the encoder's features of each step.
        diffusion_images: with ``decode``: I^d_0, [B, 3, H, W] in [-1, 1].
    """

    latents: torch.Tensor
    step_latents: torch.Tensor
    w_m: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    attention: torch.Tensor
    timesteps: list[int]
    token_maps: torch.Tensor | None = None
    features: list[EncoderFeatures] | None = None
    diffusion_images: torch.Tensor | None = None

    def modulation(self, step: int = 0) -> Modulation:
        """T's modulation at one feature step."""
        return Modulation(gamma=self.gamma[step], beta=self.beta[step], attention=self.attention[step])


@dataclass
class DiffusionDrawing:
    """What the diffusion model itself draws (:meth:`FacePipeline.draw`).

    Attributes:
        images: I^d_0, [B, 3, H, W] in [-1, 1] at the diffusion model's resolution.
        token_maps: per-token cross-attention maps of the first step, [B, 77, h, w] (when asked).
        timesteps: the timesteps that ran.
    """

    images: torch.Tensor
    token_maps: torch.Tensor | None
    timesteps: list[int]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name ("float32", "bfloat16", "float16", "auto") or None (= auto).

    Auto is float16 on CUDA and float32 elsewhere.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InvalidSettingError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


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


def word_maps(token_maps: torch.Tensor, word_tokens: list[list[int]]) -> torch.Tensor:
    """Per-word maps from per-token maps: the mean over each word's tokens, scaled to peak 1.

    Args:
        token_maps: [B, T, H, W] per-token maps.
        word_tokens: the token positions of each word (shared by the B samples).

    Returns:
        [B, n_words, H, W] in [0, 1].
    """
    if not word_tokens:
        return token_maps.new_zeros(token_maps.shape[0], 0, *token_maps.shape[2:])
    maps = torch.stack([token_maps[:, positions].mean(dim=1) for positions in word_tokens], dim=1)
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)


class FacePipeline:
    """The whole method in one object.

    Args:
        encoder: the frozen diffusion encoder E (U-Net, ControlNets, text encoder, VAE, scheduler).
        generator: the frozen GAN G (any :class:`~mm2latent.models.generator.Generator`: StyleGAN2, EG3D).
        mapper: the mapping network M.
        modulator: the style modulation network T (AbSMNet).
        trained: whether M and T carry trained weights (False for the tiny preset and fresh models).
        name: where the pipeline was loaded from (for messages and metadata).
    """

    def __init__(
        self,
        encoder: DiffusionEncoder,
        generator: Generator,
        mapper: MappingNetwork,
        modulator: StyleModulationNetwork,
        trained: bool = False,
        name: str = "custom",
    ):
        if mapper.num_ws != generator.num_ws or mapper.style_dim != generator.style_dim:
            raise ValueError(f"M outputs {mapper.num_ws}x{mapper.style_dim} latents but G expects "
                             f"{generator.num_ws}x{generator.style_dim}")
        self.encoder, self.generator, self.mapper, self.modulator = encoder, generator, mapper, modulator
        self.trained = trained
        self.name = name
        self.show_progress = True
        for module in (generator, mapper, modulator):
            module.requires_grad_(False).eval()
        # One generation at a time: feature capture swaps U-Net processors for the duration of a pass.
        self.lock = threading.RLock()

    def __getstate__(self):
        # Locks cannot be copied; ``copy.deepcopy(pipe)`` gives an independent pipeline with its own.
        state = self.__dict__.copy()
        state["lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.RLock()

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
    ) -> FacePipeline:
        """Load a pipeline.

        Args:
            name_or_path: ``"tiny"`` (built-in untrained toy preset), ``"full-random"`` (real sizes, random
                weights, for benchmarks), ``"public"`` (the public networks, untrained M and T: see
                ``FaceEditPipeline`` and ``mode="invert"``), a local folder written by ``save_pretrained``, or a Hub
                repository holding an ``mm2latent.json`` manifest.
            revision: Hub revision of that repository.
            device: default CUDA when available, else CPU.
            dtype: a torch dtype or its name; default ("auto") float16 on CUDA, float32 on CPU (bfloat16 on a
                CPU with AMX/AVX512-BF16 halves memory and time, see benchmarks/README.md).
            load_vae: keep the VAE (needed only for I^d_0 previews and training; loaded on first use anyway).
        """
        device = torch.device(device) if device is not None else _default_device()
        dtype = resolve_dtype(dtype, device)
        if str(name_or_path) in PRESETS:
            from . import presets

            parts = getattr(presets, PRESETS[str(name_or_path)])(dtype=dtype)
            pipe = cls(**parts, trained=False, name=str(name_or_path))
        else:
            manifest, parts = load_components(name_or_path, revision, dtype, skip=() if load_vae else ("vae",))
            pipe = cls.from_components(parts, trained=bool(manifest.get("pipeline", {}).get("trained", False)),
                                       name=str(name_or_path))
        return pipe.to(device, dtype)

    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> FacePipeline:
        """Assemble a pipeline from loaded manifest components ({"unet": ..., "mapper": ..., ...})."""
        encoder = DiffusionEncoder(
            unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"], vae=parts.get("vae"),
            controlnets={m: parts[f"controlnet_{m}"] for m in MODALITIES if f"controlnet_{m}" in parts},
        )
        return cls(encoder=encoder, generator=parts["generator"], mapper=parts["mapper"],
                   modulator=parts["modulator"], trained=trained, name=name)

    def components(self) -> dict:
        """Every network by manifest name (parts not loaded yet appear as their lazy loaders)."""
        return {**self.encoder.parts(), "tokenizer": self.encoder.tokenizer, "scheduler": self.encoder.make_scheduler(),
                "generator": self.generator, "mapper": self.mapper, "modulator": self.modulator}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write every component (safetensors + configs) and the ``mm2latent.json`` manifest."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        entries = save_components(self.components(), root)
        write_manifest(root, entries, {"trained": self.trained, "source": self.name})
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FacePipeline:
        """Move every network to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        # The encoder moves its own parts (and remembers where lazily loaded ones go): diffusers warns when
        # its models are cast one by one.
        self.encoder.to(device=device, dtype=dtype)
        inside = {id(part) for part in self.encoder.parts().values()}
        for part in self.components().values():
            if isinstance(part, torch.nn.Module) and id(part) not in inside:
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

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    # ------------------------------------------------------------------ 1. conditions
    def check_request(self, request: GenerationRequest) -> None:
        """What depends on the loaded model: a ControlNet for each visual input, a VAE for the preview."""
        wanted = request.inputs
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


    def prepare_conditions(self, mask=None, scribble=None) -> tuple[dict[str, torch.Tensor], dict[str, Image.Image]]:
        """Stage 1: user inputs -> ControlNet images ([1, 3, H, W] in [0, 1]) and their previews.

        Args:
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map), or None.
            scribble: a sketch (white-on-black or black-on-white), or None. A sketch without strokes is
                ignored with a warning.
        """
        self.check_request(GenerationRequest(mask=mask, scribble=scribble))
        size = self.encoder.image_size
        previews: dict[str, Image.Image] = {}
        with record_function("mm2latent.prepare_conditions"):
            if mask is not None:
                previews["mask"] = mask_to_color(parse_mask(mask, size=size))
            if scribble is not None:
                binary = parse_scribble(scribble, size=size)
                if scribble_is_empty(binary):
                    warnings.warn("the sketch has no strokes; it is ignored", stacklevel=3)
                else:
                    previews["scribble"] = scribble_to_image(binary).convert("RGB")
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
        batch = noise.shape[0]
        assert len(prompts) == batch, f"{len(prompts)} prompts for {batch} noise samples"
        controls = {k: v.expand(batch, -1, -1, -1) if v.shape[0] == 1 else v for k, v in controls.items()}
        negative = self.encode_prompts([""] * batch).embeds if guidance_scale > 1 else None
        with self.lock, record_function("mm2latent.predict_latents"):
            encoded = self.encoder(
                prompts.embeds, controls, noise, num_steps=num_steps, feature_steps=list(feature_steps),
                guidance_scale=guidance_scale, negative_embeds=negative, decode=decode,
                show_progress=self.show_progress and num_steps > 1,
            )
            per_step = [self.latents_from_features(f, prompts.word_mask) for f in encoded.features]
        step_latents = torch.stack([w for w, _, _ in per_step])
        token_maps = None
        if return_attention:
            size = self.modulator.feature_size
            token_maps = torch.stack([word_attention_maps(f.attn_probs, size) for f in encoded.features]).mean(dim=0)
            token_maps = token_maps.float().cpu()
        return LatentPrediction(
            latents=combine_steps(step_latents, combine),
            step_latents=step_latents,
            w_m=torch.stack([w_m for _, w_m, _ in per_step]),
            gamma=torch.stack([m.gamma for _, _, m in per_step]),
            beta=torch.stack([m.beta for _, _, m in per_step]),
            attention=torch.stack([m.attention for _, _, m in per_step]),
            timesteps=encoded.timesteps,
            token_maps=token_maps,
            features=encoded.features if return_features else None,
            diffusion_images=encoded.image,
        )

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
    ) -> DiffusionDrawing:
        """Stage 4 of the training-free mode (and stage 2's training target): I^d_0, what the diffusion model draws.

        DDIM sampling with classifier-free guidance (the unconditional pass batched with the conditional one)
        from seeded noise, or from ``init_latents`` noised to t ≈ ``strength``·T, to the end; VAE-decoded.

        Args:
            prompts, controls, noise: stages 2, 1 and 3.
            num_steps: DDIM steps of the schedule.
            guidance_scale: classifier-free guidance (1 = off).
            init_latents: [B, 4, h, w] clean VAE latents to start from (a training photo's), or None.
            strength: how far ``init_latents`` are noised (1 = pure noise).
            return_attention: also return the per-token attention maps of the first step.
        """
        batch = noise.shape[0]
        controls = {k: v.expand(batch, -1, -1, -1) if v.shape[0] == 1 else v for k, v in controls.items()}
        negative = self.encode_prompts([""] * batch).embeds if guidance_scale > 1 else None
        with self.lock, record_function("mm2latent.draw"):
            encoded = self.encoder(prompts.embeds, controls, noise, num_steps=num_steps,
                                   feature_steps=[0], guidance_scale=guidance_scale,
                                   negative_embeds=negative, decode=True, init_latents=init_latents, strength=strength,
                                   show_progress=self.show_progress)
        token_maps = None
        if return_attention:
            token_maps = word_attention_maps(encoded.features[0].attn_probs, self.modulator.feature_size).float().cpu()
        return DiffusionDrawing(images=encoded.image, token_maps=token_maps, timesteps=encoded.timesteps)

    # ------------------------------------------------------------------ 5. rendering
    @torch.no_grad()
    def render(self, latents: torch.Tensor, truncation: float | torch.Tensor = 1.0, noise_mode: str = "const",
               **render_kwargs) -> torch.Tensor:
        """Stage 5: truncate (ψ a float or one per image, [B]) and render with G: [B, 3, R, R] in [-1, 1].

        ``render_kwargs`` go to the generator's ``synthesis`` (a 3D generator's camera).
        """
        with self.lock, record_function("mm2latent.render"):
            return self.generator.synthesis(self.generator.truncate(latents, truncation), noise_mode=noise_mode,
                                            **render_kwargs)

    # ------------------------------------------------------------------ the whole call
    def __call__(
        self,
        prompt: str | None = None,
        mask=None,
        scribble=None,
        seed: int | None = None,
        mode: str = "fast",
        num_steps: int | None = None,
        feature_steps: list[int] | None = None,
        truncation: float = 1.0,
        num_images: int = 1,
        return_intermediates: bool = False,
        return_diffusion_image: bool = False,
        combine: str = "mean",
        guidance_scale: float | None = None,
        noise_mode: str = "const",
        **render_kwargs,
    ) -> FacePipelineOutput:
        """Generate faces.

        Args:
            prompt: a description ("She has long wavy blonde hair and is smiling."); may be empty when a
                mask or scribble is given. With neither mask nor scribble, generation is text-only.
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map).
            scribble: a sketch (white-on-black or black-on-white).
            seed: 0..2**32-1; random when None. Image i uses seed + i.
            mode: "fast" (one U-Net pass at t = T) or "quality" (DDIM steps, latents combined).
            num_steps: DDIM steps (quality mode, and the preview's denoising); default 20.
            feature_steps: which steps feed the latent (quality mode); default all.
            truncation: ψ, pulls latents toward the mean (1 = none).
            num_images: images in one batch (1..16).
            return_intermediates: also return per-step w_t and per-word attention maps.
            return_diffusion_image: also denoise to the end and decode I^d_0 (costs a full sampling).
            combine: how quality mode merges per-step latents ("mean" or "coarse-to-fine").
            guidance_scale: classifier-free guidance of the diffusion sampling (default 1 = off).
            noise_mode: the generator's noise: "const", "random" or "none".
            render_kwargs: options of the generator's ``synthesis`` (a 3D generator's camera).
        """
        request = GenerationRequest.create(
            prompt, mask, scribble, seed, mode, num_steps, feature_steps, truncation, num_images, combine,
            guidance_scale, noise_mode, return_intermediates, return_diffusion_image, render_kwargs)
        return self.generate(request)

    def generate(self, request: GenerationRequest) -> FacePipelineOutput:
        """Run one validated request (see :class:`~mm2latent.pipelines.request.GenerationRequest`)."""
        return self.generate_batch([request])[0]

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[FacePipelineOutput]:
        """Several requests in as few batched passes as possible (what a Space queue that batches calls).

        Requests that agree on everything that shapes the computation (visual inputs, mode, steps, guidance,
        preview, noise mode, rendering options) share one U-Net pass, one M, one T and one generator pass;
        their prompts, masks, seeds and truncations may all differ. Each output equals the request run alone
        up to batched-kernel rounding.
        """
        for request in requests:
            if request.mode == "invert":
                raise UnsupportedConditionError(
                    "mode='invert' (training-free) needs the photo inverter: load FaceEditPipeline.from_pretrained("
                    "...), which runs it, or use mode='fast' / 'quality' with trained M and T")
            self.check_request(request)
        results: list[FacePipelineOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            key = (tuple(request.inputs), request.mode, request.sampling_steps, request.feature_steps,
                   request.combine, request.guidance_scale, request.return_diffusion_image, request.noise_mode,
                   repr(sorted(request.render_kwargs.items())))
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            for index, output in zip(indices, self._generate_group([requests[i] for i in indices])):
                results[index] = output
        return results  # type: ignore[return-value]

    def _generate_group(self, requests: list[GenerationRequest]) -> list[FacePipelineOutput]:
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
        psis = [r.truncation for r, n in zip(requests, counts) for _ in range(n)]
        # One ψ for the batch keeps ψ = 1 exact (no arithmetic); mixed ψ go in as one value per image.
        truncation = psis[0] if len(set(psis)) == 1 else torch.tensor(psis)
        truncated = self.generator.truncate(prediction.latents, truncation)
        images = tensor_to_pil(self.render(truncated, 1.0, first.noise_mode, **first.render_kwargs))
        latents = truncated.float().cpu()
        outputs, start = [], 0
        for request, (_, previews), count in zip(requests, prepared, counts):
            rows = slice(start, start + count)
            settings = {**request.settings(), "inputs": sorted(previews), "model": self.name, "trained": self.trained}
            output = FacePipelineOutput(images=images[rows], latents=latents[rows], seeds=request.seeds,
                                        settings=settings, condition_images=previews, timesteps=prediction.timesteps)
            encoding_words = prompts.words[start]
            if prompts.truncated[start]:
                output.warnings.append("The prompt is longer than the 77 tokens CLIP reads; only its first part "
                                       "was used.")
            if request.return_intermediates:
                output.step_latents = prediction.step_latents[:, rows].float().cpu()
                output.attention_words = encoding_words
                output.attention_maps = word_maps(prediction.token_maps[rows], prompts.word_tokens[start])
            if request.return_diffusion_image:
                output.diffusion_images = tensor_to_pil(prediction.diffusion_images[rows])
            outputs.append(output)
            start += count
        return outputs
