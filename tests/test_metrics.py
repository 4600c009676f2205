"""Metrics on constructed cases with known answers, and the evaluation loop on the tiny preset."""

import json

import numpy as np
import pytest
import torch

from mm2latent.models.networks import load_network
from mm2latent.training import metrics as M
from mm2latent.training.evaluate import (
    controlnet_images,
    evaluate,
    markdown_table,
    mm2latent_images,
    results_table,
    tiny_fid_feature,
    write_report,
)


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
    assert scores.shape == (2,)
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
    json_path, table_path = write_report({"mm2latent (ours)": results}, tmp_path)
    assert json.loads(json_path.read_text())["rows"]["mm2latent (ours)"]["mask"]["num_samples"] == 3
    table = table_path.read_text()
    assert table == markdown_table(results) and "Text + Mask mIoU↑" in table and "Text + Scribble FID↓" in table


def test_evaluation_at_a_resolution_equals_metrics_by_hand_on_downscaled_images(tiny_pipe):
    """``resolution`` pools output and photo (pSp's face_pool: block means) before LPIPS, MS-SSIM, ID and FID."""
    from mm2latent.training.data import SyntheticFaceDataset

    dataset = SyntheticFaceDataset(tiny_pipe.generator, 3, 128, 128, ("mask",), seed=0)
    lpips, arcface = load_network("lpips", "tiny"), load_network("arcface", "tiny")
    results = evaluate(tiny_pipe, dataset, ("mask",), num_samples=3, seed=5, lpips=lpips, arcface=arcface,
                       fid_feature=tiny_fid_feature(), show_progress=False, resolution=16)["mask"]

    generate = mm2latent_images(tiny_pipe)
    positions = np.random.default_rng(5).permutation(3)
    by_hand = {"lpips": [], "ms_ssim": [], "id": []}
    fid = M.make_fid(tiny_fid_feature())
    for i, position in enumerate(positions):
        image = generate(dataset[(int(position), 0)], "mask", 5 + i)
        # 64² -> 16²: the mean of each 4x4 block, written out.
        small = image.reshape(1, 3, 16, 4, 16, 4).mean(dim=(3, 5))
        photo = dataset[(int(position), 0)]["target"][None].reshape(1, 3, 16, 4, 16, 4).mean(dim=(3, 5))
        by_hand["lpips"].append(float(lpips(small, photo).mean()))
        by_hand["ms_ssim"].append(float(M.ms_ssim(small, photo).mean()))
        by_hand["id"].append(float((arcface.embed(small) * arcface.embed(photo)).sum()))
        M.fid_update(fid, photo, real=True)
        M.fid_update(fid, small, real=False)
    for key, values in by_hand.items():
        assert results[key] == pytest.approx(float(np.mean(values)), rel=1e-5, abs=1e-6), key
    assert results["fid"] == pytest.approx(float(fid.compute()), rel=1e-4, abs=1e-5)
    native = evaluate(tiny_pipe, dataset, ("mask",), num_samples=3, seed=5, lpips=lpips, arcface=arcface,
                      fid_feature=None, show_progress=False, resolution=None)["mask"]
    assert native["lpips"] != pytest.approx(results["lpips"])  # the resolution matters


def test_identity_pools_large_faces_to_256_first():
    """pSp: pool to 256², crop rows 35:223 and columns 32:220, pool to 112²."""
    arcface = load_network("arcface", "tiny")
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pooled = faces.reshape(2, 3, 256, 2, 256, 2).mean(dim=(3, 5))
    crop = torch.nn.functional.adaptive_avg_pool2d(pooled[:, :, 35:223, 32:220], 112)
    expected = arcface(crop)
    torch.testing.assert_close(M.identity_similarity(arcface, faces, faces.flip(0)),
                               (expected * expected.flip(0)).sum(dim=1), rtol=1e-5, atol=1e-5)


def test_controlnet_baseline_row(tiny_pipe):
    """The reference row: the diffusion model's own drawings from the same prompts, inputs and seeds."""
    from mm2latent.training.data import SyntheticFaceDataset

    dataset = SyntheticFaceDataset(tiny_pipe.generator, 2, 128, 128, ("mask", "scribble"), seed=0)
    draw = controlnet_images(tiny_pipe, num_steps=2)
    item = dataset[(0, 0)]
    mask_image, scribble_image = draw(item, "mask", 0), draw(item, "scribble", 0)
    assert mask_image.shape == (1, 3, 128, 128) and not torch.equal(mask_image, scribble_image)
    lpips = load_network("lpips", "tiny")
    rows = {name: evaluate(tiny_pipe, dataset, ("mask",), num_samples=2, lpips=lpips, fid_feature=None,
                           show_progress=False, images=images)
            for name, images in (("ControlNet", draw), ("mm2latent (ours)", None))}
    assert rows["ControlNet"]["mask"]["lpips"] != rows["mm2latent (ours)"]["mask"]["lpips"]
    table = results_table(rows).splitlines()
    assert table[0].startswith("| Method | Text + Mask LPIPS↓ | Text + Mask MS-SSIM↑")
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| ControlNet", "| mm2latent (ours)"]


def test_face_parser_input_is_resized_as_the_official_inference_does(testdata):
    """The official BiSeNet inference resizes with PIL's bilinear filter (antialiased when shrinking); the parser's
    own resize now matches it: labels agree on >= 99 % of pixels (a plain bilinear resize: much less)."""
    from PIL import Image

    from mm2latent.inputs.images import image_to_tensor

    parser = load_network("face_parser", "tiny")
    size = parser.input_size
    with Image.open(testdata / "photos" / "celebamaskhq_0.jpg") as photo:
        photo = photo.convert("RGB").resize((8 * size, 8 * size), Image.Resampling.BICUBIC)
    image = image_to_tensor(photo)
    official = parser.parse(image_to_tensor(photo.resize((size, size), Image.Resampling.BILINEAR)), size=size)
    ours = parser.parse(image, size=size)
    plain = parser.parse(torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear"), size=size)
    assert (ours == official).float().mean() >= 0.99
    assert (plain == official).float().mean() < 0.97
