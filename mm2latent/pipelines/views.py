"""Multi-view output of a 3D-aware pipeline: one face from several cameras, turntable videos, depth maps.

A 3D generator (EG3D) turns a latent into camera-independent tri-planes and renders them from any camera,
so a face is seen from V cameras for the price of one backbone pass and V volume renderings:
``FacePipeline.render_views`` computes the tri-planes once per latent and renders each camera from them
(:func:`iter_views`); :func:`turntable` (a pipeline's ``render_turntable``) renders an orbit around the face and
writes it as a browser-playable MP4 (H.264, yuv420p, moov atom first) or a GIF. This module takes a generator, a
truncation function and a lock, never a pipeline, so the pipelines import it and not the other way round.

Cameras are (yaw°, pitch°) on the model's orbit or 25-number labels (see :mod:`mm2latent.models.camera`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InvalidSettingError
from ..inputs.images import tensor_to_pil
from ..models.generator import CameraGenerator, is_3d
from .request import check_integer, check_number

__all__ = [
    "FRAME_CONTENTS",
    "MAX_FPS",
    "MAX_FRAMES",
    "MultiViewOutput",
    "VIDEO_FORMATS",
    "depth_to_image",
    "iter_views",
    "render_turntable",
    "require_3d",
    "turntable",
    "turntable_cameras",
    "view_cameras",
    "write_video",
]

# EG3D's gen_videos.py orbit, in degrees: yaw 0.35 sin(2πt), pitch -0.05 + 0.25 cos(2πt) (radians).
TURNTABLE_YAW_AMPLITUDE = math.degrees(0.35)
TURNTABLE_PITCH = math.degrees(-0.05)
TURNTABLE_PITCH_AMPLITUDE = math.degrees(0.25)
MAX_FRAMES = 1000
MAX_FPS = 120.0
VIDEO_FORMATS = (".mp4", ".gif")
#: What a turntable frame shows: the final image, the raw neural rendering, or the depth map.
FRAME_CONTENTS = ("image", "raw", "depth")
# libx264's constant-quality setting: 18 is visually lossless for faces, ~10x smaller than lossless.
H264_CRF = 18


@dataclass
class MultiViewOutput:
    """B faces, each rendered from the same V cameras.

    Attributes:
        images: ``[B, V, 3, R, R]`` in [-1, 1] (float32, CPU).
        cameras: the camera label of each view, ``[V, 25]``.
        latents: the truncated latents that were rendered, ``[B, L, D]`` (float32, CPU).
        depth: with ``return_depth``: expected ray depth in world units, ``[B, V, 1, n, n]``.
        raw_images: with ``return_raw_image``: the neural renderings before super-resolution,
            ``[B, V, 3, n, n]`` in [-1, 1].
    """

    images: torch.Tensor
    cameras: torch.Tensor
    latents: torch.Tensor
    depth: torch.Tensor | None = None
    raw_images: torch.Tensor | None = None

    def pil_images(self, index: int = 0) -> list[Image.Image]:
        """The V views of face ``index`` as RGB images."""
        return tensor_to_pil(self.images[index])

    def depth_images(self, index: int = 0) -> list[Image.Image]:
        """The V depth maps of face ``index`` as grey images (near is bright); needs ``return_depth``."""
        if self.depth is None:
            raise InvalidSettingError("these views were rendered without return_depth=True")
        return [depth_to_image(depth) for depth in self.depth[index]]


def depth_to_image(depth: torch.Tensor) -> Image.Image:
    """A depth map ``[1, n, n]`` (or ``[n, n]``) as a grey image: near is white, far is black.

    The range is stretched per map (as EG3D's ``gen_videos.py --image_mode image_depth``): grey levels
    compare depths within one map, not across maps.
    """
    depth = depth.detach().float().cpu().reshape(depth.shape[-2], depth.shape[-1])
    nearness = -depth
    span = (nearness.max() - nearness.min()).clamp(min=1e-8)
    grey = ((nearness - nearness.min()) / span * 255).round().to(torch.uint8)
    return Image.fromarray(grey.numpy())  # uint8 [n, n]: mode "L"


def view_cameras(generator: CameraGenerator, yaws=None, pitches=0.0, cameras=None) -> torch.Tensor:
    """Labels ``[V, 25]`` from yaws and pitches in degrees (broadcast against each other) or a camera spec."""
    if (yaws is None) == (cameras is None):
        raise InvalidSettingError("give the views either as yaws (and pitches) in degrees or as cameras")
    if cameras is not None:
        return generator.camera_labels(cameras, name="cameras")
    try:
        yaw, pitch = torch.broadcast_tensors(torch.as_tensor(yaws, dtype=torch.float64).reshape(-1),
                                             torch.as_tensor(pitches, dtype=torch.float64).reshape(-1))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidSettingError(f"yaws and pitches must be numbers or equally long lists of numbers: {exc}") from exc
    return generator.camera_labels(torch.stack([yaw, pitch], dim=1), name="views")


def iter_views(
    generator: CameraGenerator,
    ws: torch.Tensor,
    cameras: torch.Tensor,
    noise_mode: str = "const",
    rng: torch.Generator | None = None,
    neural_rendering_resolution: int | None = None,
    show_progress: bool = True,
) -> Iterator:
    """Render ``ws`` from each camera in turn, the tri-planes computed once: one ``EG3DOutput`` per camera.

    Args:
        generator: a 3D generator.
        ws: truncated latents ``[B, L, D]``; each view renders all B.
        cameras: labels ``[V, 25]``.
        noise_mode: the backbone noise ("const", "random", "none"); in "const" and "none" each view equals
            the same camera rendered alone (the generator reseeds its ray samples per render).
        rng: source of random draws (noise in mode "random", ray samples); None: the generator's default.
        neural_rendering_resolution: side of the volume rendering (default: the model's).
        show_progress: a progress bar over the views.
    """
    assert cameras.ndim == 2 and cameras.shape[1] == generator.camera_dim, cameras.shape
    planes = generator.synthesize_planes(ws, noise_mode, rng)
    for camera in tqdm(cameras, desc="views", unit="view", disable=not show_progress):
        yield generator.render(ws, camera, noise_mode, rng, neural_rendering_resolution, planes=planes)


def require_3d(generator, what: str) -> CameraGenerator:
    """``generator`` if it is 3D; :class:`InvalidSettingError` naming ``what`` needs one otherwise."""
    if not is_3d(generator):
        raise InvalidSettingError(f"{what} needs a 3D generator such as EG3D; this model's generator "
                                  f"({type(generator).__name__}) is 2D")
    return generator


def turntable_cameras(
    num_frames: int = 24,
    yaw_amplitude: float = TURNTABLE_YAW_AMPLITUDE,
    pitch: float = TURNTABLE_PITCH,
    pitch_amplitude: float = TURNTABLE_PITCH_AMPLITUDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaws, pitches) in degrees, ``[num_frames]`` each, of one loop around the face.

    Frame i of N is at t = i / N: yaw = ``yaw_amplitude`` sin(2πt), pitch = ``pitch`` + ``pitch_amplitude``
    cos(2πt). The defaults are EG3D's ``gen_videos.py`` orbit (±20.1° yaw, pitch -2.9° ± 14.3°: the camera
    circles the face slightly above it); ``pitch_amplitude=0`` gives a level yaw sweep. The last frame
    leads back to the first, so the video loops without a repeated frame.
    """
    num_frames = check_integer(num_frames, "the number of frames", 1, MAX_FRAMES)
    t = torch.arange(num_frames, dtype=torch.float64) / num_frames
    return yaw_amplitude * torch.sin(2 * math.pi * t), pitch + pitch_amplitude * torch.cos(2 * math.pi * t)


def _check_fps(fps: float) -> float:
    fps = check_number(fps, "fps", 0.0, MAX_FPS)
    if fps == 0:
        raise InvalidSettingError(f"fps must be a number above 0 and at most {MAX_FPS:g}, got 0")
    return fps


def _video_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InvalidSettingError(f"the video must be {' or '.join(VIDEO_FORMATS)}, got {path.name!r}")
    return suffix


def _frame_array(frame: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidSettingError(f"video frames must be RGB images or uint8 [H, W, 3] arrays, got "
                                  f"{array.dtype} {array.shape}")
    return array


def write_video(frames: Iterable[Image.Image | np.ndarray], path: str | os.PathLike, fps: float = 24.0) -> Path:
    """Write frames (all the same size) to an MP4 or a GIF, chosen by the file's suffix.

    MP4: H.264 (libx264, constant quality CRF 18), yuv420p, the index at the front of the file
    (``+faststart``): what browsers play, also while it downloads. Frames are encoded as they arrive, so a
    long video is never held in memory; sides must be even (a yuv420p requirement). GIF: 8-bit palette
    per frame, loops forever; frame times are whole hundredths of a second, so the fps is rounded.

    Args:
        frames: RGB PIL images or uint8 ``[H, W, 3]`` arrays.
        path: ``.mp4`` or ``.gif``.
        fps: frames per second, in (0, 120].

    Returns:
        The path written.
    """
    path = Path(path)
    video_format = _video_format(path)
    fps = _check_fps(fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    if video_format == ".gif":
        images = [Image.fromarray(_frame_array(frame)) for frame in frames]
        if not images:
            raise InvalidSettingError("a video needs at least one frame")
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    try:
        return _write_mp4(frames, path, fps)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written video left behind (bad frame, interrupted render)
        raise


def _write_mp4(frames: Iterable[Image.Image | np.ndarray], path: Path, fps: float) -> Path:
    import av

    count = 0
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = None
        for frame in frames:
            array = _frame_array(frame)
            if stream is None:
                height, width = array.shape[:2]
                if height % 2 or width % 2:
                    raise InvalidSettingError(f"H.264 (yuv420p) needs even frame sides, got {width}x{height}")
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"crf": str(H264_CRF)}
            elif array.shape[:2] != (stream.height, stream.width):
                raise InvalidSettingError(f"frame {count} is {array.shape[1]}x{array.shape[0]}, the video "
                                          f"{stream.width}x{stream.height}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            count += 1
        if stream is None:
            raise InvalidSettingError("a video needs at least one frame")
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return path


def _frame(view, content: str) -> np.ndarray:
    """One video frame from a render of B faces: the B images side by side, uint8 [H, B*W, 3]."""
    if content == "depth":
        tiles = [np.asarray(depth_to_image(depth).convert("RGB")) for depth in view.depth]
    else:
        tiles = [np.asarray(image) for image in tensor_to_pil(view.image if content == "image" else view.image_raw)]
    return np.concatenate(tiles, axis=1)


@torch.no_grad()
def turntable(
    generator: CameraGenerator,
    latents: torch.Tensor,
    path: str | os.PathLike,
    num_frames: int = 24,
    fps: float = 24.0,
    *,
    truncate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lock: Any = None,
    noise_mode: str = "const",
    yaw_amplitude: float = TURNTABLE_YAW_AMPLITUDE,
    pitch: float = TURNTABLE_PITCH,
    pitch_amplitude: float = TURNTABLE_PITCH_AMPLITUDE,
    content: str = "image",
    neural_rendering_resolution: int | None = None,
    rng: torch.Generator | None = None,
    show_progress: bool = True,
) -> Path:
    """A video of the camera circling the face (see :func:`turntable_cameras`), written as it renders.

    The tri-planes are computed once; each frame is one volume rendering (+ super-resolution). Several
    latents play side by side in one video.

    Args:
        generator: a 3D generator.
        latents: ``[B, L, D]`` or one latent ``[L, D]``.
        path: ``.mp4`` (H.264, plays in browsers) or ``.gif``.
        num_frames: frames of one loop (1..1000).
        fps: frames per second (the loop lasts num_frames / fps seconds).
        truncate: applied to the latents before rendering (e.g. a pipeline's truncation); None: none.
        lock: held while rendering (e.g. the pipeline's, shared with its other calls); None: none.
        noise_mode: the generator's noise ("const" keeps the face steady from frame to frame).
        yaw_amplitude, pitch, pitch_amplitude: the orbit in degrees (default EG3D's videos').
        content: "image" (final), "raw" (the neural rendering before super-resolution) or "depth".
        neural_rendering_resolution: side of the volume rendering (default: the model's).
        rng: source of random draws in mode "random".
        show_progress: a progress bar over the frames.

    Returns:
        The path written.
    """
    generator = require_3d(generator, "a turntable")
    path = Path(path)
    _video_format(path)
    if content not in FRAME_CONTENTS:
        raise InvalidSettingError(f"content must be one of {', '.join(FRAME_CONTENTS)}, got {content!r}")
    fps = _check_fps(fps)
    yaws, pitches = turntable_cameras(num_frames, yaw_amplitude, pitch, pitch_amplitude)
    labels = view_cameras(generator, yaws, pitches)
    latents = latents.unsqueeze(0) if latents.ndim == 2 else latents
    with lock if lock is not None else nullcontext():
        ws = truncate(latents) if truncate is not None else latents
        views = iter_views(generator, ws, labels.to(ws.device), noise_mode, rng, neural_rendering_resolution,
                           show_progress)
        return write_video((_frame(view, content) for view in views), path, fps)


def render_turntable(pipe, latents: torch.Tensor, path: str | os.PathLike, num_frames: int = 24, fps: float = 24.0,
                     **options) -> Path:
    """``pipe.render_turntable(latents, path, num_frames, fps, **options)``: a pipeline's turntable video (its
    truncation, conditioning camera and lock; see
    :meth:`~mm2latent.pipelines.base.FacePipelineBase.render_turntable`)."""
    return pipe.render_turntable(latents, path, num_frames, fps, **options)
