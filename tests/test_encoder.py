"""The diffusion encoder captures the documented features and leaves the U-Net as it found it."""

import pytest
import torch

from mm2latent.errors import UnsupportedConditionError


@pytest.fixture(scope="module")
def encoder(tiny_pipe):
    return tiny_pipe.encoder


def _inputs(encoder, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, encoder.latent_size, encoder.latent_size, generator=generator)
    embeds = encoder.encode_prompt("she has long blonde hair").embeds.expand(batch, -1, -1)
    control = torch.rand(batch, 3, encoder.image_size, encoder.image_size, generator=generator)
    return latents, embeds, {"mask": control}


def test_features_have_the_sd15_structure(encoder):
    latents, embeds, controls = _inputs(encoder)
    features, _ = encoder.extract(latents, 999, embeds, controls)
    unet_blocks = encoder.unet.config.block_out_channels
    latent = encoder.latent_size
    mid = latent // 2 ** (len(unet_blocks) - 1)

    assert features.h.shape == (2, unet_blocks[-1], mid, mid)
    # Decoder blocks 0..2 upsample by 2, the last keeps the latent size (SD-1.5: 16², 32², 64², 64²).
    expected_sizes = [mid * 2, mid * 4, mid * 8, mid * 8]
    assert [tuple(f.shape) for f in features.f] == [
        (2, c, s, s) for c, s in zip(reversed(unet_blocks), expected_sizes)
    ]
    # Up block 0 has no cross-attention; blocks 1..3 have three attn2 layers each, at the block's input size.
    assert [len(a) for a in features.attn_out] == [0, 3, 3, 3]
    for n in (1, 2, 3):
        size = expected_sizes[n - 1]
        for out in features.attn_out[n]:
            assert out.shape == (2, features.f[n].shape[1], size, size)
    assert len(features.attn_probs) == 9
    for probs in features.attn_probs:
        assert probs.shape[:2] == (2, 77)
        # A max over heads of distributions over tokens sums to at least one at every pixel.
        assert (probs.sum(dim=1) >= 1 - 1e-5).all()


def test_capture_does_not_change_the_unet(encoder):
    latents, embeds, controls = _inputs(encoder, seed=1)
    unet = encoder.unet
    processors_before = unet.attn_processors
    plain, _ = encoder.predict_noise(latents, 500, embeds, controls, 1.0)

    features, captured_pred = encoder.extract(latents, 500, embeds, controls)

    # The capturing attention processor computes the same attention as diffusers' SDPA processor.
    torch.testing.assert_close(captured_pred, plain, atol=1e-5, rtol=1e-4)
    after, _ = encoder.predict_noise(latents, 500, embeds, controls, 1.0)
    assert torch.equal(after, plain)
    assert all(unet.attn_processors[k] is v for k, v in processors_before.items())
    assert not unet.mid_block._forward_hooks
    assert not any(block._forward_hooks for block in unet.up_blocks)


def test_h_is_the_mid_block_output_plus_the_controlnet_residual(encoder):
    latents, embeds, controls = _inputs(encoder, seed=2)
    seen = {}
    handle = encoder.unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))
    try:
        _, mid_residual = encoder.predict_noise(latents, 999, embeds, controls, 1.0)
    finally:
        handle.remove()
    with_mask, _ = encoder.extract(latents, 999, embeds, controls)
    text_only, _ = encoder.extract(latents, 999, embeds, {})

    assert mid_residual.abs().max() > 0
    torch.testing.assert_close(with_mask.h, seen["mid"] + mid_residual)
    assert not torch.allclose(with_mask.h, text_only.h)


def test_seeded_noise_is_reproducible(encoder):
    assert torch.equal(encoder.initial_noise([3, 4])[1], encoder.initial_noise([4])[0])
    assert not torch.equal(encoder.initial_noise([3])[0], encoder.initial_noise([4])[0])


def test_long_prompts_are_truncated_with_a_warning(encoder):
    long_prompt = " ".join(["she has long wavy blonde hair"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        encoding = encoder.encode_prompt(long_prompt)
    assert encoding.truncated and encoding.embeds.shape[1] == 77
    short = encoder.encode_prompt("she has blonde hair")
    assert not short.truncated
    assert short.words == ["she", "has", "blonde", "hair"]
    assert short.word_mask.sum() == 4


def test_unknown_modality_is_rejected(encoder):
    latents, embeds, controls = _inputs(encoder)
    with pytest.raises(UnsupportedConditionError, match="depth"):
        encoder.extract(latents, 999, embeds, {"depth": controls["mask"]})
