"""Loss/metric networks: real-size architectures match the public checkpoints' layout; tiny ones load via the Hub loader."""

import pytest
import torch

from mm2latent.errors import CheckpointFormatError, WeightsNotFoundError
from mm2latent.inputs.conditions import FACE_PARSER_TO_CELEBAMASK
from mm2latent.models.networks import IRSE50, LPIPS, BiSeNet, build_tiny_network, load_network
from mm2latent.models.networks.checkpoints import convert, lpips_state


def test_real_architectures_have_the_public_layouts():
    arcface = IRSE50().state_dict()
    assert arcface["input_layer.0.weight"].shape == (64, 3, 3, 3)
    assert arcface["body.0.res_layer.5.fc1.weight"].shape == (4, 64, 1, 1)
    assert arcface["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert len([k for k in arcface if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24  # IR-50 units
    lpips = LPIPS().state_dict()
    assert lpips["net.slice5.28.weight"].shape == (512, 512, 3, 3) and lpips["lin4.model.1.weight"].shape == (1, 512, 1, 1)
    parser = BiSeNet().state_dict()
    assert parser["cp.resnet.layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert parser["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)
    assert parser["ffm.conv1.weight"].shape == (64, 256, 1, 1)


def test_tiny_networks_and_hub_folder_round_trip(tmp_path):
    net = build_tiny_network("arcface")
    net.save_pretrained(tmp_path / "arcface")
    loaded = load_network("arcface", str(tmp_path / "arcface"))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    net.eval()
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert torch.allclose(loaded(x).norm(dim=1), torch.ones(2), atol=1e-5)
    parser = load_network("face_parser", "tiny")
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    parse = parser.parse(images, size=32)
    # The parser's argmax, renamed from its own label order to CelebAMask-HQ's.
    logits = torch.nn.functional.interpolate(parser(((images + 1) / 2 - parser.mean) / parser.std), size=(32, 32),
                                             mode="bilinear", align_corners=False)
    assert torch.equal(parse, torch.tensor(FACE_PARSER_TO_CELEBAMASK.tolist())[logits.argmax(dim=1)])


def test_missing_weights_raise_a_clear_error():
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        load_network("lpips")


def test_convert_public_checkpoints(tmp_path):
    """The converter maps torchvision's VGG16 keys and lpips' lin keys; loading is strict."""
    lpips = LPIPS()
    vgg = {}
    for key, value in lpips.state_dict().items():
        if key.startswith("net.slice"):
            index = key.split(".")[2]
            vgg[f"features.{index}.{key.split('.')[-1]}"] = value.clone()
    lins = {k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    state = lpips_state(str(tmp_path / "vgg.pth"), str(tmp_path / "vgg16.pth"))
    assert set(state) | {"scaling_layer.shift", "scaling_layer.scale"} == set(lpips.state_dict())
    out = convert("lpips", str(tmp_path / "vgg.pth"), str(tmp_path / "lpips-vgg"), vgg=str(tmp_path / "vgg16.pth"))
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.allclose(LPIPS.from_pretrained(out)(x, y), lpips.eval()(x, y))
    torch.save({"module.wrong.key": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointFormatError):
        convert("arcface", str(tmp_path / "bad.pth"), str(tmp_path / "bad"))


def test_lpips_from_the_public_files_matches_the_lpips_package(tmp_path):
    """The public LPIPS: timm/vgg16.tv_in1k's model.safetensors + the lpips wheel's v0.1 linear layers.

    The VGG16 fixture is written in timm's layout (timm/models/vgg.py: ``features.N`` as torchvision's
    ``vgg16().features``, the classifier renamed by its ``_filter_fn`` to ``pre_logits.fc2`` and ``head.fc``;
    ``pre_logits.fc1`` [4096, 512, 7, 7] is left out of the fixture for its 400 MB: the converter reads only
    ``features``). The reference is the lpips package's own network on the same trunk weights.
    """
    lpips_package = pytest.importorskip("lpips")
    from safetensors.torch import save_file

    from mm2latent.models.native_checkpoints import convert_native_file

    torch.manual_seed(0)
    reference = lpips_package.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for name, value in reference.net.state_dict().items():  # "slice{k}.{N}.weight" -> timm's "features.{N}.weight"
        _, index, leaf = name.split(".")
        trunk[f"features.{index}.{leaf}"] = value.clone().contiguous()
    trunk.update({"pre_logits.fc2.weight": torch.randn(4096, 4096, 1, 1) * 0.01, "pre_logits.fc2.bias": torch.zeros(4096),
                  "head.fc.weight": torch.randn(1000, 4096) * 0.01, "head.fc.bias": torch.zeros(1000)})
    save_file(trunk, tmp_path / "model.safetensors", metadata={"format": "pt"})
    out = convert_native_file(tmp_path / "model.safetensors", "lpips_vgg", tmp_path / "lpips", progress=False)
    ours = LPIPS.from_pretrained(out).eval()
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = reference(x, y).flatten()
        assert torch.allclose(ours(x, y), expected, rtol=1e-5, atol=1e-6)
    lins = {k: v for k, v in ours.state_dict().items() if k.startswith("lin")}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in lins.items())  # the wheel's own layers


def test_network_defaults_are_public_files():
    from mm2latent.models.networks import network_spec
    from mm2latent.pipelines.hub import PUBLIC_COMPONENTS, published

    for kind in ("arcface", "lpips", "face_parser"):
        spec = network_spec(kind)
        assert "format" in spec and published(spec["repo"])
    assert network_spec("lpips")["repo"] == "timm/vgg16.tv_in1k" and "lpips" in PUBLIC_COMPONENTS
    folder_spec = network_spec("lpips", "me/my-lpips@v1")
    assert folder_spec["repo_id"] == "me/my-lpips" and folder_spec["revision"] == "v1" and "format" not in folder_spec
