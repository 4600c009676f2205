"""Camera labels of 3D-aware generators (EG3D): orbit poses, intrinsics and the 25-number label.

The conventions are those of NVlabs/eg3d (``camera_utils.LookAtPoseSampler``, ``FOV_to_intrinsics``,
``gen_samples.py`` / ``gen_videos.py``), so labels made here equal the official scripts' labels:

* World frame: y up, the face looks along +z, its centre near the origin (EG3D's FFHQ crop).
* ``cam2world``: 4x4, OpenCV camera axes (x right, y down, z forward = viewing direction), as in
  EG3D's ``dataset.json``; the last column is the camera position.
* The camera orbits at ``radius`` (2.7) around the world origin and looks at ``pivot``
  ([0, 0, 0.2], slightly in front of the origin) with no roll.
* ``yaw`` / ``pitch`` are offsets from the frontal pose of the official sampler's two angles
  (``LookAtPoseSampler.sample(pi/2 + yaw, pi/2 + pitch, ...)``). yaw = pitch = 0 is the frontal
  camera at (0, 0, 2.7).

  - yaw is the azimuth around the vertical axis: the camera sits at
    ``(r sin(yaw) sin(phi), r cos(phi), r cos(yaw) sin(phi))``; positive yaw moves it toward +x, the
    side that is on the right of the frontal image (the subject's left cheek).
  - pitch is *not* the elevation angle: the sampler maps its vertical angle ``v = pi/2 + pitch``
    to the polar angle ``phi = arccos(1 - 2 v / pi)`` (uniform-on-the-sphere parametrisation), so
    the camera height is ``y = -2 r pitch / pi`` (pitch in radians) and the true elevation is
    ``asin(-2 pitch / pi)``. Positive pitch moves the camera *down* (it looks up at the chin); the
    official sample script's pitch -0.2 rad (-11.46°) puts the camera 7.3° above the face.
    pitch must lie in (-90°, 90°).

* Intrinsics are normalised by the image size (principal point (0.5, 0.5)). ``fov_degrees`` is the
  *diagonal* field of view of the square image, ``focal = 1 / (sqrt(2) tan(fov / 2))``, computed
  exactly as the official code does (with its constants 3.14159 and 1.414). EG3D's FFHQ default
  is 18.837°, focal ≈ 4.2634.

A label is ``cam2world.flatten()`` (16) followed by ``intrinsics.flatten()`` (9): 25 numbers.

User-facing APIs take a *camera spec* (:func:`parse_camera`): (yaw°, pitch°), a list of such pairs, a
label or a list of labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import InvalidSettingError

__all__ = [
    "CAMERA_LABEL_DIM",
    "DEFAULT_FOV_DEGREES",
    "DEFAULT_PIVOT",
    "DEFAULT_RADIUS",
    "camera_label",
    "fov_to_intrinsics",
    "look_at_cam2world",
    "parse_camera",
    "split_camera_label",
]

CAMERA_LABEL_DIM = 25
DEFAULT_FOV_DEGREES = 18.837
DEFAULT_RADIUS = 2.7
DEFAULT_PIVOT = (0.0, 0.0, 0.2)
# FOV_to_intrinsics in NVlabs/eg3d uses these rounded constants; kept so labels match it bit for bit.
OFFICIAL_PI = 3.14159
OFFICIAL_SQRT2 = 1.414
# LookAtPoseSampler clamps its vertical angle into (0, pi) by this margin.
POLAR_EPS = 1e-5
MAX_PITCH_DEGREES = 90.0
# A camera spec's yaw: one turn around the head, centred on the frontal view.
MAX_YAW_DEGREES = 180.0
# How far a label's constant entries (cam2world's last row, the intrinsics' last row) may stray: labels
# read from JSON files carry float rounding; a transposed or shuffled label misses by ~1.
LABEL_TOLERANCE = 1e-4


def fov_to_intrinsics(fov_degrees: float = DEFAULT_FOV_DEGREES) -> torch.Tensor:
    """Normalised 3x3 intrinsics of a square image with diagonal field of view ``fov_degrees``.

    Args:
        fov_degrees: diagonal field of view in degrees, in (0, 180).
    """
    fov_degrees = float(fov_degrees)
    if not 0.0 < fov_degrees < 180.0:
        raise InvalidSettingError(f"field of view must be in (0, 180) degrees, got {fov_degrees}")
    focal = float(1 / (math.tan(fov_degrees * OFFICIAL_PI / 360) * OFFICIAL_SQRT2))
    return torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]])


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True)


def look_at_cam2world(
    yaw: torch.Tensor,
    pitch: torch.Tensor,
    radius: float = DEFAULT_RADIUS,
    pivot: Sequence[float] = DEFAULT_PIVOT,
) -> torch.Tensor:
    """OpenCV cam2world matrices ``[N, 4, 4]`` of cameras orbiting the origin and looking at ``pivot``.

    Float32 arithmetic in the order of the official ``LookAtPoseSampler`` + ``create_cam2world_matrix``.

    Args:
        yaw: ``[N]`` azimuth offsets from frontal, radians.
        pitch: ``[N]`` vertical-angle offsets from frontal, radians (see the module docstring).
        radius: distance of the camera from the world origin.
        pivot: the point every camera looks at.
    """
    assert yaw.ndim == 1 and yaw.shape == pitch.shape, (yaw.shape, pitch.shape)
    # The official scripts add pi/2 to the offsets in double precision, then work in float32.
    horizontal = (math.pi / 2 + yaw.to(torch.float64)).to(torch.float32).unsqueeze(1)
    vertical = (math.pi / 2 + pitch.to(torch.float64)).to(torch.float32).unsqueeze(1)
    vertical = torch.clamp(vertical, POLAR_EPS, math.pi - POLAR_EPS)
    phi = torch.arccos(1 - 2 * (vertical / math.pi))
    origins = torch.zeros(yaw.shape[0], 3)
    origins[:, 0:1] = radius * torch.sin(phi) * torch.cos(math.pi - horizontal)
    origins[:, 2:3] = radius * torch.sin(phi) * torch.sin(math.pi - horizontal)
    origins[:, 1:2] = radius * torch.cos(phi)

    forward = _normalize(_normalize(torch.tensor(pivot, dtype=torch.float32) - origins))
    world_up = torch.tensor([0.0, 1.0, 0.0]).expand_as(forward)
    right = -_normalize(torch.cross(world_up, forward, dim=-1))
    down = _normalize(torch.cross(forward, right, dim=-1))  # camera y: image rows go down
    cam2world = torch.eye(4).repeat(yaw.shape[0], 1, 1)
    cam2world[:, :3, :3] = torch.stack((right, down, forward), dim=-1)
    cam2world[:, :3, 3] = origins
    return cam2world


def _angles(value: float | Sequence[float] | torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.ndim > 1:
        raise InvalidSettingError(f"{name} must be a number or a 1-D sequence, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise InvalidSettingError(f"{name} must be finite, got {value}")
    return tensor.reshape(-1), tensor.ndim == 0


def camera_label(
    yaw_deg: float | Sequence[float] | torch.Tensor = 0.0,
    pitch_deg: float | Sequence[float] | torch.Tensor = 0.0,
    radius: float = DEFAULT_RADIUS,
    pivot: Sequence[float] = DEFAULT_PIVOT,
    fov_degrees: float = DEFAULT_FOV_DEGREES,
) -> torch.Tensor:
    """EG3D camera label(s): ``[25]`` for one pose, ``[N, 25]`` for sequences of yaws / pitches.

    Args:
        yaw_deg: azimuth from frontal in degrees (positive: camera toward +x, see the module docstring).
        pitch_deg: official vertical-angle offset from frontal in degrees, in (-90, 90) (positive:
            camera below the face). A scalar is broadcast against a sequence of yaws and vice versa.
        radius: camera distance from the world origin (EG3D FFHQ: 2.7).
        pivot: the point the camera looks at (EG3D FFHQ: [0, 0, 0.2]).
        fov_degrees: diagonal field of view (EG3D FFHQ: 18.837).
    """
    yaw, yaw_scalar = _angles(yaw_deg, "yaw")
    pitch, pitch_scalar = _angles(pitch_deg, "pitch")
    if (pitch.abs() >= MAX_PITCH_DEGREES).any():
        raise InvalidSettingError(f"pitch must be in (-90, 90) degrees, got {pitch_deg}")
    if len(pivot) != 3 or not all(math.isfinite(float(p)) for p in pivot):
        raise InvalidSettingError(f"pivot must be 3 finite numbers, got {pivot}")
    if not (math.isfinite(float(radius)) and float(radius) > 0):
        raise InvalidSettingError(f"radius must be a positive number, got {radius}")
    try:
        yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    except RuntimeError as exc:
        raise InvalidSettingError(f"yaws ({yaw.numel()}) and pitches ({pitch.numel()}) differ in length") from exc
    pivot = [float(p) for p in pivot]
    cam2world = look_at_cam2world(torch.deg2rad(yaw), torch.deg2rad(pitch), float(radius), pivot)
    intrinsics = fov_to_intrinsics(fov_degrees).reshape(1, 9).expand(cam2world.shape[0], -1)
    labels = torch.cat([cam2world.reshape(-1, 16), intrinsics], dim=1)
    return labels[0] if yaw_scalar and pitch_scalar else labels


def split_camera_label(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 25]`` labels -> (cam2world ``[B, 4, 4]``, intrinsics ``[B, 3, 3]``)."""
    assert labels.ndim == 2 and labels.shape[1] == CAMERA_LABEL_DIM, labels.shape
    return labels[:, :16].reshape(-1, 4, 4), labels[:, 16:].reshape(-1, 3, 3)


def parse_camera(
    camera,
    radius: float = DEFAULT_RADIUS,
    pivot: Sequence[float] = DEFAULT_PIVOT,
    fov_degrees: float = DEFAULT_FOV_DEGREES,
    name: str = "camera",
) -> torch.Tensor:
    """Camera labels ``[N, 25]`` from a camera spec, checked.

    Args:
        camera: one of
            - ``(yaw, pitch)`` in degrees (see :func:`camera_label`): yaw in [-180, 180], pitch in (-90, 90);
            - ``[N, 2]`` such pairs;
            - a label ``[25]`` (cam2world 4x4 + normalised intrinsics 3x3, as in EG3D's ``dataset.json``);
            - ``[N, 25]`` labels.
            Sequences, numpy arrays and tensors are accepted.
        radius, pivot, fov_degrees: the orbit that (yaw, pitch) pairs are placed on.
        name: the setting's name in error messages.

    Raises:
        InvalidSettingError: not numbers, another shape, angles out of range, or a label whose constant
            entries (the last rows of cam2world and of the intrinsics) are wrong.
    """
    forms = f"(yaw°, pitch°), [N, 2] angles, a {CAMERA_LABEL_DIM}-number label or [N, {CAMERA_LABEL_DIM}] labels"
    try:
        values = torch.as_tensor(camera, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidSettingError(f"{name} must be {forms}; got {type(camera).__name__}") from exc
    if values.ndim not in (1, 2) or values.shape[-1] not in (2, CAMERA_LABEL_DIM):
        raise InvalidSettingError(f"{name} must be {forms}; got shape {tuple(values.shape)}")
    values = values.reshape(-1, values.shape[-1])
    if values.shape[0] == 0:
        raise InvalidSettingError(f"{name} is empty")
    if not torch.isfinite(values).all():
        raise InvalidSettingError(f"{name} must be finite numbers")
    if values.shape[1] == 2:
        yaw, pitch = values.unbind(dim=1)
        if (yaw.abs() > MAX_YAW_DEGREES).any():
            raise InvalidSettingError(f"{name}: yaw must be in [-180, 180] degrees, got {yaw.tolist()}")
        if (pitch.abs() >= MAX_PITCH_DEGREES).any():
            raise InvalidSettingError(f"{name}: pitch must be in (-90, 90) degrees, got {pitch.tolist()}")
        return camera_label(yaw, pitch, radius, pivot, fov_degrees).reshape(-1, CAMERA_LABEL_DIM)
    cam2world, intrinsics = split_camera_label(values)
    constant_rows = torch.cat([cam2world[:, 3], intrinsics[:, 2]], dim=1)
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=values.dtype)
    if ((constant_rows - expected).abs() > LABEL_TOLERANCE).any():
        raise InvalidSettingError(
            f"{name} is not a camera label: cam2world's last row must be (0, 0, 0, 1) and the intrinsics' "
            "last row (0, 0, 1) (layout: 16 numbers of cam2world row by row, then 9 of the intrinsics)")
    if (intrinsics[:, 0, 0] <= 0).any() or (intrinsics[:, 1, 1] <= 0).any():
        raise InvalidSettingError(f"{name}: the focal lengths (label entries 16 and 20) must be positive")
    return values.to(torch.float32)
