"""M and T follow METHOD.md: grouped map2style heads, identity-initialised T, word-only attention."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mm2latent.models.mapping import Map2StyleHeads, MappingNetwork, StyleModulationNetwork
from mm2latent.pipelines.generation import combine_steps


@pytest.fixture(scope="module")
def features(tiny_pipe):
    encoder = tiny_pipe.encoder
    encoding = encoder.encode_prompt("she has long blonde hair")
    noise = encoder.initial_noise([0, 1])
    out = encoder(encoding.embeds.expand(2, -1, -1), {}, noise, num_steps=1)
    return out.features[0], encoding.word_mask.expand(2, -1)


def test_grouped_heads_equal_separate_gradual_style_blocks():
    torch.manual_seed(0)
    heads = Map2StyleHeads(in_channels=6, head_channels=4, num_ws=3, style_dim=5, spatial=8)
    x = torch.randn(2, 6, 8, 8)
    grouped = heads(x)
    for layer in range(3):
        rows = slice(layer * 4, (layer + 1) * 4)
        y = F.leaky_relu(F.conv2d(x, heads.convs[0].weight[rows], heads.convs[0].bias[rows], stride=2, padding=1), 0.01)
        for conv in heads.convs[1:]:
            y = F.leaky_relu(F.conv2d(y, conv.weight[rows], conv.bias[rows], stride=2, padding=1), 0.01)
        separate = y.flatten(1) @ (heads.weight[layer] * heads.scale).T + heads.bias[layer]
        torch.testing.assert_close(grouped[:, layer], separate, atol=1e-5, rtol=1e-5)


def test_heads_reject_the_wrong_spatial_size():
    heads = Map2StyleHeads(4, 4, 2, 4, spatial=8)
    with pytest.raises(AssertionError, match="8"):
        heads(torch.randn(1, 4, 4, 4))


def test_mapping_adds_the_mean_latent(features, tiny_pipe):
    feats, _ = features
    mapper = copy.deepcopy(tiny_pipe.mapper)
    latent_avg = tiny_pipe.generator.latent_avg
    w = mapper(feats.h, latent_avg)
    assert w.shape == (2, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    assert not torch.allclose(w[0], w[1])  # different noise, different latent
    with torch.no_grad():
        mapper.heads.weight.zero_()
        mapper.heads.bias.zero_()
    torch.testing.assert_close(mapper(feats.h, latent_avg), latent_avg.expand_as(w))


def test_modulation_starts_as_the_identity(features, tiny_pipe):
    feats, word_mask = features
    modulation = tiny_pipe.modulator(feats, word_mask)
    assert torch.equal(modulation.gamma, torch.ones_like(modulation.gamma))
    assert torch.equal(modulation.beta, torch.zeros_like(modulation.beta))
    assert modulation.attention.shape == (2, 1, tiny_pipe.modulator.feature_size, tiny_pipe.modulator.feature_size)


def _perturbed(modulator):
    modulator = copy.deepcopy(modulator)
    torch.manual_seed(1)
    with torch.no_grad():
        for heads in (modulator.gamma_heads, modulator.beta_heads):
            heads.weight.normal_()
    return modulator


def test_attention_reads_only_word_tokens(features, tiny_pipe):
    feats, word_mask = features
    modulator = _perturbed(tiny_pipe.modulator)
    base = modulator(feats, word_mask)

    padded = copy.copy(feats)
    not_words = ~word_mask[0]
    padded.attn_probs = [p.clone() for p in feats.attn_probs]
    for p in padded.attn_probs:
        p[:, not_words] = torch.rand_like(p[:, not_words])
    same = modulator(padded, word_mask)
    torch.testing.assert_close(same.gamma, base.gamma)
    torch.testing.assert_close(same.attention, base.attention)

    changed = copy.copy(feats)
    changed.attn_probs = [p.clone() for p in feats.attn_probs]
    for p in changed.attn_probs:
        p[:, word_mask[0]] = torch.rand_like(p[:, word_mask[0]])
    different = modulator(changed, word_mask)
    assert not torch.allclose(different.attention, base.attention)
    assert not torch.allclose(different.gamma, base.gamma)


def test_prompt_without_words_leaves_the_global_branch_ungated(features, tiny_pipe):
    feats, word_mask = features
    modulation = tiny_pipe.modulator(feats, torch.zeros_like(word_mask))
    assert torch.equal(modulation.attention, torch.ones_like(modulation.attention))


def test_sizes_follow_the_configs(tiny_pipe):
    encoder, generator = tiny_pipe.encoder, tiny_pipe.generator
    assert tiny_pipe.mapper.num_ws == generator.num_ws
    assert tiny_pipe.modulator.block_channels == list(reversed(encoder.unet.config.block_out_channels))
    sd_mapper = MappingNetwork()  # SD-1.5 + 1024² StyleGAN2 defaults
    assert sd_mapper.heads.spatial == 8 and sd_mapper.num_ws == 18
    assert StyleModulationNetwork(num_ws=4, hidden_channels=8, head_channels=4).block_channels == [1280, 1280, 640, 320]


def test_combine_steps():
    steps = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 8, 3)
    mean = combine_steps(steps, "mean")
    assert torch.equal(mean, torch.full((2, 8, 3), 1.5))
    coarse_to_fine = combine_steps(steps, "coarse-to-fine")
    # Layer l takes step floor(l * 4 / 8): layers 0-1 step 0, 2-3 step 1, 4-5 step 2, 6-7 step 3.
    assert coarse_to_fine[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
