"""Few-step drawing: the LCM-LoRA file read through diffusers, fused into the U-Net and unfused again.

The fixture is written the way the published ``latent-consistency/lcm-lora-sdv1-5`` file was written: a PEFT
``LoraConfig`` on the U-Net with the LCM training script's target modules, ``get_peft_model_state_dict``, then
the training script's kohya renaming (``get_module_kohya_state_dict(unet, "lora_unet", dtype)`` in diffusers'
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``: ``base_model.model`` → ``lora_unet``,
``lora_A/B`` → ``lora_down/up``, every dot but the last two → ``_``, one ``.alpha`` per layer), saved as fp16
safetensors. The expected weights are computed here from the file's own tensors, independently of diffusers.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from mm2latent.errors import CheckpointFormatError, InvalidSettingError
from mm2latent.models.few_step import DRAWINGS, FewStepLoRA, make_scheduler, save_random_lora

RANK, ALPHA = 4, 8


def tiny_unet(layers_per_block: int = 2, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=layers_per_block,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def write_lcm_lora(path, unet: UNet2DConditionModel, seed: int = 1):
    """A trained-looking LoRA of ``unet`` in the published file's layout (see the module docstring)."""
    return save_random_lora(unet, path, rank=RANK, alpha=ALPHA, seed=seed)


def expected_weights(unet: UNet2DConditionModel, lora_file, scale: float) -> dict[str, torch.Tensor]:
    """W + scale·(α/r)·B·A for every layer of the file, computed from the file's tensors."""
    tensors = load_file(str(lora_file))
    modules = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.split(".")[0]
        down, up = tensors[key].float(), tensors[f"{stem}.lora_up.weight"].float()
        alpha = float(tensors[f"{stem}.alpha"])
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        weight = f"{modules[stem.removeprefix('lora_unet_')]}.weight"
        state[weight] = state[weight] + scale * alpha / down.shape[0] * delta.reshape(state[weight].shape)
    return state


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    latents, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, 799, encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return write_lcm_lora(tmp_path_factory.mktemp("lcm") / "pytorch_lora_weights.safetensors", tiny_unet())


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fusing_adds_the_scaled_low_rank_product_to_every_layer_the_file_names(lora_file, scale):
    unet = tiny_unet()
    expected = expected_weights(unet, lora_file, scale)
    lora = FewStepLoRA.from_file(lora_file, scale=scale)
    assert lora.num_layers == sum(k.endswith(".lora_down.weight") for k in load_file(str(lora_file)))
    lora.fuse(unet)
    fused = unet.state_dict()
    assert sorted(fused) == sorted(expected)  # a plain U-Net again: no adapter layers, the same names
    plain = tiny_unet().state_dict()
    changed = [k for k in expected if not torch.equal(expected[k], plain[k])]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in changed
    assert "up_blocks.1.resnets.0.conv1.weight" in changed  # 3x3 convolutions too
    for key in expected:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # The whole U-Net computes what the hand-fused weights compute.
    by_hand = tiny_unet()
    by_hand.load_state_dict(expected)
    torch.testing.assert_close(unet_output(unet), unet_output(by_hand), rtol=1e-4, atol=1e-5)


def test_unfusing_restores_the_plain_unet_and_fusing_twice_is_once(lora_file):
    unet, plain = tiny_unet(), unet_output(tiny_unet())
    lora = FewStepLoRA.from_file(lora_file)
    lora.fuse(unet)
    once = unet_output(unet)
    lora.fuse(unet)
    assert torch.equal(unet_output(unet), once) and lora.is_fused(unet)
    assert (once - plain).abs().max() > 1e-2  # the LoRA does change the network
    lora.unfuse(unet)
    assert not lora.is_fused(unet)
    # W + ΔW − ΔW rounds once each way: equal to the plain weights up to a few ulps, not bit for bit.
    for key, value in tiny_unet().state_dict().items():
        torch.testing.assert_close(unet.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)
    torch.testing.assert_close(unet_output(unet), plain, rtol=1e-5, atol=1e-6)


def test_a_lora_of_another_model_is_refused_and_leaves_the_unet_untouched(tmp_path, lora_file):
    deeper = write_lcm_lora(tmp_path / "deeper.safetensors", tiny_unet(layers_per_block=3))
    unet = tiny_unet()
    before = unet_output(unet)
    with pytest.raises(CheckpointFormatError, match="another model|does not fit"):
        FewStepLoRA.from_file(deeper).fuse(unet)
    assert torch.equal(unet_output(unet), before) and not any("lora" in k for k in unet.state_dict())
    not_safetensors = tmp_path / "weights.bin"
    not_safetensors.write_bytes(b"\0")
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        FewStepLoRA.from_file(not_safetensors)


def test_drawings_and_their_schedulers():
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    fast, quality = DRAWINGS["fast"], DRAWINGS["quality"]
    assert (fast.unet_passes, quality.unet_passes) == (4, 40)  # guidance 1 drops the unconditional pass
    scheduler = make_scheduler(fast.sampler, config)
    scheduler.set_timesteps(fast.num_steps)
    # LCM's 4 steps are picked from its 50-step distillation schedule, starting near t = T.
    assert len(scheduler.timesteps) == 4 and int(scheduler.timesteps[0]) == 999
    with pytest.raises(InvalidSettingError, match="sampler"):
        make_scheduler("euler", config)
