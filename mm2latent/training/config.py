"""Training configuration: YAML files merged over these defaults (every knob documented here)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

DEFAULTS: dict = {
    "stage": 1,  # 0: face-mask (or scribble) ControlNet, 1: M with T frozen at identity, 2: T with M frozen,
    # "mm2latent": the diffusion-free engine (mapper and/or autoencoders on G's samples, training/engine_stage.py)
    "seed": 0,  # seeds initial weights, shuffling, timesteps, noise, captions
    "output_dir": "runs/stage1",
    # Where E and G come from: "tiny", "sd15" (SD-1.5 + StyleGAN2 from the Hub, fresh M and T), a folder
    # or Hub repository with an mm2latent.json (stage 2: the stage-1 output's "final" folder).
    "pipeline": "sd15",
    # With "sd15": manifest entries to replace ({"repo_id": ...} / {"path": ...}) or drop (null).
    "components": {},
    "data": {
        "kind": "celebamask",  # "celebamask" (a folder written by `prepare`) or "synthetic" (G renders, tests)
        "root": None,
        "split": "train",
        "modalities": ["mask", "scribble"],
        "modality_sampling": "one",  # "one": one random modality per micro-batch; "all": every listed one
        "num_workers": 4,
        "num_samples": 8,  # synthetic only
        "truncation": 0.7,  # synthetic only
    },
    "train": {
        "batch_size": 8,  # per process
        "gradient_accumulation_steps": 1,
        "max_steps": 100_000,  # optimizer steps
        "learning_rate": 1.0e-4,
        "adam_betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "lr_scheduler": "constant",  # any diffusers.optimization scheduler name
        "lr_warmup_steps": 0,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",  # "no", "fp16", "bf16"
        "gradient_checkpointing": True,  # stage 0: ControlNet and the frozen U-Net it backpropagates through
        "checkpoint_every": 5000,
        "checkpoints_total_limit": 3,
        "sample_every": 1000,
        "log_every": 10,
        "resume": "latest",  # "latest", a checkpoint folder, or null
        "log_with": "tensorboard",  # or null
        "save_rank_weights": False,
        "progress": True,  # tqdm bar
        "cpu": False,  # force CPU (multi-process CPU runs without CUDA switch to it automatically)  # each process writes its final weights (the DDP agreement test)
    },
    "diffusion": {
        "num_inference_steps": 50,  # the DDIM schedule t is sampled from
        "timestep_range": [0, 999],  # inclusive range of training t (stages 1 and 2)
        "conditioning_scale": 1.0,
        "idd_steps": 20,  # DDIM steps used to make I^d_0 (stage 2 cache)
        "idd_strength": 0.8,  # I^d_0 starts from the GT latent noised to t = strength * T (1 = pure noise)
        "idd_batch_size": 8,
    },
    "loss": {"l2": 1.0, "lpips": 0.8, "id": 0.1, "w_reg": 0.005, "resolution": 256},
    "networks": {"lpips": None, "arcface": None},  # None: default Hub repos; "tiny"; a folder; "org/name"
    "controlnet": {
        "modality": "mask",
        "init": "unet",  # "unet" (diffusers' ControlNetModel.from_unet) or a folder / Hub repo to fine-tune
        "proportion_empty_prompts": 0.05,
        "conditioning_embedding_out_channels": None,  # None: diffusers' default (16, 32, 96, 256)
    },
    "mm2latent": {  # stage "mm2latent" only
        "train": ["mask_autoencoder", "sketch_autoencoder", "mapper"],  # what learns in this run
        "generator": None,  # None: the released StyleGAN2; "tiny"; a folder; "org/name[@revision]"
        "init": None,  # None: fresh networks around mm2latent.clip; "tiny"; an engine folder (a run's final/engine)
        "clip": {"model": "ViT-B-16", "weights": None, "quick_gelu": True},  # FaRL / OpenAI CLIP file or folder
        "face_parser": None,  # labels G's renders: None (default repository), "tiny", a folder, "org/name"
        "autoencoder": {"code_dim": 512, "image_size": 256},  # fresh mask and sketch autoencoders
        "mapper": {"hidden_dim": 1024, "num_layers": 4},  # fresh mapper (num_ws, style_dim from G)
        "truncation": [0.5, 1.0],  # ψ of G's training samples, uniform in this range
        "embedding_noise": 0.2,  # length of the random step added to the unit CLIP image embedding
        "modality_dropout": 0.3,  # per sample and input, the chance it is replaced by the null token
        "condition_size": None,  # side of the parsed masks / edge maps (None: the autoencoders' image_size)
        "latent_weight": 1.0,  # MSE(ŵ, w); the image terms use "loss" (l2, lpips, id, w_reg)
        "mask_weight": 1.0,  # cross-entropy of the mask autoencoder
        "sketch_weight": 1.0,  # BCE + Dice of the sketch autoencoder
    },
    "hub": {"push_to_hub": False, "repo_id": None, "private": False},
    "model_card": {
        "data": "CelebAMask-HQ (masks, photos) and Multi-Modal CelebA-HQ (captions)",
        "data_license": "CelebAMask-HQ / CelebA-HQ: non-commercial research and educational use only",
        "metrics": {},
    },
}


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins; dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "components":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- YAML file <- overrides."""
    config = DEFAULTS
    if path is not None:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    config = merge(config, overrides or {})
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    if config["stage"] not in (0, 1, 2, "mm2latent"):
        raise ValueError(f"stage must be 0, 1, 2 or \"mm2latent\", got {config['stage']!r}")
    return config


def parse_overrides(items: list[str]) -> dict:
    """["train.max_steps=10", "seed=3"] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
