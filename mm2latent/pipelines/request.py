"""One validated generation request, built in one place for the library, the CLI and the Space.

:meth:`GenerationRequest.create` checks every setting and raises the library's typed errors
(:mod:`mm2latent.errors`); the Space turns those into ``gr.Error`` messages, the CLI prints them. The
checks here are the only ones: :class:`~mm2latent.pipelines.ddgi.FacePipeline` adds only what depends on
the loaded model (which ControlNets it has, whether it has a VAE).
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..editing.closeness import refine_budget
from ..errors import EmptyPromptError, InvalidSeedError, InvalidSettingError, InvalidStepsError
from ..models.few_step import DRAWINGS

__all__ = [
    "COMBINE",
    "MAX_GUIDANCE",
    "MAX_IMAGES",
    "MAX_SEED",
    "MAX_STEPS",
    "MAX_REFINE_STEPS",
    "MAX_TRUNCATION",
    "MODES",
    "NOISE_MODES",
    "GenerationRequest",
    "check_integer",
    "check_number",
    "check_seed",
    "random_seed",
]

MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_IMAGES = 16
MAX_TRUNCATION = 2.0
MAX_GUIDANCE = 30.0
MAX_REFINE_STEPS = 1000
DEFAULT_QUALITY_STEPS = 20
#: Classifier-free guidance of the training-free mode's I^d_0, as the public ControlNet recipes use.
DEFAULT_INVERT_GUIDANCE = 7.5
#: "fast": one U-Net pass at t = T -> M, T; "quality": DDIM steps, per-step latents combined; "invert": the
#: training-free mode (public weights only): I^d_0 from the diffusion model, inverted to W+ by the photo encoder.
MODES = ("fast", "quality", "invert")
COMBINE = ("mean", "coarse-to-fine")
NOISE_MODES = ("const", "random", "none")


def _is_integral(value: Any) -> bool:
    """An integer, or a float / numpy number holding a whole number (``2.0``), but never a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()


def check_integer(value: Any, name: str, low: int, high: int, error: type[Exception] = InvalidSettingError) -> int:
    """``value`` as an int in ``[low, high]``, or ``error`` naming the setting.

    Whole-number floats (2.0, as web forms send them) are accepted; 1.5, NaN, ±inf, strings and bools are
    not. Huge integers are compared exactly (no float conversion that could overflow).
    """
    if not _is_integral(value):
        raise error(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}")
    number = int(value)
    if not low <= number <= high:
        raise error(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}")
    return number


def check_number(value: Any, name: str, low: float, high: float) -> float:
    """``value`` as a finite float in ``[low, high]``, or :class:`InvalidSettingError` naming the setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSettingError(f"{name} must be a number from {low:g} to {high:g}, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise InvalidSettingError(f"{name} must be a number from {low:g} to {high:g}, got {_shown(value)}")
    return number


def check_seed(seed: Any) -> int:
    """A seed in ``[0, MAX_SEED]``; :class:`InvalidSeedError` otherwise."""
    return check_integer(seed, "the seed", 0, MAX_SEED, InvalidSeedError)


def random_seed() -> int:
    """A fresh seed from the operating system's randomness."""
    return secrets.randbelow(MAX_SEED + 1)


def _shown(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message (a 400-digit number is cut)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call of the pipeline needs, already checked.

    Build it with :meth:`create` (which validates); the fields are the checked values.

    Attributes:
        prompt: the description, stripped (may be empty when a mask or scribble is given).
        mask: the 19-class mask as the user gave it (path, PIL image or array), or None.
        scribble: the sketch as the user gave it, or None.
        seed: 0..MAX_SEED; image i of the request uses ``seed + i`` (mod 2**32).
        mode: "fast" (one U-Net pass at t = T), "quality" (DDIM steps, latents combined) or "invert" (the
            training-free mode: the diffusion model draws I^d_0, the photo encoder inverts it to W+).
        num_steps: DDIM steps of the schedule (quality and invert modes, and the diffusion preview).
        feature_steps: the steps whose features feed the latent.
        truncation: ψ toward the mean latent (1 = none).
        num_images: images in one batch.
        combine: how quality mode merges per-step latents ("mean" or "coarse-to-fine").
        guidance_scale: classifier-free guidance of the diffusion sampling (1 = off; invert mode default 7.5).
        noise_mode: the generator's noise ("const", "random" or "none").
        refine_steps: invert mode: optimisation steps that pull G(w) toward I^d_0 (and the mask) after the encoder.
        return_intermediates: also return per-step latents and per-word attention maps.
        return_diffusion_image: also denoise to the end and decode I^d_0.
        render_kwargs: extra arguments of the generator's ``synthesis`` (a 3D generator's camera).
    """

    prompt: str = ""
    mask: Any = None
    scribble: Any = None
    seed: int = 0
    mode: str = "fast"
    num_steps: int = DEFAULT_QUALITY_STEPS
    feature_steps: tuple[int, ...] = (0,)
    truncation: float = 1.0
    num_images: int = 1
    combine: str = "mean"
    guidance_scale: float = 1.0
    noise_mode: str = "const"
    return_intermediates: bool = False
    return_diffusion_image: bool = False
    render_kwargs: dict = field(default_factory=dict)
    refine_steps: int = 0
    drawing: str = "quality"
    refine_patience: int = 20

    @classmethod
    def create(
        cls,
        prompt: str | None = None,
        mask: Any = None,
        scribble: Any = None,
        seed: Any = None,
        mode: str = "fast",
        num_steps: Any = None,
        feature_steps: Any = None,
        truncation: Any = 1.0,
        num_images: Any = 1,
        combine: str = "mean",
        guidance_scale: Any = None,
        noise_mode: str = "const",
        return_intermediates: bool = False,
        return_diffusion_image: bool = False,
        render_kwargs: dict | None = None,
        refine_steps: Any = 0,
        *,
        drawing: str | None = None,
        faithfulness: str | None = None,
        max_images: int = MAX_IMAGES,
        max_prompt_chars: int | None = None,
    ) -> GenerationRequest:
        """Check every setting and return the request (see the class attributes for their meaning).

        Args:
            seed: None draws a random seed.
            num_steps: None means 20 (the preview's denoising also uses it in fast mode).
            feature_steps: None means [0] in fast and invert modes and every step in quality mode.
            guidance_scale: None means the drawing's in invert mode (7.5 for "quality", 1 for "fast"), else 1 (off).
            drawing: invert mode: how I^d_0 is drawn, a name of ``few_step.DRAWINGS`` ("quality": 20 DDIM steps with
                guidance; "fast": 4 LCM steps, needs a fused LCM-LoRA); None = "quality". It also sets the default
                ``num_steps`` and ``guidance_scale``.
            faithfulness: invert mode: a refinement budget of ``closeness.FAITHFULNESS`` (steps and early stop);
                ignored when ``refine_steps`` is given (> 0).
            max_images: the most images one request may ask for (a Space may allow fewer than 16).
            max_prompt_chars: refuse longer prompts (None: no limit; CLIP reads 77 tokens anyway).

        Raises:
            EmptyPromptError, InvalidSeedError, InvalidStepsError, InvalidSettingError.
        """
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidSettingError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = (prompt or "").strip()
        if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
            raise InvalidSettingError(
                f"the prompt is {len(prompt):,} characters long; the limit is {max_prompt_chars:,} (the text "
                "encoder reads only about the first 60 words anyway)")
        if not prompt and mask is None and scribble is None:
            raise EmptyPromptError("the prompt is empty and there is no mask or scribble: describe the face, "
                                   "draw a mask or a sketch, or both")
        seed = random_seed() if seed is None else check_seed(seed)
        if mode not in MODES:
            raise InvalidSettingError(f"mode must be one of {', '.join(MODES)}, got {_shown(mode)}")
        if combine not in COMBINE:
            raise InvalidSettingError(f"combine must be one of {', '.join(COMBINE)}, got {_shown(combine)}")
        if noise_mode not in NOISE_MODES:
            raise InvalidSettingError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {_shown(noise_mode)}")
        drawing = _checked_drawing(drawing)
        if num_steps is None and mode == "invert":
            num_steps = DRAWINGS[drawing].num_steps
        num_steps = DEFAULT_QUALITY_STEPS if num_steps is None else check_integer(
            num_steps, "the number of steps", 1, MAX_STEPS, InvalidStepsError)
        if mode in ("fast", "invert"):
            # Fast mode reads the first (t = T) step only; num_steps still sets the preview's denoising. Invert
            # mode reads features only for its attention maps.
            if feature_steps is not None and sorted(set(feature_steps)) != [0]:
                raise InvalidStepsError(f"{mode} mode reads features at the first step only; use mode='quality' "
                                        "for other steps")
            feature_steps = [0]
        elif feature_steps is None:
            feature_steps = list(range(num_steps))
        feature_steps = sorted({check_integer(s, "feature steps", 0, num_steps - 1, InvalidStepsError)
                                for s in feature_steps})
        if not feature_steps:
            raise InvalidStepsError(f"feature steps must be step indices from 0 to {num_steps - 1}, got none")
        truncation = check_number(truncation, "truncation ψ", 0.0, MAX_TRUNCATION)
        num_images = check_integer(num_images, "the number of images", 1, max_images)
        if guidance_scale is None:
            guidance_scale = DRAWINGS[drawing].guidance_scale if mode == "invert" else 1.0
        guidance_scale = check_number(guidance_scale, "the guidance scale", 1.0, MAX_GUIDANCE)
        refine_steps = check_integer(refine_steps, "the refinement steps", 0, MAX_REFINE_STEPS, InvalidStepsError)
        if refine_steps and mode != "invert":
            raise InvalidSettingError("refine_steps applies to mode='invert' only")
        patience = 20
        if faithfulness is not None and mode == "invert" and not refine_steps:
            budget = refine_budget(faithfulness)
            refine_steps, patience = budget.steps, max(1, budget.patience)
        return cls(prompt=prompt, mask=mask, scribble=scribble, seed=seed, mode=mode, num_steps=num_steps,
                   feature_steps=tuple(feature_steps), truncation=truncation, num_images=num_images,
                   combine=combine, guidance_scale=guidance_scale, noise_mode=noise_mode,
                   return_intermediates=bool(return_intermediates),
                   return_diffusion_image=bool(return_diffusion_image), render_kwargs=dict(render_kwargs or {}),
                   refine_steps=refine_steps, drawing=drawing, refine_patience=patience)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    @property
    def sampling_steps(self) -> int:
        """DDIM steps actually run: the whole schedule in quality and invert modes or for the preview, else one."""
        return self.num_steps if (self.mode != "fast" or self.return_diffusion_image) else 1

    @property
    def inputs(self) -> list[str]:
        """The visual inputs given ("mask", "scribble")."""
        return [name for name, value in (("mask", self.mask), ("scribble", self.scribble)) if value is not None]

    def settings(self) -> dict:
        """The settings that reproduce this request (PNG metadata, the output's ``settings``)."""
        return {"prompt": self.prompt, "seed": self.seed, "mode": self.mode, "num_steps": self.sampling_steps,
                "feature_steps": list(self.feature_steps), "truncation": self.truncation,
                "num_images": self.num_images, "combine": self.combine, "guidance_scale": self.guidance_scale,
                "noise_mode": self.noise_mode,
                **({"refine_steps": self.refine_steps, "drawing": self.drawing} if self.mode == "invert" else {}),
                **{k: _plain(v) for k, v in self.render_kwargs.items()}}



def _checked_drawing(drawing: str | None) -> str:
    """A drawing name of ``DRAWINGS`` (None: "quality", the paper's)."""
    if drawing is None:
        return "quality"
    if drawing not in DRAWINGS:
        raise InvalidSettingError(f"the drawing must be one of {', '.join(DRAWINGS)}, got {_shown(drawing)}")
    return drawing


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a rendering option (tensors and tuples become lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------------------------
# Checks of single settings, for callers that take them one by one (the Space's photo edit and 3D tab)
# --------------------------------------------------------------------------------------------


def check_prompt(prompt: Any, max_chars: int | None = None, name: str = "the prompt") -> str:
    """``prompt`` stripped (None is empty); :class:`InvalidSettingError` when it is not text or too long.

    Args:
        prompt: the text as the caller sent it (a number or a list is refused, not converted).
        max_chars: the most characters allowed after stripping (None: no limit).
        name: how messages name it, e.g. "the description of the change".
    """
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise InvalidSettingError(f"{name} must be text, got {type(prompt).__name__} {_shown(prompt)}")
    prompt = prompt.strip()
    if max_chars is not None and len(prompt) > max_chars:
        raise InvalidSettingError(
            f"{name} is {len(prompt):,} characters long; the limit is {max_chars:,} (the text encoder reads only "
            "about the first 60 words anyway)")
    return prompt


def check_flag(value: Any, name: str) -> bool:
    """``value`` when it is ``True`` or ``False`` (numpy booleans too); :class:`InvalidSettingError` otherwise.

    ``"yes"``, ``1`` or ``None`` are refused: a wrong type is a caller's mistake, not a choice.
    """
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidSettingError(f"{name} must be true or false, got {_shown(value)}")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` when it is one of ``choices``; :class:`InvalidSettingError` listing them otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidSettingError(f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")
    return value


def check_camera(yaw: Any, pitch: Any, max_yaw: float = 180.0, max_pitch: float = 90.0) -> tuple[float, float]:
    """A camera ``(yaw, pitch)`` in degrees within ``±max_yaw`` and ``±max_pitch``; :class:`InvalidSettingError`
    naming the angle otherwise (a 3D model may be trained on a narrower range than a full turn)."""
    return check_number(yaw, "yaw", -max_yaw, max_yaw), check_number(pitch, "pitch", -max_pitch, max_pitch)
