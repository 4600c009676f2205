"""The denoising loop's contract: its timesteps, its per-step callback and cheap previews of the drawing.

The loop itself is :meth:`FacePipeline.denoise <mm2latent.FacePipeline.denoise>` (the pipeline owns its sampling,
as diffusers pipelines do). It uses only the diffusers scheduler API — ``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``step(...).prev_sample`` and, to start from a clean latent,
``add_noise`` — so any diffusers scheduler plugs in: DDIM by default (the loaded model's config), or e.g.
``LCMScheduler`` with a fused LCM-LoRA for 4-step drawing at guidance 1 (no unconditional pass when
``guidance_scale <= 1``).

The per-step callback follows diffusers' ``callback_on_step_end``::

    def callback(pipe, step_index, timestep, state) -> dict | None: ...

``state`` holds the tensors named in ``callback_on_step_end_tensor_inputs`` (of :data:`STEP_TENSORS`) as they
are after the step, plus ``"num_steps"`` (how many steps run). A returned dict may hold ``"latents"`` (they
replace the loop's latents, as in diffusers) and ``"stop": True`` — the public way to end the loop after this
step (diffusers' own is the private ``pipe._interrupt``). :func:`preview_callback` builds one that shows the
drawing forming.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidStepsError
from ..models.diffusion_encoder import EncoderFeatures

__all__ = ["STEP_TENSORS", "STOP", "SD15_LATENT_RGB", "DenoisingOutput", "StepCallback", "latents_to_rgb",
           "predicted_clean_latents", "preview_callback", "schedule_timesteps", "step_kwargs"]

#: The tensors a callback may ask for in ``callback_on_step_end_tensor_inputs``: the latents after the step,
#: the scheduler's prediction of the clean latent x0 (when the scheduler gives one; None otherwise) and the
#: (guided) noise prediction of the step.
STEP_TENSORS = ("latents", "pred_original_sample", "noise_pred")
#: What the tensor inputs default to.
DEFAULT_STEP_TENSORS = ("latents", "pred_original_sample")
#: The key of a callback's returned dict that ends the loop after the current step.
STOP = "stop"

#: ``callback_on_step_end(pipe, step_index, timestep, state) -> dict | None``.
StepCallback = Callable[[Any, int, int, dict], "dict | None"]

#: SD-1.5 VAE latents (scaled by the VAE's scaling factor, as the U-Net sees them) -> RGB in about [-1, 1]:
#: the linear fit of the VAE decoder that UIs such as ComfyUI use for live previews (rows: latent channels,
#: columns: R, G, B). Cheap (a 4x3 matrix per pixel) and at the latent's resolution (64² for SD-1.5).
SD15_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


@dataclass
class DenoisingOutput:
    """What :meth:`FacePipeline.denoise <mm2latent.FacePipeline.denoise>` returns for a batch of B samples.

    Attributes:
        latents: the latents after the last scheduler step that ran, [B, 4, h, w] (with ``run_to_end``
            and no early stop: the clean latent z_0).
        features: the encoder's features at each feature step (conditional half under guidance).
        timesteps: the timestep of each feature step.
        steps_run: the timesteps whose U-Net pass ran, in order.
        stopped: whether a callback ended the loop early.
    """

    latents: torch.Tensor
    features: list[EncoderFeatures] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)
    stopped: bool = False


def schedule_timesteps(scheduler, num_steps: int, strength: float, device: torch.device,
                       from_clean: bool) -> torch.Tensor:
    """The timesteps that run: the scheduler's ``num_steps`` schedule, or with ``from_clean`` (img2img) its
    tail from t ≈ ``strength``·T, as diffusers' img2img pipelines take it.

    Args:
        scheduler: any diffusers scheduler (``set_timesteps`` is called on it).
        num_steps: steps of the full schedule (1..1000).
        strength: how far a clean latent is noised (1 = pure noise: the whole schedule).
        device: where the timesteps live.
        from_clean: whether sampling starts from a clean latent.

    Raises:
        InvalidStepsError: ``num_steps`` or ``strength`` out of range.
    """
    if not 1 <= num_steps <= 1000:
        raise InvalidStepsError(f"num_steps must be between 1 and 1000, got {num_steps}")
    # On the meta device (full-size shape checks) the timesteps stay readable numbers on the CPU.
    scheduler.set_timesteps(num_steps, device="cpu" if torch.device(device).type == "meta" else device)
    timesteps = scheduler.timesteps
    if not from_clean or strength >= 1.0:
        return timesteps
    if not 0.0 < strength <= 1.0:
        raise InvalidStepsError(f"strength must be in (0, 1], got {strength}")
    order = getattr(scheduler, "order", 1)
    start = min(num_steps - 1, int(round(num_steps * (1.0 - strength)))) * order
    if hasattr(scheduler, "set_begin_index"):  # schedulers that count their steps start counting there
        scheduler.set_begin_index(start)
    return timesteps[start:]


def step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    """Keyword arguments of ``scheduler.step`` beyond (noise, t, latents): the random generator of schedulers
    that add noise in their step (LCM), when one is given."""
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


def predicted_clean_latents(step_output) -> torch.Tensor | None:
    """The scheduler's prediction of x0 in a step's output (DDIM: ``pred_original_sample``; LCM: ``denoised``),
    or None when it gives none."""
    for name in ("pred_original_sample", "denoised"):
        value = getattr(step_output, name, None)
        if value is not None:
            return value
    return None


def check_step_tensors(names: Sequence[str]) -> tuple[str, ...]:
    """``callback_on_step_end_tensor_inputs`` checked against :data:`STEP_TENSORS`."""
    unknown = sorted(set(names) - set(STEP_TENSORS))
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not step tensors; choose among "
                         f"{', '.join(STEP_TENSORS)}")
    return tuple(names)


def latents_to_rgb(latents: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """A cheap preview of SD-1.5 latents: :data:`SD15_LATENT_RGB` per pixel, no VAE.

    Args:
        latents: [B, 4, h, w] scaled VAE latents (e.g. a step's ``pred_original_sample``).
        size: resize the preview to size² (bilinear); None keeps the latent's resolution.

    Returns:
        [B, 3, h, w] (or size²) float32 in [-1, 1].
    """
    assert latents.ndim == 4 and latents.shape[1] == len(SD15_LATENT_RGB), "expected [B, 4, h, w] latents"
    factors = torch.tensor(SD15_LATENT_RGB, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), factors)
    if size is not None:
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
    return rgb.clamp(-1, 1)


def preview_callback(
    on_preview: Callable[[int, int, torch.Tensor], bool | None],
    every: int = 1,
    decoder: str = "approx",
) -> StepCallback:
    """A ``callback_on_step_end`` that shows the drawing forming (and drives a progress bar).

    Every ``every`` steps, and after the last, it previews the scheduler's x0 prediction (the latents when the
    scheduler gives none) and calls ``on_preview(step_index, num_steps, images)`` with ``images`` [B, 3, H, W]
    in [-1, 1]. When ``on_preview`` returns True the loop stops after this step.

    Args:
        on_preview: receives each preview (e.g. updates a Gradio image and progress bar).
        every: preview every this many steps (1 = each step).
        decoder: "approx" (:func:`latents_to_rgb`, at the latent's resolution, costs nothing next to a U-Net
            pass) or "vae" (the pipeline's VAE: exact, as costly as the final decode).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if decoder not in ("approx", "vae"):
        raise ValueError(f"decoder must be 'approx' or 'vae', got {decoder!r}")

    def callback(pipe, step_index: int, timestep: int, state: dict) -> dict | None:
        total = state["num_steps"]
        if (step_index + 1) % every and step_index + 1 != total:
            return None
        latents = state.get("pred_original_sample")
        latents = state["latents"] if latents is None else latents
        images = latents_to_rgb(latents) if decoder == "approx" else pipe.decode(latents).float()
        return {STOP: True} if on_preview(step_index, total, images) else None

    return callback
