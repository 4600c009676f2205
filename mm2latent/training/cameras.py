"""Camera labels for training with a 3D generator (EG3D): EG3D's ``dataset.json``, or coarse labels from landmarks.

Training with EG3D renders G(w) at the ground-truth camera of each photo (METHOD.md, 3D-aware generation), so
every training image needs EG3D's 25-number label (cam2world 4x4 + normalised intrinsics, see
:mod:`mm2latent.models.camera`). Two sources:

* **EG3D's own labels** (what the paper does): EG3D's ``dataset_preprocessing/ffhq`` recipe fits Deep3DFaceRecon
  (a 3DMM) to each photo, crops it the EG3D way and writes ``dataset.json`` =
  ``{"labels": [[file name, [25 floats]], ...]}``. :func:`read_dataset_json` reads it; the photos must be the
  crops that recipe wrote (EG3D's crop differs from FFHQ's alignment).
* **``prepare --generator eg3d``** (:mod:`.prepare_3d`, the project's path): EG3D's crop of each photo, its
  mask and scribble warped alike, and a full camera (rotation with roll) by PnP of 51 dlib landmarks against a
  68-point mean face (:mod:`.face_model`), written as ``cameras.json`` in this layout.
* **A coarse fallback** (:func:`label_from_landmarks`, for photos already in EG3D's crop): the head pose from dlib's 68 landmarks by PnP
  (``cv2.solvePnP``) against a six-point mean face (nose tip, chin, outer eye corners, mouth corners; the
  template of Mallick's "Head Pose Estimation using OpenCV and Dlib", LearnOpenCV 2016, in millimetre-like units),
  turned into EG3D's orbit camera (radius 2.7 around the pivot, default field of view). Its limits: only yaw and
  pitch are recovered (no roll, no translation, no per-photo focal length), a rigid mean face stands for every
  head, and the PnP pose is typically within 5–10° of a 3DMM fit for moderate poses; use it to start, and EG3D's
  recipe for a faithful 3D run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidImageError
from ..models.camera import DEFAULT_FOV_DEGREES, camera_label, fov_to_intrinsics

__all__ = [
    "MEAN_FACE_INDICES",
    "MEAN_FACE_POINTS",
    "head_pose_from_landmarks",
    "label_from_landmarks",
    "read_dataset_json",
    "write_dataset_json",
]

#: The six points of the mean face (x toward the image's right, y up, z toward the viewer; the nose tip at the
#: origin): nose tip, chin, left eye's outer corner, right eye's outer corner, left and right mouth corners
#: ("left" as seen in the image).
MEAN_FACE_POINTS = np.array([
    (0.0, 0.0, 0.0),
    (0.0, -330.0, -65.0),
    (-225.0, 170.0, -135.0),
    (225.0, 170.0, -135.0),
    (-150.0, -150.0, -125.0),
    (150.0, -150.0, -125.0),
], dtype=np.float64)
#: Their indices among dlib's 68 points (iBUG 300-W order).
MEAN_FACE_INDICES = (30, 8, 36, 45, 48, 54)


def read_dataset_json(path: str | Path) -> dict[str, torch.Tensor]:
    """EG3D's ``dataset.json`` -> {file name: label [25] (float32)}.

    Raises:
        InvalidImageError: the file is not EG3D's layout or a label does not have 25 numbers.
    """
    try:
        data = json.loads(Path(path).read_text())
        entries = data["labels"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidImageError(f"{path} is not an EG3D dataset.json ({{'labels': [[file, [25 numbers]], ...]}}): "
                                f"{error}") from error
    labels = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InvalidImageError(f"{path}: an entry is not [file name, label]: {str(entry)[:80]}")
        label = torch.tensor(entry[1], dtype=torch.float32)
        if label.shape != (25,):
            raise InvalidImageError(f"{path}: the label of {entry[0]} has {label.numel()} numbers, not 25")
        labels[entry[0]] = label
    return labels


def write_dataset_json(labels: dict[str, torch.Tensor], path: str | Path) -> Path:
    """{file name: label [25]} -> EG3D's ``dataset.json`` layout."""
    path = Path(path)
    entries = [[name, [float(v) for v in label.reshape(-1).tolist()]] for name, label in sorted(labels.items())]
    path.write_text(json.dumps({"labels": entries}) + "\n")
    return path


def head_pose_from_landmarks(points: np.ndarray, image_size: int | tuple[int, int],
                             fov_degrees: float = DEFAULT_FOV_DEGREES) -> tuple[float, float]:
    """EG3D orbit angles (yaw°, pitch°) of the camera that sees a head with these 68 landmarks.

    The pinhole camera has EG3D's field of view and its principal point at the image centre; PnP gives the
    head's rotation, and the direction from the head to the camera becomes EG3D's yaw (azimuth, positive toward
    the image's right) and pitch (its vertical angle: positive below the face, see :mod:`mm2latent.models.camera`).

    Args:
        points: dlib's 68 points [68, 2] in pixels.
        image_size: side of the (square) image, or (width, height).
        fov_degrees: the diagonal field of view of the camera.
    """
    import cv2

    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise InvalidImageError(f"expected dlib's 68 landmarks [68, 2], got {points.shape}")
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    focal = float(fov_to_intrinsics(fov_degrees)[0, 0]) * max(width, height)
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    image_points = points[list(MEAN_FACE_INDICES)]
    found, rotation, translation = cv2.solvePnP(MEAN_FACE_POINTS, image_points, camera, None,
                                                flags=cv2.SOLVEPNP_ITERATIVE)
    if not found:
        raise InvalidImageError("the head pose could not be estimated from these landmarks")
    matrix, _ = cv2.Rodrigues(rotation)
    centre = -matrix.T @ translation.reshape(3)  # the camera in the face's frame
    direction = centre / np.linalg.norm(centre)
    yaw = math.degrees(math.atan2(direction[0], direction[2]))
    # EG3D's sampler: height y = cos(phi) = -2·pitch/pi (pitch in radians), see models/camera.py.
    pitch = math.degrees(-math.pi / 2 * float(np.clip(direction[1], -0.999, 0.999)))
    return yaw, pitch


def label_from_landmarks(points: np.ndarray, image_size: int | tuple[int, int],
                         fov_degrees: float = DEFAULT_FOV_DEGREES) -> torch.Tensor:
    """A coarse EG3D label [25] from dlib's 68 landmarks (see the module's docstring for its limits)."""
    yaw, pitch = head_pose_from_landmarks(points, image_size, fov_degrees)
    return camera_label(yaw, pitch, fov_degrees=fov_degrees)


def estimate_labels(files: Iterable[str | Path], progress: bool = True) -> dict[str, torch.Tensor]:
    """Coarse labels of aligned face photos (largest face of each), keyed by file name.

    Raises:
        NoFaceError: a photo has no face dlib finds.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..editing.align import NoFaceError, detect_faces, predict_landmarks

    labels = {}
    for file in tqdm(list(files), desc="camera labels", disable=not progress):
        with Image.open(file) as photo:
            photo = photo.convert("RGB")
            boxes = detect_faces(photo)
            if not boxes:
                raise NoFaceError(f"no face was found in {file}")
            box = max(boxes, key=lambda b: b[2] * b[3])
            labels[Path(file).name] = label_from_landmarks(predict_landmarks(photo, box), photo.size)
    return labels
