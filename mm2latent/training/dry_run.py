"""Plan a real run: N real training steps of stage 1 or 2 on full-size models with random weights.

    python -m mm2latent.training --config configs/stage1_mapper.yaml --dry-run --steps 2

The pipeline is the ``full-random`` preset (SD-1.5 U-Net, both ControlNets, VAE and text encoder, 1024² StyleGAN2,
M and T at their real sizes; timings do not depend on weight values) and the loss networks are full-size random
LPIPS-VGG and IR-SE50; the data are the generator's own renders (no dataset needed). I^d_0, where the run compares
with it, is stood in for by the photo: the cache is made before training and is not part of a step's cost.
The report gives the time per optimizer step (the mean after the first, which includes warm-up), the peak memory
(CUDA: the allocator's peak; CPU: the process's peak resident set) and the configured run's projected time on
this device (``train.max_steps`` x time per step, one process).
"""

from __future__ import annotations

import copy
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..models.networks import NETWORKS, build_tiny_network
from ..pipelines.generation import FacePipeline
from .config import ConfigError, TrainingConfig
from .data import SyntheticFaceDataset
from .idd_cache import (
    cache_key,
    combination_name,
    draw_targets,
    modality_combinations,
    needs_idd_cache,
    plan_idd_cache,
)
from .stages import LatentStage
from .trainer import Trainer, make_accelerator

__all__ = ["PhotoAsDiffusionImage", "dry_run", "format_report"]


class PhotoAsDiffusionImage(Dataset):
    """Gives every item its own photo as I^d_0 for every visual-input combination (dry runs only)."""

    def __init__(self, base: Dataset, combinations: list[tuple[str, ...]]):
        self.base, self.combinations = base, combinations

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> dict:
        item = self.base[key]
        item["idd"] = {combination_name(c): item["target"] for c in self.combinations}
        item["idd_key"] = {combination_name(c): cache_key(item["image_id"], c, item["caption"])
                           for c in self.combinations}
        return item


def loss_networks(config: TrainingConfig, tiny: bool) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """LPIPS and ArcFace for the loss weights in use: toy ones for the tiny preset, else full-size random."""
    def make(kind: str) -> torch.nn.Module:
        net = build_tiny_network(kind) if tiny else NETWORKS[kind][0]()
        return net.eval().requires_grad_(False)

    return (make("lpips") if config.loss.lpips else None, make("arcface") if config.loss.id else None)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def with_full_size_eg3d(pipe: FacePipeline, seed: int = 0) -> FacePipeline:
    """The full-size random pipeline with NVIDIA's FFHQ 512² EG3D (random weights) in place of StyleGAN2, and M,
    T sized from it (14 W+ layers of 512): what a 3D run trains, for timing and memory."""
    from ..models.eg3d import TriPlaneGenerator, ffhq512_config
    from ..models.mapping import MappingNetwork, StyleModulationNetwork
    from ..pipelines.presets import mapper_config, modulator_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = TriPlaneGenerator(**ffhq512_config()).eval().requires_grad_(False)
        pipe.generator = generator
        pipe.mapper = MappingNetwork(**mapper_config(pipe.encoder, generator))
        pipe.modulator = StyleModulationNetwork(**modulator_config(pipe.encoder, generator))
    return pipe


def dry_run(config: TrainingConfig, steps: int = 2, pipeline: str | None = None, generator: str = "stylegan2") -> dict:
    """Run ``steps`` optimizer steps of ``config``'s stage on full-size random models; return the measurements.

    Args:
        config: the run to plan (stage 1 or 2; its batch size, accumulation, precision and loss weights are used).
        steps: optimizer steps to time (>= 2 gives a warm mean).
        pipeline: the models to time: default ``full-random``; ``tiny`` for a smoke test.
        generator: "stylegan2", or "eg3d" (3D runs: NVIDIA's FFHQ 512² EG3D at full size, ``tiny-eg3d`` with
            ``tiny``), rendered at the frontal camera.
    """
    if config.stage not in (1, 2):
        raise ConfigError(f"--dry-run plans stages 1 and 2, got stage {config.stage!r}")
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if generator not in ("stylegan2", "eg3d"):
        raise ConfigError(f"--generator must be stylegan2 or eg3d, got {generator!r}")
    tiny = (pipeline or config.pipeline) in ("tiny", "tiny-eg3d")
    pipeline = ("tiny-eg3d" if generator == "eg3d" else "tiny") if tiny else "full-random"
    run = copy.deepcopy(config)
    run.output_dir = tempfile.mkdtemp(prefix="mm2latent-dry-run-")
    train = run.train
    train.max_steps, train.log_with, train.checkpoint_every, train.sample_every = steps, None, 0, 0
    train.resume, train.progress, run.data.num_workers = None, False, 0

    load_start = time.perf_counter()
    pipe = FacePipeline.from_pretrained(pipeline, device="cpu", dtype=torch.float32)
    if generator == "eg3d" and not tiny:
        with_full_size_eg3d(pipe, run.seed)
        pipeline = "full-random + FFHQ 512² EG3D"
    pipe.show_progress = False
    lpips, arcface = loss_networks(run, tiny=tiny)
    accelerator = make_accelerator(run)
    size = pipe.encoder.image_size
    # One batch of renders is enough: the sampler cycles through the dataset.
    dataset = SyntheticFaceDataset(pipe.generator.to(accelerator.device), train.batch_size, size, size,
                                   tuple(run.data.modalities), seed=run.seed, truncation=run.data.truncation)
    if needs_idd_cache(run):
        dataset = PhotoAsDiffusionImage(dataset, modality_combinations(run.data.modalities, pipe.encoder.modalities,
                                                                       run.data.modality_sampling))
    trainer = Trainer(run, LatentStage(run, pipe, lpips, arcface), dataset, accelerator)
    load_seconds = time.perf_counter() - load_start
    cache_plan = plan_cache(run, pipe, dataset) if needs_idd_cache(run) else None

    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = []
    for step in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        trainer.train(max_steps=step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    per_step = sum(step_seconds[1:]) / (steps - 1) if steps > 1 else step_seconds[0]
    return {
        "stage": config.stage,
        "pipeline": pipeline,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "mixed_precision": train.mixed_precision,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "seconds_per_step": per_step,
        "peak_memory_bytes": peak_memory_bytes(device),
        "max_steps": config.train.max_steps,
        "projected_hours": per_step * config.train.max_steps / 3600,
        "last_losses": {k: v for k, v in trainer.history[-1].items() if k.startswith("loss/")},
        "output_dir": str(Path(run.output_dir)),
        "idd_cache": cache_plan,
    }


# CelebAMask-HQ's training split (90 % of 30 000 photos) and Multi-Modal CelebA-HQ's captions per photo: what the
# cache plan assumes when data.root is not a prepared folder.
ASSUMED_TRAIN_IMAGES = 27000
ASSUMED_CAPTIONS_PER_IMAGE = 10


def plan_cache(config: TrainingConfig, pipe: FacePipeline, dataset) -> dict:
    """The I^d_0 cache of ``config``'s data: entries, disk and hours (one entry drawn and timed here)."""
    combinations = modality_combinations(config.data.modalities, pipe.encoder.modalities,
                                         config.data.modality_sampling)
    start = time.perf_counter()
    draw_targets(config, pipe, [dataset[(0, 0)]], combinations[0])
    seconds = time.perf_counter() - start
    per_image = config.diffusion.idd_captions_per_image
    root = Path(config.data.root) if config.data.root else None
    if root is not None and (root / "train.txt").is_file():
        from .data import FaceDataset

        real = FaceDataset(root, config.data.split, captions_per_image=per_image,
                           caption_index=config.diffusion.idd_caption_index if per_image is None else None)
        num_images, source = len(real), str(root)
        captions = sum(len(real.candidate_captions(p)) for p in range(len(real))) / num_images if num_images else 0.0
    else:
        num_images, source = ASSUMED_TRAIN_IMAGES, "assumed: CelebAMask-HQ train split, 10 captions per image"
        captions = 1 if per_image is None else (ASSUMED_CAPTIONS_PER_IMAGE if per_image == 0
                                                else min(per_image, ASSUMED_CAPTIONS_PER_IMAGE))
    plan = plan_idd_cache(num_images, captions, len(combinations), pipe.generator.resolution, seconds)
    return {**plan, "num_images": num_images, "captions_per_image": captions, "combinations": len(combinations),
            "seconds_per_entry": seconds, "source": source}


def format_report(report: dict) -> str:
    """The measurements as the lines the CLI prints."""
    return "\n".join([
        f"stage {report['stage']} dry run on {report['device']} ({report['pipeline']} models, "
        f"{report['mixed_precision']} mixed precision, {report['threads']} threads)",
        f"  batch {report['batch_size']} x accumulation {report['gradient_accumulation_steps']}; "
        f"models built in {report['load_seconds']:.1f} s",
        f"  step times: {', '.join(f'{s:.2f} s' for s in report['step_seconds'])}",
        f"  time per step: {report['seconds_per_step']:.2f} s (mean after the first step)",
        f"  peak memory: {report['peak_memory_bytes'] / 2**30:.2f} GiB",
        f"  projected: {report['max_steps']} steps -> {report['projected_hours']:.1f} h on this device",
    ] + ([] if not report.get("idd_cache") else [
        f"  I^d_0 cache: {report['idd_cache']['num_images']} images x {report['idd_cache']['captions_per_image']:.1f} "
        f"captions x {report['idd_cache']['combinations']} input combinations = {report['idd_cache']['entries']} "
        f"entries, ~{report['idd_cache']['bytes'] / 2**30:.1f} GiB, {report['idd_cache']['hours']:.1f} h to draw "
        f"on this device ({report['idd_cache']['seconds_per_entry']:.2f} s per entry; {report['idd_cache']['source']})",
    ]))
