"""``FacePipeline``: text + mask/scribble -> diffusion features -> M and T -> W+ -> StyleGAN2 face."""

from __future__ import annotations

import json
import numbers
import os
import secrets
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from .. import __version__
from ..editing.inversion import InversionResult, PSPEncoder
from ..editing.methods import ClipGuide, EditResult, build_tiny_editing_components, edit_photo, invert_photo
from ..errors import (
    EmptyPromptError,
    InvalidSeedError,
    InvalidSettingError,
    InvalidStepsError,
    UnsupportedConditionError,
)
from ..inputs.conditions import (
    mask_to_color,
    parse_mask,
    parse_scribble,
    scribble_is_empty,
    scribble_to_image,
)
from ..inputs.images import tensor_to_pil
from ..models.diffusion_encoder import MODALITIES, DiffusionEncoder, EncoderFeatures
from ..models.mapping import MappingNetwork, Modulation, StyleModulationNetwork, word_attention_maps
from ..models.networks import NETWORKS
from ..models.stylegan2 import StyleGAN2Generator
from .hub import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, load_manifest, resolve_component

MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_IMAGES = 16
MODES = ("fast", "quality")
COMBINE = ("mean", "coarse-to-fine")
# Built-in presets with deterministic random (untrained) weights: name -> builder in presets.py.
PRESETS = {"tiny": "build_tiny_components", "full-random": "build_full_size_components"}
# Optional networks for real-photo editing: attribute -> network kind in mm2latent.models.networks (or None).
EDITING_COMPONENTS = {"inverter": None, "face_parser": "face_parser", "identity": "arcface", "lpips": "lpips",
                      "clip": None}


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
        attention_words: with ``return_intermediates``: the prompt's word tokens.
        attention_maps: per-word cross-attention maps Ā, [B, n_words, H, W] in [0, 1].
        diffusion_images: with ``return_diffusion_image``: I^d_0, what the diffusion model itself draws.
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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name ("float32", "bfloat16", "float16", "auto") or None (= auto)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return _default_dtype(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InvalidSettingError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


class FacePipeline:
    """The whole method in one object.

    Args:
        encoder: the frozen diffusion encoder E (U-Net, ControlNets, text encoder, VAE, scheduler).
        generator: the frozen StyleGAN2 G.
        mapper: the mapping network M.
        modulator: the style modulation network T (AbSMNet).
        trained: whether M and T carry trained weights (False for the tiny preset and fresh models).
        name: where the pipeline was loaded from (for messages and metadata).
    """

    def __init__(
        self,
        encoder: DiffusionEncoder,
        generator: StyleGAN2Generator,
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
        self._lock = threading.RLock()
        # Real-photo editing (optional): pSp encoder, face parser, ArcFace, LPIPS, CLIP guide.
        self.inverter: PSPEncoder | None = None
        self.face_parser = self.identity = self.lpips = None
        self.clip: ClipGuide | None = None

    def __getstate__(self):
        # Locks cannot be copied; ``copy.deepcopy(pipe)`` gives an independent pipeline with its own.
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

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
                weights, for benchmarks), a local folder written by
                ``save_pretrained``, or a Hub repository holding an ``mm2latent.json`` manifest.
            revision: Hub revision of that repository.
            device: default CUDA when available, else CPU.
            dtype: a torch dtype or its name; default ("auto") float16 on CUDA, float32 on CPU (bfloat16 on a
                CPU with AMX/AVX512-BF16 halves memory and time, see benchmarks/README.md).
            load_vae: load the VAE (needed only for I^d_0 previews and training).
        """
        device = torch.device(device) if device is not None else _default_device()
        dtype = resolve_dtype(dtype, device)
        if str(name_or_path) in PRESETS:
            from . import presets

            builder = getattr(presets, PRESETS[str(name_or_path)])
            pipe = cls(**builder(), trained=False, name=str(name_or_path))
            if str(name_or_path) == "tiny":
                for key, part in build_tiny_editing_components(pipe.generator).items():
                    setattr(pipe, key, part)
        else:
            manifest, base, base_repo = load_manifest(name_or_path, revision)
            components = manifest["components"]
            wanted = [c for c in components if load_vae or c != "vae"]
            folders = {c: resolve_component(c, components[c], base, base_repo) for c in wanted}
            scheduler = DDIMScheduler.from_pretrained(folders["scheduler"])
            # The big networks are read straight in the target dtype (peak memory: no float32 copy first).
            big = {"use_safetensors": True, "torch_dtype": dtype}
            controlnets = {m: ControlNetModel.from_pretrained(folders[f"controlnet_{m}"], **big)
                           for m in MODALITIES if f"controlnet_{m}" in folders}
            encoder = DiffusionEncoder(
                unet=UNet2DConditionModel.from_pretrained(folders["unet"], **big),
                text_encoder=CLIPTextModel.from_pretrained(folders["text_encoder"], use_safetensors=True, dtype=dtype),
                tokenizer=CLIPTokenizer.from_pretrained(folders["tokenizer"]),
                scheduler=scheduler,
                controlnets=controlnets,
                vae=AutoencoderKL.from_pretrained(folders["vae"], **big) if "vae" in folders else None,
            )
            pipe = cls(
                encoder=encoder,
                generator=StyleGAN2Generator.from_pretrained(folders["generator"]),
                mapper=MappingNetwork.from_pretrained(folders["mapper"]),
                modulator=StyleModulationNetwork.from_pretrained(folders["modulator"]),
                trained=bool(manifest.get("pipeline", {}).get("trained", False)),
                name=str(name_or_path),
            )
            pipe._load_editing_components(folders)
        return pipe.to(device, dtype)

    def _load_editing_components(self, folders: dict[str, Path]) -> None:
        for key, kind in EDITING_COMPONENTS.items():
            if key not in folders:
                continue
            if key == "inverter":
                part = PSPEncoder.from_pretrained(folders[key])
            elif key == "clip":
                part = ClipGuide.from_pretrained(folders[key])
            else:
                part = NETWORKS[kind][0].from_pretrained(folders[key])
            if isinstance(part, torch.nn.Module):
                part.eval().requires_grad_(False)
            setattr(self, key, part)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write every component (safetensors + configs) and the ``mm2latent.json`` manifest."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        encoder = self.encoder
        parts = {
            "mapper": self.mapper, "modulator": self.modulator, "generator": self.generator,
            "unet": encoder.unet, "text_encoder": encoder.text_encoder, "tokenizer": encoder.tokenizer,
            "scheduler": encoder.make_scheduler(),
        }
        if encoder.vae is not None:
            parts["vae"] = encoder.vae
        parts.update({f"controlnet_{m}": c for m, c in encoder.controlnets.items()})
        parts.update({key: getattr(self, key) for key in EDITING_COMPONENTS
                      if key != "clip" and getattr(self, key) is not None})
        if self.clip is not None:
            parts["clip"] = self.clip.model
            self.clip.tokenizer.save_pretrained(root / "clip")
        for name, part in parts.items():
            part.save_pretrained(root / name)
        manifest = {
            "_format": MANIFEST_FORMAT,
            "_version": MANIFEST_VERSION,
            "_mm2latent_version": __version__,
            "pipeline": {"trained": self.trained, "source": self.name},
            "components": {name: {"path": name} for name in parts},
        }
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FacePipeline:
        """Move every network to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        for module in (self.encoder, self.generator, self.mapper, self.modulator, self.inverter, self.face_parser,
                       self.identity, self.lpips, self.clip):
            if module is not None:
                module.to(device=device, dtype=dtype)
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
        return list(self.encoder.controlnets)

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    # ------------------------------------------------------------------ validation
    def _check_settings(self, prompt, has_visual, seed, mode, num_steps, feature_steps, truncation, num_images,
                        combine) -> tuple[str, int, int, list[int]]:
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidSettingError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if not prompt and not has_visual:
            raise EmptyPromptError("the prompt is empty and there is no mask or scribble: describe the face, "
                                   "draw a mask or a sketch, or both")
        if seed is None:
            seed = secrets.randbelow(MAX_SEED + 1)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) <= MAX_SEED:
            raise InvalidSeedError(f"the seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        if mode not in MODES:
            raise InvalidSettingError(f"mode must be one of {MODES}, got {mode!r}")
        if combine not in COMBINE:
            raise InvalidSettingError(f"combine must be one of {COMBINE}, got {combine!r}")
        if num_steps is None:
            num_steps = 1 if mode == "fast" else 20
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= MAX_STEPS:
            raise InvalidStepsError(f"the number of steps must be an integer from 1 to {MAX_STEPS}, got {num_steps!r}")
        if feature_steps is None:
            feature_steps = [0] if mode == "fast" else list(range(num_steps))
        feature_steps = sorted(set(feature_steps))
        if mode == "fast" and feature_steps != [0]:
            raise InvalidStepsError("fast mode reads features at the first step only; use mode='quality' for others")
        if not feature_steps or not all(isinstance(s, numbers.Integral) and 0 <= s < num_steps for s in feature_steps):
            raise InvalidStepsError(f"feature steps must be step indices from 0 to {num_steps - 1}, got {feature_steps}")
        if not isinstance(truncation, numbers.Real) or not 0.0 <= float(truncation) <= 2.0:
            raise InvalidSettingError(f"truncation ψ must be a number from 0 to 2, got {truncation!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or not 1 <= num_images <= MAX_IMAGES:
            raise InvalidSettingError(f"the number of images must be from 1 to {MAX_IMAGES}, got {num_images!r}")
        return prompt, int(seed), int(num_steps), [int(s) for s in feature_steps]

    def prepare_conditions(self, mask=None, scribble=None) -> tuple[dict[str, torch.Tensor], dict[str, Image.Image]]:
        """Turn user inputs into ControlNet images ([1, 3, H, W] in [0, 1]) and their previews."""
        wanted = [name for name, value in (("mask", mask), ("scribble", scribble)) if value is not None]
        if len(wanted) == 2 and not all(m in self.modalities for m in wanted):
            raise UnsupportedConditionError(
                f"both a mask and a scribble were given, but this model has only a {self.modalities[0]} "
                "ControlNet: pass one of them"
            )
        for name in wanted:
            if name not in self.modalities:
                available = ", ".join(self.modalities) or "none"
                raise UnsupportedConditionError(f"this model has no ControlNet for a {name} (available: {available})")
        size = self.encoder.image_size
        previews: dict[str, Image.Image] = {}
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

    # ------------------------------------------------------------------ the method
    def latents_from_features(self, features: EncoderFeatures, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Modulation]:
        """M and T on one step's features: (w, w^m, modulation) with w = w^m ⊙ w^γ + w^β."""
        w_m = self.mapper(features.h, self.generator.latent_avg)
        modulation = self.modulator(features, word_mask.expand(features.h.shape[0], -1))
        return w_m * modulation.gamma + modulation.beta, w_m, modulation

    @staticmethod
    def combine_steps(step_latents: torch.Tensor, combine: str = "mean") -> torch.Tensor:
        """[S, B, L, D] per-step latents -> [B, L, D].

        ``mean`` averages the steps. ``coarse-to-fine`` gives layer l the step ⌊l·S/L⌋: early, text-heavy
        steps feed the coarse layers, late, structure-heavy steps the fine ones.
        """
        if combine == "mean":
            return step_latents.mean(dim=0)
        steps, _, layers, _ = step_latents.shape
        pick = torch.arange(layers) * steps // layers
        return step_latents[pick, :, torch.arange(layers)].permute(1, 0, 2)

    @torch.no_grad()
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
        guidance_scale: float = 1.0,
        noise_mode: str = "const",
    ) -> FacePipelineOutput:
        """Generate faces.

        Args:
            prompt: a description ("She has long wavy blonde hair and is smiling."); may be empty when a
                mask or scribble is given. With neither mask nor scribble, generation is text-only.
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map).
            scribble: a sketch (white-on-black or black-on-white).
            seed: 0..2**32-1; random when None. Image i uses seed + i.
            mode: "fast" (one U-Net pass at t = T) or "quality" (DDIM steps, latents combined).
            num_steps: DDIM steps (quality mode, and the preview denoising); default 20.
            feature_steps: which steps feed the latent (quality mode); default all.
            truncation: ψ, pulls latents toward the mean (1 = none).
            num_images: images in one batch (1..16).
            return_intermediates: also return per-step w_t and per-word attention maps.
            return_diffusion_image: also denoise to the end and decode I^d_0 (costs a full sampling).
            combine: how quality mode merges per-step latents ("mean" or "coarse-to-fine").
            guidance_scale: classifier-free guidance of the diffusion sampling (1 = off).
            noise_mode: StyleGAN2 noise: "const", "random" or "none".
        """
        has_visual = mask is not None or scribble is not None
        prompt, seed, num_steps, feature_steps = self._check_settings(
            prompt, has_visual, seed, mode, num_steps, feature_steps, truncation, num_images, combine)
        with self._lock:
            controls, previews = self.prepare_conditions(mask, scribble)
            encoding = self.encoder.encode_prompt(prompt)
            seeds = [(seed + i) % (MAX_SEED + 1) for i in range(num_images)]
            embeds = encoding.embeds.expand(num_images, -1, -1)
            negative = self.encoder.encode_prompt("").embeds.expand(num_images, -1, -1) if guidance_scale > 1 else None
            sampling_steps = num_steps if (mode == "quality" or return_diffusion_image) else 1
            encoded = self.encoder(
                embeds, {k: v.expand(num_images, -1, -1, -1) for k, v in controls.items()},
                self.encoder.initial_noise(seeds), num_steps=sampling_steps, feature_steps=feature_steps,
                guidance_scale=guidance_scale, negative_embeds=negative, decode=return_diffusion_image,
                show_progress=self.show_progress and sampling_steps > 1,
            )
            per_step = [self.latents_from_features(f, encoding.word_mask) for f in encoded.features]
            step_latents = torch.stack([w for w, _, _ in per_step])
            latents = self.generator.truncate(self.combine_steps(step_latents, combine), float(truncation))
            images = tensor_to_pil(self.generator.synthesis(latents, noise_mode=noise_mode))
        settings = {
            "prompt": prompt, "seed": seed, "mode": mode, "num_steps": sampling_steps, "feature_steps": feature_steps,
            "truncation": float(truncation), "num_images": num_images, "combine": combine,
            "guidance_scale": guidance_scale, "noise_mode": noise_mode, "inputs": sorted(previews),
            "model": self.name, "trained": self.trained,
        }
        output = FacePipelineOutput(images=images, latents=latents.float().cpu(), seeds=seeds, settings=settings,
                                    condition_images=previews, timesteps=encoded.timesteps)
        if return_intermediates:
            output.step_latents = step_latents.float().cpu()
            output.attention_words = encoding.words
            output.attention_maps = self._word_maps(encoded.features, encoding.word_mask)
        if return_diffusion_image:
            output.diffusion_images = tensor_to_pil(encoded.image)
        return output

    # ------------------------------------------------------------------ real photos
    def invert(self, photo, refine_steps: int = 0) -> InversionResult:
        """Align a photo FFHQ-style, invert it to W+ (optionally refined by optimisation), parse its mask.

        Returns an ``InversionResult`` (latent [1, L, D], reconstruction, aligned photo, mask ids, messages).
        """
        return invert_photo(self, photo, refine_steps=refine_steps)

    def edit(self, latent_or_inversion, prompt: str = "", mask=None, scribble=None, strength: float = 1.0,
             layers: str | list[int] = "all", method: str = "modulate", seed: int = 0, clip_steps: int = 0) -> EditResult:
        """Edit a real photo's latent with text and/or an edited mask or sketch (METHOD.md).

        ``method="modulate"``: w_edit = w_real ⊙ w^γ + w^β on the chosen ``layers`` ("coarse", "middle", "fine",
        "all" or indices), blended by ``strength`` (0 = unchanged). ``method="mix"``: blend M's w^m into those
        layers. ``clip_steps`` > 0 adds a text-only CLIP-guided refinement with an identity term.
        """
        return edit_photo(self, latent_or_inversion, prompt, mask, scribble, strength, layers, method, seed, clip_steps)

    def _word_maps(self, features: list[EncoderFeatures], word_mask: torch.Tensor) -> torch.Tensor:
        """Per-word Ā averaged over the feature steps, each map scaled to [0, 1]: [B, n_words, H, W]."""
        size = self.modulator.feature_size
        maps = torch.stack([word_attention_maps(f.attn_probs, size) for f in features]).mean(dim=0)
        maps = maps.float().cpu()[:, word_mask[0].cpu()]
        peak = maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)
        return maps / peak
