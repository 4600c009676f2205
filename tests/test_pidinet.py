"""PiDiNet scribbles: the published checkpoint's layout, the pixel-difference conversion, ControlNet's thinning.

Equality with hellozhuo/pidinet's own model code on the real ``table5_pidinet.pth`` (max |difference| 4.5e-7
on random 96x128 images) was checked outside the test suite; see docs/checkpoints.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm2latent.errors import CheckpointFormatError
from mm2latent.inputs.conditions import edges_from_photo
from mm2latent.inputs.scribbles import scribble_from_photo
from mm2latent.models.native_checkpoints import convert_native_file
from mm2latent.models.networks.pidinet import (
    BLOCK_NAMES,
    PiDiNet,
    pidinet_from_checkpoint,
    pixel_difference_to_conv,
    scribble_from_edges,
)


def published_checkpoint(channels: int = 4, dilation: int = 2, seed: int = 0) -> dict:
    """``table5_pidinet.pth``'s layout at a small width: hellozhuo/pidinet main.py saves
    ``{"epoch", "state_dict": model.state_dict()}`` of ``nn.DataParallel(PiDiNet(...))`` (keys ``module.*``) with
    the *unconverted* 3x3 pixel-difference kernels (models/pidinet.py, models/ops.py Conv2d)."""
    g = torch.Generator().manual_seed(seed)
    state = {"init_block.weight": torch.randn(channels, 3, 3, 3, generator=g)}
    widths = [channels] * 3 + [2 * channels] * 4 + [4 * channels] * 8
    previous = channels
    for name, width in zip(BLOCK_NAMES, widths):
        state[f"{name}.conv1.weight"] = torch.randn(previous, 1, 3, 3, generator=g) * 0.5
        state[f"{name}.conv2.weight"] = torch.randn(width, previous, 1, 1, generator=g) * 0.5
        if name in ("block2_1", "block3_1", "block4_1"):  # stride 2: max-pool + 1x1 shortcut
            state[f"{name}.shortcut.weight"] = torch.randn(width, previous, 1, 1, generator=g) * 0.5
            state[f"{name}.shortcut.bias"] = torch.randn(width, generator=g) * 0.1
        previous = width
    for i, c in enumerate([channels, 2 * channels, 4 * channels, 4 * channels]):
        state[f"dilations.{i}.conv1.weight"] = torch.randn(dilation, c, 1, 1, generator=g) * 0.5
        state[f"dilations.{i}.conv1.bias"] = torch.zeros(dilation)
        for n in range(1, 5):
            state[f"dilations.{i}.conv2_{n}.weight"] = torch.randn(dilation, dilation, 3, 3, generator=g) * 0.3
        state[f"attentions.{i}.conv1.weight"] = torch.randn(4, dilation, 1, 1, generator=g)
        state[f"attentions.{i}.conv1.bias"] = torch.zeros(4)
        state[f"attentions.{i}.conv2.weight"] = torch.randn(1, 4, 3, 3, generator=g)
        state[f"conv_reduces.{i}.conv.weight"] = torch.randn(1, dilation, 1, 1, generator=g)
        state[f"conv_reduces.{i}.conv.bias"] = torch.zeros(1)
    state["classifier.weight"] = torch.full((1, 4, 1, 1), 0.25)
    state["classifier.bias"] = torch.zeros(1)
    return {"epoch": 19, "state_dict": {f"module.{k}": v for k, v in state.items()}}


def neighbourhood(x: torch.Tensor, radius: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, (2r+1)^2, H, W], zero padded, row-major offsets."""
    k = 2 * radius + 1
    b, c, h, w = x.shape
    return F.unfold(x, k, padding=radius).reshape(b, c, k * k, h, w)


def test_central_and_radial_differences_match_their_definitions():
    """cd: Σ w_i (x_i − x_c); rd: Σ w_i (x at distance 2 − x at distance 1, same direction) (PiDiNet, Sec. 3.2)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 9, 9, generator=g), torch.randn(1, 1, 3, 3, generator=g)
    inner = neighbourhood(x, 1)[0, 0]  # [9, H, W]
    cd = sum(w.flatten()[i] * (inner[i] - inner[4]) for i in range(9))
    torch.testing.assert_close(F.conv2d(x, pixel_difference_to_conv(w, "cd"), padding=1)[0, 0], cd)
    outer = neighbourhood(x, 2)[0, 0]  # [25, H, W]
    directions = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    rd = sum(w.flatten()[1 + n] * (outer[(2 + 2 * dy) * 5 + 2 + 2 * dx] - outer[(2 + dy) * 5 + 2 + dx])
             for n, (dy, dx) in enumerate(directions))
    torch.testing.assert_close(F.conv2d(x, pixel_difference_to_conv(w, "rd"), padding=2)[0, 0], rd)
    for op in ("cd", "ad", "rd"):  # differences of a flat image are zero
        assert abs(float(pixel_difference_to_conv(w, op).sum())) < 1e-5


def test_published_layout_converts_strictly_and_gives_edge_probabilities(tmp_path):
    checkpoint = published_checkpoint()
    torch.save(checkpoint, tmp_path / "table5_pidinet.pth")
    folder = convert_native_file(tmp_path / "table5_pidinet.pth", "pidinet", tmp_path / "pidinet", progress=False)
    net = PiDiNet.from_pretrained(folder).eval()
    direct = pidinet_from_checkpoint(checkpoint)
    image = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        edges = net(image)
        assert torch.equal(edges, direct(image))
        flat = net(torch.full((1, 3, 40, 56), 0.4))
    assert edges.shape == (2, 1, 40, 56)
    # The first layer is a central difference: a flat image has no first-layer response at all.
    assert torch.equal(F.conv2d(torch.full((1, 3, 8, 8), 0.4), net.init_block.weight, padding=1)[..., 1:-1, 1:-1].abs()
                       .lt(1e-5), torch.ones(1, 4, 6, 6, dtype=torch.bool))
    assert flat.std() < edges.std()
    broken = {"epoch": 1, "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if "classifier" not in k}}
    with pytest.raises(CheckpointFormatError, match="classifier"):
        pidinet_from_checkpoint(broken)


def test_controlnet_scribble_thinning_keeps_one_thin_stroke_per_edge():
    edges = np.zeros((64, 64), np.uint8)
    edges[:, 28:36] = 255  # a thick vertical edge response
    strokes = scribble_from_edges(edges)
    assert strokes.dtype == bool and strokes[:, 31:33].all()  # the ridge is kept along the whole edge
    assert not strokes[:, :20].any() and not strokes[:, 44:].any()  # nothing far from it
    assert not scribble_from_edges(np.full((64, 64), 100, np.uint8)).any()  # weak responses (< 127) draw nothing


def test_scribble_from_photo_uses_pidinet_or_the_named_sobel_fallback(mask_path):
    from PIL import Image

    photo = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    net = pidinet_from_checkpoint(published_checkpoint())
    strokes = scribble_from_photo(photo, size=32, detector=net)
    assert strokes.shape == (32, 32) and strokes.dtype == bool
    with pytest.warns(UserWarning, match="Sobel fallback"):  # offline, without the weights in the cache
        from mm2latent.inputs import scribbles

        scribbles.load_scribble_detector.cache_clear()
        assert np.array_equal(scribble_from_photo(photo, size=32), edges_from_photo(photo, size=32))
    scribbles.load_scribble_detector.cache_clear()
