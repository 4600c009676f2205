"""``prepare --generator eg3d``: CelebAMask-HQ in EG3D's framing, with a camera label per photo.

EG3D renders faces in its own crop (``dataset_preprocessing/ffhq`` of NVlabs/eg3d), not in CelebA-HQ's, and
training with it renders G(w) at each photo's camera. Per photo this module:

1. finds dlib's 68 landmarks (:mod:`mm2latent.editing.align`);
2. crops the photo the way EG3D does: Deep3DFaceRecon's ``align_img`` fits its five standard 3D points
   (:data:`~.face_model.LM3D_STANDARD`) to the photo's five points with an orthographic least-squares fit
   (``POS``: a scale s and the projected origin t), rescales the photo so one standard unit is 300 px, takes the
   1024² square centred on t, then EG3D's ``crop_images_in_the_wild.py`` keeps its centre 700² and resizes it to
   512². As one transform: a square of side 700·s/300 photo pixels centred on t, resized to 512² (box corners
   rounded to whole pixels, as EG3D's integer crop does; no rotation: the roll stays in the camera);
3. warps the mask (nearest) and the scribble (any stroke coverage stays a stroke) with that same transform;
4. estimates the camera by PnP (``cv2.solvePnP``) of the crop's landmarks against the 68-point mean face
   (:data:`~.face_model.MEAN_FACE_68`, in EG3D's world frame) with EG3D's intrinsics (18.837° diagonal field of
   view, principal point at the centre), and writes EG3D's 25-number label: cam2world (OpenCV axes) with its
   position moved along its direction to radius 2.7 from the origin (EG3D's ``fix_pose_orig``), then the
   normalised intrinsics. Cameras look at the mean face's origin, Deep3DFaceRecon's, which the crop centres on.

The jaw contour (points 0–16) is left out of PnP: dlib puts it on the face's silhouette, which moves over the
head as it turns, so it is no fixed point of a rigid face.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidImageError
from ..inputs.conditions import parse_mask
from ..inputs.scribbles import scribble_from_photo
from ..models.camera import DEFAULT_FOV_DEGREES, DEFAULT_RADIUS, fov_to_intrinsics
from .cameras import write_dataset_json
from .face_model import LM3D_STANDARD, MEAN_FACE_68, five_points

__all__ = [
    "EG3D_CROP_SIZE",
    "crop_box",
    "crop_image",
    "crop_landmarks",
    "label_from_crop_landmarks",
    "prepare_eg3d",
]

EG3D_CROP_SIZE = 512
# Deep3DFaceRecon's align_img rescale (px per standard unit at the 1024 stage) and EG3D's centre crop of it.
RESCALE_FACTOR = 300.0
CENTER_CROP = 700.0
#: The points PnP reads (all but the jaw contour, see the module docstring).
POSE_POINTS = np.arange(17, 68)
CAMERAS_FILE = "cameras.json"


def _orthographic_fit(image_points: np.ndarray, model_points: np.ndarray) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's POS: image ≈ [R1; R2]·X + t in least squares -> (t [2], s = mean row norm of R)."""
    n = len(model_points)
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3], a[0::2, 3] = model_points, 1
    a[1::2, 4:7], a[1::2, 7] = model_points, 1
    k = np.linalg.lstsq(a, image_points.reshape(-1), rcond=None)[0]
    return np.array([k[3], k[7]]), float((np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2)


def crop_box(points: np.ndarray, image_height: int) -> tuple[int, int, int, int]:
    """EG3D's crop of a photo with these 68 landmarks: (left, top, right, bottom) in photo pixels, square.

    Args:
        points: dlib's 68 points [68, 2] (pixels, y down).
        image_height: the photo's height (Deep3DFaceRecon fits in y-up coordinates, y' = H - 1 - y).
    """
    five = five_points(points)
    five[:, 1] = image_height - 1 - five[:, 1]
    t, s = _orthographic_fit(five, LM3D_STANDARD)
    side = CENTER_CROP * s / RESCALE_FACTOR
    centre_x, centre_y = t[0], image_height - t[1]  # resize_n_crop_img's centre, back in y-down pixels
    left, top = int(round(centre_x - side / 2)), int(round(centre_y - side / 2))
    size = int(round(side))
    return left, top, left + size, top + size


def crop_landmarks(points: np.ndarray, box: tuple[int, int, int, int], size: int = EG3D_CROP_SIZE) -> np.ndarray:
    """Photo-space points -> their place in the ``size`` crop of ``box`` (pixel centres at integers)."""
    left, top, right, _ = box
    return (np.asarray(points, np.float64) + 0.5 - [left, top]) * (size / (right - left)) - 0.5


def crop_image(image: Image.Image, box: tuple[int, int, int, int], size: int = EG3D_CROP_SIZE,
               kind: str = "photo") -> Image.Image:
    """The ``size``² crop of ``box`` (outside the image: black) of a photo, an index mask or a scribble.

    Every kind goes through the same box at the photo's resolution (a mask or scribble of another size is first
    brought to the photo's size), so pixel (i, j) of the three crops shows one point of the face.

    Args:
        image: the photo (RGB), the mask (class ids, mode "L") or the scribble (white strokes on black).
        box: :func:`crop_box` in the photo's pixels.
        size: the crop's side.
        kind: "photo" (Lanczos), "mask" (nearest: ids stay ids) or "scribble" (box filter, then any coverage of
            a stroke stays a stroke, so thin lines survive the downscale).
    """
    resample = {"photo": Image.Resampling.LANCZOS, "mask": Image.Resampling.NEAREST,
                "scribble": Image.Resampling.BOX}[kind]
    cropped = image.crop(box)
    out = cropped.resize((size, size), resample)
    if kind == "scribble":
        out = Image.fromarray(((np.asarray(out.convert("L")) > 0) * 255).astype(np.uint8))
    return out


def label_from_crop_landmarks(points: np.ndarray, size: int = EG3D_CROP_SIZE,
                              fov_degrees: float = DEFAULT_FOV_DEGREES, radius: float = DEFAULT_RADIUS) -> torch.Tensor:
    """EG3D's label [25] of the camera that sees the mean face with these landmarks in an EG3D crop.

    Args:
        points: dlib's 68 points [68, 2] in the crop's pixels.
        size: the crop's side.
        fov_degrees: EG3D's diagonal field of view (its intrinsics).
        radius: the camera's distance from the origin (EG3D: 2.7).
    """
    import cv2

    points = np.asarray(points, dtype=np.float64)
    if points.shape != (68, 2):
        raise InvalidImageError(f"expected dlib's 68 landmarks [68, 2], got {points.shape}")
    intrinsics = fov_to_intrinsics(fov_degrees).double().numpy()
    # Normalised intrinsics address pixel edges; landmarks are at pixel centres, hence the half pixel.
    camera = np.array([[intrinsics[0, 0] * size, 0, intrinsics[0, 2] * size - 0.5],
                       [0, intrinsics[1, 1] * size, intrinsics[1, 2] * size - 0.5], [0, 0, 1]])
    model = MEAN_FACE_68[POSE_POINTS]
    frontal = np.array([np.pi, 0.0, 0.0])  # the frontal camera: x right, y down, looking along -z
    found, rotation, translation = cv2.solvePnP(model, points[POSE_POINTS], camera, None, rvec=frontal.copy(),
                                                tvec=np.array([0.0, 0.0, radius]), useExtrinsicGuess=True,
                                                flags=cv2.SOLVEPNP_ITERATIVE)
    if not found:
        raise InvalidImageError("the head pose could not be estimated from these landmarks")
    world_to_camera, _ = cv2.Rodrigues(rotation)
    cam2world = np.eye(4)
    cam2world[:3, :3] = world_to_camera.T
    position = -world_to_camera.T @ translation.reshape(3)
    cam2world[:3, 3] = position / np.linalg.norm(position) * radius
    return torch.tensor(np.concatenate([cam2world.reshape(-1), intrinsics.reshape(-1)]), dtype=torch.float32)


def process_photo(photo: Image.Image, size: int = EG3D_CROP_SIZE):
    """(crop box, crop's landmarks [68, 2], label [25]) of a photo's largest face.

    Raises:
        NoFaceError: dlib finds no face.
    """
    from ..editing.align import NoFaceError, detect_faces, predict_landmarks

    boxes = detect_faces(photo)
    if not boxes:
        raise NoFaceError("no face was found in the photo")
    points = predict_landmarks(photo, max(boxes, key=lambda b: b[2] * b[3]))
    box = crop_box(points, photo.size[1])
    in_crop = crop_landmarks(points, box, size)
    return box, in_crop, label_from_crop_landmarks(in_crop, size)


def _to_photo_size(image: Image.Image, photo: Image.Image, resample) -> Image.Image:
    return image if image.size == photo.size else image.resize(photo.size, resample)


def _prepare_one(job: tuple) -> tuple[int, torch.Tensor | None]:
    """One photo: crops of photo, mask and scribble written; (index, label), label None when dlib finds no face."""
    from ..editing.align import NoFaceError
    from .data import combine_part_masks, image_file

    index, image_dir, anno_dir, mask_dir, output, size = job
    output = Path(output)
    with Image.open(image_file(Path(image_dir), index)) as file:
        photo = file.convert("RGB")
    try:
        box, _, label = process_photo(photo, size)
    except NoFaceError:
        return index, None
    if mask_dir is not None:
        ids = parse_mask(Path(mask_dir) / f"{index}.png", require_face=False)
    else:
        ids = combine_part_masks(anno_dir, index)
    mask = _to_photo_size(Image.fromarray(ids), photo, Image.Resampling.NEAREST)
    crop_image(photo, box, size).save(output / "images" / f"{index}.png")
    crop_image(mask, box, size, "mask").save(output / "masks" / f"{index}.png")
    edges = Image.fromarray(np.where(scribble_from_photo(photo, size=photo.size[0]), 255, 0).astype(np.uint8))
    crop_image(edges, box, size, "scribble").save(output / "scribbles" / f"{index}.png")
    return index, label


def prepare_eg3d(root: str | Path, output: str | Path, text_dir: str | Path | None = None,
                 mask_dir: str | Path | None = None, size: int = EG3D_CROP_SIZE, test_fraction: float = 0.1,
                 test_ids: list[int] | None = None, seed: int = 0, limit: int | None = None,
                 image_dir: str | Path | None = None, workers: int = 0) -> Path:
    """Convert CelebAMask-HQ into EG3D's framing: ``images/``, ``masks/``, ``scribbles/`` (all ``size``²,
    one transform per photo), ``cameras.json`` (EG3D's ``dataset.json`` layout), the splits and ``dataset.json``.

    Args:
        root: the CelebAMask-HQ folder (``CelebA-HQ-img``, ``CelebAMask-HQ-mask-anno``).
        output: the prepared folder.
        text_dir: Multi-Modal CelebA-HQ ``text/`` (default ``root/text``).
        mask_dir: combined masks ``{i}.png`` instead of the per-part files.
        size: side of the crops (EG3D: 512).
        test_fraction, test_ids, seed: the split, as in :func:`~.data.prepare`.
        limit: only the first ``limit`` photos.
        image_dir: photos ``{i}.jpg`` (default ``root/CelebA-HQ-img``).
        workers: processes (0 = in this process).

    Photos in which dlib finds no face are left out (listed in ``dataset.json`` under ``skipped``).
    """
    from .data import EDGE_DETECTOR, PREPARED_FORMAT, celebamask_folders, image_ids, write_splits

    root, output = Path(root), Path(output)
    image_dir, anno_dir, text_dir = celebamask_folders(root, image_dir, text_dir, mask_dir)
    for sub in ("images", "masks", "scribbles"):
        (output / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(index, str(image_dir), str(anno_dir), None if mask_dir is None else str(mask_dir), str(output), size)
            for index in image_ids(image_dir)[:limit]]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_prepare_one, jobs, chunksize=16))
    else:
        results = [_prepare_one(job) for job in jobs]
    labels = {f"{index}.png": label for index, label in results if label is not None}
    kept = [index for index, label in results if label is not None]
    skipped = [index for index, label in results if label is None]
    if not kept:
        raise InvalidImageError(f"dlib found no face in any photo of {image_dir}")
    write_dataset_json(labels, output / CAMERAS_FILE)
    train, test = write_splits(output, kept, test_ids, test_fraction, seed)
    info = {"_format": PREPARED_FORMAT, "generator": "eg3d", "image_dir": str((output / "images").resolve()),
            "text_dir": str(text_dir.resolve()), "num_images": len(kept), "mask_size": size, "scribble_size": size,
            "edge_detector": EDGE_DETECTOR + " (on the full photo, then cropped)", "split_seed": seed,
            "test_fraction": test_fraction if test_ids is None else None, "camera_labels": CAMERAS_FILE,
            "crop": "EG3D (Deep3DFaceRecon align_img, rescale 300, centre 700 -> 512)", "skipped": skipped}
    (output / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return output


def prepared_camera_labels(root: str | Path | None) -> Path | None:
    """The ``cameras.json`` a ``prepare --generator eg3d`` folder names in its ``dataset.json`` (else None)."""
    info_file = Path(root) / "dataset.json" if root else None
    if info_file is None or not info_file.is_file():
        return None
    name = json.loads(info_file.read_text()).get("camera_labels")
    return Path(root) / name if name else None
