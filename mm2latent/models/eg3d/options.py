"""EG3D's rendering options: every key of the public ``rendering_kwargs``, typed and checked."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ...errors import InvalidSettingError
from ..camera import DEFAULT_PIVOT, DEFAULT_RADIUS
from ..stylegan2 import NOISE_MODES

__all__ = ["AUTO", "RenderingOptions"]

AUTO = "auto"  # ray_start = ray_end = "auto": each ray is clipped to the tri-plane box
CLAMP_MODES = ("softplus",)


@dataclass(frozen=True)
class RenderingOptions:
    """NVIDIA's ``rendering_kwargs`` (train.py, ``--cfg=ffhq`` defaults); the keys are theirs.

    Rendering:
        depth_resolution: stratified (coarse) samples per ray.
        depth_resolution_importance: importance (fine) samples per ray; 0 = coarse pass only.
        ray_start: near distance along each ray, or "auto" (with ray_end) for the box entry.
        ray_end: far distance along each ray, or "auto".
        box_warp: side of the cube the tri-planes span, centred on the origin.
        disparity_space_sampling: stratified samples uniform in 1/depth instead of depth.
        clamp_mode: density activation; "softplus" (softplus(sigma - 1)) is the only one.
        white_back: composite on white instead of black.
        density_noise: std of Gaussian noise added to the raw densities (a training regulariser).
    Conditioning:
        c_gen_conditioning_zero: the mapping network sees an all-zero camera label.
        c_scale: multiplier of the camera label the mapping network sees.
    Super-resolution and decoder:
        superresolution_module: NVIDIA class path of the super-resolution (see
            :data:`~.superresolution.SUPERRESOLUTION_LAYOUTS`), or None for a custom layout.
        superresolution_noise_mode: noise of the super-resolution layers ("none" in the public
            models), independent of the backbone's noise mode, as in NVIDIA's code.
        sr_antialias: antialiased bilinear resize of the rendered image before super-resolution.
        decoder_lr_mul: learning-rate multiplier of the OSG decoder's layers.
        image_resolution: the final image side.
    Cameras (NVIDIA's visualiser and scripts):
        avg_camera_radius: orbit radius of the default cameras.
        avg_camera_pivot: the point the default cameras look at.
    Training only (kept so a converted model's config is complete; rendering ignores them):
        gpc_reg_prob, density_reg, density_reg_p_dist, reg_type.
    """

    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float | str = 2.25
    ray_end: float | str = 3.3
    box_warp: float = 1.0
    disparity_space_sampling: bool = False
    clamp_mode: str = "softplus"
    white_back: bool = False
    density_noise: float = 0.0
    c_gen_conditioning_zero: bool = False
    c_scale: float = 1.0
    superresolution_module: str | None = "training.superresolution.SuperresolutionHybrid8XDC"
    superresolution_noise_mode: str = "none"
    sr_antialias: bool = True
    decoder_lr_mul: float = 1.0
    image_resolution: int = 512
    avg_camera_radius: float = DEFAULT_RADIUS
    avg_camera_pivot: tuple[float, float, float] = field(default=DEFAULT_PIVOT)
    gpc_reg_prob: float | None = 0.5
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    reg_type: str = "l1"

    def __post_init__(self):
        def fail(message: str):
            raise InvalidSettingError(f"rendering option {message}")

        if int(self.depth_resolution) != self.depth_resolution or self.depth_resolution < 2:
            fail(f"depth_resolution must be an integer >= 2, got {self.depth_resolution}")
        importance = self.depth_resolution_importance
        if int(importance) != importance or importance < 0:
            fail(f"depth_resolution_importance must be an integer >= 0, got {importance}")
        if (self.ray_start == AUTO) != (self.ray_end == AUTO):
            fail(f"ray_start and ray_end must both be numbers or both 'auto', got {self.ray_start!r}, "
                 f"{self.ray_end!r}")
        if self.ray_start != AUTO:
            start, end = float(self.ray_start), float(self.ray_end)
            if not (math.isfinite(start) and math.isfinite(end) and 0 < start < end):
                fail(f"ray_start/ray_end must satisfy 0 < ray_start < ray_end, got {start}, {end}")
            object.__setattr__(self, "ray_start", start)
            object.__setattr__(self, "ray_end", end)
        if not (math.isfinite(self.box_warp) and self.box_warp > 0):
            fail(f"box_warp must be positive, got {self.box_warp}")
        if self.clamp_mode not in CLAMP_MODES:
            fail(f"clamp_mode must be one of {CLAMP_MODES}, got {self.clamp_mode!r}")
        if self.superresolution_noise_mode not in NOISE_MODES:
            fail(f"superresolution_noise_mode must be one of {NOISE_MODES}, "
                 f"got {self.superresolution_noise_mode!r}")
        if self.density_noise < 0:
            fail(f"density_noise must be >= 0, got {self.density_noise}")
        pivot = tuple(float(p) for p in self.avg_camera_pivot)
        if len(pivot) != 3:
            fail(f"avg_camera_pivot must be 3 numbers, got {self.avg_camera_pivot}")
        object.__setattr__(self, "avg_camera_pivot", pivot)
        object.__setattr__(self, "depth_resolution", int(self.depth_resolution))
        object.__setattr__(self, "depth_resolution_importance", int(self.depth_resolution_importance))

    @classmethod
    def from_dict(cls, options: dict | None) -> RenderingOptions:
        """Options from a ``rendering_kwargs`` dict; unknown keys are an error (a typo must not pass)."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidSettingError(
                f"unknown rendering options: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def to_dict(self) -> dict:
        """JSON-ready ``rendering_kwargs``."""
        options = dataclasses.asdict(self)
        options["avg_camera_pivot"] = list(self.avg_camera_pivot)
        return options
