"""Metrics on constructed cases with known answers, and the evaluation loop on the tiny preset."""

import json

import pytest
import torch

from mm2latent.models.networks import load_network
from mm2latent.training import metrics as M
from mm2latent.training.evaluate import evaluate, markdown_table, tiny_fid_feature, write_report


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_identical_images(images):
    lpips = load_network("lpips", "tiny")
    assert torch.equal(M.lpips_distance(lpips, images, images), torch.zeros(4))
    assert torch.allclose(M.ms_ssim(images, images), torch.ones(4), atol=1e-5)
    assert torch.allclose(M.identity_similarity(load_network("arcface", "tiny"), images, images), torch.ones(4), atol=1e-5)


def test_different_images_score_worse(images):
    lpips = load_network("lpips", "tiny")
    blurred = torch.nn.functional.avg_pool2d(images, 5, 1, 2)
    assert (M.lpips_distance(lpips, images, blurred) > 0).all()
    assert (M.ms_ssim(images, blurred) < 0.99).all()
    assert M.ms_ssim(torch.rand(1, 3, 256, 256), torch.rand(1, 3, 256, 256)).shape == (1,)  # 5 scales


def test_mask_scores_exact():
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:, 4:] = 1  # 32 background, 32 skin
    mask[0:2, 0:2] = 2  # 4 nose pixels
    same = M.mask_scores(M.confusion_matrix(mask, mask))
    assert same == {"pixel_accuracy": 1.0, "miou": 1.0}
    wrong = mask.clone()
    wrong[0:2, 0:2] = 1  # the 4 nose pixels become skin
    scores = M.mask_scores(M.confusion_matrix(wrong, mask))
    assert scores["pixel_accuracy"] == pytest.approx(60 / 64)
    # IoU: background 28/28, skin 32/36, nose 0/4 -> mean of three classes
    assert scores["miou"] == pytest.approx((1 + 32 / 36 + 0) / 3)


def test_fid_of_a_set_against_itself_is_zero():
    fid = M.make_fid(tiny_fid_feature())
    images = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    M.fid_update(fid, images, real=True)
    M.fid_update(fid, images, real=False)
    assert abs(float(fid.compute())) < 1e-2
    other = M.make_fid(tiny_fid_feature())
    M.fid_update(other, images, real=True)
    M.fid_update(other, torch.nn.functional.avg_pool2d(images, 9, 1, 4) * 0.3, real=False)
    assert float(other.compute()) > 1e-2


def test_clip_score(tiny_pipe, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from mm2latent.errors import WeightsNotFoundError

    scorer = M.CLIPScorer("tiny")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    scores = scorer(images, ["she is smiling", "a man with a beard"])
    assert scores.shape == (2,) and (scores >= 0).all() and (scores <= 100).all()
    # The score is 100 * max(cos, 0) of the two embeddings, prompt by prompt.
    cos = (scorer.guide.encode_image(images[:1]) * scorer.guide.encode_text("she is smiling")).sum()
    torch.testing.assert_close(scores[0], 100 * cos.clamp(min=0))
    swapped = scorer(images, ["a man with a beard", "she is smiling"])
    assert not torch.allclose(scores, swapped)
    # Real weights come through the Hub loader; offline without a cache the error names the repository.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="clip-vit-base-patch32"):
        M.CLIPScorer()


def test_evaluate_on_the_tiny_preset(tiny_pipe, tmp_path):
    from mm2latent.training.data import SyntheticFaceDataset

    dataset = SyntheticFaceDataset(tiny_pipe.generator, 3, 128, 128, ("mask", "scribble"), seed=0)
    results = evaluate(tiny_pipe, dataset, ("mask", "scribble"), num_samples=3, seed=0,
                       lpips=load_network("lpips", "tiny"), arcface=load_network("arcface", "tiny"),
                       face_parser=load_network("face_parser", "tiny"), fid_feature=tiny_fid_feature(),
                       clip=M.CLIPScorer("tiny"), show_progress=False)
    assert set(results["mask"]) >= {"fid", "lpips", "ms_ssim", "id", "pixel_accuracy", "miou", "clip_score"}
    assert "pixel_accuracy" not in results["scribble"]
    assert all(0 <= results[m]["ms_ssim"] <= 1 for m in results)
    json_path, table_path = write_report(results, tmp_path)
    assert json.loads(json_path.read_text())["results"]["mask"]["num_samples"] == 3
    table = table_path.read_text()
    assert table == markdown_table(results) and "Text + Mask mIoU↑" in table and "Text + Scribble FID↓" in table
