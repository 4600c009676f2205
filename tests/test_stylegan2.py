"""Tests of the pure-PyTorch StyleGAN2 generator and the checkpoint converters.

Reference values (key names, shapes, FIR kernels, NVIDIA's forward equations) are rebuilt
here from their definitions, independently of ``mm2latent.stylegan2``.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mm2latent.errors import CheckpointFormatError
from mm2latent.models.stylegan2 import ModulatedConv2d, StyleGAN2Generator, Upsample, make_kernel, upfirdn2d
from mm2latent.models.stylegan2_checkpoints import (
    add_convert_arguments,
    convert_checkpoint,
    convert_nvidia_pickle,
    convert_rosinality,
    nvidia_to_rosinality_state_dict,
    run_convert,
)

TAPS = (1.0, 3.0, 3.0, 1.0)
SMALL = dict(resolution=256, style_dim=64, n_mlp=2, channel_base=2048, channel_max=64)


# ----------------------------------------------------------------------------------------------
# Independent references


def blur_kernel_reference(taps=TAPS, gain=1.0) -> torch.Tensor:
    """Normalised outer product of the taps, from the definition."""
    k = torch.tensor(taps, dtype=torch.float64)
    return (torch.outer(k, k) / k.sum() ** 2 * gain).float()


def fir_matrix(length: int, taps, up: int, down: int, pad0: int, pad1: int) -> torch.Tensor:
    """1-D upsample/pad/FIR/downsample as a dense matrix (true convolution), float64."""
    f = torch.tensor(taps, dtype=torch.float64)
    f = f / f.sum()
    k = len(taps)
    out_len = (length * up + pad0 + pad1 - k) // down + 1
    m = torch.zeros(out_len, length, dtype=torch.float64)
    for o in range(out_len):
        for i in range(length):
            j = o * down + k - 1 - (i * up + pad0)
            if 0 <= j < k:
                m[o, i] = f[j]
    return m


def fir_reference(x, taps=TAPS, up=1, down=1, pad=(0, 0), gain=1.0) -> torch.Tensor:
    """Separable matrix formulation of upfirdn2d (independent of any convolution)."""
    my = fir_matrix(x.shape[-2], taps, up, down, *pad)
    mx = fir_matrix(x.shape[-1], taps, up, down, *pad)
    return (gain * my @ x.double() @ mx.T).float()


def rosinality_shapes(size: int, style_dim: int, n_mlp: int, channel_multiplier: int) -> dict[str, tuple]:
    """Key -> shape of rosinality's ``Generator(size, style_dim, n_mlp, channel_multiplier)`` state dict."""
    cm = channel_multiplier
    channels = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * cm,
        128: 128 * cm,
        256: 64 * cm,
        512: 32 * cm,
        1024: 16 * cm,
    }
    log_size = int(math.log2(size))
    shapes: dict[str, tuple] = {}
    for i in range(1, n_mlp + 1):
        shapes[f"style.{i}.weight"] = (style_dim, style_dim)
        shapes[f"style.{i}.bias"] = (style_dim,)

    def styled_conv(prefix, cin, cout, upsample):
        shapes[f"{prefix}.conv.weight"] = (1, cout, cin, 3, 3)
        shapes[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        shapes[f"{prefix}.conv.modulation.bias"] = (cin,)
        if upsample:
            shapes[f"{prefix}.conv.blur.kernel"] = (4, 4)
        shapes[f"{prefix}.noise.weight"] = (1,)
        shapes[f"{prefix}.activate.bias"] = (cout,)

    def to_rgb(prefix, cin, upsample):
        if upsample:
            shapes[f"{prefix}.upsample.kernel"] = (4, 4)
        shapes[f"{prefix}.conv.weight"] = (1, 3, cin, 1, 1)
        shapes[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        shapes[f"{prefix}.conv.modulation.bias"] = (cin,)
        shapes[f"{prefix}.bias"] = (1, 3, 1, 1)

    shapes["input.input"] = (1, channels[4], 4, 4)
    styled_conv("conv1", channels[4], channels[4], False)
    to_rgb("to_rgb1", channels[4], False)
    cin = channels[4]
    for j, i in enumerate(range(3, log_size + 1)):
        cout = channels[2**i]
        styled_conv(f"convs.{2 * j}", cin, cout, True)
        styled_conv(f"convs.{2 * j + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{j}", cout, True)
        cin = cout
    for layer in range((log_size - 2) * 2 + 1):
        res = 2 ** ((layer + 5) // 2)
        shapes[f"noises.noise_{layer}"] = (1, 1, res, res)
    return shapes


def make_rosinality_checkpoint(size=256, style_dim=512, n_mlp=8, channel_multiplier=2, seed=0) -> dict:
    """Random weights with rosinality's names and shapes; kernels hold their defined values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in rosinality_shapes(size, style_dim, n_mlp, channel_multiplier).items():
        if name.endswith("kernel"):
            state[name] = blur_kernel_reference(gain=4.0)
        elif name.endswith("modulation.bias"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("noise.weight") or name.endswith("bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen)
    return {"g_ema": state, "latent_avg": torch.randn(style_dim, generator=gen)}


def without_kernels(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(".kernel")}


def small_generator(seed=0, noise_weight=0.0, **overrides) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    g = StyleGAN2Generator(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(noise_weight)
        g.latent_avg.normal_()
    return g


def random_ws(g: StyleGAN2Generator, batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, g.num_ws, g.style_dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# 1-2. rosinality checkpoint at 256² with real sizes: load, convert, round trip


@pytest.fixture(scope="module")
def rosinality_ckpt(tmp_path_factory):
    """(path, checkpoint dict, ws, output of the generator built directly from the dict)."""
    ckpt = make_rosinality_checkpoint()
    path = tmp_path_factory.mktemp("rosinality") / "stylegan2-256.pt"
    torch.save(ckpt, path)
    direct = StyleGAN2Generator.from_rosinality(ckpt).eval()
    ws = torch.randn(1, direct.num_ws, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = direct.synthesis(ws, noise_mode="const")
    return path, ckpt, ws, image


def test_rosinality_checkpoint_converts_and_round_trips_bit_identically(rosinality_ckpt, tmp_path):
    path, ckpt, ws, image = rosinality_ckpt
    out_dir = tmp_path / "converted"
    converted = convert_checkpoint(path, out_dir)
    reloaded = StyleGAN2Generator.from_pretrained(out_dir).eval()

    assert (reloaded.resolution, reloaded.style_dim, reloaded.num_ws, reloaded.num_noise_layers) == (
        256,
        512,
        14,
        13,
    )
    assert reloaded.channels == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128}
    assert len(reloaded.style) == 9  # PixelNorm + 8 layers
    assert torch.equal(reloaded.latent_avg, ckpt["latent_avg"])
    with safe_open(out_dir / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert not any(k.endswith(".kernel") for k in stored)
    assert stored == set(without_kernels(ckpt["g_ema"])) | {"latent_avg"}
    with torch.no_grad():
        assert torch.equal(converted.synthesis(ws, noise_mode="const"), image)
        assert torch.equal(reloaded.synthesis(ws, noise_mode="const"), image)
    assert torch.isfinite(image).all() and image.std() > 0


def test_missing_kernels_are_rebuilt_and_exported(rosinality_ckpt):
    _, ckpt, ws, image = rosinality_ckpt
    stripped = {"g_ema": without_kernels(ckpt["g_ema"]), "latent_avg": ckpt["latent_avg"]}
    g = StyleGAN2Generator.from_rosinality(stripped).eval()
    with torch.no_grad():
        assert torch.equal(g.synthesis(ws, noise_mode="const"), image)

    exported = g.rosinality_state_dict()
    assert set(exported) == set(ckpt["g_ema"])
    for name, value in ckpt["g_ema"].items():
        assert torch.equal(exported[name], value), name
    kernel = blur_kernel_reference(gain=4.0)
    assert exported["convs.0.conv.blur.kernel"].shape == (4, 4)
    assert torch.equal(exported["to_rgbs.5.upsample.kernel"], kernel)
    assert abs(float(exported["convs.2.conv.blur.kernel"].sum()) - 4.0) < 1e-6


def test_training_checkpoint_with_args_and_g_converts_either_generator(tmp_path):
    """rosinality train.py checkpoints also hold "g", "d" and an argparse.Namespace "args"."""
    ema = make_rosinality_checkpoint(size=32, style_dim=32, n_mlp=2, seed=5)
    raw = make_rosinality_checkpoint(size=32, style_dim=32, n_mlp=2, seed=6)
    ckpt = {
        **ema,
        "g": raw["g_ema"],
        "d": {"convs.0.0.weight": torch.zeros(1)},
        "args": argparse.Namespace(size=32),
    }
    path = tmp_path / "100000.pth"
    torch.save(ckpt, path)
    g = convert_rosinality(path, tmp_path / "out")
    reloaded = StyleGAN2Generator.from_pretrained(tmp_path / "out")
    g_bare = StyleGAN2Generator.from_rosinality({**ema["g_ema"], "latent_avg": ema["latent_avg"]})
    with pytest.warns(UserWarning, match="latent_avg"):  # latent_avg belongs to g_ema, not g
        g_raw = convert_rosinality(path, tmp_path / "out_g", use_ema=False)
    ws = torch.randn(2, g.num_ws, 32)
    with torch.no_grad():
        assert torch.equal(g(ws), reloaded(ws))
        assert torch.equal(g(ws), g_bare(ws))
        assert not torch.allclose(g_raw(ws), g(ws), atol=1e-3)
    assert torch.equal(g_raw.style[1].weight, raw["g_ema"]["style.1.weight"])


def test_from_pretrained_is_strict(tmp_path):
    g = small_generator(resolution=32)
    g.save_pretrained(tmp_path / "model")
    state = load_file(tmp_path / "model" / "model.safetensors")
    del state["convs.1.noise.weight"]
    save_file(state, tmp_path / "model" / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"convs\.1\.noise\.weight"):
        StyleGAN2Generator.from_pretrained(tmp_path / "model")


def test_small_config_is_inferred_back_from_its_rosinality_state(tmp_path):
    g = small_generator()
    state = g.rosinality_state_dict()
    g2 = StyleGAN2Generator.from_rosinality({"g_ema": state, "latent_avg": g.latent_avg})
    assert g2.channels == g.channels == {4: 64, 8: 64, 16: 64, 32: 64, 64: 32, 128: 16, 256: 8}
    g2.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in SMALL} == SMALL
    ws = random_ws(g)
    with torch.no_grad():
        assert torch.equal(g(ws), g2(ws))


def test_missing_latent_avg_is_estimated_with_a_warning():
    g = small_generator(resolution=32)
    with pytest.warns(UserWarning, match="latent_avg"):
        g2 = StyleGAN2Generator.from_rosinality(g.rosinality_state_dict())
    # An independent estimate from other samples agrees within sampling error.
    with torch.no_grad():
        w = g2.mapping(torch.randn(4096, g2.style_dim, generator=torch.Generator().manual_seed(99)))
    tolerance = 6 * w.std(0) / math.sqrt(4096) * math.sqrt(2)
    assert ((g2.latent_avg - w.mean(0)).abs() <= tolerance).all()
    assert not torch.equal(g2.latent_avg, torch.zeros_like(g2.latent_avg))


# ----------------------------------------------------------------------------------------------
# 3. malformed checkpoints


def test_missing_unexpected_and_misshapen_keys_are_named():
    g = small_generator(resolution=32)
    state = g.rosinality_state_dict()

    missing = dict(state)
    del missing["convs.3.conv.modulation.bias"]
    with pytest.raises(CheckpointFormatError, match=r"missing keys: convs\.3\.conv\.modulation\.bias"):
        StyleGAN2Generator.from_rosinality({"g_ema": missing, "latent_avg": g.latent_avg})

    renamed = dict(missing)
    renamed["convs.3.conv.modulation.biass"] = state["convs.3.conv.modulation.bias"]
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys: convs\.3\.conv\.modulation\.biass"):
        StyleGAN2Generator.from_rosinality({"g_ema": renamed, "latent_avg": g.latent_avg})

    misshapen = dict(state)
    misshapen["to_rgbs.1.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointFormatError, match=r"to_rgbs\.1\.bias has shape \(3,\)"):
        StyleGAN2Generator.from_rosinality({"g_ema": misshapen, "latent_avg": g.latent_avg})

    other_kernel = dict(state)
    other_kernel["convs.0.conv.blur.kernel"] = blur_kernel_reference((1, 2, 1), gain=4.0)
    with pytest.raises(CheckpointFormatError, match=r"convs\.0\.conv\.blur\.kernel"):
        StyleGAN2Generator.from_rosinality({"g_ema": other_kernel, "latent_avg": g.latent_avg})

    no_mapping = {k: v for k, v in state.items() if not k.startswith("style.")}
    with pytest.raises(CheckpointFormatError, match=r"style\.1\.weight"):
        StyleGAN2Generator.from_rosinality(no_mapping)

    with pytest.raises(CheckpointFormatError, match="'g'"):
        StyleGAN2Generator.from_rosinality({"g_ema": state}, use_ema=False)


def _record_call(flag: str) -> None:
    """Target of a malicious pickle: must never run."""
    _record_call.calls.append(flag)


_record_call.calls = []


class _Malicious:
    def __reduce__(self):
        return (_record_call, ("executed",))


def test_pt_loading_rejects_arbitrary_objects_without_running_them(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}, "payload": _Malicious()}, path)
    with pytest.raises(CheckpointFormatError, match="weights_only"):
        convert_checkpoint(path, tmp_path / "out")
    assert _record_call.calls == []
    assert not (tmp_path / "out").exists()


def test_convert_checkpoint_reports_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointFormatError, match="not found"):
        convert_checkpoint(tmp_path / "nope.pt", tmp_path / "out")
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\x00")
    with pytest.raises(CheckpointFormatError, match="suffix"):
        convert_checkpoint(weird, tmp_path / "out")
    with pytest.raises(CheckpointFormatError, match="source"):
        convert_checkpoint(weird, tmp_path / "out", source="tensorflow")


def test_cli_helpers_convert_and_report_errors(tmp_path, capsys):
    ckpt = make_rosinality_checkpoint(size=32, style_dim=32, n_mlp=1, seed=2)
    torch.save(ckpt, tmp_path / "g.pt")
    parser = add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--input", str(tmp_path / "g.pt"), "--output", str(tmp_path / "out")])
    assert (args.source, args.allow_pickle, args.use_ema) == ("auto", False, True)
    assert run_convert(args) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()

    (tmp_path / "g.pkl").write_bytes(pickle.dumps({}))
    args = parser.parse_args(
        ["--input", str(tmp_path / "g.pkl"), "--output", str(tmp_path / "out2"), "--no-ema"]
    )
    assert args.use_ema is False
    assert run_convert(args) == 1
    assert "--allow-pickle" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 4. truncation and noise


def test_truncation_endpoints():
    g = small_generator()
    ws = random_ws(g)
    truncated = g.truncate(ws, 0.0)
    assert torch.equal(truncated, g.latent_avg.expand_as(ws))
    assert torch.equal(g.truncate(ws, 1.0), ws)
    half = g.truncate(ws, 0.5)
    assert torch.allclose(half, (ws + g.latent_avg) / 2, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(g(ws, truncation=0.0), g.synthesis(g.latent_avg.expand(2, -1)))


def test_w_broadcast_equals_repeated_w_plus():
    g = small_generator(resolution=64)
    w = torch.randn(2, g.style_dim)
    with torch.no_grad():
        assert torch.equal(g.synthesis(w), g.synthesis(w[:, None].repeat(1, g.num_ws, 1)))
    with pytest.raises(ValueError, match="ws must be"):
        g.synthesis(torch.randn(2, g.num_ws - 1, g.style_dim))


def test_noise_modes():
    g = small_generator(resolution=64, noise_weight=0.5)
    ws = random_ws(g)
    with torch.no_grad():
        const_a = g.synthesis(ws, noise_mode="const")
        const_b = g.synthesis(ws, noise_mode="const")
        none = g.synthesis(ws, noise_mode="none")
        rand_1 = g.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(1))
        rand_1b = g.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(1))
        rand_2 = g.synthesis(ws, noise_mode="random", generator=torch.Generator().manual_seed(2))
        zeros = [torch.zeros(1, 1, s, s) for s in g.noise_sizes]
        explicit_zero = g.synthesis(ws, noise=zeros)
        buffers = [getattr(g.noises, f"noise_{i}") for i in range(g.num_noise_layers)]
        explicit_const = g.synthesis(ws, noise_mode="random", noise=buffers)
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(none, const_a, atol=1e-3)
    assert torch.equal(rand_1, rand_1b)
    assert not torch.allclose(rand_1, rand_2, atol=1e-3)
    assert torch.equal(explicit_zero, none)
    assert torch.equal(explicit_const, const_a)
    with pytest.raises(ValueError, match="noise_mode"):
        g.synthesis(ws, noise_mode="fixed")
    with pytest.raises(ValueError, match="noise"):
        g.synthesis(ws, noise=zeros[:-1])


def test_noise_is_ignored_when_its_weights_are_zero():
    g = small_generator(resolution=64, noise_weight=0.0)
    ws = random_ws(g)
    with torch.no_grad():
        assert torch.equal(g.synthesis(ws, noise_mode="none"), g.synthesis(ws, noise_mode="const"))


def test_invalid_resolutions_are_rejected():
    for resolution in (100, 2048, 4):
        with pytest.raises(ValueError, match="resolution"):
            StyleGAN2Generator(resolution=resolution, style_dim=8, n_mlp=1, channel_base=256, channel_max=8)


# ----------------------------------------------------------------------------------------------
# 5. numerical building blocks


def test_upsample_matches_transposed_convolution_and_matrix_reference():
    x = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(0))
    up = Upsample(TAPS)
    assert torch.equal(up.kernel, blur_kernel_reference(gain=4.0))
    out = up(x)
    depthwise = blur_kernel_reference(gain=4.0).expand(5, 1, 4, 4)
    assert out.shape == (2, 5, 14, 12)
    assert torch.allclose(out, F.conv_transpose2d(x, depthwise, stride=2, padding=1, groups=5), atol=1e-5)
    assert torch.allclose(out, fir_reference(x, up=2, pad=(2, 1), gain=4.0), atol=1e-5)


def test_upfirdn2d_matches_matrix_reference_with_asymmetric_kernel_and_downsampling():
    x = torch.randn(1, 3, 9, 8, generator=torch.Generator().manual_seed(1))
    taps = (1.0, 2.0, 5.0)  # asymmetric: catches a missing kernel flip
    kernel = make_kernel(taps)
    assert torch.allclose(kernel, blur_kernel_reference(taps))
    for up, down, pad in [(2, 1, (1, 2)), (1, 2, (1, 1)), (1, 1, (-1, 2)), (2, 2, (0, 1))]:
        got = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
        want = fir_reference(x, taps, up=up, down=down, pad=pad)
        assert got.shape == want.shape, (up, down, pad)
        assert torch.allclose(got, want, atol=1e-5), (up, down, pad)


def test_demodulated_weights_have_unit_norm_per_output_channel():
    torch.manual_seed(0)
    style = torch.randn(3, 16)
    conv = ModulatedConv2d(8, 12, 3, 16)
    norms = conv.modulated_weight(style).square().sum(dim=(2, 3, 4))
    assert norms.shape == (3, 12)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    plain = (
        ModulatedConv2d(8, 12, 3, 16, demodulate=False).modulated_weight(style).square().sum(dim=(2, 3, 4))
    )
    assert not torch.allclose(plain, torch.ones_like(plain), atol=1e-2)


def test_batched_synthesis_equals_per_sample_synthesis():
    g = small_generator(resolution=64, noise_weight=0.3)
    ws = random_ws(g, batch=3)
    with torch.no_grad():
        batched = g.synthesis(ws)
        single = torch.cat([g.synthesis(ws[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 6. NVIDIA stylegan2-ada-pytorch


NV = dict(resolution=32, w_dim=32, n_mapping=2, channel_base=256, channel_max=32)


def make_nvidia_state_dict(
    seed=0, resolution=32, w_dim=32, n_mapping=2, channel_base=256, channel_max=32
) -> dict:
    """A synthetic G_ema state dict with NVIDIA's names and shapes (config-f 'skip' layout)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen)

    channels = {
        r: min(channel_base // r, channel_max)
        for r in [2**i for i in range(2, int(math.log2(resolution)) + 1)]
    }
    resample_filter = blur_kernel_reference()
    sd = {}
    for i in range(n_mapping):
        sd[f"mapping.fc{i}.weight"] = randn(w_dim, w_dim) / 0.01
        sd[f"mapping.fc{i}.bias"] = randn(w_dim, scale=0.1)
    sd["mapping.w_avg"] = randn(w_dim)

    def layer(prefix, cin, cout, res):
        sd[f"{prefix}.resample_filter"] = resample_filter.clone()
        sd[f"{prefix}.affine.weight"] = randn(cin, w_dim)
        sd[f"{prefix}.affine.bias"] = 1.0 + randn(cin, scale=0.1)
        sd[f"{prefix}.weight"] = randn(cout, cin, 3, 3)
        sd[f"{prefix}.noise_const"] = randn(res, res)
        sd[f"{prefix}.noise_strength"] = randn(scale=0.2).reshape(())
        sd[f"{prefix}.bias"] = randn(cout, scale=0.1)

    def torgb(prefix, cin):
        sd[f"{prefix}.affine.weight"] = randn(cin, w_dim)
        sd[f"{prefix}.affine.bias"] = 1.0 + randn(cin, scale=0.1)
        sd[f"{prefix}.weight"] = randn(3, cin, 1, 1)
        sd[f"{prefix}.bias"] = randn(3, scale=0.1)

    for res, c in channels.items():
        sd[f"synthesis.b{res}.resample_filter"] = resample_filter.clone()
        if res == 4:
            sd["synthesis.b4.const"] = randn(c, 4, 4)
        else:
            layer(f"synthesis.b{res}.conv0", channels[res // 2], c, res)
        layer(f"synthesis.b{res}.conv1", c, c, res)
        torgb(f"synthesis.b{res}.torgb", c)
    return sd


def nvidia_reference_mapping(sd, z, n_mapping, lr=0.01):
    """stylegan2-ada-pytorch MappingNetwork.forward (no labels, no truncation)."""
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
    for i in range(n_mapping):
        w, b = sd[f"mapping.fc{i}.weight"], sd[f"mapping.fc{i}.bias"]
        x = F.leaky_relu(x @ (w * (lr / math.sqrt(w.shape[1]))).t() + b * lr, 0.2) * math.sqrt(2)
    return x


def nvidia_reference_synthesis(sd, ws, resolution):
    """stylegan2-ada-pytorch SynthesisNetwork.forward, noise_mode='const', written from its equations."""

    def affine(w, name):
        a, b = sd[f"{name}.affine.weight"], sd[f"{name}.affine.bias"]
        return w @ (a / math.sqrt(a.shape[1])).t() + b

    def modulated_conv(x, styles, weight, demodulate, up):
        outs = []
        for b in range(x.shape[0]):  # one sample at a time, not grouped
            w = weight * styles[b].view(1, -1, 1, 1)
            if demodulate:
                w = w * (w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).rsqrt()
            if up:  # conv2d_resample(up=2, padding=1): transposed conv, then FIR pad (1, 1), gain 4
                y = F.conv_transpose2d(x[b : b + 1], w.transpose(0, 1), stride=2)
                y = fir_reference(y, pad=(1, 1), gain=4.0)
            else:
                y = F.conv2d(x[b : b + 1], w, padding=w.shape[-1] // 2)
            outs.append(y)
        return torch.cat(outs)

    def synthesis_layer(x, w, name, up=False):
        x = modulated_conv(x, affine(w, name), sd[f"{name}.weight"], True, up)
        x = x + sd[f"{name}.noise_const"] * sd[f"{name}.noise_strength"]
        return F.leaky_relu(x + sd[f"{name}.bias"].view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def to_rgb(x, w, name):
        weight = sd[f"{name}.weight"]
        styles = affine(w, name) * (1 / math.sqrt(weight.shape[1]))
        return modulated_conv(x, styles, weight, False, False) + sd[f"{name}.bias"].view(1, -1, 1, 1)

    x = sd["synthesis.b4.const"].unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
    x = synthesis_layer(x, ws[:, 0], "synthesis.b4.conv1")
    img = to_rgb(x, ws[:, 1], "synthesis.b4.torgb")
    w_idx = 1
    for res in [2**i for i in range(3, int(math.log2(resolution)) + 1)]:
        x = synthesis_layer(x, ws[:, w_idx], f"synthesis.b{res}.conv0", up=True)
        x = synthesis_layer(x, ws[:, w_idx + 1], f"synthesis.b{res}.conv1")
        img = fir_reference(img, up=2, pad=(2, 1), gain=4.0) + to_rgb(
            x, ws[:, w_idx + 2], f"synthesis.b{res}.torgb"
        )
        w_idx += 2
    return img


def test_nvidia_state_dict_maps_to_rosinality_and_matches_nvidia_equations():
    sd = make_nvidia_state_dict()
    mapped = nvidia_to_rosinality_state_dict(sd)
    g = StyleGAN2Generator.from_rosinality(mapped).eval()  # strict load; no latent_avg warning
    assert (g.resolution, g.num_ws, g.style_dim) == (32, 8, 32)
    assert torch.equal(g.latent_avg, sd["mapping.w_avg"])

    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    ws = torch.randn(2, g.num_ws, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(g.mapping(z), nvidia_reference_mapping(sd, z, NV["n_mapping"]), atol=1e-4)
        ours = g.synthesis(ws, noise_mode="const")
    reference = nvidia_reference_synthesis(sd, ws, NV["resolution"])
    assert ours.shape == reference.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_nvidia_mapping_rejects_other_architectures_and_names_bad_keys():
    sd = make_nvidia_state_dict()
    with pytest.raises(CheckpointFormatError, match="StyleGAN3"):
        nvidia_to_rosinality_state_dict({**sd, "synthesis.input.affine.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointFormatError, match=r"synthesis\.b8\.skip\.weight"):
        nvidia_to_rosinality_state_dict({**sd, "synthesis.b8.skip.weight": torch.zeros(32, 32, 1, 1)})
    incomplete = {k: v for k, v in sd.items() if k != "synthesis.b16.conv1.noise_strength"}
    with pytest.raises(CheckpointFormatError, match=r"synthesis\.b16\.conv1\.noise_strength"):
        nvidia_to_rosinality_state_dict(incomplete)
    with pytest.raises(CheckpointFormatError, match="conditional"):
        nvidia_to_rosinality_state_dict({**sd, "mapping.embed.weight": torch.zeros(32, 10)})


def _nvidia_module_tree(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def write_fake_nvidia_pickle(path, flat_sd, monkeypatch):
    """Pickle a snapshot the way torch_utils.persistence does, with stand-in NVIDIA modules.

    The stand-ins exist only while pickling; loading must work without them.
    """
    torch_utils = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    dnnlib = types.ModuleType("dnnlib")
    dnnlib_util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("NVIDIA's reconstructor must not be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    dnnlib_util.EasyDict = EasyDict
    buffer_names = {"w_avg", "noise_const", "resample_filter"}

    class PersistentModule:
        def __init__(self, class_name, tree, init_kwargs=None):
            self.class_name, self.tree, self.init_kwargs = class_name, tree, init_kwargs

        def __reduce__(self):
            params, buffers, modules = OrderedDict(), OrderedDict(), OrderedDict()
            for key, value in self.tree.items():
                if isinstance(value, dict):
                    modules[key] = PersistentModule(key, value)
                elif key in buffer_names:
                    buffers[key] = value
                else:
                    params[key] = torch.nn.Parameter(value, requires_grad=False)
            state = dict(
                training=False,
                _parameters=params,
                _buffers=buffers,
                _non_persistent_buffers_set=set(),
                _modules=modules,
                _init_args=(),
                _init_kwargs=self.init_kwargs,
            )
            meta = dict(
                type="class",
                version=6,
                module_src="raise SystemExit('pickled module source was executed')",
                class_name=self.class_name,
                state=state,
            )
            return (_reconstruct_persistent_obj, (meta,))

    init_kwargs = EasyDict(
        z_dim=32,
        c_dim=0,
        w_dim=32,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs=EasyDict(num_layers=2),
        synthesis_kwargs=EasyDict(channel_base=256, channel_max=32, conv_clamp=None, architecture="skip"),
    )
    snapshot = dict(
        G=PersistentModule("Generator", _nvidia_module_tree(flat_sd), init_kwargs),
        G_ema=PersistentModule("Generator", _nvidia_module_tree(flat_sd), init_kwargs),
        augment_pipe=_Malicious(),
        training_set_kwargs=EasyDict(path="ffhq.zip"),
    )
    with monkeypatch.context() as m:
        for name, module in [
            ("torch_utils", torch_utils),
            ("torch_utils.persistence", persistence),
            ("dnnlib", dnnlib),
            ("dnnlib.util", dnnlib_util),
        ]:
            m.setitem(sys.modules, name, module)
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)


def test_nvidia_pickle_requires_opt_in_then_converts_without_nvidia_code(tmp_path, monkeypatch):
    sd = make_nvidia_state_dict(seed=3)
    path = tmp_path / "network-snapshot.pkl"
    write_fake_nvidia_pickle(path, sd, monkeypatch)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules

    with pytest.raises(CheckpointFormatError, match="allow_pickle"):
        convert_nvidia_pickle(path, tmp_path / "refused")
    with pytest.raises(CheckpointFormatError, match="allow-pickle"):
        convert_checkpoint(path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    with pytest.warns(UserWarning, match="arbitrary code"):
        g = convert_checkpoint(path, tmp_path / "out", allow_pickle=True)
    assert _record_call.calls == []
    reloaded = StyleGAN2Generator.from_pretrained(tmp_path / "out")
    expected = StyleGAN2Generator.from_rosinality(nvidia_to_rosinality_state_dict(sd))
    ws = torch.randn(1, g.num_ws, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(g.synthesis(ws), expected.synthesis(ws))
        assert torch.equal(reloaded.synthesis(ws), expected.synthesis(ws))
    assert torch.equal(reloaded.latent_avg, sd["mapping.w_avg"])


# ----------------------------------------------------------------------------------------------
# 7. mixed precision


def test_bfloat16_output_is_close_to_float32():
    g = small_generator(resolution=64, noise_weight=0.2)
    ws = random_ws(g)
    with torch.no_grad():
        reference = g.synthesis(ws)
        g16 = g.to(torch.bfloat16)
        out = g16(ws.to(torch.bfloat16), truncation=0.7)
        out_full = g16.synthesis(g16.truncate(ws.to(torch.bfloat16), 1.0))
        rand = g16.synthesis(
            ws.to(torch.bfloat16), noise_mode="random", generator=torch.Generator().manual_seed(0)
        )
        w = g16.mapping(torch.randn(2, g.style_dim))
    assert out.dtype == out_full.dtype == rand.dtype == w.dtype == torch.bfloat16
    relative = (out_full.float() - reference).norm() / reference.norm()
    assert relative < 0.05, relative
