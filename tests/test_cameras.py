"""Camera labels for EG3D training: EG3D's dataset.json, and the coarse head pose from 68 landmarks."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mm2latent.errors import InvalidImageError
from mm2latent.models.camera import camera_label, fov_to_intrinsics
from mm2latent.training.cameras import (
    MEAN_FACE_INDICES,
    MEAN_FACE_POINTS,
    head_pose_from_landmarks,
    label_from_landmarks,
    read_dataset_json,
    write_dataset_json,
)

SIZE = 512


def project_mean_face(yaw_deg: float, elevation_deg: float, distance: float = 2500.0) -> np.ndarray:
    """68 landmarks whose six PnP points are the mean face seen by a pinhole camera at (yaw, elevation).

    The camera sits on a sphere around the nose tip (x right, y up, z toward the frontal viewer), looks at it,
    and has EG3D's focal length; the other 62 points are left at the image centre (PnP reads only the six).
    """
    yaw, elevation = math.radians(yaw_deg), math.radians(elevation_deg)
    centre = distance * np.array([math.sin(yaw) * math.cos(elevation), math.sin(elevation),
                                  math.cos(yaw) * math.cos(elevation)])
    forward = -centre / np.linalg.norm(centre)  # OpenCV camera: z forward, x right, y down
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    focal = float(fov_to_intrinsics()[0, 0]) * SIZE
    in_camera = (MEAN_FACE_POINTS - centre) @ rotation.T
    pixels = focal * in_camera[:, :2] / in_camera[:, 2:] + SIZE / 2
    points = np.full((68, 2), SIZE / 2)
    points[list(MEAN_FACE_INDICES)] = pixels
    return points


@pytest.mark.parametrize(("yaw", "elevation"), [(0.0, 0.0), (25.0, 0.0), (-20.0, 10.0), (10.0, -15.0)])
def test_pnp_recovers_the_camera_that_saw_the_mean_face(yaw, elevation):
    found_yaw, found_pitch = head_pose_from_landmarks(project_mean_face(yaw, elevation), SIZE)
    assert found_yaw == pytest.approx(yaw, abs=0.5)
    # EG3D's pitch is its vertical angle: height y = sin(elevation) = -2·pitch/pi.
    assert found_pitch == pytest.approx(-math.degrees(math.pi / 2 * math.sin(math.radians(elevation))), abs=0.5)


def test_label_is_eg3ds_label_of_those_angles():
    points = project_mean_face(15.0, 5.0)
    yaw, pitch = head_pose_from_landmarks(points, SIZE)
    torch.testing.assert_close(label_from_landmarks(points, SIZE), camera_label(yaw, pitch))


def test_a_real_photo_and_its_mirror(testdata):
    """A near-frontal FFHQ face gets a near-frontal camera; its mirror image the opposite yaw."""
    pytest.importorskip("dlib")
    from mm2latent.editing.align import detect_faces, predict_landmarks

    photo = Image.open(testdata / "photos" / "ffhq_0.jpg").convert("RGB")
    angles = []
    for image in (photo, ImageOps.mirror(photo)):
        box = max(detect_faces(image), key=lambda b: b[2] * b[3])
        angles.append(head_pose_from_landmarks(predict_landmarks(image, box), image.size))
    (yaw, pitch), (mirror_yaw, mirror_pitch) = angles
    assert abs(yaw) < 30 and abs(pitch) < 30
    assert mirror_yaw == pytest.approx(-yaw, abs=3.0) and mirror_pitch == pytest.approx(pitch, abs=3.0)


def test_dataset_json_round_trip_and_errors(tmp_path):
    labels = {"00000.png": camera_label(0.0, 0.0), "00001.png": camera_label(20.0, -5.0)}
    path = write_dataset_json(labels, tmp_path / "dataset.json")
    assert json.loads(path.read_text())["labels"][1][0] == "00001.png"
    read = read_dataset_json(path)
    assert read.keys() == labels.keys()
    for name in labels:
        torch.testing.assert_close(read[name], labels[name])
    (tmp_path / "bad.json").write_text(json.dumps({"labels": [["a.png", [0.0] * 24]]}))
    with pytest.raises(InvalidImageError, match="24 numbers"):
        read_dataset_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(InvalidImageError, match="not an EG3D dataset.json"):
        read_dataset_json(tmp_path / "other.json")
