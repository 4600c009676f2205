"""`prepare --generator eg3d`: EG3D's crop, masks and scribbles warped alike, and PnP cameras (training/prepare_3d.py)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent.models.camera import camera_label, split_camera_label
from mm2latent.training.cameras import read_dataset_json
from mm2latent.training.face_model import MEAN_FACE_68, MIRROR_68
from mm2latent.training.prepare_3d import (
    EG3D_CROP_SIZE,
    crop_box,
    crop_image,
    crop_landmarks,
    label_from_crop_landmarks,
    prepare_eg3d,
)

SIZE = EG3D_CROP_SIZE
FACE_CLASSES = list(range(1, 13))  # skin .. lower lip: what a face detector's box covers


def project(label: torch.Tensor, points: np.ndarray = MEAN_FACE_68, size: int = SIZE) -> np.ndarray:
    """Pixel positions (centres at integers) of 3D world points seen by the camera of an EG3D label."""
    cam2world, intrinsics = (m[0].double().numpy() for m in split_camera_label(label[None]))
    world2cam = np.linalg.inv(cam2world)
    in_camera = points @ world2cam[:3, :3].T + world2cam[:3, 3]
    uv = in_camera[:, :2] / in_camera[:, 2:]
    return (uv * intrinsics[[0, 1], [0, 1]] + intrinsics[:2, 2]) * size - 0.5


def rotation_error_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a[:16].reshape(4, 4)[:3, :3].double(), b[:16].reshape(4, 4)[:3, :3].double()
    return math.degrees(math.acos(float(((torch.trace(ra.T @ rb) - 1) / 2).clamp(-1, 1))))


def test_mean_face_is_symmetric_and_faces_the_frontal_camera():
    # Symmetric about its own mid-plane (x = -0.00012: Deep3DFaceRecon's five points are not quite symmetric).
    mid = MEAN_FACE_68[:, 0].mean()
    mirrored = (MEAN_FACE_68[MIRROR_68] - [mid, 0, 0]) * [-1, 1, 1] + [mid, 0, 0]
    np.testing.assert_allclose(mirrored, MEAN_FACE_68, atol=2e-5)  # rounding of the 5-decimal constants
    assert MEAN_FACE_68[30, 2] == MEAN_FACE_68[:, 2].max()  # the nose tip is the nearest point to the viewer
    assert MEAN_FACE_68[8, 1] == MEAN_FACE_68[:, 1].min()  # the chin is the lowest


@pytest.mark.parametrize(("yaw", "pitch"), [(0.0, 0.0), (30.0, 0.0), (-25.0, 10.0), (10.0, -20.0), (40.0, 15.0)])
def test_pnp_recovers_a_known_camera(yaw, pitch):
    """Noise-free: the mean face projected through a camera looking at the origin comes back to 0.05° (PnP
    solves the exact model; the tolerance covers float32 labels). With 1 px landmark noise: within 3°."""
    truth = camera_label(yaw, pitch, pivot=(0.0, 0.0, 0.0))
    points = project(truth)
    found = label_from_crop_landmarks(points)
    assert rotation_error_degrees(found, truth) < 0.05
    torch.testing.assert_close(found[:16], truth[:16], atol=1e-4, rtol=0)  # the position too (radius 2.7)
    torch.testing.assert_close(found[16:], truth[16:])  # EG3D's intrinsics
    noisy = points + np.random.default_rng(0).normal(0.0, 1.0, points.shape)
    assert rotation_error_degrees(label_from_crop_landmarks(noisy), truth) < 3.0


def test_crop_maps_photo_points_to_crop_points():
    """A photo with one bright pixel per landmark, cropped: each pixel lands where crop_landmarks says."""
    truth = camera_label(15.0, 5.0, pivot=(0.0, 0.0, 0.0))
    in_crop = project(truth)
    scale, offset = 1.7, np.array([90.0, 40.0])  # the "photo" is the crop magnified and shifted
    photo_points = (in_crop + 0.5) * scale - 0.5 + offset
    box = crop_box(photo_points, 1024)
    np.testing.assert_allclose(crop_landmarks(crop_landmarks(photo_points, box), (0, 0, SIZE, SIZE)),
                               crop_landmarks(photo_points, box))
    picked = [30, 36, 45, 48, 54]
    for index in picked:
        x, y = np.round(photo_points[index]).astype(int)
        canvas = np.zeros((1024, 1024), np.uint8)
        canvas[y - 3:y + 4, x - 3:x + 4] = 255  # a 7 px square: survives the downscale
        crop = np.asarray(crop_image(Image.fromarray(canvas), box, kind="mask"))
        ys, xs = np.nonzero(crop)
        expected = crop_landmarks(np.array([[x, y]], np.float64), box)[0]
        assert abs(xs.mean() - expected[0]) < 1.0 and abs(ys.mean() - expected[1]) < 1.0
    # The crop of the magnified face sees the camera it was made with (the crop centres the origin's projection).
    assert rotation_error_degrees(label_from_crop_landmarks(crop_landmarks(photo_points, box)), truth) < 2.0


def test_mask_and_scribble_crops_keep_their_kind():
    mask = Image.fromarray(np.random.default_rng(0).integers(0, 19, (256, 256)).astype(np.uint8))
    box = (-20, 10, 236, 266)
    cropped = np.asarray(crop_image(mask, box, 128, "mask"))
    assert set(np.unique(cropped)) <= set(range(19))
    assert (cropped[:, :10] == 0).all()  # outside the photo: background
    lines = np.zeros((256, 256), np.uint8)
    lines[:, 100] = 255  # a 1 px stroke, halved in size: still a stroke
    scribble = np.asarray(crop_image(Image.fromarray(lines), (0, 0, 256, 256), 128, "scribble"))
    assert set(np.unique(scribble)) == {0, 255} and scribble[:, 50].all()


@pytest.fixture(scope="module")
def prepared(testdata, tmp_path_factory):
    """The two CelebAMask-HQ photos of the test data (with their masks) prepared for EG3D."""
    tmp = tmp_path_factory.mktemp("eg3d")
    root, masks = tmp / "raw", tmp / "masks"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    masks.mkdir()
    for i in (0, 1):
        shutil.copy(testdata / "photos" / f"celebamaskhq_{i}.jpg", root / "CelebA-HQ-img" / f"{i}.jpg")
        shutil.copy(testdata / "masks" / f"celebamaskhq_{i}_index.png", masks / f"{i}.png")
    return prepare_eg3d(root, tmp / "prepared", mask_dir=masks, test_fraction=0, workers=2), root  # the pool path


def test_real_photos_get_plausible_cameras(prepared):
    folder, _ = prepared
    labels = read_dataset_json(folder / "cameras.json")
    assert sorted(labels) == ["0.png", "1.png"]
    for label in labels.values():
        position = label[:16].reshape(4, 4)[:3, 3]
        assert float(position.norm()) == pytest.approx(2.7, abs=1e-4)
        yaw = math.degrees(math.atan2(float(position[0]), float(position[2])))
        elevation = math.degrees(math.asin(float(position[1]) / 2.7))
        assert abs(yaw) < 30 and abs(elevation) < 25  # CelebA-HQ portraits: near-frontal
    info = json.loads((folder / "dataset.json").read_text())
    assert info["generator"] == "eg3d" and info["camera_labels"] == "cameras.json"


def test_real_crops_are_aligned_with_their_masks(prepared):
    """Parser-free: the warped mask's face classes cover the face dlib finds in the warped photo, far better than
    the unwarped mask (CelebA-HQ framing) does."""
    from mm2latent.editing.align import detect_faces

    folder, root = prepared
    for i in (0, 1):
        with Image.open(folder / "images" / f"{i}.png") as image:
            assert image.size == (SIZE, SIZE)
            boxes = detect_faces(image.convert("RGB"))
        x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
        inner = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))  # the box's centre
        warped = np.isin(np.asarray(Image.open(folder / "masks" / f"{i}.png")), FACE_CLASSES)
        with Image.open(root.parent / "masks" / f"{i}.png") as raw:
            unwarped = np.isin(np.asarray(raw.resize((SIZE, SIZE), Image.Resampling.NEAREST)), FACE_CLASSES)
        assert warped[inner].mean() > 0.95
        ys, xs = np.nonzero(warped)
        face = (xs.min(), ys.min(), xs.max(), ys.max())
        overlap = max(0, min(face[2], x + w) - max(face[0], x)) * max(0, min(face[3], y + h) - max(face[1], y))
        union = (face[2] - face[0]) * (face[3] - face[1]) + w * h - overlap
        assert overlap / union > 0.5
        assert (warped ^ unwarped).mean() > 0.02  # the warp moved the mask: it was not a no-op
        scribble = np.asarray(Image.open(folder / "scribbles" / f"{i}.png"))
        assert scribble.shape == (SIZE, SIZE) and set(np.unique(scribble)) == {0, 255}


@pytest.mark.parametrize("photo", ["ffhq_3.jpg", "ffhq_7.jpg"])
def test_arcface_eg3d_box_frames_the_face_as_psp_frames_ffhq(testdata, photo):
    """The eyes, nose tip and mouth corners sit at the same places of ArcFace's box whether a face is FFHQ-aligned
    (pSp's box) or in EG3D's crop (FACE_CROPS["eg3d"]); pSp's box on the EG3D crop would be off."""
    from mm2latent.editing.align import detect_faces, predict_landmarks
    from mm2latent.models.networks.arcface import FACE_CROPS
    from mm2latent.training.face_model import five_points

    with Image.open(testdata / "photos" / photo) as image:
        image = image.convert("RGB")
        points = predict_landmarks(image, max(detect_faces(image), key=lambda b: b[2] * b[3]))
    in_crop = crop_landmarks(points, crop_box(points, image.size[1]))

    def in_box(pts, side, framing):
        top, bottom, left, right = FACE_CROPS[framing]
        unit = (five_points(pts) + 0.5) / side * 256
        return (unit - [left, top]) / [right - left, bottom - top]

    ffhq = in_box(points, image.size[0], "ffhq")
    assert np.abs(in_box(in_crop, SIZE, "eg3d") - ffhq).max() < 0.06  # within 6 % of the box
    assert np.abs(in_box(in_crop, SIZE, "ffhq") - ffhq).max() > 0.08
