"""PiDiNet edge detector (Su et al., ICCV 2021), the network the paper draws its scribble maps with.

The public weights are ``table5_pidinet.pth`` (hellozhuo/pidinet's ``trained_models``, mirrored as
``lllyasviel/Annotators``): ``{"epoch", "state_dict", "optimizer"}`` saved from ``nn.DataParallel`` (keys start
with ``module.``), PiDiNet with 60 base channels, the ``carv4`` pixel-difference layout, CDCM dilation
modules (24 channels) and CSAM attention. Pixel-difference convolutions are linear in their weights, so they
are converted once, at load, into the vanilla 3x3 (``cd``, ``ad``, ``cv``) and 5x5 (``rd``) convolutions they
equal (the paper's Sec. 3.3); this module holds the converted network.

Scribbles are post-processed as ControlNet's scribble preprocessor does (``nms`` + Gaussian blur +
threshold, lllyasviel/ControlNet ``gradio_fake_scribble2image.py:35-38``, ``annotator/hed/__init__.py:81-96``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ...errors import CheckpointFormatError

__all__ = ["PiDiNet", "convert_pidinet_state_dict", "pidinet_from_checkpoint", "scribble_from_edges"]

# carv4: (cd, ad, rd, cv) repeated over the 16 layers (init block + 15 blocks).
CARV4 = ("cd", "ad", "rd", "cv") * 4
# blockS_N of each of the 15 residual blocks, in order.
BLOCK_NAMES = [f"block{s}_{n}" for s, count in ((1, 3), (2, 4), (3, 4), (4, 4)) for n in range(1, count + 1)]


def pixel_difference_to_conv(weight: torch.Tensor, op: str) -> torch.Tensor:
    """The vanilla kernel equal to a pixel-difference convolution with 3x3 ``weight`` ([O, I, 3, 3]).

    cd (central): Σ w_i (x_i − x_c) → w with the centre minus Σ w. ad (angular): Σ w_i (x_i − x_{π(i)}) with π
    the clockwise neighbour → w − w∘π⁻¹. rd (radial): 5x5, w on the outer ring and −w on the inner ring.
    """
    if op == "cv":
        return weight
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels, in_channels, 9)
    if op == "cd":
        kernel = flat.clone()
        kernel[:, :, 4] = flat[:, :, 4] - flat.sum(dim=2)
        return kernel.reshape(weight.shape)
    if op == "ad":
        return (flat - flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).reshape(weight.shape)
    if op == "rd":
        kernel = torch.zeros(out_channels, in_channels, 25, dtype=weight.dtype)
        kernel[:, :, [0, 2, 4, 10, 14, 20, 22, 24]] = flat[:, :, 1:]
        kernel[:, :, [6, 7, 8, 11, 13, 16, 17, 18]] = -flat[:, :, 1:]
        return kernel.reshape(out_channels, in_channels, 5, 5)
    raise ValueError(f"unknown pixel-difference op {op!r}")


class Block(nn.Module):
    """Depth-wise (pixel-difference) conv -> ReLU -> 1x1 conv, plus the input (pooled and projected when strided)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels,
                               bias=False)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class Dilations(nn.Module):
    """CDCM: 1x1 conv, then four 3x3 convs dilated 5, 7, 9, 11, summed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        for n, dilation in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{n}", nn.Conv2d(out_channels, out_channels, 3, dilation=dilation, padding=dilation,
                                                  bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return sum(getattr(self, f"conv2_{n}")(x) for n in range(1, 5))


class Attention(nn.Module):
    """CSAM: x * sigmoid(conv3x3(conv1x1(relu(x))))."""

    def __init__(self, channels: int, mid_channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid_channels, 1)
        self.conv2 = nn.Conv2d(mid_channels, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module, PyTorchModelHubMixin):
    """PiDiNet with its pixel-difference convolutions converted to vanilla ones; returns edge probabilities.

    Args:
        channels: base width C (60 for ``table5_pidinet``; stages are C, 2C, 4C, 4C).
        dilation_channels: CDCM width (24).
        layout: the 16 pixel-difference ops (``carv4``); sets the kernel sizes (``rd`` is 5x5).
    """

    def __init__(self, channels: int = 60, dilation_channels: int = 24, layout: tuple | list = CARV4):
        super().__init__()
        layout = tuple(layout)
        assert len(layout) == 16, f"PiDiNet has 16 pixel-difference layers, got {len(layout)}"
        size = [5 if op == "rd" else 3 for op in layout]
        self.init_block = nn.Conv2d(3, channels, size[0], padding=size[0] // 2, bias=False)
        widths = [channels] * 3 + [2 * channels] * 4 + [4 * channels] * 8
        previous = channels
        for i, (name, width) in enumerate(zip(BLOCK_NAMES, widths), start=1):
            stride = 2 if name.endswith("_1") and name != "block1_1" else 1
            setattr(self, name, Block(previous, width, size[i], stride))
            previous = width
        fuse = [channels, 2 * channels, 4 * channels, 4 * channels]
        self.dilations = nn.ModuleList([Dilations(c, dilation_channels) for c in fuse])
        self.attentions = nn.ModuleList([Attention(dilation_channels) for _ in fuse])
        self.conv_reduces = nn.ModuleList([MapReduce(dilation_channels) for _ in fuse])
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BGR images in [0, 1] ``[B, 3, H, W]`` (as ControlNet feeds it) -> fused edge probability ``[B, 1, H, W]``."""
        height, width = x.shape[2:]
        x = self.init_block(x)
        stages = []
        for name in BLOCK_NAMES:
            if name.endswith("_1") and name != "block1_1":
                stages.append(x)
            x = getattr(self, name)(x)
        stages.append(x)
        edges = [F.interpolate(reduce(attend(dilate(s))), (height, width), mode="bilinear", align_corners=False)
                 for s, dilate, attend, reduce in zip(stages, self.dilations, self.attentions, self.conv_reduces)]
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))


def convert_pidinet_state_dict(state: Mapping[str, torch.Tensor], layout: tuple = CARV4) -> dict[str, torch.Tensor]:
    """hellozhuo/pidinet's (unconverted, ``module.``-prefixed) state dict -> :class:`PiDiNet`'s."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    names = ["init_block"] + [f"{b}.conv1" for b in BLOCK_NAMES]
    for name, op in zip(names, layout):
        key = f"{name}.weight"
        if key not in state:
            raise CheckpointFormatError(f"not a PiDiNet checkpoint: it has no {key!r}")
        state[key] = pixel_difference_to_conv(state[key], op)
    return state


def pidinet_from_checkpoint(checkpoint: Mapping) -> PiDiNet:
    """:class:`PiDiNet` from ``table5_pidinet.pth``'s contents (``{"state_dict": ...}`` or a bare state dict)."""
    state = checkpoint.get("state_dict", checkpoint)
    converted = convert_pidinet_state_dict(state)
    try:
        channels = converted["init_block.weight"].shape[0]
        dilation_channels = converted["dilations.0.conv1.weight"].shape[0]
    except KeyError as error:
        raise CheckpointFormatError(f"not a PiDiNet checkpoint: it has no {error.args[0]!r}") from error
    net = PiDiNet(channels, dilation_channels)
    try:
        net.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise CheckpointFormatError(f"the checkpoint does not have PiDiNet's layout: {error}") from error
    return net.eval()


def scribble_from_edges(edges: np.ndarray, threshold: int = 127, sigma: float = 3.0) -> np.ndarray:
    """ControlNet's scribble post-processing of an edge map (uint8 [H, W]): non-maximum suppression along four
    directions at ``threshold``, a Gaussian blur (``sigma``), then every pixel above 4 is a stroke. Returns a
    boolean [H, W] stroke mask."""
    import cv2

    blurred = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    kept = np.zeros_like(blurred)
    for kernel in (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0]] * 3, np.uint8),
                   np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy()):
        np.putmask(kept, cv2.dilate(blurred, kernel=kernel) == blurred, blurred)
    thin = np.where(kept > threshold, 255, 0).astype(np.uint8)
    return cv2.GaussianBlur(thin, (0, 0), sigma) > 4
