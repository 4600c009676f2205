"""Training configuration: typed sections with every knob documented, read from YAML plus ``--set`` overrides.

``load_config(path, overrides)`` merges the defaults below, a YAML file and overrides, and checks every key and
value: an unknown key is an error that names it and the nearest valid one ("unknown key 'train.batchsize'; did
you mean 'train.batch_size'?"), a value of the wrong type names the key and the expected type. Code reads the
result as attributes (``config.train.batch_size``); ``config.to_dict()`` gives the plain dict (model cards,
TensorBoard, YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = ["LOSS_TARGETS", "STAGES", "ConfigError", "TrainingConfig", "load_config", "loss_targets", "parse_overrides"]

#: 0: face-mask (or scribble) ControlNet; 1: M with T frozen at identity; 2: T with M frozen; "inverter": the photo
#: encoder (pSp / e4e); "mm2latent": the diffusion-free engine (training/engine_stage.py).
STAGES = (0, 1, 2, "inverter", "mm2latent")
LOSS_TARGETS = ("auto", "gt", "idd", "both")


class ConfigError(ValueError):
    """A training config names an unknown key, or a value of the wrong type."""


@dataclass
class DataConfig:
    kind: str = "celebamask"  # "celebamask" (a folder written by `prepare`), "synthetic" (G renders, tests), "photos"
    root: str | None = None  # the `prepare` folder; with kind "photos": a folder of FFHQ-aligned photos
    split: str = "train"
    modalities: list[str] = field(default_factory=lambda: ["mask", "scribble"])
    modality_sampling: str = "one"  # "one": one random modality per micro-batch; "all": every listed one
    # EG3D's dataset.json ({"labels": [[file, [25 floats]], ...]}, training/cameras.py): the camera G renders each
    # photo's sample at (3D generators). With "synthetic" data the samples cycle through its labels.
    camera_labels: str | None = None
    caption_template: str = "{caption}"  # rewrites every caption (style transfer: "a Greek statue, {caption}")
    num_workers: int = 4
    num_samples: int = 8  # synthetic only
    truncation: float = 0.7  # synthetic only


@dataclass
class TrainConfig:
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 100_000  # optimizer steps
    learning_rate: float = 1.0e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = True  # stage 0: ControlNet and the frozen U-Net it backpropagates through
    checkpoint_every: int = 5000
    checkpoints_total_limit: int | None = 3
    sample_every: int = 1000
    log_every: int = 10
    resume: str | None = "latest"  # "latest", a checkpoint folder, or null
    log_with: str | None = "tensorboard"  # or null
    save_rank_weights: bool = False  # each process writes its final weights (the DDP agreement test)
    progress: bool = True  # tqdm bar
    cpu: bool = False  # force CPU (multi-process CPU runs without CUDA switch to it automatically)


@dataclass
class DiffusionConfig:
    num_inference_steps: int = 50  # the DDIM schedule t is sampled from
    timestep_range: list[int] = field(default_factory=lambda: [0, 999])  # inclusive range of training t (stages 1, 2)
    conditioning_scale: float = 1.0
    # I^d_0, the target the diffusion model draws itself (FacePipeline.draw), cached per (image, modalities, caption):
    idd_steps: int = 20  # DDIM steps of its schedule
    idd_strength: float = 0.8  # starts from the GT latent noised to t ≈ strength * T (1 = pure noise)
    # Classifier-free guidance of I^d_0: 7.5 is the default of diffusers' StableDiffusionControlNetPipeline (and of
    # FacePipeline.draw, so training targets and the training-free mode draw alike); lllyasviel's demos use 9.0.
    idd_guidance_scale: float = 7.5
    idd_caption_index: int = 0  # which caption line of an image T sees (and I^d_0 is drawn with) when it is cached
    # Captions per image cached and sampled (one per step, as stage 1 does): None = only idd_caption_index's line,
    # 0 = every caption, n = n captions drawn once per image (seeded).
    idd_captions_per_image: int | None = None
    idd_batch_size: int = 8
    idd_stale_cache: str = "refuse"  # a cache made with other settings: "refuse" (error naming them) or "rebuild"
    # "lcm": draw I^d_0 with the fused LCM-LoRA (idd_lcm_steps LCM steps, guidance 1; idd_steps and
    # idd_guidance_scale are DDIM's) — a deviation from the paper, ~10x fewer U-Net passes (docs/training_free.md).
    idd_sampler: str = "ddim"
    idd_lcm_steps: int = 4


@dataclass
class LossConfig:
    """pSp's objective (one definition, ``mm2latent/losses.py``): λ0·L2 + λ1·LPIPS + λ2·ID + λ3·‖w − w̄‖."""

    l2: float = 1.0
    lpips: float = 0.8
    id: float = 0.1
    w_reg: float = 0.005
    resolution: int = 256  # L2, LPIPS and ArcFace see images pooled to this size (pSp's face_pool)
    # What the image terms compare G(w) with. "gt": I^gt in every term; "idd": I^d_0 in every term (style transfer,
    # paper Section 4); "both": L2 and LPIPS against I^d_0, identity against I^gt (the paper's stage 2);
    # "auto": stage 1 "gt", stage 2 "both".
    target: str = "auto"


@dataclass
class ModulatorConfig:
    """T's Table 2 ablation switches (stages 1 and 2 build T with them; "w/o T" is a stage-1 run's output)."""

    attention_outputs: bool = True  # False: "w/o A", F̂ = F
    attention_maps: bool = True  # False: "w/o Ā", F̄̂ = F̄


@dataclass
class NetworksConfig:
    lpips: str | None = None  # None: default Hub repos; "tiny"; a folder; "org/name"
    arcface: str | None = None


@dataclass
class ControlNetConfig:
    modality: str = "mask"
    init: str = "unet"  # "unet" (diffusers' ControlNetModel.from_unet) or a folder / Hub repo to fine-tune
    proportion_empty_prompts: float = 0.05
    conditioning_embedding_out_channels: list[int] | None = None  # None: diffusers' default (16, 32, 96, 256)


@dataclass
class InverterConfig:
    """Stage "inverter": the photo encoder, trained on ``data.root`` photos against ``pipeline``'s generator."""

    architecture: str = "psp"  # "psp" (one head per W+ layer) or "e4e" (w0 + per-layer offsets)
    init: str | None = None  # an encoder folder to continue from; None: a fresh encoder at the generator's sizes
    input_size: int = 256  # photos are encoded (and the losses compared) at this size


@dataclass
class ClipConfig:
    model: str = "ViT-B-16"
    weights: str | None = None  # FaRL / OpenAI CLIP file or folder
    quick_gelu: bool = True


@dataclass
class AutoencoderConfig:
    code_dim: int = 512
    image_size: int = 256


@dataclass
class LatentMapperConfig:
    hidden_dim: int = 1024
    num_layers: int = 4


@dataclass
class MM2LatentConfig:
    """Stage "mm2latent" only."""

    train: list[str] = field(default_factory=lambda: ["mask_autoencoder", "sketch_autoencoder", "mapper"])  # what learns
    generator: str | None = None  # None: the released StyleGAN2; "tiny"; a folder; "org/name[@revision]"
    init: str | None = None  # None: fresh networks around mm2latent.clip; "tiny"; an engine folder (a run's final/engine)
    clip: ClipConfig = field(default_factory=ClipConfig)
    face_parser: str | None = None  # labels G's renders: None (default repository), "tiny", a folder, "org/name"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # fresh mask and sketch autoencoders
    mapper: LatentMapperConfig = field(default_factory=LatentMapperConfig)  # fresh mapper (num_ws, style_dim from G)
    truncation: list[float] = field(default_factory=lambda: [0.5, 1.0])  # ψ of G's training samples, uniform
    embedding_noise: float = 0.2  # length of the random step added to the unit CLIP image embedding
    modality_dropout: float = 0.3  # per sample and input, the chance it is replaced by the null token
    condition_size: int | None = None  # side of the parsed masks / edge maps (None: the autoencoders' image_size)
    latent_weight: float = 1.0  # MSE(ŵ, w); the image terms use "loss" (l2, lpips, id, w_reg)
    mask_weight: float = 1.0  # cross-entropy of the mask autoencoder
    sketch_weight: float = 1.0  # BCE + Dice of the sketch autoencoder


@dataclass
class HubConfig:
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool = False


@dataclass
class ModelCardConfig:
    data: str = "CelebAMask-HQ (masks, photos) and Multi-Modal CelebA-HQ (captions)"
    data_license: str = "CelebAMask-HQ / CelebA-HQ: non-commercial research and educational use only"
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    stage: int | str = 1  # one of STAGES
    seed: int = 0  # seeds initial weights, shuffling, timesteps, noise, captions
    output_dir: str = "runs/stage1"
    # Where E and G come from: "tiny", "sd15" (SD-1.5 + StyleGAN2 from the Hub, fresh M and T), a folder or Hub
    # repository with an mm2latent.json (stage 2: the stage-1 output's "final" folder).
    pipeline: str = "sd15"
    # With "sd15": manifest entries to replace ({"repo_id": ...} / {"path": ...}) or drop (null).
    components: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    modulator: ModulatorConfig = field(default_factory=ModulatorConfig)
    networks: NetworksConfig = field(default_factory=NetworksConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    inverter: InverterConfig = field(default_factory=InverterConfig)
    mm2latent: MM2LatentConfig = field(default_factory=MM2LatentConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    model_card: ModelCardConfig = field(default_factory=ModelCardConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- reading


def _merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins; dicts merge, except free-form ``components``)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "components":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to ``annotation`` (dataclass, list[...], X | None, int, float, str, bool, dict)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_value(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where} must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of settings, got {value!r}")
        return _build(annotation, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be text, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")  # a bug in this module


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else \
                f"; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}'{hint}")
        kwargs[key] = _check_value(value, hints[key], where)
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainingConfig:
    """Defaults <- YAML file <- overrides, checked key by key.

    Raises:
        ConfigError: an unknown key (naming the nearest valid one), a value of the wrong type, an unknown stage.
    """
    values = TrainingConfig().to_dict()
    if path is not None:
        values = _merge(values, yaml.safe_load(Path(path).read_text()) or {})
    values = _merge(values, overrides or {})
    config = _build(TrainingConfig, values)
    if config.stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(map(repr, STAGES))}, got {config.stage!r}")
    choices = {"loss.target": (config.loss.target, LOSS_TARGETS),
               "diffusion.idd_stale_cache": (config.diffusion.idd_stale_cache, ("refuse", "rebuild")),
               "diffusion.idd_sampler": (config.diffusion.idd_sampler, ("ddim", "lcm")),
               "data.modality_sampling": (config.data.modality_sampling, ("one", "all"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return config


def loss_targets(config: TrainingConfig) -> tuple[str, str]:
    """(reconstruction target, identity target), each "gt" (I^gt) or "idd" (I^d_0), for stages 1 and 2."""
    target = config.loss.target
    if target == "auto":
        target = "gt" if config.stage == 1 else "both"
    return {"gt": ("gt", "gt"), "idd": ("idd", "idd"), "both": ("idd", "gt")}[target]


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
