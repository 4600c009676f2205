"""M and T follow METHOD.md: grouped map2style heads, identity-initialised T, word-only attention."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mm2latent.models.mapping import Map2StyleHeads, MappingNetwork, StyleModulationNetwork
from mm2latent.pipelines.generation import combine_steps


@pytest.fixture(scope="module")
def features(tiny_pipe):
    prompts = tiny_pipe.encode_prompts(["she has long blonde hair"] * 2)
    out = tiny_pipe.denoise(prompts, {}, tiny_pipe.prepare_noise([0, 1]), num_steps=1, feature_steps=[0],
                            run_to_end=False)
    return out.features[0], prompts.word_mask


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


def test_m_and_t_size_themselves_from_the_encoder_and_any_generator(features, tiny_pipe):
    """Built from the encoder's and a generator's configs, M and T read the real features and emit that
    generator's W+ (here a 3D-sized one with 8 layers and 48-d styles, not the tiny StyleGAN2's 10 x 64)."""
    from types import SimpleNamespace

    from mm2latent.pipelines.presets import mapper_config, modulator_config

    feats, word_mask = features
    other = SimpleNamespace(num_ws=8, style_dim=48)
    mapper = MappingNetwork(**mapper_config(tiny_pipe.encoder, other, reduce_channels=8, head_channels=4))
    modulator = StyleModulationNetwork(**modulator_config(tiny_pipe.encoder, other, hidden_channels=8, head_channels=4))
    with torch.no_grad():
        w_m = mapper(feats.h, torch.zeros(48))
        modulation = modulator(feats, word_mask)
    assert w_m.shape == modulation.gamma.shape == modulation.beta.shape == (2, 8, 48)


def test_combine_steps():
    steps = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 8, 3)
    mean = combine_steps(steps, "mean")
    assert torch.equal(mean, torch.full((2, 8, 3), 1.5))
    coarse_to_fine = combine_steps(steps, "coarse-to-fine")
    # Layer l takes step floor(l * 4 / 8): layers 0-1 step 0, 2-3 step 1, 4-5 step 2, 6-7 step 3.
    assert coarse_to_fine[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _ablated(modulator, **switches):
    """The same weights as ``modulator`` in a T built with Table 2's ablation switches."""
    config = {**modulator._hub_mixin_config, **switches}
    ablated = StyleModulationNetwork(**config)
    ablated.load_state_dict(modulator.state_dict())
    return ablated


def _replaced(feats, name):
    """The features with ``attn_out`` or ``attn_probs`` replaced by other (seeded random) values, the rest kept."""
    out = copy.copy(feats)
    torch.manual_seed(2)
    if name == "attn_probs":
        out.attn_probs = [torch.rand_like(p) for p in feats.attn_probs]
    else:
        out.attn_out = [[torch.randn_like(a) for a in block] for block in feats.attn_out]
    return out


@pytest.mark.parametrize("switch, replaced", [("use_attention_maps", "attn_probs"),
                                             ("use_attention_outputs", "attn_out")])
def test_ablation_switches_remove_their_input(features, tiny_pipe, switch, replaced):
    """Without Ā (A) the modulation ignores the attention maps (outputs): replacing them leaves w^γ and w^β
    unchanged, while the full T's change."""
    feats, word_mask = features
    full = _perturbed(tiny_pipe.modulator)
    ablated = _ablated(full, **{switch: False})
    other = _replaced(feats, replaced)
    with torch.no_grad():
        assert not torch.allclose(full(other, word_mask).gamma, full(feats, word_mask).gamma)
        base, moved = ablated(feats, word_mask), ablated(other, word_mask)
    # Bit-exact: the ablated network never reads the replaced tensors, so the same operations see the same inputs.
    assert torch.equal(moved.gamma, base.gamma) and torch.equal(moved.beta, base.beta)
