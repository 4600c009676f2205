"""Editing a real photo's latent with text and a mask or sketch (METHOD.md, "Editing a real photo").

The diffusion encoder E reads (text, edited mask or sketch); T's modulation is applied to the real
latent: w_edit = w_real ⊙ w^γ + w^β, blended in with a strength s on a chosen layer range only:

    w_edit[l] = w_real[l] + s · (w_real[l] ⊙ γ[l] + β[l] − w_real[l])   for l in the range,
    w_edit[l] = w_real[l]                                               elsewhere (bit-identical).

The alternative ("mix", TediGAN-style style mixing) blends M's w^m into the chosen layers. An
optional text-only refinement then optimises the chosen layers with CLIP guidance and an identity
loss (TediGAN / StyleCLIP). CLIP is transformers' ``CLIPModel``, fed tensors directly: the
differentiable preprocessing (resize + CLIP normalisation) is done here in torch, because
``CLIPProcessor`` works on PIL/numpy (no gradients) and open_clip needs torchvision, whose PyPI
wheels require a CUDA torch and do not import on the CPU build this project tests with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ..errors import EmptyPromptError, InvalidSeedError, InvalidSettingError, InvalidStepsError
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..models.mapping import Modulation
from .inversion import InversionResult, PSPEncoder, invert, photo_mask, tiny_psp_config

__all__ = [
    "LAYER_RANGE_NAMES",
    "MAX_CLIP_STEPS",
    "METHODS",
    "ClipGuide",
    "EditResult",
    "LatentEdit",
    "apply_edit",
    "build_tiny_editing_components",
    "clip_refine",
    "edit_latent",
    "edit_photo",
    "identity_similarity",
    "invert_photo",
    "layer_ranges",
    "photo_mask",
]

LAYER_RANGE_NAMES = ("coarse", "middle", "fine", "all")
METHODS = ("modulate", "mix")
MAX_STRENGTH = 2.0
MAX_CLIP_STEPS = 300
MAX_SEED = 2**32 - 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def layer_ranges(num_ws: int) -> dict[str, list[int]]:
    """W+ layer indices of each range.

    StyleGAN's convention at 18 layers: coarse 0–3 (4²–8²: pose, face shape), middle 4–7 (16²–32²:
    features, hair style, eyes open/closed), fine 8–17 (64²–1024²: colours, texture). Layer l drives
    resolution 4·2^⌈l/2⌉, so the same resolutions define the ranges at any size; generators with
    fewer than 9 layers are split into thirds.
    """
    if num_ws >= 9:
        coarse, middle = list(range(4)), list(range(4, 8))
    else:
        third = max(1, num_ws // 3)
        coarse, middle = list(range(third)), list(range(third, min(2 * third, num_ws - 1)))
    fine = list(range(len(coarse) + len(middle), num_ws))
    return {"coarse": coarse, "middle": middle, "fine": fine, "all": list(range(num_ws))}


#: The ranges of an 18-layer (1024²) generator.
LAYER_RANGES = layer_ranges(18)


def _layers(layers: str | list[int], num_ws: int) -> list[int]:
    if isinstance(layers, str):
        if layers not in LAYER_RANGE_NAMES:
            raise InvalidSettingError(f"the layer range must be one of {', '.join(LAYER_RANGE_NAMES)}, got {layers!r}")
        return layer_ranges(num_ws)[layers]
    picked = sorted({int(i) for i in layers})
    if not picked or picked[0] < 0 or picked[-1] >= num_ws:
        raise InvalidSettingError(f"layer indices must be from 0 to {num_ws - 1}, got {layers!r}")
    return picked


def _strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0.0 <= float(strength) <= MAX_STRENGTH:
        raise InvalidSettingError(f"the strength must be a number from 0 to {MAX_STRENGTH:g}, got {strength!r}")
    return float(strength)


def apply_edit(
    w_real: torch.Tensor,
    w_m: torch.Tensor,
    modulation: Modulation,
    strength: float = 1.0,
    layers: str | list[int] = "all",
    method: str = "modulate",
) -> torch.Tensor:
    """w_edit from w_real [1, L, D]: T's modulation ("modulate") or M's w^m ("mix") on ``layers`` only."""
    strength = _strength(strength)
    if method not in METHODS:
        raise InvalidSettingError(f"the method must be one of {', '.join(METHODS)}, got {method!r}")
    assert w_real.ndim == 3 and w_m.shape[1:] == w_real.shape[1:], (w_real.shape, w_m.shape)
    index = _layers(layers, w_real.shape[1])
    w_edit = w_real.clone()
    if strength == 0.0:
        return w_edit
    real = w_real[:, index]
    if method == "modulate":
        target = real * modulation.gamma[:, index].to(real) + modulation.beta[:, index].to(real)
    else:
        target = w_m[:, index].to(real)
    w_edit[:, index] = real + strength * (target - real)
    return w_edit


@dataclass
class LatentEdit:
    """Output of :func:`edit_latent`.

    Attributes:
        latent: w_edit, [1, L, D].
        generated: E→M,T's own latent w = w^m ⊙ w^γ + w^β for (text, mask) (what text-to-face would draw).
        w_m: M's latent.
        modulation: T's γ, β and attention.
        layers: the edited layer indices.
    """

    latent: torch.Tensor
    generated: torch.Tensor
    w_m: torch.Tensor
    modulation: Modulation
    layers: list[int]


@torch.no_grad()
def edit_latent(
    pipe,
    w_real: torch.Tensor,
    prompt: str | None,
    mask=None,
    scribble=None,
    seed: int = 0,
    strength: float = 1.0,
    layers: str | list[int] = "all",
    method: str = "modulate",
) -> LatentEdit:
    """Run E on (prompt, mask/scribble) with one U-Net pass and apply M/T to the real latent.

    Args:
        pipe: a :class:`~mm2latent.pipelines.generation.FacePipeline`.
        w_real: the photo's W+ latent, [1, L, D].
        prompt: the wanted description (may be empty when a mask or a sketch is given).
        mask: an edited 19-class mask (any form :func:`~mm2latent.inputs.conditions.parse_mask` reads).
        scribble: a sketch.
        seed: the diffusion noise seed.
        strength: 0 keeps w_real, 1 applies the edit fully (up to 2 exaggerates it).
        layers: "coarse", "middle", "fine", "all" or a list of layer indices.
        method: "modulate" (T's γ, β on w_real) or "mix" (M's w^m mixed into the layers).
    """
    prompt = (prompt or "").strip() if isinstance(prompt, str) or prompt is None else prompt
    if not isinstance(prompt, str):
        raise InvalidSettingError(f"the prompt must be text, got {type(prompt).__name__}")
    if not prompt and mask is None and scribble is None:
        raise EmptyPromptError("describe the change, or edit the mask or the sketch")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) <= MAX_SEED:
        raise InvalidSeedError(f"the seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    _strength(strength), _layers(layers, w_real.shape[1])  # check the settings before the diffusion pass
    if method not in METHODS:
        raise InvalidSettingError(f"the method must be one of {', '.join(METHODS)}, got {method!r}")
    with pipe._lock:
        controls, _ = pipe.prepare_conditions(mask, scribble)
        encoding = pipe.encoder.encode_prompt(prompt)
        encoded = pipe.encoder(encoding.embeds, controls, pipe.encoder.initial_noise([int(seed)]), num_steps=1)
        generated, w_m, modulation = pipe.latents_from_features(encoded.features[0], encoding.word_mask)
    w_real = w_real.to(generated.device, torch.float32)
    w_edit = apply_edit(w_real, w_m.float(), modulation, strength, layers, method)
    return LatentEdit(w_edit, generated.float(), w_m.float(), modulation, _layers(layers, w_real.shape[1]))


# ---------------------------------------------------------------------------------------------- CLIP, identity


class ClipGuide:
    """transformers' CLIP with differentiable image preprocessing.

    Args:
        model: a ``CLIPModel``.
        tokenizer: its ``CLIPTokenizer``.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = model.config.vision_config.image_size

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipGuide:
        """Load a Hub-format CLIP folder (``config.json``, ``model.safetensors``, tokenizer files)."""
        return cls(CLIPModel.from_pretrained(folder, use_safetensors=True), CLIPTokenizer.from_pretrained(folder))

    def to(self, device=None, dtype=None) -> ClipGuide:
        self.model.to(device=device, dtype=dtype)
        return self

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        return output.pooler_output if hasattr(output, "pooler_output") else output

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding [1, E]."""
        param = next(self.model.parameters())
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        features = self._pooled(self.model.get_text_features(input_ids=tokens.input_ids.to(param.device)))
        return F.normalize(features.float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, E] of images [B, 3, H, W] in [-1, 1] (differentiable)."""
        param = next(self.model.parameters())
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[None, :, None, None]
        x = (((x + 1) / 2) - mean) / std
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x.to(param.dtype))).float(), dim=-1)


def _identity(identity_net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    param = next(identity_net.parameters())
    return identity_net.embed(images.to(param.device, param.dtype)).float()


@torch.no_grad()
def identity_similarity(identity_net: nn.Module, image_a, image_b) -> float:
    """Cosine similarity of ArcFace embeddings of two aligned faces (PIL images or [1, 3, H, W] in [-1, 1])."""
    a, b = (image_to_tensor(x, 256) if isinstance(x, Image.Image) else F.interpolate(x.float(), size=(256, 256),
            mode="bilinear", align_corners=False, antialias=True) for x in (image_a, image_b))
    return float((_identity(identity_net, a) * _identity(identity_net, b)).sum(dim=1)[0])


@dataclass
class ClipRefineResult:
    """Output of :func:`clip_refine`: the latent and the loss terms per step."""

    latent: torch.Tensor
    losses: list[dict[str, float]]


def clip_refine(
    generator: nn.Module,
    latent: torch.Tensor,
    prompt: str,
    clip: ClipGuide,
    steps: int = 50,
    identity_net: nn.Module | None = None,
    id_weight: float = 0.1,
    l2_weight: float = 0.008,
    layers: str | list[int] = "all",
    lr: float = 0.05,
    reference: torch.Tensor | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> ClipRefineResult:
    """Text-only CLIP-guided optimisation of the chosen W+ layers (TediGAN / StyleCLIP).

    loss = (1 − cos(CLIP(G(w)), CLIP(prompt))) + id_weight·(1 − cos(ArcFace(G(w)), ArcFace(reference)))
    + l2_weight·‖w − w_start‖². Layers outside ``layers`` stay bit-identical.

    Args:
        generator: the StyleGAN2 G (frozen).
        latent: the starting W+ (usually w_edit), [1, L, D].
        prompt: the wanted description.
        clip: a :class:`ClipGuide`.
        steps: Adam steps (0..300).
        identity_net: an ArcFace IR-SE50 (no identity term without it).
        id_weight: weight of the identity term.
        l2_weight: weight of the latent distance to the start.
        layers: the optimised layer range.
        lr: Adam learning rate.
        reference: the face whose identity is kept, [1, 3, H, W] in [-1, 1]; default G(latent).
        progress: tqdm bar.
        callback: (step, loss) after every step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_CLIP_STEPS:
        raise InvalidStepsError(f"CLIP steps must be an integer from 0 to {MAX_CLIP_STEPS}, got {steps!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise EmptyPromptError("CLIP-guided refinement needs a text prompt")
    param = next(generator.parameters())
    start = latent.detach().to(param.device, torch.float32)
    index = torch.tensor(_layers(layers, start.shape[1]), device=start.device)
    chosen = start[:, index].clone().requires_grad_(True)
    text = clip.encode_text(prompt.strip()).to(param.device)
    reference_id = None
    if identity_net is not None:  # the identity term's target; without it no reference is needed
        with torch.no_grad():
            reference = generator.synthesis(start.to(param.dtype)) if reference is None else reference.to(param.device)
            reference_id = _identity(identity_net, reference)
    optimizer = torch.optim.Adam([chosen], lr=lr)
    losses = []
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="CLIP refinement", disable=not progress, leave=False):
            w = start.index_copy(1, index, chosen)
            image = generator.synthesis(w.to(param.dtype)).float()
            terms = {"clip": 1 - (clip.encode_image(image) * text).sum(dim=1).mean(),
                     "l2": (chosen - start[:, index]).pow(2).sum()}
            total = terms["clip"] + l2_weight * terms["l2"]
            if reference_id is not None:
                terms["identity"] = 1 - (_identity(identity_net, image) * reference_id).sum(dim=1).mean()
                total = total + id_weight * terms["identity"]
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append({**{k: float(v.detach()) for k, v in terms.items()}, "total": float(total.detach())})
            if callback is not None:
                callback(step, losses[-1]["total"])
    return ClipRefineResult(start.index_copy(1, index, chosen.detach()).cpu(), losses)


# ---------------------------------------------------------------------------------------------- pipeline level


@dataclass
class EditResult:
    """Output of :func:`edit_photo`.

    Attributes:
        image: the edited face.
        latent: w_edit, [1, L, D] float32 on the CPU.
        identity_similarity: ArcFace cosine between the aligned photo (or reconstruction) and the edit
            (None without an identity network).
        reconstruction: G(w_real), for the before/after comparison.
        settings: what was used (for metadata and the latent download).
        clip_losses: per-step terms of the CLIP refinement.
    """

    image: Image.Image
    latent: torch.Tensor
    identity_similarity: float | None
    reconstruction: Image.Image | None = None
    settings: dict = field(default_factory=dict)
    clip_losses: list[dict[str, float]] = field(default_factory=list)


def _render(generator: nn.Module, latent: torch.Tensor) -> tuple[torch.Tensor, Image.Image]:
    param = next(generator.parameters())
    with torch.no_grad():
        images = generator.synthesis(latent.to(param.device, param.dtype)).float()
    return images, tensor_to_pil(images[:1])[0]


def invert_photo(pipe, photo: Any, refine_steps: int = 0, progress: bool | None = None,
                 callback: Callable[[int, float], None] | None = None) -> InversionResult:
    """``FacePipeline.invert``: align, encode with ``pipe.inverter``, refine, parse the mask."""
    inverter = getattr(pipe, "inverter", None)
    if inverter is None:
        raise InvalidSettingError("this model has no photo encoder (inverter); photo editing is unavailable")
    with pipe._lock:
        return invert(pipe.generator, inverter, photo, face_parser=getattr(pipe, "face_parser", None),
                      lpips=getattr(pipe, "lpips", None), refine_steps=refine_steps,
                      progress=pipe.show_progress if progress is None else progress, callback=callback)


def edit_photo(
    pipe,
    latent_or_inversion: torch.Tensor | InversionResult,
    prompt: str | None,
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
    """``FacePipeline.edit``: w_edit from (prompt, mask/scribble), optional CLIP refinement, render, identity."""
    inversion = latent_or_inversion if isinstance(latent_or_inversion, InversionResult) else None
    w_real = inversion.latent if inversion is not None else latent_or_inversion
    if not isinstance(w_real, torch.Tensor) or w_real.ndim != 3 or w_real.shape[1:] != (
            pipe.generator.num_ws, pipe.generator.style_dim):
        shape = tuple(w_real.shape) if isinstance(w_real, torch.Tensor) else type(w_real).__name__
        raise InvalidSettingError(f"the latent must be [1, {pipe.generator.num_ws}, {pipe.generator.style_dim}], "
                                  f"got {shape}")
    edit = edit_latent(pipe, w_real, prompt, mask, scribble, seed, strength, layers, method)
    latent, clip_losses = edit.latent, []
    if clip_steps:
        clip = getattr(pipe, "clip", None)
        if clip is None:
            raise InvalidSettingError("this model has no CLIP network; CLIP-guided refinement is unavailable")
        reference = image_to_tensor(inversion.aligned) if inversion is not None else None
        with pipe._lock:
            refined = clip_refine(pipe.generator, latent, prompt or "", clip, clip_steps,
                                  identity_net=getattr(pipe, "identity", None), id_weight=id_weight, layers=layers,
                                  reference=reference, progress=pipe.show_progress if progress is None else progress,
                                  callback=callback)
        latent, clip_losses = refined.latent, refined.losses
    with pipe._lock:
        images, image = _render(pipe.generator, latent)
        # The inversion already drew the reconstruction; only a bare latent needs rendering.
        reconstruction = inversion.reconstruction if inversion is not None else _render(pipe.generator, w_real)[1]
        identity_net = getattr(pipe, "identity", None)
        similarity = None
        if identity_net is not None:
            before = inversion.aligned if inversion is not None else reconstruction
            similarity = identity_similarity(identity_net, before, images)
    settings = {"prompt": (prompt or "").strip(), "seed": int(seed), "strength": float(strength),
                "layers": layers if isinstance(layers, str) else list(edit.layers), "method": method,
                "clip_steps": int(clip_steps), "inputs": [n for n, v in (("mask", mask), ("scribble", scribble))
                                                          if v is not None], "model": getattr(pipe, "name", "")}
    return EditResult(image, latent.float().cpu(), similarity, reconstruction, settings, clip_losses)


# ---------------------------------------------------------------------------------------------- tiny preset


def build_tiny_clip(seed: int = 1234) -> ClipGuide:
    """A toy CLIP (random weights, the tiny preset's tokenizer) for tests and the offline demo."""
    from ..pipelines.presets import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **special),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return ClipGuide(model, tokenizer)


def build_tiny_editing_components(generator: nn.Module, seed: int = 1234) -> dict[str, Any]:
    """Toy inverter, face parser, identity net, LPIPS and CLIP with deterministic random weights.

    Returns a dict with the pipeline attribute names: ``inverter``, ``face_parser``, ``identity``,
    ``lpips``, ``clip``.
    """
    from ..models.networks import build_tiny_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inverter = PSPEncoder(**tiny_psp_config(generator.num_ws, generator.style_dim))
    parts = {"inverter": inverter, "face_parser": build_tiny_network("face_parser", seed),
             "identity": build_tiny_network("arcface", seed), "lpips": build_tiny_network("lpips", seed)}
    for module in parts.values():
        module.eval().requires_grad_(False)
    parts["clip"] = build_tiny_clip(seed)
    return parts


def latent_file(latent: torch.Tensor, path: str | Path, settings: dict | None = None) -> Path:
    """Save a W+ latent for download: ``.pt`` holding {"latent": [1, L, D] float32, "settings": {...}}."""
    path = Path(path)
    torch.save({"latent": latent.detach().float().cpu(), "settings": dict(settings or {})}, path)
    return path

