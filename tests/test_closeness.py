"""Closeness of a training-free face to its drawing, the faithfulness budgets, and the alignment of I^d_0."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent.editing.align import align_face
from mm2latent.editing.closeness import FAITHFULNESS, measure_closeness, refine_budget
from mm2latent.editing.drawing_alignment import align_drawing, warp_to_crop
from mm2latent.errors import InvalidSettingError
from mm2latent.models.networks import build_tiny_network
from mm2latent.training.metrics import confusion_matrix, mask_scores


@pytest.fixture(scope="module")
def lpips():
    return build_tiny_network("lpips").eval()


@pytest.fixture(scope="module")
def parser():
    return build_tiny_network("face_parser").eval()


def test_l2_is_the_mean_squared_difference_and_lpips_orders_distances(lpips):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 512, 512, generator=generator) - 0.5
    shifted = images + torch.tensor([0.2, 0.4]).view(2, 1, 1, 1)  # a constant survives the pooling to 256²
    near = measure_closeness(images, shifted, lpips)
    assert [c.l2 for c in near] == pytest.approx([0.04, 0.16], rel=1e-5)
    same = measure_closeness(images, images.clone(), lpips)
    assert [c.l2 for c in same] == [0.0, 0.0] and [c.lpips for c in same] == [0.0, 0.0]
    noisy = images + 0.5 * torch.randn(images.shape, generator=generator)
    far = measure_closeness(images, noisy, lpips)
    assert far[0].lpips > near[0].lpips > 0
    assert measure_closeness(images, shifted)[0].lpips is None  # no LPIPS network: no figure


def test_miou_is_one_for_the_faces_own_parse_and_lower_for_another_mask(parser, mask_path, other_mask_path):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    own = parser.parse(images, size=64)[0]
    assert measure_closeness(images, images, face_parser=parser, mask_ids=own)[0].miou == 1.0
    other = torch.from_numpy(np.array(Image.open(other_mask_path).resize((64, 64), Image.NEAREST))).long()
    closeness = measure_closeness(images, images, face_parser=parser, mask_ids=other)[0]
    assert closeness.miou == pytest.approx(mask_scores(confusion_matrix(own, other))["miou"])
    assert closeness.miou < 1.0
    assert measure_closeness(images, images, face_parser=parser)[0].miou is None  # no mask: no mIoU


def test_faithfulness_names_budgets_from_fastest_to_most_faithful():
    steps = [budget.steps for budget in FAITHFULNESS.values()]
    assert steps[0] == 0 and steps == sorted(steps) and len(set(steps)) == len(steps)
    with pytest.raises(InvalidSettingError, match="faithfulness must be one of"):
        refine_budget("perfect")


# ---------------------------------------------------------------------------------------------- alignment


def off_template(image: Image.Image, fill, scale: float = 0.7, offset=(120, 40)) -> Image.Image:
    """The image shrunk and moved on a canvas of its size: a drawing whose face left the FFHQ template."""
    small = image.resize((round(image.width * scale),) * 2, Image.NEAREST if image.mode == "L" else Image.LANCZOS)
    canvas = Image.new(image.mode, image.size, fill)
    canvas.paste(small, offset)
    return canvas


@pytest.fixture(scope="module")
def on_template(testdata):
    """A face on the FFHQ template (align_face keeps it as is) and its CelebAMask-HQ mask, at 512²."""
    photo = Image.open(testdata / "photos" / "celebamaskhq_1.jpg").convert("RGB").resize((512, 512), Image.LANCZOS)
    mask = Image.open(testdata / "masks" / "celebamaskhq_1_index.png")
    return photo, mask


def test_a_drawing_on_the_template_is_inverted_as_drawn(on_template):
    photo, mask = on_template
    ids = np.asarray(mask)
    result = align_drawing(photo, ids)
    assert not result.moved and result.image is photo and result.mask_ids is ids and result.messages == []


def test_an_off_template_drawing_is_brought_back_and_its_mask_moves_alike(on_template):
    photo, mask = on_template
    moved_photo, moved_mask = off_template(photo, (128, 128, 128)), off_template(mask, 0)
    result = align_drawing(moved_photo, np.asarray(moved_mask))
    assert result.moved and result.image.size == photo.size and "off the FFHQ template" in result.messages[0]
    # The aligned crop puts the landmarks where the template has them (the original was on the template).
    landmarks = align_face(result.image, size=512, keep_aligned=False).landmarks.as_array()
    expected = align_face(photo, size=512, keep_aligned=False).landmarks.as_array()
    assert np.abs(landmarks - expected).max() < 0.02 * 512
    # The mask, warped by the same transform, lies on the original mask again (to the precision of the landmarks:
    # the original is "on the template" within align.ALIGNED_TOLERANCE, 2 % of the side).
    original = torch.from_numpy(np.asarray(mask).astype(np.int64))
    warped = torch.from_numpy(result.mask_ids.astype(np.int64))
    assert result.mask_ids.shape == np.asarray(mask).shape
    assert mask_scores(confusion_matrix(warped, original))["pixel_accuracy"] > 0.9
    unwarped = torch.from_numpy(np.asarray(moved_mask).astype(np.int64))
    assert mask_scores(confusion_matrix(unwarped, original))["pixel_accuracy"] < 0.6  # what the parser loss had


def test_the_mask_goes_through_the_transform_the_image_goes_through(on_template):
    photo, _ = on_template
    moved = off_template(photo, (128, 128, 128))
    # Brightness bands of the drawing as "classes": warped like a mask, they must match the aligned crop's bands.
    bands = (np.asarray(moved.convert("L")) // 64).astype(np.uint8)
    result = align_drawing(moved, bands)
    aligned_bands = np.asarray(result.image.convert("L")) // 64
    assert (aligned_bands == result.mask_ids).mean() > 0.95  # band edges differ by resampling only
    assert (aligned_bands == bands).mean() < 0.5


def test_warping_follows_the_quad_at_any_mask_resolution():
    ids = np.zeros((64, 64), np.uint8)
    ids[16:32, 32:48] = 5
    # The quad of the image's right half (pixel edges at quad + 0.5), given in 128 px image coordinates.
    quad = np.array([[64, 0], [64, 128], [192, 128], [192, 0]], np.float64) - 0.5
    warped = warp_to_crop(ids, quad, source_size=128, size=64)
    expected = np.zeros((64, 64), np.uint8)
    expected[16:32, 0:16] = 5  # columns 32-48 of 64 -> 0-16 of the right half; outside the image: background
    np.testing.assert_array_equal(warped, expected)


def test_a_drawing_without_a_face_is_inverted_as_drawn():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    result = align_drawing(noise, None)
    assert not result.moved and result.image is noise and "no face" in result.messages[0]
