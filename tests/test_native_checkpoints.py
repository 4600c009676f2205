"""Public checkpoints in their original formats (tiny sizes, files written here in the public key layouts).

* e4e / pSp encoder checkpoints run e4e's and pSp's published forwards (a re-implementation below, with
  their module names), and the two differ;
* each native format loads from a file placed in the huggingface_hub cache layout at the public preset's
  paths, converts once, and the second load reuses the converted folder;
* a file holding anything but tensors is refused without running it; env overrides take ``repo:path``.
"""

import argparse
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    COMMIT,
    TINY_STAGES,
    WIDTH,
    bisenet_file,
    ir_se50_file,
    put_file_in_cache,
    randomize_batchnorms,
    rosinality_file,
    tiny_generator,
)
from torch import nn

from mm2latent.editing.inversion import (
    PSPEncoder,
    convert_psp_state_dict,
    encoder_from_checkpoint,
    psp_encoder_config,
)
from mm2latent.errors import CheckpointFormatError, WeightsNotFoundError
from mm2latent.models import native_checkpoints
from mm2latent.models.networks import IRSE50, BiSeNet
from mm2latent.models.networks.arcface import IR50_STAGES, BottleneckIRSE
from mm2latent.models.networks.checkpoints import infer_network_config
from mm2latent.models.stylegan2 import StyleGAN2Generator
from mm2latent.pipelines.hub import (
    CONVERTED_DIR,
    CONVERTER_VERSION,
    DEFAULT_COMPONENTS,
    PUBLIC_COMPONENTS,
    resolve_component,
)

NUM_WS, INPUT_SIZE = 8, 64  # 8 W+ layers (a 32² generator); pSp heads 0-2 / 3-6 / 7 on 4², 8², 16²


# ---------------------------------------------------------------------------------------------- e4e / pSp as published


def e4e_layout(stages=IR50_STAGES, style_count=18, width=512, input_size=256, se_reduction=16) -> dict[str, tuple]:
    """Key -> shape of e4e's ``Encoder4Editing(50, 'ir_se', opts)`` (= pSp's GradualStyleEncoder) state dict."""
    shapes: dict[str, tuple] = {}

    def batchnorm(prefix, channels):
        shapes.update({f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
                       f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()})

    shapes["input_layer.0.weight"] = (stages[0][0], 3, 3, 3)
    batchnorm("input_layer.1", stages[0][0])
    shapes["input_layer.2.weight"] = (stages[0][0],)
    unit = 0
    for in_channels, depth, num_units in stages:
        for n in range(num_units):
            cin, prefix = in_channels if n == 0 else depth, f"body.{unit}"
            if cin != depth:  # bottleneck_IR_SE: a MaxPool2d shortcut (no weights) when the widths agree
                shapes[f"{prefix}.shortcut_layer.0.weight"] = (depth, cin, 1, 1)
                batchnorm(f"{prefix}.shortcut_layer.1", depth)
            batchnorm(f"{prefix}.res_layer.0", cin)
            shapes[f"{prefix}.res_layer.1.weight"] = (depth, cin, 3, 3)
            shapes[f"{prefix}.res_layer.2.weight"] = (depth,)
            shapes[f"{prefix}.res_layer.3.weight"] = (depth, depth, 3, 3)
            batchnorm(f"{prefix}.res_layer.4", depth)
            shapes[f"{prefix}.res_layer.5.fc1.weight"] = (depth // se_reduction, depth, 1, 1)
            shapes[f"{prefix}.res_layer.5.fc2.weight"] = (depth, depth // se_reduction, 1, 1)
            unit += 1
    for i in range(style_count):
        spatial = input_size // 16 * (1 if i < 3 else 2 if i < 7 else 4)
        for j in range(int(math.log2(spatial))):  # Conv2d, LeakyReLU, Conv2d, ...
            shapes[f"styles.{i}.convs.{2 * j}.weight"] = (width, width, 3, 3)
            shapes[f"styles.{i}.convs.{2 * j}.bias"] = (width,)
        shapes[f"styles.{i}.linear.weight"] = (width, width)
        shapes[f"styles.{i}.linear.bias"] = (width,)
    shapes["latlayer1.weight"], shapes["latlayer1.bias"] = (width, stages[2][1], 1, 1), (width,)
    shapes["latlayer2.weight"], shapes["latlayer2.bias"] = (width, stages[1][1], 1, 1), (width,)
    return shapes


class EqualLinear(nn.Module):
    """rosinality's EqualLinear with lr_mul=1 and no activation, as the pSp / e4e heads end."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(0.1 * torch.randn(out_dim))  # zeros at init in e4e; random to exercise it
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers = [nn.Conv2d(in_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_c, out_c, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c)

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


def upsample_add(x, y):
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class ReferenceEncoder(nn.Module):
    """e4e's ``models/encoders/psp_encoders.py`` at toy sizes: one GradualStyleBlock per layer, pSp's
    ``GradualStyleEncoder.forward`` and e4e's ``Encoder4Editing.forward`` (progressive stage Inference).
    The IR-SE units are pSp's bottleneck_IR_SE, i.e. mm2latent's BottleneckIRSE (layout checked above)."""

    coarse_ind, middle_ind = 3, 7

    def __init__(self):
        super().__init__()
        first = TINY_STAGES[0][0]
        self.input_layer = nn.Sequential(nn.Conv2d(3, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.PReLU(first))
        units = []
        for cin, depth, n in TINY_STAGES:
            units += [BottleneckIRSE(cin, depth, 2, 4)] + [BottleneckIRSE(depth, depth, 1, 4) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        ends = list(itertools.accumulate(n for *_, n in TINY_STAGES))
        self.taps = (ends[1] - 1, ends[2] - 1, ends[3] - 1)  # IR-50: units 6, 20, 23
        s = INPUT_SIZE // 16
        self.styles = nn.ModuleList(GradualStyleBlock(WIDTH, WIDTH, s if i < 3 else 2 * s if i < 7 else 4 * s)
                                    for i in range(NUM_WS))
        self.latlayer1 = nn.Conv2d(TINY_STAGES[2][1], WIDTH, 1)
        self.latlayer2 = nn.Conv2d(TINY_STAGES[1][1], WIDTH, 1)

    def features(self, x):
        x = self.input_layer(x)
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == self.taps[0]:
                c1 = x
            elif i == self.taps[1]:
                c2 = x
            elif i == self.taps[2]:
                c3 = x
        return c1, c2, c3

    def forward_psp(self, x):
        c1, c2, c3 = self.features(x)
        latents = [self.styles[j](c3) for j in range(self.coarse_ind)]
        p2 = upsample_add(c3, self.latlayer1(c2))
        latents += [self.styles[j](p2) for j in range(self.coarse_ind, self.middle_ind)]
        p1 = upsample_add(p2, self.latlayer2(c1))
        latents += [self.styles[j](p1) for j in range(self.middle_ind, NUM_WS)]
        return torch.stack(latents, dim=1)

    def forward_e4e(self, x):
        c1, c2, c3 = self.features(x)
        w0 = self.styles[0](c3)
        w = w0.repeat(NUM_WS, 1, 1).permute(1, 0, 2)
        features = c3
        for i in range(1, NUM_WS):
            if i == self.coarse_ind:
                p2 = upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == self.middle_ind:
                p1 = upsample_add(p2, self.latlayer2(c1))
                features = p1
            w[:, i] += self.styles[i](features)
        return w






def encoder_checkpoint(encoder_type: str = "Encoder4Editing", seed: int = 0) -> tuple[ReferenceEncoder, dict]:
    """(reference encoder, checkpoint as e4e's / pSp's coach saves it: state_dict with encoder.* and decoder.*)."""
    torch.manual_seed(seed)
    reference = randomize_batchnorms(ReferenceEncoder())
    state = {f"encoder.{k}": v for k, v in reference.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in tiny_generator(seed).rosinality_state_dict().items()})
    opts = {"encoder_type": encoder_type, "stylegan_size": 32, "start_from_latent_avg": True, "checkpoint_path": None,
            "lpips_lambda": 0.8, "progressive_steps": [0, 20000, 22000], "dataset_type": "ffhq_encode"}
    return reference, {"state_dict": state, "latent_avg": torch.randn(NUM_WS, WIDTH), "opts": opts}


@pytest.fixture(scope="module")
def e4e():
    return encoder_checkpoint()


@pytest.fixture(scope="module")
def faces():
    return torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_reference_has_e4e_layout():
    toy = {k: tuple(v.shape) for k, v in ReferenceEncoder().state_dict().items()}
    assert toy == e4e_layout(TINY_STAGES, NUM_WS, WIDTH, INPUT_SIZE, se_reduction=4)


@pytest.mark.parametrize("num_ws, levels", [(18, (3, 4, 11)), (14, (3, 4, 7))])  # 1024² and 256² generators
def test_real_size_layout_converts_onto_our_encoder(num_ws, levels):
    # The full-size e4e_ffhq_encode.pt layout (shapes only, on the meta device): config read back, keys map 1:1.
    real = {k: torch.empty(shape, device="meta") for k, shape in e4e_layout(style_count=num_ws).items()}
    converted = convert_psp_state_dict({f"encoder.{k}": v for k, v in real.items()})
    config = psp_encoder_config(converted, "e4e")
    assert config == dict(num_ws=num_ws, style_dim=512, input_size=256, stages=list(IR50_STAGES), fpn_channels=512,
                          head_channels=512, se_reduction=16, architecture="e4e", level_sizes=levels,
                          stores_latent_avg=True)
    with torch.device("meta"):
        ours = PSPEncoder(**config).state_dict()
    ours.pop("latent_avg")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in converted.items()}


def test_e4e_checkpoint_runs_e4e_forward_and_differs_from_psp(e4e, faces):
    reference, checkpoint = e4e
    latent_avg = checkpoint["latent_avg"]
    encoder = encoder_from_checkpoint(checkpoint, "e4e")
    assert encoder.architecture == "e4e" and torch.equal(encoder.latent_avg, latent_avg)
    with torch.no_grad():
        ours, expected = encoder(faces), reference.forward_e4e(faces) + latent_avg
        psp_expected = reference.forward_psp(faces) + latent_avg
    # Grouped convolutions sum in another order than one conv per head: equal up to float rounding.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # The same weights through pSp's forward (what loading e4e into a pSp encoder computed) are far off:
    # only layer 0 agrees, every other layer lacks w0.
    without_opts = {k: v for k, v in checkpoint.items() if k != "opts"}
    with torch.no_grad():
        psp = encoder_from_checkpoint(without_opts, "psp")(faces)
    torch.testing.assert_close(psp, psp_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(psp[:, 0], ours[:, 0])
    gap = (ours[:, 1:] - psp[:, 1:]).abs().mean() / (ours[:, 1:] - latent_avg[1:]).abs().mean()
    assert gap > 0.3, gap  # measured 0.76 here (the issue estimated ~2/3 on the real e4e)


def test_encoder_format_is_named_or_read_from_the_checkpoint(e4e):
    _, checkpoint = e4e
    assert encoder_from_checkpoint(checkpoint).architecture == "e4e"  # opts["encoder_type"] == "Encoder4Editing"
    with pytest.raises(CheckpointFormatError, match="trained as e4e"):
        encoder_from_checkpoint(checkpoint, "psp")
    with pytest.raises(CheckpointFormatError, match="cannot tell pSp from e4e"):
        encoder_from_checkpoint({k: v for k, v in checkpoint.items() if k != "opts"})
    _, psp_checkpoint = encoder_checkpoint("GradualStyleEncoder", seed=1)
    assert encoder_from_checkpoint(psp_checkpoint).architecture == "psp"


def test_mean_latent_follows_the_checkpoint_options(e4e, faces):
    reference, checkpoint = e4e
    single = {**checkpoint, "latent_avg": checkpoint["latent_avg"][0]}  # [style_dim] form: added to every layer
    off = {**checkpoint, "opts": {**checkpoint["opts"], "start_from_latent_avg": False}}
    with torch.no_grad():
        heads = reference.forward_e4e(faces)
        torch.testing.assert_close(encoder_from_checkpoint(single)(faces), heads + checkpoint["latent_avg"][0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder_from_checkpoint(off)(faces), heads, rtol=1e-5, atol=1e-5)


def test_real_ir_se50_layout_gives_the_ir50_config():
    with torch.device("meta"):
        state = IRSE50().state_dict()  # names and shapes checked against model_ir_se50.pth in test_networks
    assert infer_network_config("arcface", state) == dict(stages=list(IR50_STAGES), embedding_dim=512, input_size=112,
                                                           se_reduction=16)


# ---------------------------------------------------------------------------------------------- through the Hub cache




def rosinality_training_file() -> tuple[dict, StyleGAN2Generator]:
    """A checkpoint of rosinality's train.py (train.py:318-327): both generators, the discriminator, both Adam
    states, the argparse options and ``ada_aug_p``; no ``latent_avg``."""
    g = tiny_generator(2)
    d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(1))
    d(torch.zeros(1, 3, 8, 8))
    g_optim = torch.optim.Adam(g.parameters(), lr=0.002, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(d.parameters(), lr=0.002, betas=(0.0, 0.99))
    for optim, module in ((g_optim, g), (d_optim, d)):
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        optim.step()
    args = argparse.Namespace(path="ffhq.lmdb", iter=800000, batch=16, size=32, r1=10, path_regularize=2,
                              mixing=0.9, ckpt=None, lr=0.002, channel_multiplier=2, augment=False, ada_target=0.6,
                              latent=WIDTH, n_mlp=2, start_iter=0)
    checkpoint = {"g": g.rosinality_state_dict(), "d": d.state_dict(), "g_ema": g.rosinality_state_dict(),
                  "g_optim": g_optim.state_dict(), "d_optim": d_optim.state_dict(), "args": args, "ada_aug_p": 0.0}
    return checkpoint, g






def e4e_file() -> tuple[dict, tuple[ReferenceEncoder, torch.Tensor]]:
    """e4e's coach.py __get_save_dict (:323-339) with --save_training_data and --w_discriminator_lambda > 0:
    ``opts`` is ``vars(argparse.Namespace)`` (a dict), ``latent_avg`` [18, 512] (psp.py:103-104 repeats the
    StyleGAN mean), and the training state beside ``state_dict``: the latent discriminator's own
    ``discriminator_state_dict`` (LatentCodesDiscriminator(512, 4): ``mlp.{0,2,4,6}``), never inside ``state_dict``."""
    reference, checkpoint = encoder_checkpoint(seed=6)
    checkpoint["opts"] = vars(argparse.Namespace(**checkpoint["opts"], save_training_data=True,
                                                 w_discriminator_lambda=0.1, w_discriminator_lr=2e-5))
    discriminator = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.LeakyReLU(0.2))], nn.Linear(8, 1))
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-4)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-5)
    checkpoint.update(global_step=20000, optimizer=optimizer.state_dict(), best_val_loss=0.31,
                      discriminator_state_dict={f"mlp.{k}": v for k, v in discriminator.state_dict().items()},
                      discriminator_optimizer_state_dict=d_optimizer.state_dict())
    return checkpoint, (reference, checkpoint["latent_avg"])


def outputs_match(name: str, folder, original) -> None:
    """The network loaded from the converted folder computes what the original computes."""
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        if name == "generator":
            loaded = StyleGAN2Generator.from_pretrained(folder).eval()
            ws = torch.randn(1, loaded.num_ws, WIDTH, generator=torch.Generator().manual_seed(8))
            assert torch.equal(loaded.latent_avg, original.latent_avg)
            # Same weights, same code, same input: bit-identical.
            assert torch.equal(loaded.synthesis(ws, noise_mode="const"), original.synthesis(ws, noise_mode="const"))
        elif name == "inverter":
            reference, latent_avg = original
            faces = x[:, :, :INPUT_SIZE, :INPUT_SIZE]
            loaded = PSPEncoder.from_pretrained(folder).eval()
            torch.testing.assert_close(loaded(faces), reference.forward_e4e(faces) + latent_avg, rtol=1e-5, atol=1e-5)
        elif name == "face_parser":
            assert torch.equal(BiSeNet.from_pretrained(folder).eval()(x), original(x))
        else:
            assert torch.equal(IRSE50.from_pretrained(folder).eval()(x), original(x))


FILES = {"generator": rosinality_file, "inverter": e4e_file, "face_parser": bisenet_file, "identity": ir_se50_file}
# 79999_iter.pth (2019) and model_ir_se50.pth predate torch's zip format (torch 1.6).
LEGACY_FORMAT = {"face_parser", "identity"}




@pytest.mark.parametrize("name", sorted(FILES))
def test_public_preset_loads_from_the_hub_cache_and_converts_once(name, hub_cache, tmp_path, monkeypatch):
    spec = PUBLIC_COMPONENTS[name]
    checkpoint, original = FILES[name]()
    put_file_in_cache(hub_cache, tmp_path, spec["repo"], spec["path"], checkpoint, legacy=name in LEGACY_FORMAT)
    folder = resolve_component(name, spec, None, None)
    repo_cache = hub_cache / f"models--{spec['repo'].replace('/', '--')}"
    assert folder == repo_cache / CONVERTED_DIR / CONVERTER_VERSION / COMMIT / spec["format"] / spec["path"]
    outputs_match(name, folder, original)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(native_checkpoints, "convert_native_file", no_second_conversion)
    assert resolve_component(name, spec, None, None) == folder


executed = []


def _spring(*args):
    executed.append(args)


class Trap:
    def __reduce__(self):
        return _spring, ("unpickled",)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_file_holding_an_object_is_refused_without_running_it(legacy, hub_cache, tmp_path):
    checkpoint, _ = rosinality_file()
    spec = {"repo": "someone/stylegan2", "path": "ffhq.pt", "format": "rosinality"}
    put_file_in_cache(hub_cache, tmp_path, spec["repo"], spec["path"], {**checkpoint, "hook": Trap()}, legacy)
    with pytest.raises(CheckpointFormatError, match="_spring") as info:
        resolve_component("generator", spec, None, None)
    assert "not a plain-tensor checkpoint" in str(info.value) and not executed
    assert not [p for p in (hub_cache / "models--someone--stylegan2" / CONVERTED_DIR).rglob("*") if p.is_file()]


def test_env_overrides_name_native_files(hub_cache, tmp_path, monkeypatch):
    checkpoint, generator = rosinality_file()
    put_file_in_cache(hub_cache, tmp_path, "gan-lab/weights", "stylegan2/ffhq-32.pt", checkpoint)
    monkeypatch.setenv("MM2LATENT_GENERATOR_REPO", "gan-lab/weights@main:stylegan2/ffhq-32.pt")
    folder = resolve_component("generator", DEFAULT_COMPONENTS["generator"], None, None)  # the public ffhq.pt by default
    assert folder.parts[-2:] == ("stylegan2", "ffhq-32.pt") and "rosinality" in folder.parts
    outputs_match("generator", folder, generator)

    # The inverter's override is read as pSp or e4e from the file itself, whatever the preset named.
    reference, psp_checkpoint = encoder_checkpoint("GradualStyleEncoder", seed=9)
    put_file_in_cache(hub_cache, tmp_path, "psp-lab/psp", "psp_ffhq_encode.pt", psp_checkpoint)
    monkeypatch.setenv("MM2LATENT_INVERTER_REPO", "psp-lab/psp:psp_ffhq_encode.pt")
    encoder = PSPEncoder.from_pretrained(resolve_component("inverter", PUBLIC_COMPONENTS["inverter"], None, None))
    assert encoder.architecture == "psp"

    # A local file converts into MM2LATENT_CACHE.
    state, net = ir_se50_file()
    torch.save(state, tmp_path / "model_ir_se50.pth")
    monkeypatch.setenv("MM2LATENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MM2LATENT_ARCFACE_REPO", str(tmp_path / "model_ir_se50.pth"))
    folder = resolve_component("identity", PUBLIC_COMPONENTS["identity"], None, None)
    assert (tmp_path / "cache") in folder.parents
    outputs_match("identity", folder, net)

    monkeypatch.setenv("MM2LATENT_ARCFACE_REPO", "not a repository:file.pth")
    with pytest.raises(WeightsNotFoundError, match="MM2LATENT_ARCFACE_REPO"):
        resolve_component("identity", PUBLIC_COMPONENTS["identity"], None, None)


def test_missing_native_file_names_the_download_command(hub_cache):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_component("inverter", PUBLIC_COMPONENTS["inverter"], None, None)
    message = str(info.value)
    assert "`hf download AIRI-Institute/HairFastGAN pretrained_models/encoder4editing/e4e_ffhq_encode.pt`" in message
    assert "MM2LATENT_INVERTER_REPO" in message and "huggingface-cli" not in message


def test_rosinality_training_checkpoint_converts_with_its_optimiser_states(tmp_path):
    checkpoint, g = rosinality_training_file()
    torch.save(checkpoint, tmp_path / "100000.pt")
    with pytest.warns(UserWarning, match="latent_avg"):  # train.py stores none: estimated from the mapping network
        folder = native_checkpoints.convert_native_file(tmp_path / "100000.pt", "rosinality", tmp_path / "out", progress=False)
    loaded = StyleGAN2Generator.from_pretrained(folder).eval()
    ws = torch.randn(1, loaded.num_ws, WIDTH, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded.synthesis(ws, noise_mode="const"), g.eval().synthesis(ws, noise_mode="const"))
