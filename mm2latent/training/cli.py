"""Train the face-mask ControlNet (stage 0), M (stage 1) or T (stage 2); ``prepare`` the data; or train the
photo ``inverter`` (pSp-style encoder for real-photo editing).

    python -m mm2latent.training prepare --root CelebAMask-HQ --text-dir MM-CelebA-HQ/text --output data/prepared
    python -m mm2latent.training prepare --generator eg3d --root CelebAMask-HQ --text-dir MM-CelebA-HQ/text \
        --output data/prepared-eg3d      # EG3D crops + cameras.json
    python -m mm2latent.training inverter --images ffhq/images1024x1024 --model mm2latent/mm2latent-celebahq --output runs/inverter
    python -m mm2latent.training --config configs/inverter.yaml --set data.root=ffhq/images1024x1024
    python -m mm2latent.training --config configs/stage1_mapper.yaml [--set train.batch_size=4 ...]
    accelerate launch --multi_gpu --num_processes 8 -m mm2latent.training --config configs/stage1_mapper.yaml
    python -m mm2latent.training --config configs/stage1_mapper.yaml --dry-run --steps 2   # plan: time, memory
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..models.networks import load_network
from ..pipelines.generation import FacePipeline
from ..pipelines.hub import DEFAULT_COMPONENTS, resolve_component
from .components import load_training_pipeline, module_config
from .config import TrainingConfig, load_config, parse_overrides
from .data import prepare
from .idd_cache import (
    CachedDiffusionImages,
    DiffusionImageCache,
    build_idd_cache,
    cache_settings,
    modality_combinations,
    needs_idd_cache,
    prepare_cache_folder,
)
from .model_card import push_folder, write_model_card
from .stages import ControlNetStage, InverterStage, LatentStage, build_dataset
from .trainer import Trainer, make_accelerator

logger = logging.getLogger("mm2latent.training")


def load_sd_encoder(config: TrainingConfig, pipe: FacePipeline | None = None):
    """The diffusion encoder for stage 0 (no M, T or G needed), and the generator when there is one."""
    if pipe is not None:
        return pipe.encoder, pipe.generator
    if config.pipeline == "tiny":
        tiny = FacePipeline.from_pretrained("tiny", device="cpu")
        return tiny.encoder, tiny.generator
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.diffusion_encoder import DiffusionEncoder

    specs = {**DEFAULT_COMPONENTS, **{k: v for k, v in config.components.items() if v is not None}}
    folder = {n: resolve_component(n, specs[n], None, None) for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    encoder = DiffusionEncoder(
        unet=UNet2DConditionModel.from_pretrained(folder["unet"], use_safetensors=True),
        text_encoder=CLIPTextModel.from_pretrained(folder["text_encoder"], use_safetensors=True),
        tokenizer=CLIPTokenizer.from_pretrained(folder["tokenizer"]),
        scheduler=DDIMScheduler.from_pretrained(folder["scheduler"]),
        controlnets={}, vae=AutoencoderKL.from_pretrained(folder["vae"], use_safetensors=True),
    )
    return encoder, None


def make_controlnet(config: TrainingConfig, encoder):
    from diffusers import ControlNetModel

    init = config.controlnet.init
    if init == "unet":
        kwargs = {}
        channels = config.controlnet.conditioning_embedding_out_channels
        if channels:
            kwargs["conditioning_embedding_out_channels"] = tuple(channels)
        return ControlNetModel.from_unet(encoder.unet, **kwargs)
    return ControlNetModel.from_pretrained(init, use_safetensors=True)


def build(config: TrainingConfig, pipe: FacePipeline | None = None, accelerator: Accelerator | None = None) -> Trainer:
    """Everything a run needs, ready to ``train()``: the stage, its dataset and the trainer.

    Args:
        config: a full config (``load_config``).
        pipe: an already loaded pipeline to train on (its networks are modified: pass a copy).
        accelerator: an existing accelerator (default: one built from the config).
    """
    if config.stage == "mm2latent":
        from .engine_stage import build_engine_trainer

        return build_engine_trainer(config, accelerator)
    accelerator = accelerator or make_accelerator(config)
    set_seed(config.seed)
    stage = config.stage
    if stage == "inverter":
        return build_inverter(config, pipe, accelerator)
    if stage == 0:
        encoder, generator = load_sd_encoder(config, pipe)
        dataset = build_dataset(config, encoder, generator)
        task = ControlNetStage(config, encoder, make_controlnet(config, encoder))
        return Trainer(config, task, dataset, accelerator)
    if pipe is None:
        pipe = load_training_pipeline(config.pipeline, config.components,
                                      fresh=("mapper",) if stage == 1 and config.pipeline != "tiny" else ())
    weights = config.loss
    lpips = load_network("lpips", config.networks.lpips) if weights.lpips else None
    arcface = load_network("arcface", config.networks.arcface) if weights.id else None
    apply_modulator_switches(config, pipe)
    dataset = build_dataset(config, pipe)
    if needs_idd_cache(config):
        dataset = with_idd_cache(config, pipe, dataset, accelerator)
    task = LatentStage(config, pipe, lpips, arcface)
    return Trainer(config, task, dataset, accelerator)


def apply_modulator_switches(config: TrainingConfig, pipe: FacePipeline) -> None:
    """Rebuild T (at identity) when ``config.modulator``'s ablation switches differ from the loaded T's."""
    current = module_config(pipe.modulator)
    wanted = {"use_attention_outputs": config.modulator.attention_outputs,
              "use_attention_maps": config.modulator.attention_maps}
    if all(current.get(k, True) == v for k, v in wanted.items()):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        pipe.modulator = type(pipe.modulator)(**{**current, **wanted}).to(pipe.device)


def with_idd_cache(config: TrainingConfig, pipe: FacePipeline, dataset, accelerator: Accelerator):
    """The dataset with each sample's cached I^d_0 (``output_dir/idd_cache``), built first where missing.

    The main process checks the cache's settings (refusing or wiping a stale cache); every process then draws
    its share of the missing entries.
    """
    cache_dir = Path(config.output_dir) / "idd_cache"
    pipe.encoder.to(accelerator.device)
    pipe.generator.to(accelerator.device)
    combinations = modality_combinations(config.data.modalities, pipe.encoder.modalities,
                                         config.data.modality_sampling)
    if accelerator.is_main_process:
        prepare_cache_folder(cache_dir, cache_settings(config, pipe, combinations), config.diffusion.idd_stale_cache)
    accelerator.wait_for_everyone()
    build_idd_cache(config, pipe, dataset, cache_dir, accelerator.process_index, accelerator.num_processes)
    accelerator.wait_for_everyone()
    return CachedDiffusionImages(dataset, DiffusionImageCache(cache_dir), pipe.generator.resolution, combinations)


def build_inverter(config: TrainingConfig, pipe: FacePipeline | None, accelerator: Accelerator) -> Trainer:
    """The photo inverter's run: ``config.pipeline``'s generator, a fresh (or ``inverter.init``) encoder."""
    from ..editing.inversion import PSPEncoder, tiny_psp_config

    if pipe is None:
        pipe = FacePipeline.from_pretrained(config.pipeline, device="cpu", dtype=torch.float32, load_vae=False)
    generator, settings = pipe.generator, config.inverter
    if settings.init is not None:
        encoder = PSPEncoder.from_pretrained(settings.init)
    elif config.pipeline == "tiny":
        encoder = PSPEncoder(**{**tiny_psp_config(generator.num_ws, generator.style_dim),
                                "architecture": settings.architecture})
    else:
        encoder = PSPEncoder(num_ws=generator.num_ws, style_dim=generator.style_dim, input_size=settings.input_size,
                             architecture=settings.architecture)
    lpips = load_network("lpips", config.networks.lpips) if config.loss.lpips else None
    arcface = load_network("arcface", config.networks.arcface) if config.loss.id else None
    task = InverterStage(config, generator, encoder, lpips, arcface)
    return Trainer(config, task, build_dataset(config, pipe), accelerator)


def inverter_overrides(argv: list[str]) -> dict:
    """``inverter --images DIR --output DIR ...`` as config overrides of stage "inverter"."""
    parser = argparse.ArgumentParser(prog="python -m mm2latent.training inverter",
                                     description="Train the photo -> W+ encoder used to edit real photos "
                                                 "(the same trainer and pSp objective as stages 1 and 2).")
    parser.add_argument("--images", required=True, help="folder of FFHQ-aligned face photos")
    parser.add_argument("--output", required=True, help="run folder (checkpoints, samples, final/inverter)")
    parser.add_argument("--model", default="tiny", help="pipeline whose generator is inverted (folder or repo)")
    parser.add_argument("--architecture", choices=("psp", "e4e"), default="psp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--lpips", default=None, help="LPIPS network: default repository, a folder, org/name or tiny")
    parser.add_argument("--arcface", default=None, help="ArcFace network: same forms")
    parser.add_argument("--init", default=None, help="encoder folder to continue from")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other config entry")
    args = parser.parse_args(argv)
    overrides = {
        "stage": "inverter", "seed": args.seed, "output_dir": args.output, "pipeline": args.model,
        "data": {"kind": "photos", "root": args.images, "num_workers": 0},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "checkpoint_every": args.save_every, "sample_every": args.save_every},
        "networks": {"lpips": args.lpips, "arcface": args.arcface},
        "inverter": {"architecture": args.architecture, "init": args.init},
    }
    for key, value in parse_overrides(args.set).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return overrides


def run(config: TrainingConfig, pipe: FacePipeline | None = None) -> Trainer:
    """Train (resuming if a checkpoint exists), export to ``output_dir/final`` with a model card, push if asked."""
    trainer = build(config, pipe)
    trainer.resume(config.train.resume)
    trainer.train()
    if config.train.save_rank_weights:
        trainer.save_rank_weights()
    acc = trainer.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = Path(config.output_dir) / "final"
        trainer.stage.export(trainer.unwrapped_model(), final)
        last = {k: v for k, v in (trainer.history[-1] if trainer.history else {}).items() if k != "step"}
        write_model_card(final, config, last)
        hub = config.hub
        if hub.push_to_hub:
            if not hub.repo_id:
                raise ValueError("hub.push_to_hub needs hub.repo_id")
            logger.info("pushed %s", push_folder(final, hub.repo_id, hub.private))
    trainer.finish()
    return trainer


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] == "prepare":
        parser = argparse.ArgumentParser(prog="python -m mm2latent.training prepare",
                                         description="Convert CelebAMask-HQ + MM-CelebA-HQ once for training.")
        parser.add_argument("--root", required=True, help="CelebAMask-HQ folder (CelebA-HQ-img, CelebAMask-HQ-mask-anno)")
        parser.add_argument("--output", required=True)
        parser.add_argument("--text-dir", help="Multi-Modal CelebA-HQ text/ folder (default ROOT/text)")
        parser.add_argument("--mask-dir", help="combined masks {i}.png instead of the per-part files")
        parser.add_argument("--mask-size", type=int, default=512)
        parser.add_argument("--scribble-size", type=int, default=512)
        parser.add_argument("--test-fraction", type=float, default=0.1)
        parser.add_argument("--test-ids", help="file with the test image ids, one per line")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--limit", type=int)
        parser.add_argument("--workers", type=int, default=0)
        parser.add_argument("--generator", choices=("stylegan2", "eg3d"), default="stylegan2",
                            help="eg3d: EG3D's crop of each photo (mask and scribble warped alike) and its camera "
                                 "label (cameras.json), see training/prepare_3d.py")
        parser.add_argument("--image-dir", help="photos {i}.jpg (default ROOT/CelebA-HQ-img)")
        args = parser.parse_args(argv[1:])
        test_ids = [int(x) for x in Path(args.test_ids).read_text().split()] if args.test_ids else None
        if args.generator == "eg3d":
            from .prepare_3d import prepare_eg3d

            print(prepare_eg3d(args.root, args.output, args.text_dir, args.mask_dir, test_fraction=args.test_fraction,
                               test_ids=test_ids, seed=args.seed, limit=args.limit, image_dir=args.image_dir,
                               workers=args.workers))
            return
        out = prepare(args.root, args.output, args.text_dir, args.mask_dir, args.mask_size, args.scribble_size,
                      args.test_fraction, test_ids, args.seed, args.limit, args.workers)
        print(out)
        return
    if argv and argv[0] == "inverter":
        run(load_config(None, inverter_overrides(argv[1:])))
        return
    parser = argparse.ArgumentParser(prog="python -m mm2latent.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and training/config.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config entries")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan the run: time --steps real steps of stage 1 or 2 on full-size random models and "
                             "report time per step, peak memory and the projected time (training/dry_run.py)")
    parser.add_argument("--steps", type=int, default=2, help="steps a --dry-run times (default 2)")
    parser.add_argument("--generator", choices=("stylegan2", "eg3d"), default="stylegan2",
                        help="the generator a --dry-run builds at full size (eg3d: NVIDIA's FFHQ 512² EG3D)")
    args = parser.parse_args(argv)
    config = load_config(args.config, parse_overrides(args.set))
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.dry_run:
        from .dry_run import dry_run, format_report

        report = dry_run(config, args.steps, generator=args.generator)
        print(format_report(report))
        print(json.dumps(report))
        return
    run(config)


if __name__ == "__main__":
    main()
