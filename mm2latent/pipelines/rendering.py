"""Stage 5's options and its one generator pass, shared by every engine: rendering options checked against the
loaded generator (2D StyleGAN2 or 3D EG3D cameras, depth, raw renderings) and the synthesis they ask for.

:class:`~mm2latent.pipelines.base.FacePipelineBase` adds truncation (with its camera-conditioned mean latents)
and the pipeline's lock around these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidSettingError
from ..models.generator import Generator, is_3d
from .request import check_integer

__all__ = ["CAMERA_OPTIONS", "MAX_NEURAL_RENDERING_RESOLUTION", "RenderSettings", "RenderedImages",
           "per_image_cameras", "resolve_render_kwargs", "synthesize"]

#: The rendering options (``render_kwargs``, also ``GenerationRequest.render_kwargs``) of a 3D generator.
CAMERA_OPTIONS = ("camera", "conditioning_camera", "return_depth", "return_raw_image", "neural_rendering_resolution")
MAX_NEURAL_RENDERING_RESOLUTION = 512


@dataclass(frozen=True)
class RenderSettings:
    """Rendering options (``render_kwargs``) checked against the loaded generator, for a batch of B images.

    Attributes:
        cameras: 3D: the rendering camera of each image, [B, 25] (frontal when none was given); 2D: None.
        conditioning: 3D: the conditioning camera of each image, [B, 25], whose mean latent truncation pulls
            toward; None: the checkpoint's w̄ (what official truncation uses).
        return_depth: also return depth maps.
        return_raw_image: also return the neural renderings before super-resolution.
        neural_rendering_resolution: side of the volume rendering (None: the model's).
        extra: 2D: other keyword arguments of the generator's ``synthesis``, passed through unchanged.
    """

    cameras: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None
    return_depth: bool = False
    return_raw_image: bool = False
    neural_rendering_resolution: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RenderedImages:
    """Stage 5's output with its 3D by-products.

    Attributes:
        images: [B, 3, R, R] in [-1, 1] (the generator's device and dtype).
        latents: the truncated latents that were rendered, [B, L, D].
        cameras: 3D: the camera label of each image, [B, 25].
        depth: 3D, on request: expected ray depth, [B, 1, n, n].
        raw_images: 3D, on request: the neural renderings, [B, 3, n, n] in [-1, 1].
    """

    images: torch.Tensor
    latents: torch.Tensor
    cameras: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    raw_images: torch.Tensor | None = None


def resolve_render_kwargs(generator: Generator, render_kwargs: dict, counts: Sequence[int]) -> RenderSettings:
    """Check rendering options against a generator.

    A 3D generator takes :data:`CAMERA_OPTIONS`:

    * ``camera``: where each image is seen from: (yaw°, pitch°) on the model's orbit, ``[N, 2]`` angles, a
      25-number label or ``[N, 25]`` labels (:func:`~mm2latent.models.camera.parse_camera`); default the
      frontal camera. N is 1 (every image) or one per image.
    * ``conditioning_camera``: the same forms; truncation pulls toward the mean latent of the mapping
      network conditioned on this camera. Default None: the checkpoint's w̄ (NVIDIA's running mean over
      the training cameras, what official truncation uses).
    * ``return_depth``, ``return_raw_image``: booleans.
    * ``neural_rendering_resolution``: side of the volume rendering, 1..512 (default the model's).

    None values count as absent. A 2D generator takes none of them; other options go to its ``synthesis``.

    Args:
        generator: the loaded G.
        render_kwargs: the options.
        counts: the images of each request that shares these options (``[B]`` for one batch): a camera
            list must give one camera per image of each.

    Raises:
        InvalidSettingError: an option the generator does not take, a bad camera, a list of cameras of
            another length, a bad flag or resolution.
    """
    given = {name: value for name, value in render_kwargs.items() if value is not None}
    if not is_3d(generator):
        camera_options = sorted(set(given) & set(CAMERA_OPTIONS))
        if camera_options:
            raise InvalidSettingError(
                f"this model's generator ({type(generator).__name__}) is 2D: it takes no "
                f"{', '.join(camera_options)}. Cameras and depth need a 3D generator such as EG3D (e.g. the "
                "'tiny-eg3d' preset)")
        return RenderSettings(extra={k: v for k, v in render_kwargs.items() if k not in CAMERA_OPTIONS})
    unknown = sorted(set(given) - set(CAMERA_OPTIONS))
    if unknown:
        raise InvalidSettingError(f"unknown rendering option {', '.join(unknown)}; a 3D generator takes "
                                  f"{', '.join(CAMERA_OPTIONS)}")
    for flag in ("return_depth", "return_raw_image"):
        if not isinstance(given.get(flag, False), (bool, np.bool_)):
            raise InvalidSettingError(f"{flag} must be True or False, got {given[flag]!r}")
    resolution = given.get("neural_rendering_resolution")
    if resolution is not None:
        resolution = check_integer(resolution, "neural_rendering_resolution", 1, MAX_NEURAL_RENDERING_RESOLUTION)
    conditioning = given.get("conditioning_camera")
    return RenderSettings(
        cameras=per_image_cameras(generator, given.get("camera", generator.default_camera()), counts, "camera"),
        conditioning=None if conditioning is None else per_image_cameras(generator, conditioning, counts,
                                                                         "conditioning_camera"),
        return_depth=bool(given.get("return_depth", False)),
        return_raw_image=bool(given.get("return_raw_image", False)),
        neural_rendering_resolution=resolution,
    )


def per_image_cameras(generator: Generator, camera, counts: Sequence[int], name: str) -> torch.Tensor:
    """A camera spec as one label per image of each request: ``[sum(counts), 25]``."""
    labels = generator.camera_labels(camera, name=name)
    if labels.shape[0] == 1:
        return labels.expand(sum(counts), -1)
    if any(count != labels.shape[0] for count in counts):
        raise InvalidSettingError(f"{name} lists {labels.shape[0]} cameras for {'/'.join(map(str, counts))} "
                                  "images: give one camera, or one per image")
    return labels.repeat(len(counts), 1)


def synthesize(generator: Generator, ws: torch.Tensor, noise_mode: str, settings: RenderSettings) -> RenderedImages:
    """Render truncated latents [B, L, D] with checked settings (:func:`resolve_render_kwargs`)."""
    if settings.cameras is None:
        return RenderedImages(generator.synthesis(ws, noise_mode=noise_mode, **settings.extra), ws)
    cameras = settings.cameras.to(ws.device)
    resolution = settings.neural_rendering_resolution
    if not (settings.return_depth or settings.return_raw_image):
        # synthesis, not render: the method speedups.compile_pipeline compiles.
        images = generator.synthesis(ws, noise_mode, camera=cameras, neural_rendering_resolution=resolution)
        return RenderedImages(images, ws, settings.cameras)
    out = generator.render(ws, cameras, noise_mode, neural_rendering_resolution=resolution)
    return RenderedImages(out.image, ws, settings.cameras, out.depth if settings.return_depth else None,
                          out.image_raw if settings.return_raw_image else None)
