"""Face alignment of an uploaded photo to an FFHQ-style square crop.

The crop is NVIDIA's FFHQ recipe (``recreate_aligned_images`` in NVlabs/ffhq-dataset), fed with the
landmarks FFHQ itself was aligned with: dlib's 68-point shape predictor (iBUG 300-W layout).

1. dlib's HOG face detector runs on a copy downscaled to :data:`DETECT_MAX_SIDE` (upsample 0, then 1
   when nothing is found); the largest confident face is kept (the most central one among equal sizes).
2. When no face, or only a weak detection, is found upright, the photo is also searched turned by
   +-30 degrees (:data:`SEARCH_ANGLES`) and the best face of any view is kept.
3. The 68 points are predicted at full resolution (and again on a levelled view when the eyes tilt by
   more than :data:`LEVEL_TILT` degrees), then turned back into the photo. Eyes are the means of points
   36-41 and 42-47, the mouth corners are points 48 and 54, as in FFHQ.
4. When dlib finds nothing, or is not installed, OpenCV's Haar cascades are the fallback: face box, eye
   pair, and the mouth estimated from FFHQ's average proportions (rougher).
5. :func:`ffhq_quad` turns eyes and mouth into an oriented square, which is cut out of the photo,
   reflect-padded and blurred where it leaves the photo, resampled at up to 4x the output size and
   downsampled with Lanczos (FFHQ transforms to 4096 px and resizes to 1024).

The landmark model ships with the ``face-recognition-models`` package (loaded once, lazily, behind a
lock). Detector calls are serialised by another lock: dlib's ``object_detector::operator()`` is not const
(it loads each image into the detector's own scanner), so two threads must not run it at once; the shape
predictor's ``operator()`` is const and needs no lock. The model's training data (iBUG 300-W) is licensed for
non-commercial research only; dlib itself is under the Boost Software License.

Why this module is over 600 lines: detection, landmarks, the rotated-view search and NVIDIA's crop are one
procedure whose steps share their geometry (the transform of each view back to the photo); split, each part
would need the others' coordinate conventions.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InvalidImageError, WeightsNotFoundError
from ..inputs.conditions import load_image

__all__ = [
    "MIN_FACE_SIZE",
    "AlignedFace",
    "FaceLandmarks",
    "FaceTooSmallError",
    "NoFaceError",
    "align_face",
    "crop_points",
    "detect_faces",
    "ffhq_quad",
    "landmark_model_path",
    "predict_landmarks",
    "template_landmarks",
]

MIN_FACE_SIZE = 64  # face box side, in pixels of the uploaded photo
OUTPUT_SIZE = 1024
# The HOG detector runs on a copy whose longer side is at most this (the 68 points use the full photo).
DETECT_MAX_SIDE = 800
# Turns (degrees) tried when no confident upright face is found. The upright HOG detector finds the test
# faces up to 45-50 degrees of roll; with these turns, faces up to ~75 degrees are found.
SEARCH_ANGLES = (30.0, -30.0)
# HOG detections scoring below this also trigger the turned search; frontal faces in the test photos score
# 1.3-2.9, texture that a face turned by 60 degrees shows to the upright detector 0.08.
CONFIDENT_SCORE = 0.5
# FFHQ supersamples the quad transform (4096 px for a 1024 crop) so that bilinear sampling never minifies.
MAX_SUPERSAMPLE = 4
# Faces whose eye line tilts more than LEVEL_TILT degrees get their points predicted again (up to
# LEVEL_PASSES times) on a view turned to level the eyes.
LEVEL_TILT = 10.0
LEVEL_PASSES = 2
# A square photo is kept as is ("already aligned") when the FFHQ crop of its own 68-point landmarks is its
# own frame: every corner within ALIGNED_TOLERANCE of the side. On the 14 FFHQ test photos the corners move
# by 0.3-1.7 % (13 of them) and 5 % (one whose crop FFHQ made from the larger in-the-wild photo): dlib's
# points differ a little between resolutions. At 2 % a kept photo's eyes are at most ~1 % of the side off.
ALIGNED_TOLERANCE = 0.02
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"

# --- Haar fallback -------------------------------------------------------------------------------
# Eye-to-mouth length as a fraction of eye-to-eye length (mean of dlib's points on the FFHQ test photos).
MOUTH_RATIO = 1.04
# Where the eye cascade's box centre sits relative to the eye centre, as a fraction of the box height
# (Haar eye boxes include part of the brow); calibrated on the FFHQ test photos.
EYE_BOX_Y_SHIFT = 0.08
# Eyes relative to a frontal-face box (fallback when the eye cascade finds no consistent pair).
BOX_EYES = ((0.30, 0.42), (0.68, 0.42))
EYE_FACE_WIDTH = 320  # face boxes are scaled to this width for the eye cascade


class NoFaceError(InvalidImageError):
    """No face was found in the photo."""


class FaceTooSmallError(InvalidImageError):
    """The photo, or the face in it, is smaller than :data:`MIN_FACE_SIZE` pixels."""


@dataclass
class FaceLandmarks:
    """The points the FFHQ recipe needs, in photo pixels (x, y; pixel centres at integers)."""

    eye_left: np.ndarray  # the eye on the image's left
    eye_right: np.ndarray
    mouth_left: np.ndarray
    mouth_right: np.ndarray

    def as_array(self) -> np.ndarray:
        return np.stack([self.eye_left, self.eye_right, self.mouth_left, self.mouth_right]).astype(np.float64)

    @classmethod
    def from_68(cls, points: np.ndarray) -> FaceLandmarks:
        """Eyes and mouth corners from 68 iBUG 300-W points [68, 2], as FFHQ computes them."""
        points = np.asarray(points, dtype=np.float64)
        assert points.shape == (68, 2), points.shape
        return cls(points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[48].copy(), points[54].copy())


@dataclass
class AlignedFace:
    """Result of :func:`align_face`.

    Attributes:
        image: the aligned RGB crop, ``size`` x ``size``.
        landmarks: the landmarks found in the photo.
        quad: the photo-space corners of the crop (top-left, bottom-left, bottom-right, top-right), [4, 2].
        face_box: (x, y, w, h) of the chosen face in the photo.
        faces_found: how many faces the detector found (the largest is used).
        eyes_detected: False when the eyes were placed from the face box (less accurate).
        already_aligned: True when the photo was already an FFHQ crop and was only resized.
        messages: notes for the user (several faces, eyes estimated, ...).
        method: where the landmarks came from: ``"dlib-68"``, ``"haar-eyes"`` or ``"haar-box"``.
        search_angle: direction (degrees, clockwise as seen) of the turned view in which the face was found;
            0 when it was found upright.
        points: the 68 landmarks [68, 2] in photo pixels (``None`` for the Haar fallback).
    """

    image: Image.Image
    landmarks: FaceLandmarks
    quad: np.ndarray
    face_box: tuple[int, int, int, int]
    faces_found: int = 1
    eyes_detected: bool = True
    already_aligned: bool = False
    messages: list[str] = field(default_factory=list)
    method: str = "dlib-68"
    search_angle: float = 0.0
    points: np.ndarray | None = None


# --- dlib ----------------------------------------------------------------------------------------

_LOAD_LOCK = threading.Lock()
_DETECTOR_LOCK = threading.Lock()
_DLIB_MODELS: tuple[Any, Any] | None = None
_DLIB_MISSING_WARNED = False


def landmark_model_path() -> Path:
    """Path of dlib's 68-point model as installed by the ``face-recognition-models`` package.

    The package is located without being imported (its ``__init__`` needs the removed ``pkg_resources``).
    Raises :class:`~mm2latent.errors.WeightsNotFoundError` when it is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "models" / LANDMARK_MODEL
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"dlib's landmark model {LANDMARK_MODEL} was not found: pip install face-recognition-models")


def _dlib_models() -> tuple[Any, Any] | None:
    """(HOG face detector, 68-point shape predictor), loaded once; ``None`` when dlib is unavailable."""
    global _DLIB_MODELS, _DLIB_MISSING_WARNED
    if _DLIB_MODELS is None:
        with _LOAD_LOCK:
            if _DLIB_MODELS is None:
                try:
                    import dlib

                    path = landmark_model_path()
                except (ImportError, WeightsNotFoundError) as error:
                    if not _DLIB_MISSING_WARNED:
                        warnings.warn(f"dlib landmarks unavailable ({error}); faces are aligned with OpenCV's "
                                      "Haar cascades (rougher)", UserWarning, stacklevel=3)
                        _DLIB_MISSING_WARNED = True
                    return None
                _DLIB_MODELS = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))
    return _DLIB_MODELS


def _downscaled(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), size[0] / image.width


class _Face(NamedTuple):
    box: tuple[float, float, float, float]  # left, top, right, bottom in pixels of the searched image
    score: float  # the HOG detector's margin (> 0 is a detection)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _hog_faces(detector: Any, image: Image.Image, upsamples: tuple[int, ...] = (0, 1)) -> list[_Face]:
    """dlib HOG detections in ``image``, the one to use first: confident ones, then largest, then most central.

    Each of ``upsamples`` is tried in turn until something is found: upsampling once doubles the image
    (faces down to ~40 px instead of ~80 px in the downscaled copy) at 4x the cost.
    """
    small, scale = _downscaled(image, DETECT_MAX_SIDE)
    pixels = np.asarray(small)
    rects: Any = []
    scores: list[float] = []
    for upsample in upsamples:
        with _DETECTOR_LOCK:
            rects, scores, _ = detector.run(pixels, upsample, 0.0)
        if len(rects):
            break
    centre = (small.width / 2, small.height / 2)
    faces = [(r, score) for r, score in zip(rects, scores)]
    # HOG boxes come in discrete pyramid sizes, so equal areas are common: prefer the most central then.
    faces.sort(key=lambda f: (f[1] < CONFIDENT_SCORE, -f[0].area(),
                              math.hypot(f[0].center().x - centre[0], f[0].center().y - centre[1])))
    return [_Face((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), score)
            for r, score in faces]


def detect_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Upright frontal face boxes (x, y, w, h) in ``image`` pixels, the one :func:`align_face` uses first.

    dlib's HOG detector on a copy downscaled to :data:`DETECT_MAX_SIDE` (upsample 0, then 1): confident
    detections first, then by size; OpenCV's Haar cascades (largest first) when dlib is not installed.
    """
    models = _dlib_models()
    if models is None:
        return _haar_faces(image)
    return [_xywh(face.box) for face in _hog_faces(models[0], image.convert("RGB"))]


def predict_landmarks(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """dlib's 68 points [68, 2] (iBUG 300-W order, photo pixels) of the face in ``box`` (x, y, w, h)."""
    models = _dlib_models()
    if models is None:
        raise WeightsNotFoundError("dlib is not installed: pip install dlib-bin face-recognition-models")
    return _predict(models[1], np.asarray(image.convert("RGB")), box)


def _predict(predictor: Any, pixels: np.ndarray, box: tuple[float, float, float, float] | tuple[int, ...]) -> np.ndarray:
    import dlib

    x, y, w, h = (int(round(v)) for v in box)
    shape = predictor(pixels, dlib.rectangle(x, y, x + w - 1, y + h - 1))
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    assert points.shape == (68, 2), points.shape
    return points


def _xywh(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    return int(round(left)), int(round(top)), int(round(right - left)), int(round(bottom - top))


def _turned_view(image: Image.Image, degrees: float, centre: np.ndarray | None = None,
                 size: tuple[int, int] | None = None) -> tuple[Image.Image, np.ndarray]:
    """A view of ``image`` whose x axis runs at ``degrees`` in it (clockwise as seen: image y points down).

    Args:
        image: the photo.
        degrees: direction of the view's x axis in the photo.
        centre: photo point (pixel centres at integers) at the view's centre; default the photo's centre.
        size: (width, height) of the view; default the bounding box of the turned photo.

    Returns the view and the [2, 3] affine map from view pixels to photo pixels.
    """
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    if centre is None:
        centre = (np.array(image.size, dtype=np.float64) - 1) / 2
    if size is None:
        size = (math.ceil(image.width * abs(cos) + image.height * abs(sin)),
                math.ceil(image.width * abs(sin) + image.height * abs(cos)))
    linear = np.array([[cos, -sin], [sin, cos]])  # columns: the view's axes in the photo
    offset = np.asarray(centre, dtype=np.float64) - linear @ ((np.array(size, dtype=np.float64) - 1) / 2)
    # PIL's affine maps continuous coordinates (pixel centres at +0.5): u_photo = A u_view + t.
    continuous = offset + 0.5 - linear @ [0.5, 0.5]
    view = image.transform(size, Image.Transform.AFFINE,
                           (*linear[0], continuous[0], *linear[1], continuous[1]), Image.Resampling.BILINEAR)
    return view, np.concatenate([linear, offset[:, None]], axis=1)


def _tilt(points: np.ndarray) -> float:
    """Direction (degrees, clockwise as seen) of the line from the left eye to the right eye."""
    eyes = FaceLandmarks.from_68(points)
    dx, dy = eyes.eye_right - eyes.eye_left
    return math.degrees(math.atan2(dy, dx))


class _View(NamedTuple):
    angle: float  # direction of the view's x axis in the photo (degrees, clockwise as seen)
    image: Image.Image
    to_photo: np.ndarray  # [2, 3] view pixels -> photo pixels
    faces: list[_Face]


@dataclass
class _Detection:
    points: np.ndarray  # [68, 2] photo pixels
    box: tuple[int, int, int, int]  # (x, y, w, h) photo pixels
    faces_found: int
    angle: float


def _find_landmarks(image: Image.Image) -> _Detection | None:
    """The largest face's 68 points, searching upright first and then turned by :data:`SEARCH_ANGLES`."""
    models = _dlib_models()
    if models is None:
        return None
    detector, predictor = models
    views = [_View(0.0, image, np.eye(2, 3), _hog_faces(detector, image))]
    # Nothing upright, or only weak detections (which can be texture on a turned face): turn the photo
    # both ways and keep the best face of any view.
    if not views[0].faces or views[0].faces[0].score < CONFIDENT_SCORE:
        for angle in SEARCH_ANGLES:  # without upsampling: small faces turned that much are rare
            view, to_photo = _turned_view(image, angle)
            views.append(_View(angle, view, to_photo, _hog_faces(detector, view, upsamples=(0,))))
    views = [v for v in views if v.faces]
    if not views:
        return None
    angle, view, to_photo, faces = max(views, key=lambda v: (v.faces[0].score >= CONFIDENT_SCORE, v.faces[0].area))
    left, top, right, bottom = faces[0].box
    points = _apply(to_photo, _predict(predictor, np.asarray(view), _xywh(faces[0].box)))
    corners = _apply(to_photo, np.array([[left, top], [right, top], [right, bottom], [left, bottom]]))
    centre, side = corners.mean(axis=0), right - left
    # The predictor starts from an upright mean face and loses accuracy past ~20 degrees of roll (at 45
    # degrees eyes land 40 px off at 1024): predict again on a view levelled along the eyes it found.
    for _ in range(LEVEL_PASSES):
        tilt = _tilt(points)
        if abs(tilt) <= LEVEL_TILT:
            break
        level, level_to_photo = _turned_view(image, tilt, centre, (math.ceil(2 * side),) * 2)
        box = ((level.width - side) / 2, (level.height - side) / 2, side, side)
        points = _apply(level_to_photo, _predict(predictor, np.asarray(level), box))
    # A turned view's box, as the same-sized square in the photo (its bounding box would overstate the face).
    box = faces[0].box if angle == 0.0 else (*(centre - side / 2), *(centre + side / 2))
    return _Detection(points, _xywh(box), len(faces), angle)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine map to points [N, 2]."""
    return points @ matrix[:, :2].T + matrix[:, 2]


# --- Haar fallback -------------------------------------------------------------------------------


def _cv2():
    import cv2  # imported lazily: only the fallback needs OpenCV

    return cv2


_CASCADES: dict[str, Any] = {}


def _cascade(name: str):
    if name not in _CASCADES:
        cv2 = _cv2()
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if cascade.empty():
            raise RuntimeError(f"OpenCV cannot load its bundled cascade {name}; install opencv-python-headless<5")
        _CASCADES[name] = cascade
    return _CASCADES[name]


def _haar_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Haar frontal face boxes (x, y, w, h) in ``image`` pixels, largest first."""
    cv2 = _cv2()
    small, scale = _downscaled(image, DETECT_MAX_SIDE)
    gray = cv2.equalizeHist(np.asarray(small.convert("L")))
    boxes = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=6, minSize=(24, 24))
    if len(boxes) == 0:  # the alt2 cascade finds some faces (tilted, dark) that the default misses
        boxes = _cascade("haarcascade_frontalface_alt2.xml").detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
    faces = [tuple(int(round(v / scale)) for v in box) for box in boxes]
    return sorted(faces, key=lambda b: b[2] * b[3], reverse=True)


def _eye_pair(gray: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The most plausible Haar eye pair inside a face box, as (left, right) centres in ``gray`` pixels."""
    x, y, w, h = box
    scale = min(1.0, EYE_FACE_WIDTH / w)
    top = gray[y : y + int(0.6 * h), x : x + w]
    if scale < 1.0:
        top = np.asarray(Image.fromarray(top).resize((round(top.shape[1] * scale), round(top.shape[0] * scale)),
                                                     Image.Resampling.BILINEAR))
    w, h = w * scale, h * scale
    candidates = []
    for name in ("haarcascade_eye.xml", "haarcascade_eye_tree_eyeglasses.xml"):
        found = _cascade(name).detectMultiScale(top, scaleFactor=1.05, minNeighbors=3,
                                                minSize=(max(8, int(w) // 12),) * 2, maxSize=(int(w) // 2,) * 2)
        candidates += [(ex + ew / 2, ey + eh / 2 + EYE_BOX_Y_SHIFT * eh, ew) for ex, ey, ew, eh in found]
    best, best_score = None, np.inf
    for i, a in enumerate(candidates):
        for b in candidates[i + 1 :]:
            left, right = (a, b) if a[0] < b[0] else (b, a)
            dx, dy = right[0] - left[0], right[1] - left[1]
            # Geometry of a frontal face: eyes on both halves, roughly level, 0.25-0.6 box widths apart.
            if not (left[0] < 0.5 * w < right[0] and 0.25 * w < dx < 0.6 * w and abs(dy) < 0.3 * dx):
                continue
            if max(left[2], right[2]) > 1.8 * min(left[2], right[2]):
                continue
            expected = [(BOX_EYES[0][0] * w, BOX_EYES[0][1] * h), (BOX_EYES[1][0] * w, BOX_EYES[1][1] * h)]
            score = np.hypot(left[0] - expected[0][0], left[1] - expected[0][1]) + np.hypot(
                right[0] - expected[1][0], right[1] - expected[1][1])
            if score < best_score:
                best, best_score = (left, right), score
    if best is None:
        return None
    return (np.array([x + best[0][0] / scale, y + best[0][1] / scale]),
            np.array([x + best[1][0] / scale, y + best[1][1] / scale]))


def _landmarks_from_eyes(eye_left: np.ndarray, eye_right: np.ndarray) -> FaceLandmarks:
    """Estimate the mouth corners from the eyes with FFHQ's average proportions."""
    eye_to_eye = eye_right - eye_left
    down = np.array([-eye_to_eye[1], eye_to_eye[0]])  # eye_to_eye turned 90° clockwise (image y points down)
    mouth = (eye_left + eye_right) / 2 + MOUTH_RATIO * down
    half_width = 0.4 * eye_to_eye
    return FaceLandmarks(eye_left, eye_right, mouth - half_width, mouth + half_width)


def _haar_landmarks(image: Image.Image) -> tuple[FaceLandmarks, tuple[int, int, int, int], int, bool] | None:
    """(landmarks, face box, faces found, eyes detected) from the Haar cascades, or ``None``."""
    faces = _haar_faces(image)
    if not faces:
        return None
    box = faces[0]
    eyes = _eye_pair(_cv2().equalizeHist(np.asarray(image.convert("L"))), box)
    eyes_detected = eyes is not None
    if eyes is None:
        x, y, w, h = box
        eyes = (np.array([x + BOX_EYES[0][0] * w, y + BOX_EYES[0][1] * h]),
                np.array([x + BOX_EYES[1][0] * w, y + BOX_EYES[1][1] * h]))
    return _landmarks_from_eyes(*eyes), box, len(faces), eyes_detected


# --- FFHQ crop -----------------------------------------------------------------------------------


def ffhq_quad(landmarks: FaceLandmarks) -> np.ndarray:
    """FFHQ's oriented crop square: corners [4, 2] (top-left, bottom-left, bottom-right, top-right)."""
    eye_left, eye_right = landmarks.eye_left.astype(np.float64), landmarks.eye_right.astype(np.float64)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (landmarks.mouth_left + landmarks.mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def template_landmarks(size: int = OUTPUT_SIZE) -> FaceLandmarks:
    """Where an average FFHQ face's landmarks lie in a ``size`` crop (eyes 1/4 of the size apart)."""
    unit = _landmarks_from_eyes(np.array([0.0, 0.0]), np.array([1.0, 0.0]))
    return crop_points(unit, ffhq_quad(unit), size)


def crop_points(landmarks: FaceLandmarks | np.ndarray, quad: np.ndarray, size: int) -> Any:
    """Photo-space points -> their place in the ``size`` crop of ``quad`` (same type as given).

    ``landmarks`` is a :class:`FaceLandmarks` or an array [..., 2]; ``quad`` is an :class:`AlignedFace`'s
    ``quad`` (its first corner is the crop's top-left edge, its last the top-right one). Pixel centres are
    at integers on both sides, as in dlib's points.
    """
    points = landmarks.as_array() if isinstance(landmarks, FaceLandmarks) else np.asarray(landmarks, np.float64)
    origin, x_axis, y_axis = quad[0], quad[3] - quad[0], quad[1] - quad[0]
    basis = np.stack([x_axis, y_axis], axis=1) / size
    # The quad's corners are pixel edges (FFHQ samples at quad + 0.5), hence the half pixel.
    mapped = np.linalg.solve(basis, (points.reshape(-1, 2) - origin).T).T.reshape(points.shape) - 0.5
    return FaceLandmarks(*mapped) if isinstance(landmarks, FaceLandmarks) else mapped


def _crop_quad(image: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """Resample the photo inside ``quad`` to ``size``² as FFHQ does: shrink, crop, reflect-pad, transform."""
    quad = quad.copy()
    qsize = np.hypot(*(quad[3] - quad[0]))
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:  # leaves qsize < 4 * size
        image = image.resize((int(np.rint(image.width / shrink)), int(np.rint(image.height / shrink))),
                             Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    left, top = int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min()))
    right, bottom = int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max()))
    crop = (max(left - border, 0), max(top - border, 0),
            min(right + border, image.width), min(bottom + border, image.height))
    if crop[2] - crop[0] < image.width or crop[3] - crop[1] < image.height:
        image = image.crop(crop)
        quad -= crop[0:2]
    pad = (max(-left + border, 0), max(-top + border, 0),
           max(right - image.width - crop[0] + border, 0), max(bottom - image.height - crop[1] + border, 0))
    if max(pad) > border - 4:
        # As FFHQ: once any side needs padding, every side gets at least 0.3 qsize, so that the blend mask
        # fades in from all four edges (a side with no padding would make the mask 1 everywhere).
        pad = tuple(int(p) for p in np.maximum(pad, int(np.rint(qsize * 0.3))))
        image = _reflect_pad(image, pad, qsize)
        quad += pad[:2]
    # Transform at a size where bilinear sampling does not minify, then downsample with Lanczos
    # (FFHQ: 4096 then 1024; after the shrink qsize < 4 * size, so at most 4x is needed).
    supersample = min(MAX_SUPERSAMPLE, max(1, math.ceil(qsize / size)))
    transform_size = size * supersample
    image = image.transform((transform_size, transform_size), Image.Transform.QUAD,
                            (quad + 0.5).flatten().tolist(), Image.Resampling.BILINEAR)
    return image if supersample == 1 else image.resize((size, size), Image.Resampling.LANCZOS)


def _reflect_pad(image: Image.Image, pad: tuple[int, int, int, int], qsize: float) -> Image.Image:
    """Reflect-pad by ``pad`` (left, top, right, bottom; each > 0), then blur toward the padded edges and
    fade them to the median colour (FFHQ's recipe), so no black corners or mirrored seams show."""
    assert min(pad) > 0, pad
    left, top, right, bottom = pad
    array = np.pad(np.float32(image), ((top, bottom), (left, right), (0, 0)), "reflect")
    h, w, _ = array.shape
    yy, xx = np.ogrid[:h, :w]
    # 1 on the outer edge, 0 where the photo starts, negative inside it.
    mask = np.maximum(1.0 - np.minimum(np.float32(xx) / left, np.float32(w - 1 - xx) / right),
                      1.0 - np.minimum(np.float32(yy) / top, np.float32(h - 1 - yy) / bottom))[..., None]
    radius = max(float(qsize) * 0.02, 1.0)  # PIL's radius is the Gaussian's standard deviation, as scipy's sigma
    blurred = np.float32(Image.fromarray(np.uint8(np.clip(np.rint(array), 0, 255))).filter(
        ImageFilter.GaussianBlur(radius)))
    array += (blurred - array) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    array += (np.median(array, axis=(0, 1)) - array) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(array), 0, 255)), "RGB")


def _is_own_crop(quad: np.ndarray, side: int) -> bool:
    """Whether ``quad`` (the FFHQ crop of a square photo's landmarks) is the photo's own frame."""
    frame = np.array([[0, 0], [0, side], [side, side], [side, 0]], dtype=np.float64) - 0.5
    return bool(np.hypot(*(quad - frame).T).max() <= ALIGNED_TOLERANCE * side)


def _to_rgb(photo: Any) -> Image.Image:
    image = load_image(photo)
    if image.mode == "RGBA":  # transparent areas become white, as a viewer shows them
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def align_face(photo: Any, size: int = OUTPUT_SIZE, keep_aligned: bool = True) -> AlignedFace:
    """Find the largest face in ``photo`` and return its FFHQ-style ``size``² crop.

    dlib's detector and 68 points (turned search for strongly tilted faces), or OpenCV's Haar cascades when
    dlib finds nothing; ``AlignedFace.method`` and ``messages`` say which. See the module docstring.

    Args:
        photo: a path, PIL image or array (EXIF orientation honoured; gray and RGBA become RGB).
        size: output side in pixels.
        keep_aligned: when the photo is already a square FFHQ crop (its 68-point landmarks give its own
            frame as the crop), only resize it instead of resampling it through the quad.

    Raises :class:`FaceTooSmallError` for photos or faces under 64 px, :class:`NoFaceError` when
    no face is found, and the errors of :func:`~mm2latent.inputs.conditions.load_image`.
    """
    image = _to_rgb(photo)
    if min(image.size) < MIN_FACE_SIZE:
        raise FaceTooSmallError(
            f"the photo is {image.width}x{image.height} pixels; a face needs at least {MIN_FACE_SIZE} pixels")
    messages = []
    detection = _find_landmarks(image)
    if detection is not None:
        landmarks, box, faces_found = FaceLandmarks.from_68(detection.points), detection.box, detection.faces_found
        method, eyes_detected, points, angle = "dlib-68", True, detection.points, detection.angle
    else:
        haar = _haar_landmarks(image)
        if haar is None:
            raise NoFaceError("no face was found in the photo: upload a photo with a clearly visible, "
                              "roughly frontal face")
        landmarks, box, faces_found, eyes_detected = haar
        method, points, angle = ("haar-eyes" if eyes_detected else "haar-box"), None, 0.0
        messages.append("the eyes were not found; they were placed from the face outline (rougher alignment)"
                        if not eyes_detected else
                        "the facial landmarks were not found; the face was aligned from its eyes (rougher alignment)")
    if min(box[2], box[3]) < MIN_FACE_SIZE:
        raise FaceTooSmallError(
            f"the face is only {min(box[2:])} pixels wide; use a photo where it is at least {MIN_FACE_SIZE} pixels")
    if faces_found > 1:
        messages.insert(0, f"{faces_found} faces were found; the largest one is used")
        warnings.warn(messages[0], UserWarning, stacklevel=2)
    quad = ffhq_quad(landmarks)
    # Only precise landmarks may decide that the photo is already its own crop.
    already = (keep_aligned and method == "dlib-68" and image.width == image.height
               and _is_own_crop(quad, image.width))
    if already:
        aligned = image if image.width == size else image.resize((size, size), Image.Resampling.LANCZOS)
        quad = np.array([[0, 0], [0, image.height], [image.width, image.height], [image.width, 0]],
                        dtype=np.float64) - 0.5
    else:
        aligned = _crop_quad(image, quad, size)
    return AlignedFace(aligned, landmarks, quad, tuple(int(v) for v in box), faces_found, eyes_detected, already,
                       messages, method, angle, points)
