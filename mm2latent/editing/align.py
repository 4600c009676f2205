"""Face alignment of an uploaded photo to an FFHQ-style square crop.

Detection uses OpenCV's bundled Haar cascades (``opencv-python-headless`` 4.x ships them in
``cv2.data.haarcascades``; OpenCV 5 dropped them): the frontal-face cascade finds faces, the eye
cascade finds the eyes inside the largest face. The mouth is not detected (no mouth cascade is
bundled); it is estimated from the eyes with FFHQ's average face geometry. The crop then follows
NVIDIA's FFHQ recipe (``recreate_aligned_images`` in NVlabs/ffhq-dataset): eye-to-eye and
eye-to-mouth vectors give an oriented square (the "quad"), which is cut out of the photo, reflected
and blurred where it leaves the photo, and resampled to the output size.

A learned landmark model (e.g. a 68-point model loaded through the Hub loader) can replace the
detector: pass its eye centres and mouth corners to :func:`ffhq_quad` as :class:`FaceLandmarks`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InvalidImageError
from ..inputs.conditions import load_image

__all__ = [
    "MIN_FACE_SIZE",
    "AlignedFace",
    "FaceLandmarks",
    "FaceTooSmallError",
    "NoFaceError",
    "align_face",
    "detect_faces",
    "ffhq_quad",
    "template_landmarks",
]

MIN_FACE_SIZE = 64  # face box side, in pixels of the uploaded photo
OUTPUT_SIZE = 1024
# Eye-to-mouth length as a fraction of eye-to-eye length on FFHQ faces (used when no mouth is detected).
MOUTH_RATIO = 0.9
# Where the eye cascade's box centre sits relative to the eye centre, as a fraction of the box height
# (Haar eye boxes include part of the brow); calibrated on the FFHQ test photos.
EYE_BOX_Y_SHIFT = 0.08
# Eyes relative to a frontal-face box (fallback when the eye cascade finds no consistent pair).
BOX_EYES = ((0.30, 0.42), (0.68, 0.42))
# A square photo is treated as already aligned when its eye midpoint is within ALIGNED_SHIFT (fraction
# of its size) of the template's, its eye distance within ALIGNED_SCALE (relative) and its eye line
# within ALIGNED_ANGLE degrees of level. FFHQ levels eyes and mouth together, so its eyes can tilt a
# few degrees, and Haar eye boxes are noisy by a few pixels.
ALIGNED_SHIFT = 0.03
ALIGNED_SCALE = 0.12
ALIGNED_ANGLE = 8.0
DETECT_MAX_SIDE = 800
EYE_FACE_WIDTH = 320  # face boxes are scaled to this width for the eye cascade


class NoFaceError(InvalidImageError):
    """No face was found in the photo."""


class FaceTooSmallError(InvalidImageError):
    """The photo, or the face in it, is smaller than :data:`MIN_FACE_SIZE` pixels."""


@dataclass
class FaceLandmarks:
    """The points the FFHQ recipe needs, in photo pixels (x, y)."""

    eye_left: np.ndarray  # the eye on the image's left
    eye_right: np.ndarray
    mouth_left: np.ndarray
    mouth_right: np.ndarray

    def as_array(self) -> np.ndarray:
        return np.stack([self.eye_left, self.eye_right, self.mouth_left, self.mouth_right]).astype(np.float64)


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
    """

    image: Image.Image
    landmarks: FaceLandmarks
    quad: np.ndarray
    face_box: tuple[int, int, int, int]
    faces_found: int = 1
    eyes_detected: bool = True
    already_aligned: bool = False
    messages: list[str] = field(default_factory=list)


def _cv2():
    import cv2  # imported lazily: only alignment needs OpenCV

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


def _to_rgb(photo: Any) -> Image.Image:
    image = load_image(photo)
    if image.mode == "RGBA":  # transparent areas become white, as a viewer shows them
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def detect_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal face boxes (x, y, w, h) in ``image`` pixels, largest first."""
    cv2 = _cv2()
    scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
    # Keep a MIN_FACE_SIZE face detectable (>= 24 px) so it can be reported as too small.
    scale = max(scale, min(1.0, 24 / MIN_FACE_SIZE))
    small = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)),
                                                    Image.Resampling.BILINEAR)
    gray = cv2.equalizeHist(np.asarray(small.convert("L")))
    boxes = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=6, minSize=(24, 24))
    if len(boxes) == 0:  # the alt2 cascade finds some faces (tilted, dark) that the default misses
        boxes = _cascade("haarcascade_frontalface_alt2.xml").detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
    faces = [tuple(int(round(v / scale)) for v in box) for box in boxes]
    return sorted(faces, key=lambda b: b[2] * b[3], reverse=True)


def _eye_pair(gray: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The most plausible eye pair inside a face box, as (left, right) centres in ``gray`` pixels."""
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
    """Where :func:`align_face` puts the estimated landmarks in a ``size`` crop."""
    unit = _landmarks_from_eyes(np.array([0.0, 0.0]), np.array([1.0, 0.0]))
    quad = ffhq_quad(unit)
    # Map the unit face into the crop: quad[0] -> (0, 0), quad[3] -> (size, 0).
    return _map_points(unit, quad, size)


def _map_points(landmarks: FaceLandmarks, quad: np.ndarray, size: int) -> FaceLandmarks:
    """Photo-space landmarks -> crop-space landmarks for the crop ``quad`` resampled to ``size``."""
    origin, x_axis, y_axis = quad[0], quad[3] - quad[0], quad[1] - quad[0]
    basis = np.stack([x_axis, y_axis], axis=1) / size
    points = np.linalg.solve(basis, (landmarks.as_array() - origin).T).T
    return FaceLandmarks(*points)


def _crop_quad(image: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """Resample the photo inside ``quad`` to ``size``² as FFHQ does: shrink, crop, reflect-pad, transform."""
    quad = quad.copy()
    qsize = np.hypot(*(quad[3] - quad[0]))
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
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
        image = _reflect_pad(image, pad, qsize)
        quad += pad[:2]
    return image.transform((size, size), Image.Transform.QUAD, (quad + 0.5).flatten().tolist(),
                           Image.Resampling.BILINEAR)


def _reflect_pad(image: Image.Image, pad: tuple[int, int, int, int], qsize: float) -> Image.Image:
    """Reflect-pad and blur toward the padded edges (FFHQ's recipe), so no black corners appear."""
    left, top, right, bottom = (max(int(p), 0) for p in pad)
    array = np.float32(image)
    # np.pad's reflect mode needs pads shorter than the image; repeat for very large pads.
    while left or top or right or bottom:
        step = [min(p, s - 1) for p, s in zip((top, bottom, left, right), (array.shape[0],) * 2 + (array.shape[1],) * 2)]
        array = np.pad(array, ((step[0], step[1]), (step[2], step[3]), (0, 0)), "reflect")
        top, bottom, left, right = (p - s for p, s in zip((top, bottom, left, right), step))
    h, w, _ = array.shape
    yy, xx = np.ogrid[:h, :w]
    pl, pt, pr, pb = (float(p) if p > 0 else np.inf for p in pad)
    mask = np.maximum(1.0 - np.minimum(xx / pl, (w - 1 - xx) / pr), 1.0 - np.minimum(yy / pt, (h - 1 - yy) / pb))
    mask = np.float32(mask)[..., None]
    radius = max(float(qsize) * 0.02, 1.0)
    blurred = np.float32(Image.fromarray(np.uint8(np.clip(np.rint(array), 0, 255))).filter(
        ImageFilter.GaussianBlur(radius)))
    array += (blurred - array) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    array += (np.median(array, axis=(0, 1)) - array) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(array), 0, 255)), "RGB")


def align_face(photo: Any, size: int = OUTPUT_SIZE, keep_aligned: bool = True) -> AlignedFace:
    """Detect the largest face in ``photo`` and return its FFHQ-style ``size``² crop.

    Args:
        photo: a path, PIL image or array (EXIF orientation honoured; gray and RGBA become RGB).
        size: output side in pixels.
        keep_aligned: when the photo is already a square FFHQ crop (eyes at the template), only
            resize it instead of resampling it through the quad.

    Raises :class:`FaceTooSmallError` for photos or faces under 64 px, :class:`NoFaceError` when
    no face is found, and the errors of :func:`~mm2latent.inputs.conditions.load_image`.
    """
    image = _to_rgb(photo)
    if min(image.size) < MIN_FACE_SIZE:
        raise FaceTooSmallError(
            f"the photo is {image.width}x{image.height} pixels; a face needs at least {MIN_FACE_SIZE} pixels")
    faces = detect_faces(image)
    if not faces:
        raise NoFaceError("no face was found in the photo: upload a photo with a clearly visible, "
                          "roughly frontal face")
    box = faces[0]
    messages = []
    if min(box[2], box[3]) < MIN_FACE_SIZE:
        raise FaceTooSmallError(
            f"the face is only {min(box[2:])} pixels wide; use a photo where it is at least {MIN_FACE_SIZE} pixels")
    if len(faces) > 1:
        messages.append(f"{len(faces)} faces were found; the largest one is used")
        warnings.warn(messages[-1], UserWarning, stacklevel=2)
    gray = _cv2().equalizeHist(np.asarray(image.convert("L")))
    eyes = _eye_pair(gray, box)
    eyes_detected = eyes is not None
    if not eyes_detected:
        x, y, w, h = box
        eyes = (np.array([x + BOX_EYES[0][0] * w, y + BOX_EYES[0][1] * h]),
                np.array([x + BOX_EYES[1][0] * w, y + BOX_EYES[1][1] * h]))
        messages.append("the eyes were not found; they were placed from the face outline (rougher alignment)")
    landmarks = _landmarks_from_eyes(*eyes)
    quad = ffhq_quad(landmarks)
    already = keep_aligned and image.width == image.height and _near_template(landmarks, image.width)
    if already:
        aligned = image if image.width == size else image.resize((size, size), Image.Resampling.LANCZOS)
        quad = np.array([[0, 0], [0, image.height], [image.width, image.height], [image.width, 0]], dtype=np.float64)
    else:
        aligned = _crop_quad(image, quad, size)
    return AlignedFace(aligned, landmarks, quad, tuple(int(v) for v in box), len(faces), eyes_detected, already,
                       messages)


def _near_template(landmarks: FaceLandmarks, size: int) -> bool:
    template = template_landmarks(size)
    shift = np.hypot(*((landmarks.eye_left + landmarks.eye_right) - (template.eye_left + template.eye_right)) / 2)
    eye_to_eye = landmarks.eye_right - landmarks.eye_left
    scale = np.hypot(*eye_to_eye) / np.hypot(*(template.eye_right - template.eye_left))
    angle = np.degrees(np.arctan2(abs(eye_to_eye[1]), eye_to_eye[0]))
    return bool(shift <= ALIGNED_SHIFT * size and abs(scale - 1) <= ALIGNED_SCALE and angle <= ALIGNED_ANGLE)
