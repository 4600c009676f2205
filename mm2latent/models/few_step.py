"""Few-step drawing of I^d_0: LCM-LoRA (latent consistency distillation of SD-1.5) fused into our U-Net.

The training-free mode (METHOD.md) draws I^d_0 with the diffusion model, then inverts it. With 20 DDIM steps
and classifier-free guidance that is 40 U-Net + ControlNet passes; the published LCM-LoRA of SD-1.5
(``latent-consistency/lcm-lora-sdv1-5``, Luo et al. 2023) draws in 4 steps of :class:`~diffusers.LCMScheduler`
without the unconditional pass (guidance 1), and works with SD-1.5 ControlNets (diffusers documents it with
them): 4 passes instead of 40.

* :class:`FewStepLoRA` reads a LoRA file through diffusers' LoRA loading (kohya ``lora_unet_*`` keys, as the
  published file has them, converted to PEFT's layout by diffusers) and fuses it into a
  ``UNet2DConditionModel`` through diffusers / PEFT (W ← W + scale·(α/r)·B·A), leaving a plain U-Net: no
  adapter layers, same parameter names, no extra cost per pass. :meth:`FewStepLoRA.unfuse` subtracts the same
  product again (exact up to float rounding: one rounding per weight each way).
* :data:`DRAWINGS` names the two drawings: ``"quality"`` (20 DDIM steps, guidance 7.5: the paper's) and
  ``"fast"`` (4 LCM steps, guidance 1). :func:`make_scheduler` builds the scheduler of a sampler from the
  SD-1.5 scheduler config.

The fused U-Net is a different network: M and T were trained on the plain U-Net's features, so a pipeline whose
trained M and T read the U-Net must unfuse before a fast / quality pass (see docs/training_free.md).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

from ..errors import CheckpointFormatError, InvalidSettingError, WeightsNotFoundError

__all__ = [
    "DRAWINGS",
    "LCM_LORA_FILE",
    "LCM_LORA_REPO",
    "SAMPLERS",
    "Drawing",
    "FewStepLoRA",
    "make_scheduler",
    "save_random_lora",
    "step_generators",
]

#: The published LCM-LoRA of Stable Diffusion 1.5 and its weights file.
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
#: Samplers of I^d_0: DDIM (the paper's) and LCM (needs a fused LCM-LoRA).
SAMPLERS = ("ddim", "lcm")
ADAPTER_NAME = "few_step"
#: The U-Net layers the LCM-LoRA training script adapts (its ``--lora_target_modules`` default) and the published
#: file's rank (64: 67 M factors, the file's 135 MB in fp16).
LCM_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                      "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LCM_RANK = 64


@dataclass(frozen=True)
class Drawing:
    """How I^d_0 is drawn.

    Attributes:
        sampler: "ddim" or "lcm".
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance; 1 = no unconditional pass.
    """

    sampler: str
    num_steps: int
    guidance_scale: float

    @property
    def unet_passes(self) -> int:
        """U-Net (+ ControlNet) passes per image."""
        return self.num_steps * (2 if self.guidance_scale > 1 else 1)


#: The named drawings of the training-free mode. "fast": LCM-LoRA's recommended 4 steps at guidance 1 (its
#: model card: 2-8 steps, guidance 1-2; above 1 the unconditional pass comes back and doubles the cost).
DRAWINGS = {
    "quality": Drawing("ddim", 20, 7.5),
    "fast": Drawing("lcm", 4, 1.0),
}


def make_scheduler(sampler: str, config: dict) -> DDIMScheduler | LCMScheduler:
    """The scheduler of ``sampler`` from an SD-1.5 scheduler config (betas and training steps are shared)."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "lcm":
        return LCMScheduler.from_config(config)
    raise InvalidSettingError(f"the sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def step_generators(seeds: list[int], latent_shape: tuple[int, ...]) -> list[torch.Generator]:
    """One CPU generator per sample for LCM's noise between steps, continuing that sample's seeded stream.

    The initial latent of a sample is the first ``randn(latent_shape)`` of ``Generator().manual_seed(seed)``
    (:meth:`DiffusionEncoder.initial_noise`); the generator returned here has made that draw already, so the
    step noise is independent of the initial noise, the same on every device, and the same for a sample alone
    or in a batch.
    """
    generators = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        torch.randn(latent_shape, generator=generator)
        generators.append(generator)
    return generators


def _lora_layers(unet: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in unet.modules())


class FewStepLoRA:
    """A distillation LoRA (LCM-LoRA) for the SD-1.5 U-Net, kept in memory as low-rank factors and fused on demand.

    Args:
        state_dict: the LoRA's factors as diffusers' ``lora_state_dict`` returns them (``unet.*`` keys).
        network_alphas: their α per layer (kohya ``.alpha``), or None (α = r).
        scale: multiplier of the fused product (1 = as trained).
        name: where the weights came from (shown in outputs and docs).
        sampler: the scheduler the LoRA was distilled for.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], network_alphas: dict[str, float] | None,
                 scale: float = 1.0, name: str = "custom", sampler: str = "lcm"):
        if not state_dict or not all(k.startswith("unet.") for k in state_dict):
            raise CheckpointFormatError("the LoRA file holds no U-Net layers (expected kohya 'lora_unet_*' or "
                                        "diffusers 'unet.*' keys)")
        self.state_dict, self.network_alphas = state_dict, network_alphas
        self.scale, self.name, self.sampler = float(scale), name, sampler
        self._fused: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    @property
    def num_layers(self) -> int:
        """How many U-Net layers the LoRA changes."""
        return sum(1 for k in self.state_dict if k.endswith(("down.weight", "lora_A.weight")))

    @classmethod
    def from_file(cls, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> FewStepLoRA:
        """Read a LoRA safetensors file (the published ``pytorch_lora_weights.safetensors`` layout)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        path = Path(path)
        if not path.is_file():
            raise WeightsNotFoundError(f"no LoRA file at {path}")
        if path.suffix != ".safetensors":
            raise CheckpointFormatError(f"LoRA weights are read from .safetensors files only, got {path.name}")
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True)
        return cls(state_dict, alphas, scale=scale, name=name or str(path))

    @classmethod
    def from_pretrained(cls, repo_id: str = LCM_LORA_REPO, filename: str = LCM_LORA_FILE,
                        revision: str | None = None, scale: float = 1.0) -> FewStepLoRA:
        """Download (or read from the Hub cache) a published LoRA; default: LCM-LoRA for SD-1.5."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = hf_hub_download(repo_id, filename, revision=revision)
        except LocalEntryNotFoundError as error:
            raise WeightsNotFoundError(f"{repo_id}/{filename} is not in the Hub cache and the Hub cannot be "
                                       "reached") from error
        return cls.from_file(path, scale=scale, name=repo_id)

    # ------------------------------------------------------------------ fusing
    def is_fused(self, unet: UNet2DConditionModel) -> bool:
        return unet in self._fused

    def _apply(self, unet: UNet2DConditionModel, scale: float) -> None:
        """Load the factors as a PEFT adapter (diffusers), merge scale·ΔW into the weights, drop the adapter."""
        if _lora_layers(unet):
            raise InvalidSettingError("the U-Net already carries LoRA adapter layers; fuse or unload them first")
        try:
            unet.load_lora_adapter(dict(self.state_dict), prefix="unet", network_alphas=self.network_alphas,
                                   adapter_name=ADAPTER_NAME)
        except (RuntimeError, ValueError) as error:  # shapes of another model's layers
            unet.unload_lora()
            raise CheckpointFormatError(f"the LoRA {self.name} does not fit this U-Net: {error}") from error
        loaded = _lora_layers(unet)
        try:
            if loaded != self.num_layers:
                raise CheckpointFormatError(f"the LoRA has {self.num_layers} layers but only {loaded} match this "
                                            "U-Net: it was trained for another model")
            unet.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
        finally:
            unet.unload_lora()

    @torch.no_grad()
    def fuse(self, unet: UNet2DConditionModel) -> None:
        """W ← W + scale·(α/r)·B·A in every layer the LoRA names (no-op when already fused into ``unet``)."""
        if unet in self._fused:
            return
        self._apply(unet, self.scale)
        self._fused.add(unet)

    @torch.no_grad()
    def unfuse(self, unet: UNet2DConditionModel) -> None:
        """Subtract the product again (the plain U-Net up to float rounding); no-op when not fused."""
        if unet not in self._fused:
            return
        self._apply(unet, -self.scale)
        self._fused.discard(unet)


def save_random_lora(unet: UNet2DConditionModel, path: str | os.PathLike, rank: int = LCM_RANK, alpha: float = LCM_RANK,
                     seed: int = 0, std: float = 0.05) -> Path:
    """Write a LoRA of ``unet`` with random factors in the published LCM-LoRA file's layout (tests, speed runs).

    Written as the LCM training script writes it (diffusers ``examples/consistency_distillation/
    train_lcm_distill_lora_sd_wds.py``: a PEFT ``LoraConfig`` on the LCM target modules, ``get_peft_model_state_dict``,
    then ``get_module_kohya_state_dict(unet, "lora_unet", dtype)``: ``base_model.model`` → ``lora_unet``, ``lora_A/B``
    → ``lora_down/up``, every dot but the last two → ``_``, one ``.alpha`` per layer), in fp16 safetensors.
    """
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    student = get_peft_model(copy.deepcopy(unet).float(), LoraConfig(r=rank, lora_alpha=alpha,
                                                                     target_modules=list(LCM_TARGET_MODULES)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero; a trained LoRA has both factors non-zero
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    tensors = {}
    for peft_key, weight in get_peft_model_state_dict(student).items():
        key = peft_key.replace("base_model.model", "lora_unet").replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        key = key.replace(".", "_", key.count(".") - 2)
        tensors[key] = weight.to(torch.float16).contiguous()
        if "lora_down" in key:
            tensors[f"{key.split('.')[0]}.alpha"] = torch.tensor(alpha).to(torch.float16)
    save_file(tensors, str(path))
    return Path(path)
