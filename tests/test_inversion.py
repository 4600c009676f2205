"""Inversion to W+: the pSp encoder, the optimisation refinement and the training step (tiny, CPU)."""

import numpy as np
import pytest
import torch

from mm2latent.editing.inversion import (
    PSPEncoder,
    convert_psp_state_dict,
    image_to_tensor,
    invert,
    psp_level_sizes,
    refine_latent,
    tiny_psp_config,
)
from mm2latent.errors import InvalidStepsError
from mm2latent.models.networks import build_tiny_network


@pytest.fixture(scope="module")
def generator(tiny_pipe):
    return tiny_pipe.generator


@pytest.fixture(scope="module")
def encoder(generator):
    torch.manual_seed(0)
    return PSPEncoder(**tiny_psp_config(generator.num_ws, generator.style_dim)).eval()


@pytest.fixture(scope="module")
def lpips():
    return build_tiny_network("lpips").eval()


@pytest.fixture(scope="module")
def photo(testdata):
    from PIL import Image

    return Image.open(testdata / "photos" / "ffhq_0.jpg").convert("RGB")


def test_level_sizes_follow_psp():
    assert psp_level_sizes(18) == (3, 4, 11)  # pSp: coarse 0-2, middle 3-6, fine 7-17
    # Smaller generators keep the proportions 3/18 and 7/18: round(30/18) = 2, round(70/18) - 2 = 2, rest 6.
    assert psp_level_sizes(10) == (2, 2, 6)
    assert psp_level_sizes(14) == (2, 3, 9)


def test_encoder_outputs_offsets_from_the_mean_latent(encoder, generator, tmp_path):
    x = torch.rand(2, 3, 80, 80) * 2 - 1  # any size is resized to the input size
    with torch.no_grad():
        w = encoder(x, generator.latent_avg)
        w0 = encoder(x, torch.zeros_like(generator.latent_avg))
    assert w.shape == (2, generator.num_ws, generator.style_dim)
    torch.testing.assert_close(w - w0, generator.latent_avg.expand_as(w))
    encoder.save_pretrained(tmp_path / "inverter")
    loaded = PSPEncoder.from_pretrained(tmp_path / "inverter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, generator.latent_avg), w)


def test_psp_checkpoint_conversion_round_trip(encoder):
    """Split our grouped heads into pSp's per-layer GradualStyleBlocks, convert back, get the same weights."""
    ours = encoder.state_dict()
    psp, start = {}, 0
    for level, count in zip(("coarse", "middle", "fine"), psp_level_sizes(encoder.num_ws)):
        n_convs = len(getattr(encoder, level).convs)
        for h in range(count):
            for n in range(n_convs):
                for kind in ("weight", "bias"):
                    psp[f"encoder.styles.{start + h}.convs.{2 * n}.{kind}"] = ours[f"{level}.convs.{n}.{kind}"].chunk(count)[h]
            psp[f"encoder.styles.{start + h}.linear.weight"] = ours[f"{level}.weight"][h]
            psp[f"encoder.styles.{start + h}.linear.bias"] = ours[f"{level}.bias"][h]
        start += count
    psp.update({f"encoder.{k}": v for k, v in ours.items() if not k.startswith(("coarse", "middle", "fine"))})
    psp["decoder.ignored"] = torch.zeros(1)
    converted = convert_psp_state_dict(psp, encoder.num_ws)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)


def test_refinement_lowers_the_reconstruction_loss(encoder, generator, lpips, photo):
    with torch.no_grad():
        start = encoder(image_to_tensor(photo, encoder.input_size), generator.latent_avg)
    target = image_to_tensor(photo, generator.resolution)
    seen = []
    result = refine_latent(generator, start, target, steps=20, lr=0.02, lpips=lpips, progress=False,
                           callback=lambda step, loss: seen.append(step))
    assert len(result.losses) == 21 and seen == list(range(21)) and not result.stopped_early
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses  # measured 2.55 -> 0.32 (ffhq_0, tiny G)
    assert result.latent.shape == start.shape
    assert not start.requires_grad and not any(p.requires_grad for p in generator.parameters())


def test_refinement_loss_is_the_psp_objective_by_hand(generator, lpips):
    """Step 0's loss, written out: a 128² target (I^d_0 of the tiny preset) is pooled to G's 64² (2×2 block means,
    pSp's face_pool), then L2 + 0.8·LPIPS + mask_weight·CE(parser) + w_reg_weight·‖w − w̄‖."""
    parser = build_tiny_network("face_parser").eval()
    w = generator.latent_avg.expand(1, generator.num_ws, -1) + 0.3 * torch.randn(
        1, generator.num_ws, generator.style_dim, generator=torch.Generator().manual_seed(0))
    target = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask_ids = torch.randint(0, 19, (1, 32, 32), generator=torch.Generator().manual_seed(2))
    result = refine_latent(generator, w, target, steps=0, lpips=lpips, face_parser=parser, mask_ids=mask_ids,
                           mask_weight=0.3, w_reg_weight=0.01, latent_avg=generator.latent_avg, progress=False)
    with torch.no_grad():
        image = generator.synthesis(w)
        pooled = target.reshape(1, 3, 64, 2, 64, 2).mean(dim=(3, 5))
        by_hand = ((image - pooled).pow(2).mean() + 0.8 * lpips(image, pooled).mean()
                   + 0.3 * torch.nn.functional.cross_entropy(parser.celebamask_logits(image, size=32), mask_ids)
                   + 0.01 * (w - generator.latent_avg).flatten(1).norm(dim=1).mean())
    assert result.losses == [pytest.approx(float(by_hand), rel=1e-5)]


def test_refinement_stops_early_and_checks_steps(generator):
    w = generator.latent_avg.expand(1, generator.num_ws, -1).clone()
    target = torch.zeros(1, 3, generator.resolution, generator.resolution)
    result = refine_latent(generator, w, target, steps=50, lr=1e-12, patience=2, progress=False)
    assert result.stopped_early and len(result.losses) < 10
    with pytest.raises(InvalidStepsError):
        refine_latent(generator, w, target, steps=-1)


def test_invert_a_real_photo(encoder, generator, lpips, testdata):
    parser = build_tiny_network("face_parser").eval()
    result = invert(generator, encoder, testdata / "photos" / "ffhq_1.jpg", face_parser=parser, lpips=lpips,
                    refine_steps=2, progress=False)
    assert result.latent.shape == (1, generator.num_ws, generator.style_dim) and result.latent.dtype == torch.float32
    assert result.reconstruction.size == (generator.resolution,) * 2
    assert result.aligned.size == (256, 256) and result.faces_found == 1
    assert result.mask.shape == (512, 512)
    np.testing.assert_array_equal(result.mask, parser.parse(image_to_tensor(result.aligned), size=512)[0].numpy())
    assert len(result.refine_losses) == 3


def test_invert_adds_the_encoders_own_mean_latent(generator, photo):
    """pSp / e4e checkpoints carry the mean latent they were trained with; invert() must use it, not G's."""
    torch.manual_seed(2)
    encoder = PSPEncoder(**tiny_psp_config(generator.num_ws, generator.style_dim), architecture="e4e",
                         stores_latent_avg=True).eval()
    encoder.latent_avg.normal_()
    result = invert(generator, encoder, photo, align=False, progress=False)
    with torch.no_grad():
        faces = image_to_tensor(photo, encoder.input_size)
        own, with_g_mean = encoder(faces), encoder(faces, generator.latent_avg)
    assert torch.equal(result.latent, own)  # same weights, input and code path
    assert not torch.allclose(result.latent, with_g_mean)
    with pytest.raises(ValueError, match="latent_avg"):
        PSPEncoder(**tiny_psp_config(generator.num_ws, generator.style_dim))(faces)


def test_train_inverter_command_saves_a_loadable_encoder(testdata, tmp_path):
    import shutil

    from mm2latent.editing.inversion import PSPEncoder, tiny_psp_config
    from mm2latent.training.cli import main

    images = tmp_path / "faces"
    images.mkdir()
    for name in ("ffhq_0.jpg", "ffhq_1.jpg"):
        shutil.copy(testdata / "photos" / name, images / name)  # a temporary copy, deleted with tmp_path
    start = PSPEncoder(**tiny_psp_config(10, 64))
    start.save_pretrained(tmp_path / "start")
    main(["inverter", "--images", str(images), "--output", str(tmp_path / "out"), "--model", "tiny", "--steps", "3",
          "--batch-size", "2", "--lpips", "tiny", "--arcface", "tiny", "--init", str(tmp_path / "start"),
          "--set", "train.log_with=null", "train.progress=false"])
    trained = PSPEncoder.from_pretrained(tmp_path / "out" / "final" / "inverter")
    before, after = start.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The same trainer as the other stages: a resumable checkpoint and a model card.
    assert (tmp_path / "out" / "final" / "README.md").read_text().count("photo encoder") >= 1
