"""Face alignment on real photos (../shared/testdata/photos), offline, CPU."""

import warnings

import numpy as np
import pytest
from PIL import Image

from mm2latent.editing.align import FaceTooSmallError, NoFaceError, align_face, template_landmarks
from mm2latent.errors import ImageTooLargeError, InvalidImageError

BACKDROP = (90, 120, 150)


@pytest.fixture(scope="module")
def photos(testdata):
    return testdata / "photos"


def _perturbed(photo: Image.Image) -> Image.Image:
    """The photo rotated by 10°, shifted and padded onto a larger, non-square canvas."""
    canvas = Image.new("RGB", (1500, 1300), BACKDROP)
    canvas.paste(photo.rotate(10, resample=Image.Resampling.BICUBIC, fillcolor=BACKDROP), (300, 150))
    return canvas


def _central_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference (0..255) of the central 75% of two faces compared at 256²."""
    x, y = (np.float32(im.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)) for im in (a, b))
    return float(np.abs(x - y)[32:224, 32:224].mean())


def _eye_error(image: Image.Image) -> float:
    """Largest distance (fraction of the size) of the eyes found in an aligned crop from the template eyes."""
    found = align_face(image).landmarks.as_array()[:2]
    template = template_landmarks(image.width).as_array()[:2]
    return float(np.hypot(*(found - template).T).max() / image.width)


def test_already_aligned_ffhq_photo_is_kept(photos):
    original = Image.open(photos / "ffhq_0.jpg").convert("RGB")
    result = align_face(photos / "ffhq_0.jpg")
    assert result.already_aligned and result.eyes_detected and result.faces_found == 1
    assert result.image.size == (1024, 1024)
    assert np.array_equal(np.asarray(result.image), np.asarray(original))


def test_forced_transform_of_an_aligned_photo_is_close(photos):
    original = Image.open(photos / "ffhq_4.jpg").convert("RGB")
    result = align_face(original, size=256, keep_aligned=False)
    assert result.image.size == (256, 256) and not result.already_aligned
    assert _central_difference(result.image, original) < 12  # measured 6.5 (another face: > 50)


@pytest.mark.parametrize("name", ["ffhq_0.jpg", "ffhq_4.jpg"])
def test_shifted_rotated_padded_photo_comes_back(photos, name):
    original = Image.open(photos / name).convert("RGB")
    other = Image.open(photos / "ffhq_3.jpg").convert("RGB")
    result = align_face(_perturbed(original))
    assert result.image.size == (1024, 1024) and not result.already_aligned and result.eyes_detected
    difference = _central_difference(result.image, original)
    assert difference < 20, difference  # measured 11.4 (ffhq_0) and 7.1 (ffhq_4)
    assert _central_difference(other, original) > 3 * difference  # another face: 54 and 65
    assert _eye_error(result.image) < 0.03  # the face is centred: eyes within 3% of the template


def test_configured_size_and_centred_face(photos):
    result = align_face(photos / "celebamaskhq_1.jpg", size=512, keep_aligned=False)
    assert result.image.size == (512, 512)
    assert _eye_error(result.image) < 0.03


def test_exif_orientation_is_honoured(photos, tmp_path):
    original = Image.open(photos / "ffhq_0.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "sideways.jpg"
    original.rotate(90, expand=True).save(path, exif=exif, quality=95)
    result = align_face(path)
    assert result.eyes_detected
    assert _central_difference(result.image, original) < 12


def test_grayscale_photo_becomes_rgb(photos):
    result = align_face(Image.open(photos / "ffhq_2.jpg").convert("L"), size=256)
    assert result.image.mode == "RGB" and result.image.size == (256, 256)


def test_several_faces_use_the_largest(photos):
    big = Image.open(photos / "ffhq_0.jpg").convert("RGB").resize((600, 600))
    small = Image.open(photos / "ffhq_4.jpg").convert("RGB").resize((300, 300))
    group = Image.new("RGB", (1000, 700), BACKDROP)
    group.paste(big, (0, 50))
    group.paste(small, (680, 200))
    with pytest.warns(UserWarning, match="largest"):
        result = align_face(group, size=256)
    assert result.faces_found >= 2 and any("largest" in m for m in result.messages)
    x, _, w, _ = result.face_box
    assert x + w <= 620  # the face of the big photo


@pytest.mark.parametrize("kind", ["flat", "landscape"])
def test_no_face_raises(kind):
    rng = np.random.default_rng(0)
    if kind == "flat":
        image = Image.new("RGB", (640, 480), (120, 180, 90))
    else:
        sky = np.linspace(235, 120, 300)[:, None, None] * np.array([0.6, 0.8, 1.0])
        ground = np.linspace(90, 40, 180)[:, None, None] * np.array([0.5, 1.0, 0.4])
        array = np.concatenate([np.broadcast_to(sky, (300, 640, 3)), np.broadcast_to(ground, (180, 640, 3))])
        image = Image.fromarray(np.uint8(np.clip(array + rng.normal(0, 6, array.shape), 0, 255)))
    with pytest.raises(NoFaceError, match="no face"):
        align_face(image)
    assert issubclass(NoFaceError, InvalidImageError)


def test_tiny_image_and_small_face_raise(photos):
    with pytest.raises(FaceTooSmallError, match="1x1"):
        align_face(Image.new("RGB", (1, 1)))
    canvas = Image.new("RGB", (400, 400), BACKDROP)
    canvas.paste(Image.open(photos / "ffhq_0.jpg").convert("RGB").resize((70, 70)), (165, 165))
    with pytest.raises(FaceTooSmallError, match="52 pixels"):  # the detector's box of the 70 px photo
        align_face(canvas)


def test_huge_image_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageTooLargeError):
            align_face(np.zeros((7000, 7000), dtype=np.uint8))
