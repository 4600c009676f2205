"""What each stage trains and how its loss is computed (the trainer in ``trainer.py`` runs any of them).

* :class:`LatentStage` — stage 1 (M; T frozen at identity, target I^gt) and stage 2 (T; M frozen in float32,
  targets I^d_0 for L2/LPIPS and I^gt for identity); ``loss.target`` switches the targets (style transfer,
  Table 2). Each sample's t is drawn from the DDIM schedule inside ``diffusion.timestep_range``; z_t is the VAE
  latent of I^gt noised to t. I^d_0 comes from the cache of ``idd_cache.py``.
* :class:`ControlNetStage` — stage 0, the ControlNet's denoising loss (diffusers' recipe).
* :class:`InverterStage` — the photo encoder (pSp / e4e) for real-photo editing, with the same pSp objective
  (:class:`~.losses.LatentLoss`) as stages 1 and 2.

Every random draw of a micro-step comes from a generator seeded by (seed, micro-step, rank), so a
resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..inputs.images import tensor_to_pil
from ..models.diffusion_encoder import DiffusionEncoder, PromptBatch
from ..models.generator import is_3d
from ..pipelines.generation import FacePipeline
from .cameras import read_dataset_json
from .config import ConfigError, TrainingConfig, loss_targets
from .data import FaceDataset, PhotoFolderDataset, SyntheticFaceDataset, TemplatedCaptions
from .idd_cache import combination_name, needs_idd_cache
from .losses import LatentLoss
from .prepare_3d import prepared_camera_labels

#: 3D runs: the yaws (degrees, pitch 0) the sample grid also shows each output from.
SAMPLE_YAWS = (-30.0, 30.0)


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, micro_step, rank]).integers(2**62)))


def encode_captions(encoder: DiffusionEncoder, captions: list[str]) -> PromptBatch:
    """CLIP embeddings and word masks of a batch of captions (new captions encoded as one batch)."""
    return PromptBatch.stack(encoder.encode_prompts(captions))


def choose_controls(controls: dict[str, torch.Tensor], available: list[str], sampling: str,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The visual inputs of one micro-batch: one random modality ("one") or all of them ("all")."""
    names = [m for m in sorted(controls) if m in available]
    if sampling == "all" or len(names) <= 1:
        return {m: controls[m] for m in names}
    pick = names[int(torch.randint(len(names), (1,), generator=generator))]
    return {pick: controls[pick]}


def build_dataset(config: TrainingConfig, pipe_or_encoder, generator=None) -> Dataset:
    """The training dataset named by ``config.data`` at the model's sizes (captions through ``data.caption_template``)."""
    data = config.data
    if data.kind == "photos":
        if not data.root:
            raise ValueError("data.root must point at a folder of FFHQ-aligned photos")
        return PhotoFolderDataset(data.root, config.inverter.input_size)
    encoder = pipe_or_encoder.encoder if isinstance(pipe_or_encoder, FacePipeline) else pipe_or_encoder
    generator = generator if generator is not None else getattr(pipe_or_encoder, "generator", None)
    size = encoder.image_size
    # A `prepare --generator eg3d` folder carries its cameras.json: used unless data.camera_labels names a file.
    camera_file = data.camera_labels or (prepared_camera_labels(data.root) if data.kind == "celebamask" else None)
    labels = read_dataset_json(camera_file) if camera_file else None
    if data.kind == "synthetic":
        cameras = torch.stack([labels[name] for name in sorted(labels)]) if labels else None
        dataset = SyntheticFaceDataset(generator, data.num_samples, size, size, tuple(data.modalities),
                                       seed=config.seed, truncation=data.truncation, cameras=cameras)
    elif data.kind != "celebamask":
        raise ValueError(f"data.kind must be 'celebamask', 'synthetic' or 'photos', got {data.kind!r}")
    elif not data.root:
        raise ValueError("data.root must point at the folder written by `python -m mm2latent.training prepare`")
    else:
        target = generator.resolution if generator is not None else size
        # Cached runs (stage 2, I^d_0 targets) draw captions from what the cache holds: diffusion.idd_captions_per_image
        # of each image, or the one line diffusion.idd_caption_index when that is unset.
        cached = config.stage == 2 or needs_idd_cache(config)
        per_image = config.diffusion.idd_captions_per_image if cached else None
        dataset = FaceDataset(data.root, data.split, image_size=size, target_size=target, condition_size=size,
                              modalities=tuple(data.modalities), seed=config.seed,
                              caption_index=config.diffusion.idd_caption_index if cached and per_image is None else None,
                              camera_labels=labels, captions_per_image=per_image)
    return dataset if data.caption_template == "{caption}" else TemplatedCaptions(dataset, data.caption_template)


class FullPrecision(nn.Module):
    """Runs a frozen network in float32 with autocast off: stage 2's M gives the same w^m as at inference.

    Under ``mixed_precision: bf16`` autocast would otherwise run M's convolutions (and add ``latent_avg``) in
    bfloat16, so T would learn to modulate a slightly different w^m from the one inference produces.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, enabled=False):
            return self.module(*(a.float() for a in args))


class LatentStage:
    """Stage 1 (train M) or stage 2 (train T) on a frozen E and G.

    Every sample of a micro-batch gets its own t (uniform over the DDIM timesteps in ``diffusion.timestep_range``)
    and z_t is its VAE latent noised to that t. The image terms compare G(w) with I^gt or the cached I^d_0 as
    ``loss.target`` says (:func:`~.config.loss_targets`); I^d_0 is the entry drawn under the micro-batch's visual
    inputs and the sample's caption.

    Args:
        config: the full training config.
        pipe: the pipeline holding E, G, M and T (float32; moved and cast by ``setup``).
        lpips: LPIPS network (or None when its weight is 0).
        arcface: IR-SE50 network (or None when its weight is 0).
    """

    def __init__(self, config: TrainingConfig, pipe: FacePipeline, lpips: nn.Module | None, arcface: nn.Module | None):
        self.config, self.pipe, self.stage = config, pipe, config.stage
        assert self.stage in (1, 2)
        if arcface is not None and is_3d(pipe.generator):
            arcface.face_crop = "eg3d"  # L_ID crops EG3D's framing (networks/arcface.py FACE_CROPS)
        self.loss_fn = LatentLoss(config.loss, lpips, arcface, config.loss.resolution)
        self.recon_target, self.id_target = loss_targets(config)
        self.model = pipe.mapper if self.stage == 1 else pipe.modulator
        self.model.requires_grad_(True).train()
        if self.stage == 1:
            pipe.modulator.reset_to_identity()
        self.frozen_mapper = FullPrecision(pipe.mapper) if self.stage == 2 else None
        diffusion = config.diffusion
        scheduler = pipe.encoder.make_scheduler()
        scheduler.set_timesteps(diffusion.num_inference_steps)
        low, high = diffusion.timestep_range
        self.timesteps = torch.tensor([int(t) for t in scheduler.timesteps if low <= int(t) <= high])
        if not len(self.timesteps):
            raise ValueError(f"no DDIM timestep of a {diffusion.num_inference_steps}-step schedule in {low}..{high}")
        self.scheduler = scheduler
        self.drawn_timesteps: list[int] = []  # since the last pop_timesteps (the trainer logs their histogram)
        self.last_target_keys: list[str] | None = None  # the I^d_0 cache keys of the last micro-batch
        self.last_idd: torch.Tensor | None = None  # and its I^d_0 (the sample grid shows it)
        self.last_w: torch.Tensor | None = None  # and its w (3D: the sample grid renders it from other views)

    @property
    def name(self) -> str:
        return "mapper" if self.stage == 1 else "modulator"

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen networks to ``device`` in ``weight_dtype`` (a frozen M in float32); the trained one float32."""
        pipe = self.pipe
        pipe.encoder.to(device, weight_dtype)
        pipe.generator.to(device)  # G stays float32: gradients flow through it to w
        if self.stage == 1:
            pipe.modulator.to(device, weight_dtype)
        else:
            pipe.mapper.to(device, torch.float32)
        self.model.to(device, torch.float32)
        for net in (self.loss_fn.lpips, self.loss_fn.arcface):
            if net is not None:
                net.to(device)

    def pop_timesteps(self) -> list[int]:
        """The t drawn since the last call (one per sample)."""
        drawn, self.drawn_timesteps = self.drawn_timesteps, []
        return drawn

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One t per sample, uniform over the training timesteps: [B] (long)."""
        return self.timesteps[torch.randint(len(self.timesteps), (batch_size,), generator=generator)]

    def features(self, batch: dict, controls: dict[str, torch.Tensor], generator: torch.Generator):
        """One frozen U-Net pass on z_t, t drawn per sample: (features, word masks, t)."""
        encoder, diffusion = self.pipe.encoder, self.config.diffusion
        device, dtype = encoder.device, encoder.dtype
        controls = {k: v.to(device, dtype) for k, v in controls.items()}
        prompts = self.pipe.encode_prompts(batch["caption"])
        with torch.no_grad():
            z0 = encoder.encode_images(batch["pixel_values"].to(device), generator=generator)
            t = self.sample_timesteps(z0.shape[0], generator)
            noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
            z_t = self.scheduler.add_noise(z0, noise, t.to(device))
            features, _ = encoder.extract(z_t, t.to(device), prompts.embeds, controls, diffusion.conditioning_scale)
        self.drawn_timesteps.extend(t.tolist())
        return features, prompts.word_mask, t

    def latents(self, features, word_mask, model: nn.Module) -> torch.Tensor:
        """w for this stage: w^m with T at identity (stage 1) or w^m ⊙ w^γ + w^β with M frozen in float32 (stage 2)."""
        if self.stage == 1:
            w, _, _ = self.pipe.latents_from_features(features, word_mask, mapper=model, modulator=None)
        else:
            w, _, _ = self.pipe.latents_from_features(features, word_mask, mapper=self.frozen_mapper, modulator=model)
        return w.float()

    def render(self, w: torch.Tensor, batch: dict) -> torch.Tensor:
        """G(w); a 3D generator renders each sample at its ground-truth camera (``batch["camera"]``)."""
        generator = self.pipe.generator
        if not is_3d(generator):
            return generator.synthesis(w)
        if "camera" not in batch:
            raise ConfigError("training with a 3D generator renders each sample at its photo's camera: set "
                              "data.camera_labels to EG3D's dataset.json (training/cameras.py writes one)")
        return generator.synthesis(w, camera=batch["camera"].to(w.device))

    def targets(self, batch: dict, modalities: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction target, identity target) of a micro-batch whose visual inputs are ``modalities``."""
        images = {"gt": batch["target"]}
        self.last_target_keys, self.last_idd = None, None
        if "idd" in (self.recon_target, self.id_target):
            name = combination_name(modalities)
            images["idd"] = self.last_idd = batch["idd"][name]
            self.last_target_keys = list(batch["idd_key"][name])
        return images[self.recon_target].to(device), images[self.id_target].to(device)

    def loss(self, batch: dict, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(loss, logged terms, generated images) of one micro-batch."""
        controls = choose_controls(batch["controls"], list(self.pipe.encoder.controlnets),
                                   self.config.data.modality_sampling, generator)
        features, word_mask, t = self.features(batch, controls, generator)
        w = self.latents(features, word_mask, model)
        images = self.render(w, batch)
        recon_target, id_target = self.targets(batch, list(controls), images.device)
        total, logs = self.loss_fn(images, recon_target, id_target, w, self.pipe.generator.latent_avg)
        logs["t/mean"] = float(t.float().mean())
        self.last_w = w.detach()
        return total, logs, images.detach()

    def sample_grid(self, batch: dict, images: torch.Tensor) -> Image.Image:
        """Rows: target | output (| I^d_0 of the last visual inputs, when the run uses it) (| 3D: the output seen
        from each of :data:`SAMPLE_YAWS`, so the grid shows what the run makes of the whole head)."""
        rows = [batch["target"], images.cpu()]
        if self.last_idd is not None:
            rows.append(self.last_idd)
        generator = self.pipe.generator
        if is_3d(generator) and self.last_w is not None:
            with torch.no_grad():
                for yaw in SAMPLE_YAWS:
                    cameras = generator.camera_labels([[yaw, 0.0]]).to(self.last_w.device)
                    rows.append(generator.synthesis(self.last_w, camera=cameras.expand(len(self.last_w), -1)).cpu())
        return image_grid(rows)

    def export(self, model: nn.Module, folder: Path) -> Path:
        """The whole pipeline with the trained network, via ``FacePipeline.save_pretrained``."""
        pipe = copy.copy(self.pipe)
        trained = copy.deepcopy(model).float().cpu().eval().requires_grad_(False)
        if self.stage == 1:
            pipe.mapper = trained
        else:
            pipe.modulator = trained
        pipe.trained = True
        for module in (pipe.encoder, pipe.generator, pipe.mapper, pipe.modulator):
            module.to("cpu", torch.float32)
        return pipe.save_pretrained(folder)


class ControlNetStage:
    """Stage 0: train a ControlNet (mask or scribble) on the frozen SD-1.5 U-Net.

    Args:
        config: the full training config.
        encoder: the diffusion encoder providing U-Net, VAE, text encoder and scheduler config.
        controlnet: the ControlNet to train (from ``ControlNetModel.from_unet`` or a checkpoint).
    """

    name = "controlnet"

    def __init__(self, config: TrainingConfig, encoder: DiffusionEncoder, controlnet: nn.Module):
        self.config, self.encoder = config, encoder
        self.modality = config.controlnet.modality
        self.model = controlnet.requires_grad_(True).train()
        self.noise_scheduler = encoder.make_scheduler()
        if config.train.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            encoder.unet.enable_gradient_checkpointing()

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        self.encoder.to(device, weight_dtype)
        self.model.to(device, torch.float32)

    def loss(self, batch: dict, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict, None]:
        encoder, scheduler = self.encoder, self.noise_scheduler
        device, dtype = encoder.device, encoder.dtype
        with torch.no_grad():
            z0 = encoder.encode_images(batch["pixel_values"].to(device), generator=generator)
            noise = torch.randn(z0.shape, generator=generator).to(device, dtype)
            t = torch.randint(scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator).to(device)
            noisy = scheduler.add_noise(z0, noise, t)
            drop = torch.rand(len(batch["caption"]), generator=generator) < self.config.controlnet.proportion_empty_prompts
            captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            embeds = encode_captions(encoder, captions).embeds
        cond = batch["controls"][self.modality].to(device, torch.float32)
        down, mid = model(noisy.float(), t, encoder_hidden_states=embeds.float(), controlnet_cond=cond, return_dict=False)
        pred = encoder.unet(noisy, t, encoder_hidden_states=embeds,
                            down_block_additional_residuals=[r.to(dtype) for r in down],
                            mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss/denoise": float(loss.detach())}, None

    def sample_grid(self, batch: dict, images) -> Image.Image:
        return image_grid([batch["target"], batch["controls"][self.modality] * 2 - 1])

    def export(self, model: nn.Module, folder: Path) -> Path:
        out = folder / f"controlnet_{self.modality}"
        copy.deepcopy(model).float().cpu().save_pretrained(out, safe_serialization=True)
        return out


class InverterStage:
    """The photo inverter: aligned photo -> W+ (pSp / e4e), trained against a frozen G.

    pSp's recipe: the photo and G(E(photo)) pooled to ``inverter.input_size`` (pSp's ``face_pool``) are compared
    with the one pSp objective of stages 1 and 2 (L2, LPIPS, ArcFace identity against the photo itself,
    ‖w − w̄‖).

    Args:
        config: the full training config (stage "inverter").
        generator: the frozen generator inverted into.
        encoder: the encoder to train (a fresh ``PSPEncoder`` or one to continue from).
        lpips: LPIPS network (or None when its weight is 0).
        arcface: IR-SE50 network (or None when its weight is 0).
    """

    name = "inverter"

    def __init__(self, config: TrainingConfig, generator: nn.Module, encoder: nn.Module, lpips: nn.Module | None,
                 arcface: nn.Module | None):
        self.config, self.generator = config, generator.requires_grad_(False).eval()
        self.model = encoder.requires_grad_(True).train()
        self.size = config.inverter.input_size
        self.loss_fn = LatentLoss(config.loss, lpips, arcface, config.loss.resolution)

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """G and the loss networks to ``device`` (float32: gradients flow through G); the encoder float32."""
        self.generator.to(device, torch.float32)
        self.model.to(device, torch.float32)
        for net in (self.loss_fn.lpips, self.loss_fn.arcface):
            if net is not None:
                net.to(device)

    def latent_avg(self, model: nn.Module) -> torch.Tensor | None:
        """The mean latent the codes are offsets from: the encoder's own when it stores one, else G's."""
        inner = getattr(model, "module", model)  # DDP
        return None if getattr(inner, "stores_latent_avg", False) else self.generator.latent_avg

    def loss(self, batch: dict, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict, torch.Tensor]:
        device = next(self.generator.parameters()).device
        photos = batch["target"].to(device)
        w = model(photos, self.latent_avg(model))
        generated = self.generator.synthesis(w)
        if generated.shape[-1] != photos.shape[-1]:
            generated = F.adaptive_avg_pool2d(generated, photos.shape[-1])
        total, logs = self.loss_fn(generated, photos, photos, w, self.generator.latent_avg)
        return total, logs, generated.detach()

    def sample_grid(self, batch: dict, images: torch.Tensor) -> Image.Image:
        """Rows: photo | reconstruction."""
        return image_grid([batch["target"], images.cpu()])

    def export(self, model: nn.Module, folder: Path) -> Path:
        """The encoder as a manifest component folder (``inverter``)."""
        out = folder / "inverter"
        copy.deepcopy(model).float().cpu().eval().save_pretrained(out)
        return out


def image_grid(rows: list[torch.Tensor], max_columns: int = 8) -> Image.Image:
    """Rows of [B, 3, H, W] images in [-1, 1] (resized to the first row's size) -> one PIL grid."""
    size = rows[0].shape[-1]
    columns = min(max_columns, rows[0].shape[0])
    tiles = [F.interpolate(r[:columns].float().cpu(), size=(size, size), mode="bilinear", align_corners=False)
             for r in rows]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in tiles], dim=1)
    return tensor_to_pil(grid[None])[0]
