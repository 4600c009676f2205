"""The one pSp objective (mm2latent.losses) against by-hand computations of pSp's resizing.

pSp (``models/psp.py``) pools G's 1024² output with ``face_pool = AdaptiveAvgPool2d((256, 256))`` before
``calc_loss`` (``training/coach.py``), so L2, LPIPS and the identity term all see 256² faces: the mean of each
4×4 block at 1024², of each 2×2 block at 512². The by-hand versions below write those block means out with
``reshape(...).mean(...)``.
"""

import pytest
import torch
import torch.nn.functional as F

from mm2latent.editing.methods import identity_similarity as edit_identity_similarity
from mm2latent.losses import LatentLoss, comparison_size, resize_faces
from mm2latent.models.networks import load_network

L2_ONLY = {"l2": 1.0, "lpips": 0.0, "id": 0.0, "w_reg": 0.0}


def faces(size: int, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def block_mean(images: torch.Tensor, size: int) -> torch.Tensor:
    """pSp's face_pool for a whole factor, written out: the mean of each k×k block."""
    batch, channels, side, _ = images.shape
    k = side // size
    return images.reshape(batch, channels, size, k, size, k).mean(dim=(3, 5))


@pytest.mark.parametrize("size", [1024, 512])
def test_l2_is_computed_on_faces_pooled_to_256_like_psp(size):
    images, targets = faces(size, 0), faces(size, 1)
    _, logs = LatentLoss(L2_ONLY)(images, targets)
    by_hand = float((block_mean(images, 256) - block_mean(targets, 256)).pow(2).mean())
    assert logs["loss/l2"] == pytest.approx(by_hand, rel=1e-5)
    # Not the full-resolution MSE: averaging k×k blocks of independent noise divides its variance by k².
    full = float(F.mse_loss(images, targets))
    assert logs["loss/l2"] < 0.5 * full


def test_generator_and_target_of_different_sizes_meet_at_256():
    """A 1024² G(w) against a 512² diffusion drawing (the training-free mode at full size): both pooled to 256²."""
    generated, drawing = faces(1024, 2), faces(512, 3)
    _, logs = LatentLoss(L2_ONLY)(generated, drawing)
    by_hand = float((block_mean(generated, 256) - block_mean(drawing, 256)).pow(2).mean())
    assert logs["loss/l2"] == pytest.approx(by_hand, rel=1e-5)


def test_small_faces_are_compared_at_their_own_size_never_upsampled():
    images, targets = faces(64, 4), faces(128, 5)
    assert comparison_size(images, targets) == 64
    _, logs = LatentLoss(L2_ONLY)(images, targets)
    assert logs["loss/l2"] == pytest.approx(float((images - block_mean(targets, 64)).pow(2).mean()), rel=1e-5)
    same, _ = LatentLoss(L2_ONLY)(images, images)
    assert float(same) == 0.0  # the same pixels, no resampling: exactly zero


def test_lpips_and_identity_see_psp_pooled_crops_at_512():
    lpips, arcface = load_network("lpips", "tiny"), load_network("arcface", "tiny")
    images, targets = faces(512, 6), faces(512, 7)
    weights = {"l2": 1.0, "lpips": 0.8, "id": 0.1, "w_reg": 0.0}
    _, logs = LatentLoss(weights, lpips, arcface)(images, targets, targets)
    small_images, small_targets = block_mean(images, 256), block_mean(targets, 256)
    with torch.no_grad():
        assert logs["loss/lpips"] == pytest.approx(float(lpips(small_images, small_targets).mean()), rel=1e-5)

        def embedding(x):  # pSp's IDLoss.extract_feats on a 256² face
            return arcface(F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112))

        cosine = (embedding(small_images) * embedding(small_targets)).sum(dim=1)
    assert logs["loss/id"] == pytest.approx(float((1 - cosine).mean()), rel=1e-5, abs=1e-6)
    # The editing score of a pair is the same identity path.
    assert edit_identity_similarity(arcface, images[:1], targets[:1]) == pytest.approx(float(cosine[0]), abs=1e-5)


def test_w_reg_and_mask_terms_and_weights():
    parser = load_network("face_parser", "tiny")
    images = faces(64, 8)
    w, latent_avg = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(9)), torch.zeros(64)
    mask_ids = torch.randint(0, 19, (2, 32, 32), generator=torch.Generator().manual_seed(10))
    weights = {"l2": 1.0, "lpips": 0.0, "id": 0.0, "w_reg": 0.5, "mask": 2.0}
    total, logs = LatentLoss(weights, face_parser=parser)(images, images, w=w, latent_avg=latent_avg,
                                                        mask_ids=mask_ids)
    with torch.no_grad():
        cross_entropy = F.cross_entropy(parser.celebamask_logits(images, size=32), mask_ids)
    w_reg = w.flatten(1).norm(dim=1).mean()  # pSp's WNormLoss
    assert logs["loss/w_reg"] == pytest.approx(float(w_reg), rel=1e-6)
    assert logs["loss/mask"] == pytest.approx(float(cross_entropy), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(w_reg) + 2.0 * float(cross_entropy), rel=1e-5)
    with pytest.raises(ValueError, match="lpips loss has weight"):
        LatentLoss({"l2": 1.0, "lpips": 0.8, "id": 0.0, "w_reg": 0.0})


def test_resize_faces_pools_down_and_interpolates_up():
    images = faces(64, 11)
    assert resize_faces(images, 64) is images
    torch.testing.assert_close(resize_faces(images, 16), block_mean(images, 16))
    up = resize_faces(images, 128)
    torch.testing.assert_close(up, F.interpolate(images, size=(128, 128), mode="bilinear", align_corners=False))
