"""Training the MM2Latent engine without paired captions (``stage: "mm2latent"``).

Every micro-step draws its own data from the frozen generator G:

1. z ~ N(0, I), w = truncate(mapping(z), ψ) with ψ ~ U[``truncation``], rendered to G(w);
2. the CLIP/FaRL *image* embedding of G(w) stands in for a caption (moved by ``embedding_noise`` to bridge the
   image–text gap, LAFITE-style); the face parser's mask and ``edges_from_photo``'s sketch of G(w) are the
   spatial inputs;
3. each input is dropped per sample with probability ``modality_dropout`` (the mapper's null token replaces it);
4. the mapper regresses w: ``latent_weight``·MSE(ŵ, w) plus the pSp image terms of ``config.loss`` between
   G(ŵ) and G(w) (L2, LPIPS, ArcFace identity, w-regulariser).

The mask and sketch autoencoders learn by reconstruction (cross-entropy; BCE + Dice) in the same run
(``train`` lists what learns: both autoencoders, the mapper, or any subset), either on G's parsed masks and
edge maps (``data.kind: synthetic``) or on CelebAMask-HQ masks and scribbles (``data.kind: celebamask``, the
``prepare`` folder). The mapper reads the codes with gradients stopped, so the autoencoders' codes are shaped by
reconstruction alone; the usual recipe is a run with ``train: [mask_autoencoder, sketch_autoencoder]`` and then
one with ``train: [mapper]`` and ``init`` pointing at the first run's ``final/engine``.

The stage plugs into :class:`~mm2latent.training.trainer.Trainer` like ``LatentStage`` (``setup``, ``loss``,
``sample_grid``, ``export``, ``name``, ``model``), so resume, checkpoints, the model card and Hub push are shared.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..errors import InvalidSettingError
from ..inputs.conditions import CELEBAMASK_PALETTE
from ..inputs.images import tensor_to_pil
from ..inputs.scribbles import scribble_from_photo
from ..models.autoencoders import MaskAutoencoder, SketchAutoencoder
from ..models.clip_encoder import CLIPEncoder
from ..models.generator import Generator, generator_class
from ..models.latent_mapper import (
    MODALITIES,
    LatentMapper,
    MM2LatentEngine,
    build_tiny_mm2latent_components,
    mapper_config,
    perturb_embeddings,
)
from ..models.networks import load_network
from .config import TrainingConfig
from .data import FaceDataset
from .losses import LatentLoss, w_norm
from .stages import image_grid

__all__ = ["TRAINABLE", "GeneratorSamples", "EngineTrainingModule", "MM2LatentStage", "build_engine_trainer",
           "renders_to_conditions", "colors_to_ids", "load_engine", "load_generator"]

#: Networks a run can train (``mm2latent.train``).
TRAINABLE = ("mask_autoencoder", "sketch_autoencoder", "mapper")


class GeneratorSamples(Dataset):
    """Ids of G's training samples for the trainer's loader: sample ``i`` is z ~ N(0, I) and ψ ~ U[truncation]
    drawn from a generator seeded by (seed, i) (:func:`sample_latent_seed`), so ``num_samples`` sets the pool
    (large for real runs: every draw is a new face; small for the learning checks)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    @property
    def ids(self) -> list[int]:
        return list(range(self.num_samples))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        position = key[0] if isinstance(key, tuple) else key
        empty = torch.zeros(0)
        return {"pixel_values": empty, "target": empty, "controls": {}, "caption": "", "index": position,
                "image_id": position}


def sample_latent_seed(seed: int, sample_id: int) -> int:
    """The seed of G's training sample ``sample_id`` in a run seeded ``seed``."""
    return int(np.random.default_rng([seed, sample_id, 0x6D326C]).integers(2**62))


@torch.no_grad()
def renders_to_conditions(images: torch.Tensor, face_parser: nn.Module, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The spatial inputs of renders in [-1, 1]: (parsed mask ids ``[B, size, size]``, edge sketches ``[B, size, size]``)."""
    mask_ids = face_parser.parse(images, size=size).cpu()
    sketches = torch.stack([torch.from_numpy(scribble_from_photo(photo, size=size)) for photo in tensor_to_pil(images)])
    return mask_ids, sketches


def colors_to_ids(colors: torch.Tensor) -> torch.Tensor:
    """Colour masks ``[B, 3, H, W]`` in [0, 1] (what ``FaceDataset`` returns) -> class ids by the nearest palette colour."""
    palette = torch.tensor(CELEBAMASK_PALETTE.tolist(), dtype=torch.float32, device=colors.device) / 255.0
    distance = (colors.float()[:, None] - palette[None, :, :, None, None]).square().sum(dim=2)
    return distance.argmin(dim=1)


def mask_colors(ids: torch.Tensor) -> torch.Tensor:
    """Class ids ``[B, H, W]`` -> palette images ``[B, 3, H, W]`` in [-1, 1] (sample grids)."""
    palette = torch.tensor(CELEBAMASK_PALETTE.tolist(), dtype=torch.float32) / 127.5 - 1
    return palette[ids.cpu().long()].permute(0, 3, 1, 2)


class EngineTrainingModule(nn.Module):
    """What the optimizer sees: the mapper and the autoencoders, with one ``forward`` (DDP wraps it).

    Args:
        mapper: the latent mapper.
        mask_autoencoder: the mask autoencoder.
        sketch_autoencoder: the sketch autoencoder.
        trained: which of :data:`TRAINABLE` learn (the others are frozen).
    """

    def __init__(self, mapper: LatentMapper, mask_autoencoder: MaskAutoencoder, sketch_autoencoder: SketchAutoencoder,
                 trained: tuple[str, ...]):
        super().__init__()
        self.mapper, self.mask_autoencoder, self.sketch_autoencoder = mapper, mask_autoencoder, sketch_autoencoder
        self.trained = tuple(trained)
        for name in TRAINABLE:
            getattr(self, name).requires_grad_(name in self.trained).train(name in self.trained)

    def forward(self, latent_avg: torch.Tensor, text: torch.Tensor | None, mask_ids: torch.Tensor | None,
                sketch: torch.Tensor | None, present: dict[str, torch.Tensor] | None, recon_masks: torch.Tensor | None,
                recon_sketches: torch.Tensor | None) -> dict:
        """Reconstruction losses of the trained autoencoders (on ``recon_*``) and, when the mapper learns, its
        latents ``w`` from G's sample inputs (``text``, ``mask_ids``, ``sketch``, ``present``)."""
        out: dict[str, torch.Tensor] = {}
        for name, inputs, key in (("mask_autoencoder", recon_masks, "mask"), ("sketch_autoencoder", recon_sketches, "sketch")):
            if name in self.trained:
                out[f"{key}_loss"], out[f"{key}_logits"] = getattr(self, name).loss(inputs)
        if "mapper" in self.trained:
            # Codes with stopped gradients: the autoencoders learn from reconstruction only.
            with torch.no_grad():
                mask_code = self.mask_autoencoder.encode(mask_ids)
                sketch_code = self.sketch_autoencoder.encode(sketch)
            out["w"] = self.mapper(latent_avg, text=text, mask=mask_code, sketch=sketch_code, present=present)
        return out


class MM2LatentStage:
    """Train the engine's mapper and/or autoencoders on samples of a frozen generator.

    Args:
        config: the full training config (``config.mm2latent`` holds this stage's settings).
        generator: the frozen GAN (float32; gradients flow through it to ŵ).
        engine: the engine; its text encoder stays frozen, ``mm2latent.train`` says what else learns.
        face_parser: BiSeNet (``load_network("face_parser", ...)``) that labels G's renders.
        lpips: LPIPS network (or None when its weight is 0).
        arcface: IR-SE50 network (or None when its weight is 0).
    """

    name = "mm2latent"

    def __init__(self, config: TrainingConfig, generator: Generator, engine: MM2LatentEngine, face_parser: nn.Module,
                 lpips: nn.Module | None = None, arcface: nn.Module | None = None):
        self.config, self.settings = config, config.mm2latent
        trained = tuple(self.settings.train)
        unknown = set(trained) - set(TRAINABLE)
        if not trained or unknown:
            raise InvalidSettingError(f"mm2latent.train must list some of {TRAINABLE}, got {list(trained)}")
        low, high = self.settings.truncation
        if not 0 < low <= high:
            raise InvalidSettingError(f"mm2latent.truncation must be [low, high] with 0 < low <= high, got {[low, high]}")
        self.generator = generator.requires_grad_(False).eval()
        self.engine = engine
        engine.text_encoder.requires_grad_(False).eval()
        self.face_parser = face_parser.requires_grad_(False).eval()
        self.model = EngineTrainingModule(engine.mapper, engine.mask_autoencoder, engine.sketch_autoencoder, trained)
        self.loss_fn = LatentLoss(config.loss, lpips, arcface, config.loss.resolution)
        self.render_loss = "mapper" in trained and any(self.loss_fn.weights[k] for k in ("l2", "lpips", "id"))
        self.condition_size = self.settings.condition_size or engine.mask_autoencoder.image_size

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen networks to ``device`` (the text encoder in ``weight_dtype``); trained ones stay float32."""
        self.generator.to(device)
        self.engine.text_encoder.to(device, weight_dtype)
        self.face_parser.to(device)
        self.model.to(device, torch.float32)
        for net in (self.loss_fn.lpips, self.loss_fn.arcface):
            if net is not None:
                net.to(device)

    @torch.no_grad()
    def draw(self, sample_ids: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """G's samples ``sample_ids`` and their inputs; the augmentations (embedding noise, modality dropout)
        come from ``generator``."""
        g, settings = self.generator, self.settings
        device = g.latent_avg.device
        low, high = settings.truncation
        batch_size = len(sample_ids)
        seeds = [torch.Generator().manual_seed(sample_latent_seed(self.config.seed, int(i))) for i in sample_ids]
        z = torch.stack([torch.randn(g.style_dim, generator=s) for s in seeds]).to(device)
        psi = low + (high - low) * torch.cat([torch.rand(1, generator=s) for s in seeds])
        w_plus = g.truncate(g.mapping(z)[:, None].expand(-1, g.num_ws, -1), psi).float().contiguous()
        images = g.synthesis(w_plus).float().clamp(-1, 1)
        embeddings = self.engine.text_encoder.encode_images(images).float()
        embeddings = perturb_embeddings(embeddings, settings.embedding_noise, generator)
        mask_ids, sketches = renders_to_conditions(images, self.face_parser, self.condition_size)
        present = {m: torch.rand(batch_size, generator=generator) >= settings.modality_dropout for m in MODALITIES}
        return {"w": w_plus, "images": images, "text": embeddings, "mask_ids": mask_ids.to(device),
                "sketch": sketches.to(device), "present": {m: p.to(device) for m, p in present.items()}}

    def loss(self, batch: dict, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """(loss, logged terms, images for the sample grid) of one micro-batch."""
        settings, g = self.settings, self.generator
        device = g.latent_avg.device
        trained = model_part(model, "trained")
        controls = batch.get("controls", {})
        # Real CelebAMask-HQ masks / scribbles, when the dataset has them, train the autoencoders; G's samples
        # are rendered only when something needs them.
        real = {"mask_autoencoder": "mask" in controls, "sketch_autoencoder": "scribble" in controls}
        needs_samples = "mapper" in trained or any(not real[n] for n in real if n in trained)
        sample = self.draw(batch["image_id"].tolist(), generator) if needs_samples else {}
        recon_masks = colors_to_ids(controls["mask"].to(device)) if real["mask_autoencoder"] else sample.get("mask_ids")
        recon_sketches = ((controls["scribble"][:, 0] > 0.5).to(device) if real["sketch_autoencoder"]
                          else sample.get("sketch"))
        out = model(g.latent_avg, sample.get("text"), sample.get("mask_ids"), sample.get("sketch"),
                    sample.get("present"), recon_masks, recon_sketches)
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        shown: dict[str, torch.Tensor] = {}
        if sample:
            shown["target"] = sample["images"]
        if "mask_loss" in out:
            terms["mask"] = settings.mask_weight * out["mask_loss"]
            logs["loss/mask_ce"] = float(out["mask_loss"].detach())
            predicted = out["mask_logits"].argmax(1)
            target = model_part(model, "mask_autoencoder").resize_ids(recon_masks)
            logs["metric/mask_accuracy"] = float((predicted == target).float().mean())
            shown.update(mask=mask_colors(target), mask_reconstruction=mask_colors(predicted))
        if "sketch_loss" in out:
            terms["sketch"] = settings.sketch_weight * out["sketch_loss"]
            logs["loss/sketch_bce_dice"] = float(out["sketch_loss"].detach())
            target = model_part(model, "sketch_autoencoder").resize_strokes(recon_sketches)
            shown.update(sketch=target.expand(-1, 3, -1, -1) * 2 - 1,
                         sketch_reconstruction=(out["sketch_logits"] > 0).float().expand(-1, 3, -1, -1) * 2 - 1)
        if "w" in out:
            w = out["w"]
            latent = F.mse_loss(w.float(), sample["w"])
            terms["latent"] = settings.latent_weight * latent
            logs["loss/latent"] = float(latent.detach())
            if self.render_loss:
                images = g.synthesis(w)
                image_total, image_logs = self.loss_fn(images, sample["images"], sample["images"], w, g.latent_avg)
                terms["image"] = image_total
                logs.update({k: v for k, v in image_logs.items() if k != "loss/total"})
                shown["output"] = images
            elif self.loss_fn.weights["w_reg"]:
                terms["w_reg"] = self.loss_fn.weights["w_reg"] * w_norm(w.float(), g.latent_avg.float())
        total = sum(terms.values())
        logs["loss/total"] = float(total.detach())
        return total, logs, {k: v.detach() for k, v in shown.items()}

    def sample_grid(self, batch: dict, images: dict) -> Image.Image:
        """Rows, those this run has: G(w) | G(ŵ) | mask | its reconstruction | sketch | its reconstruction."""
        order = ("target", "output", "mask", "mask_reconstruction", "sketch", "sketch_reconstruction")
        return image_grid([images[k] for k in order if k in images])

    def export(self, model: nn.Module, folder: Path) -> Path:
        """``folder/engine`` (:meth:`MM2LatentEngine.save_pretrained`, with the trained networks) and
        ``folder/generator`` (the generator it was trained for)."""
        trained = copy.deepcopy(model).float().cpu().eval().requires_grad_(False)
        text_encoder = self.engine.text_encoder
        device = text_encoder.device
        engine = MM2LatentEngine(text_encoder.to("cpu", torch.float32), trained.mask_autoencoder,
                                 trained.sketch_autoencoder, trained.mapper)
        folder = Path(folder)
        engine.save_pretrained(folder / "engine")
        text_encoder.to(device)
        generator_device = self.generator.latent_avg.device
        self.generator.to("cpu").save_pretrained(folder / "generator")
        self.generator.to(generator_device)
        return folder


def model_part(model: nn.Module, name: str) -> nn.Module:
    """A network of the (possibly DDP-wrapped) training module."""
    return getattr(getattr(model, "module", model), name)


# ------------------------------------------------------------------------------------------------ building
def load_generator(source: str | None) -> Generator:
    """The frozen generator: None (the released StyleGAN2), "tiny", a folder or "org/name[@revision]"."""
    if source == "tiny":
        from ..pipelines.presets import build_tiny_components

        return build_tiny_components()["generator"]
    from ..pipelines.hub import DEFAULT_COMPONENTS, parse_repo_reference, resolve_component

    spec = dict(DEFAULT_COMPONENTS["generator"])
    if source is not None:
        path = Path(os.path.expanduser(str(source)))
        if path.is_dir():
            spec = {"path": str(path.resolve())}
        else:
            repo_id, revision = parse_repo_reference(str(source))
            spec = {**spec, "repo_id": repo_id, "revision": revision or "main"}
            spec.pop("env", None)
    folder = resolve_component("generator", spec, None, None)
    return generator_class("stylegan2").from_pretrained(folder)


def load_engine(settings: dict, generator: Generator, seed: int) -> MM2LatentEngine:
    """``mm2latent.init``: "tiny", an engine folder (e.g. a previous run's ``final/engine``), or None for fresh
    networks at the configured sizes around the CLIP weights of ``mm2latent.clip``."""
    init = settings.init
    if init == "tiny":
        return MM2LatentEngine(**build_tiny_mm2latent_components(generator, seed))
    if init is not None:
        return MM2LatentEngine.from_pretrained(init)
    clip = settings.clip
    if not clip.weights:
        raise InvalidSettingError("a fresh engine needs CLIP weights: set mm2latent.clip.weights to a FaRL / OpenAI "
                                  "CLIP file or a converted folder (python -m mm2latent.models.clip_encoder)")
    weights = Path(os.path.expanduser(str(clip.weights)))
    if weights.is_file():
        text_encoder = CLIPEncoder.from_checkpoint(clip.model, weights, quick_gelu=clip.quick_gelu)
    else:
        text_encoder = CLIPEncoder.from_pretrained(clip.weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mask_autoencoder = MaskAutoencoder(**asdict(settings.autoencoder))
        sketch_autoencoder = SketchAutoencoder(**asdict(settings.autoencoder))
        mapper = LatentMapper(**mapper_config(generator, text_encoder, mask_autoencoder, sketch_autoencoder,
                                              **asdict(settings.mapper)))
    return MM2LatentEngine(text_encoder, mask_autoencoder, sketch_autoencoder, mapper)


def build_dataset(config: TrainingConfig, condition_size: int) -> Dataset:
    """``data.kind``: "synthetic" (G's samples only) or "celebamask" (real masks/scribbles for the autoencoders)."""
    data = config.data
    if data.kind == "synthetic":
        return GeneratorSamples(data.num_samples)
    if data.kind != "celebamask" or not data.root:
        raise InvalidSettingError("data.kind must be 'synthetic', or 'celebamask' with data.root (the `prepare` folder)")
    # The photos are not used: read them at a token size.
    return FaceDataset(data.root, data.split, image_size=16, target_size=16, condition_size=condition_size,
                       modalities=tuple(data.modalities), seed=config.seed)


def build_engine_trainer(config: TrainingConfig, accelerator=None, generator: Generator | None = None,
                         engine: MM2LatentEngine | None = None, face_parser: nn.Module | None = None):
    """A :class:`~mm2latent.training.trainer.Trainer` for ``stage: "mm2latent"``, ready to ``train()``.

    Args:
        config: a full config (``load_config``).
        accelerator: an existing accelerator (default: one built from the config).
        generator, engine, face_parser: already loaded networks (default: loaded as the config says).
    """
    from accelerate.utils import set_seed

    from .trainer import Trainer, make_accelerator

    accelerator = accelerator or make_accelerator(config)
    set_seed(config.seed)
    settings = config.mm2latent
    generator = generator if generator is not None else load_generator(settings.generator)
    engine = engine if engine is not None else load_engine(settings, generator, config.seed)
    if face_parser is None:
        face_parser = load_network("face_parser", settings.face_parser)
    weights = config.loss
    lpips = load_network("lpips", config.networks.lpips) if weights.lpips else None
    arcface = load_network("arcface", config.networks.arcface) if weights.id else None
    stage = MM2LatentStage(config, generator, engine, face_parser, lpips, arcface)
    dataset = build_dataset(config, stage.condition_size)
    return Trainer(config, stage, dataset, accelerator)

