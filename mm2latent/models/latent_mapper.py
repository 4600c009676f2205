"""The MM2Latent engine: [text or image embedding, mask code, sketch code] -> W+, no diffusion model.

A CLIP/FaRL embedding of the prompt (:class:`~.clip_encoder.CLIPEncoder`) and the codes of the mask and
sketch autoencoders (:mod:`.autoencoders`) are projected to one token each; a missing input (not given, or
dropped during training) is replaced by its learned null token. The three tokens, concatenated, go through
an MLP, and one linear head per W+ layer adds an offset to the generator's mean latent w̄ — so an untrained
mapper already yields the average face, as pSp's ``start_from_latent_avg``. Inference is one mapper pass and
one generator pass.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import InvalidSettingError, WeightsNotFoundError
from .autoencoders import MaskAutoencoder, SketchAutoencoder, tiny_autoencoder_config
from .clip_encoder import TINY_CLIP_CONFIG, CLIPEncoder
from .generator import Generator

__all__ = ["MODALITIES", "LatentMapper", "MM2LatentEngine", "mapper_config", "build_tiny_mm2latent_components",
           "build_full_size_mm2latent_components"]

#: The mapper's inputs, in token order.
MODALITIES = ("text", "mask", "sketch")
ENGINE_CONFIG_NAME = "mm2latent_engine.json"
ENGINE_FORMAT = "mm2latent-engine"
TINY_ENGINE_SEED = 20240917


class LatentMapper(nn.Module, PyTorchModelHubMixin):
    """Multi-modal embeddings (any subset) -> W+ latents around w̄.

    Args:
        num_ws: W+ layers of the generator (18 at 1024²).
        style_dim: size of one w (512).
        text_dim: size of the text / image embedding (CLIP ViT-B/16: 512).
        mask_dim: size of the mask code.
        sketch_dim: size of the sketch code.
        hidden_dim: width of the tokens and of the MLP.
        num_layers: linear layers of the MLP (the first reads the three concatenated tokens).
        head_init_scale: initial scale of the per-layer heads (small: an untrained mapper stays near w̄).
    """

    def __init__(
        self,
        num_ws: int = 18,
        style_dim: int = 512,
        text_dim: int = 512,
        mask_dim: int = 512,
        sketch_dim: int = 512,
        hidden_dim: int = 1024,
        num_layers: int = 4,
        head_init_scale: float = 0.1,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_ws, self.style_dim, self.hidden_dim = num_ws, style_dim, hidden_dim
        self.input_dims = {"text": text_dim, "mask": mask_dim, "sketch": sketch_dim}
        # LayerNorm first: CLIP embeddings are unit-norm, autoencoder codes have no fixed scale.
        self.projections = nn.ModuleDict({
            name: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim)) for name, dim in self.input_dims.items()
        })
        self.null_tokens = nn.ParameterDict({name: nn.Parameter(0.02 * torch.randn(hidden_dim)) for name in MODALITIES})
        layers: list[nn.Module] = [nn.Linear(len(MODALITIES) * hidden_dim, hidden_dim), nn.LeakyReLU(0.2)]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        self.head_weight = nn.Parameter(torch.randn(num_ws, style_dim, hidden_dim) * head_init_scale / math.sqrt(hidden_dim))
        self.head_bias = nn.Parameter(torch.zeros(num_ws, style_dim))

    def tokens(self, inputs: dict[str, torch.Tensor | None], present: dict[str, torch.Tensor] | None,
               batch_size: int) -> torch.Tensor:
        """One token per modality, null where the input is missing: ``[B, 3 * hidden_dim]``."""
        tokens = []
        for name in MODALITIES:
            null = self.null_tokens[name].expand(batch_size, -1)
            value = inputs.get(name)
            if value is None:
                tokens.append(null)
                continue
            expected = (batch_size, self.input_dims[name])
            assert tuple(value.shape) == expected, f"{name} input must be {expected}, got {tuple(value.shape)}"
            token = self.projections[name](value.to(null.dtype))
            keep = None if present is None else present.get(name)
            if keep is not None:
                token = torch.where(keep.to(token.device).bool()[:, None], token, null)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def forward(
        self,
        latent_avg: torch.Tensor,
        text: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        sketch: torch.Tensor | None = None,
        present: dict[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """W+ latents ``[B, num_ws, style_dim]``.

        Args:
            latent_avg: the generator's w̄, ``[style_dim]``.
            text: text (or image) embeddings ``[B, text_dim]``, or None.
            mask: mask codes ``[B, mask_dim]``, or None.
            sketch: sketch codes ``[B, sketch_dim]``, or None.
            present: per modality, ``[B]`` booleans; False uses the null token for that sample (modality dropout).
            batch_size: needed only when no input is given (every token null: the mapper's mean face).
        """
        inputs = {"text": text, "mask": mask, "sketch": sketch}
        given = [v.shape[0] for v in inputs.values() if v is not None]
        if given:
            batch_size = given[0]
            if any(b != batch_size for b in given):
                raise InvalidSettingError(f"the inputs of one call must have the same batch size, got {given}")
        elif batch_size is None:
            raise InvalidSettingError("give at least one input, or batch_size for the all-null latent")
        hidden = self.trunk(self.tokens(inputs, present, batch_size))
        offsets = torch.einsum("bh,ldh->bld", hidden, self.head_weight) + self.head_bias
        return offsets + latent_avg.to(offsets)


def mapper_config(generator: Generator, text_encoder: CLIPEncoder, mask_autoencoder: MaskAutoencoder,
                  sketch_autoencoder: SketchAutoencoder, **overrides) -> dict:
    """The mapper's sizes derived from the generator (num_ws, style_dim) and the encoders (input sizes)."""
    config = dict(num_ws=generator.num_ws, style_dim=generator.style_dim, text_dim=text_encoder.embed_dim,
                  mask_dim=mask_autoencoder.code_dim, sketch_dim=sketch_autoencoder.code_dim)
    config.update(overrides)
    return config


class MM2LatentEngine(nn.Module):
    """The engine's networks together: prompt / mask / sketch -> W+ (the generator stays outside).

    ``save_pretrained(folder)`` writes one subfolder per network and ``mm2latent_engine.json``;
    ``from_pretrained(folder)`` reads them back.

    Args:
        text_encoder: CLIP/FaRL towers (frozen).
        mask_autoencoder: the mask autoencoder (its encoder gives the mask code).
        sketch_autoencoder: the sketch autoencoder (its encoder gives the sketch code).
        mapper: the latent mapper.
    """

    COMPONENTS: dict[str, type] = {"text_encoder": CLIPEncoder, "mask_autoencoder": MaskAutoencoder,
                                   "sketch_autoencoder": SketchAutoencoder, "mapper": LatentMapper}

    def __init__(self, text_encoder: CLIPEncoder, mask_autoencoder: MaskAutoencoder,
                 sketch_autoencoder: SketchAutoencoder, mapper: LatentMapper):
        super().__init__()
        self.text_encoder, self.mask_autoencoder = text_encoder, mask_autoencoder
        self.sketch_autoencoder, self.mapper = sketch_autoencoder, mapper
        for name, dim in (("text", text_encoder.embed_dim), ("mask", mask_autoencoder.code_dim),
                          ("sketch", sketch_autoencoder.code_dim)):
            if mapper.input_dims[name] != dim:
                raise InvalidSettingError(f"the mapper reads {mapper.input_dims[name]}-d {name} inputs, "
                                          f"its encoder gives {dim}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, text_dim]``."""
        return self.text_encoder.encode_text(prompts)

    def codes(self, mask_ids: torch.Tensor | None = None, sketch: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask code, sketch code), None where the input is None."""
        mask_code = None if mask_ids is None else self.mask_autoencoder.encode(mask_ids)
        sketch_code = None if sketch is None else self.sketch_autoencoder.encode(sketch)
        return mask_code, sketch_code

    @torch.no_grad()
    def latents(self, latent_avg: torch.Tensor, text_embedding: torch.Tensor | None = None,
                mask_ids: torch.Tensor | None = None, sketch: torch.Tensor | None = None,
                batch_size: int | None = None, present: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Inference: any subset of the inputs -> W+ ``[B, num_ws, style_dim]``.

        Args:
            latent_avg: the generator's w̄ (``generator.latent_avg``).
            text_embedding: ``encode_prompts(...)`` (or CLIP image embeddings) ``[B, text_dim]``, or None.
            mask_ids: CelebAMask-HQ index maps ``[B, H, W]`` (any size), or None.
            sketch: binary sketches ``[B, H, W]`` (white strokes = 1, any size), or None.
            batch_size: only when no input is given.
            present: per modality, ``[B]`` booleans; False reads the null token for that sample (e.g. a batch
                where some prompts are empty).
        """
        mask_code, sketch_code = self.codes(mask_ids, sketch)
        return self.mapper(latent_avg, text=text_embedding, mask=mask_code, sketch=sketch_code, present=present,
                           batch_size=batch_size)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.COMPONENTS:
            getattr(self, name).save_pretrained(folder / name)
        index = {"_format": ENGINE_FORMAT, "_version": 1, "components": {n: {"path": n} for n in self.COMPONENTS}}
        (folder / ENGINE_CONFIG_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> MM2LatentEngine:
        """Load a folder written by :meth:`save_pretrained` (frozen, eval mode)."""
        folder = Path(folder)
        index_file = folder / ENGINE_CONFIG_NAME
        if not index_file.is_file():
            raise WeightsNotFoundError(f"'{folder}' has no {ENGINE_CONFIG_NAME}: not an MM2Latent engine folder")
        index = json.loads(index_file.read_text())
        if index.get("_format") != ENGINE_FORMAT:
            raise WeightsNotFoundError(f"{index_file} is not an MM2Latent engine index")
        parts = {name: cls.COMPONENTS[name].from_pretrained(folder / index["components"][name]["path"])
                 for name in cls.COMPONENTS}
        return cls(**parts).eval().requires_grad_(False)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_mm2latent_components(generator: Generator, seed: int = TINY_ENGINE_SEED) -> dict[str, nn.Module]:
    """The engine's networks at toy size with deterministic random weights, sized for ``generator``.

    Returns ``{"text_encoder", "mask_autoencoder", "sketch_autoencoder", "mapper"}`` (``MM2LatentEngine(**parts)``).
    """
    def build():
        text_encoder = CLIPEncoder("tiny-vit", model_cfg=TINY_CLIP_CONFIG).eval().requires_grad_(False)
        mask_autoencoder = MaskAutoencoder(**tiny_autoencoder_config())
        sketch_autoencoder = SketchAutoencoder(**tiny_autoencoder_config())
        mapper = LatentMapper(**mapper_config(generator, text_encoder, mask_autoencoder, sketch_autoencoder,
                                              hidden_dim=64, num_layers=2))
        return {"text_encoder": text_encoder, "mask_autoencoder": mask_autoencoder,
                "sketch_autoencoder": sketch_autoencoder, "mapper": mapper}

    return _seeded(seed, build)


def build_full_size_mm2latent_components(generator: Generator, seed: int = TINY_ENGINE_SEED) -> dict[str, nn.Module]:
    """The engine's networks at their real sizes (CLIP ViT-B/16, 256² autoencoders with 512-d codes) with
    random weights: for speed and memory measurements, which do not depend on weight values."""
    def build():
        text_encoder = CLIPEncoder("ViT-B-16").eval().requires_grad_(False)
        mask_autoencoder, sketch_autoencoder = MaskAutoencoder(), SketchAutoencoder()
        mapper = LatentMapper(**mapper_config(generator, text_encoder, mask_autoencoder, sketch_autoencoder))
        return {"text_encoder": text_encoder, "mask_autoencoder": mask_autoencoder,
                "sketch_autoencoder": sketch_autoencoder, "mapper": mapper}

    return _seeded(seed, build)


def perturb_embeddings(embeddings: torch.Tensor, noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-norm ``embeddings`` moved by a random direction of length ``noise``, renormalised (LAFITE's trick
    to make a mapper trained on CLIP *image* embeddings accept *text* embeddings: the two sit in different
    regions of the joint space)."""
    if noise <= 0:
        return embeddings
    direction = torch.randn(embeddings.shape, generator=generator).to(embeddings)
    direction = F.normalize(direction, dim=-1)
    return F.normalize(F.normalize(embeddings, dim=-1) + noise * direction, dim=-1)
