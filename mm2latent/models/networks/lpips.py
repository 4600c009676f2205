"""LPIPS perceptual distance, 'vgg' variant (Zhang et al. 2018; the ``lpips`` package, v0.1 weights).

Module names follow the ``lpips`` package: ``scaling_layer``, ``net.slice1..5`` (VGG16 ``features``
indices kept), ``lin0..lin4.model.1`` (1x1 convs after dropout), so the package's ``vgg.pth`` plus
torchvision's VGG16 weights convert to one safetensors file (``mm2latent.models.networks.checkpoints``).
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# Convs per slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (slices 2..5 start with a max-pool).
VGG16_CONVS = (2, 2, 3, 3, 3)


class ScalingLayer(nn.Module):
    """[-1, 1] images -> the ImageNet-like normalisation LPIPS was trained with."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGGSlices(nn.Module):
    """VGG16 ``features`` cut after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.

    Args:
        channels: output channels of the five slices.
        convs: number of 3x3 conv + ReLU pairs in each slice.
    """

    def __init__(self, channels: tuple | list = VGG16_CHANNELS, convs: tuple | list = VGG16_CONVS):
        super().__init__()
        index, in_channels = 0, 3
        for n, (width, count) in enumerate(zip(channels, convs), start=1):
            block = nn.Sequential()
            if n > 1:
                block.add_module(str(index), nn.MaxPool2d(2, 2))
                index += 1
            for _ in range(count):
                block.add_module(str(index), nn.Conv2d(in_channels, width, 3, padding=1))
                block.add_module(str(index + 1), nn.ReLU(inplace=False))
                index, in_channels = index + 2, width
            setattr(self, f"slice{n}", block)
        self.num_slices = len(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for n in range(1, self.num_slices + 1):
            x = getattr(self, f"slice{n}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout + 1x1 conv to one channel (the learned per-channel weights of LPIPS)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module, PyTorchModelHubMixin):
    """LPIPS distance between images in [-1, 1]; ``forward`` returns one value per pair, [B].

    Args:
        channels: VGG slice widths (VGG16: 64, 128, 256, 512, 512).
        convs: convs per slice (VGG16: 2, 2, 3, 3, 3).
    """

    def __init__(self, channels: tuple | list = VGG16_CHANNELS, convs: tuple | list = VGG16_CONVS):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGGSlices(channels, convs)
        for n, width in enumerate(channels):
            setattr(self, f"lin{n}", NetLinLayer(width))
        self.num_slices = len(channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape == y.shape and x.shape[1] == 3, f"LPIPS needs two equal RGB batches, got {x.shape}, {y.shape}"
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        total = 0.0
        for n, (a, b) in enumerate(zip(feats_x, feats_y)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{n}")((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


def tiny_lpips_config() -> dict:
    """A toy LPIPS (same code path) for tests."""
    return dict(channels=(4, 8, 8, 16, 16), convs=(1, 1, 1, 1, 1))
