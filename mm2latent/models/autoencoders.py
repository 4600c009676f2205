"""The MM2Latent engine's spatial encoders: convolutional autoencoders for face masks and sketches.

Each squeezes its input into one code vector (512-d by default) that the latent mapper reads; the decoder
exists to train the code (reconstruction) and to show what a code keeps.

* :class:`MaskAutoencoder`: 19-class CelebAMask-HQ index maps, one-hot in, class logits out, trained with
  cross-entropy.
* :class:`SketchAutoencoder`: binary sketches (white strokes = 1), trained with BCE + Dice (strokes cover
  a few percent of the pixels: Dice keeps the loss from settling on "all background").

Both share :class:`ConvEncoder` / :class:`ConvDecoder`: ``log2(image_size / bottleneck_size)`` levels of
(stride-2 3x3 conv, 3x3 conv) with LeakyReLU, a linear layer to and from the code, and a mirror decoder with
nearest-neighbour upsampling (no checkerboard artefacts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import InvalidImageError
from ..inputs.conditions import NUM_CLASSES

__all__ = ["ConvEncoder", "ConvDecoder", "MaskAutoencoder", "SketchAutoencoder", "dice_loss",
           "tiny_autoencoder_config"]


def _level_channels(num_levels: int, base_channels: int, max_channels: int) -> list[int]:
    """Channels after each downsampling level: base, 2·base, ... capped at ``max_channels``."""
    return [min(max_channels, base_channels * 2**i) for i in range(num_levels)]


def _num_levels(image_size: int, bottleneck_size: int) -> int:
    levels = int(round(math.log2(image_size / bottleneck_size)))
    if levels < 1 or bottleneck_size * 2**levels != image_size:
        raise ValueError(f"image_size / bottleneck_size must be a power of two >= 2, got {image_size} / {bottleneck_size}")
    return levels


class ConvEncoder(nn.Module):
    """Image ``[B, C, S, S]`` -> code ``[B, code_dim]``.

    Args:
        in_channels: input channels.
        code_dim: size of the code.
        image_size: input side S.
        bottleneck_size: side of the last feature map before the linear layer.
        base_channels: channels of the first level (doubling per level).
        max_channels: channel cap.
    """

    def __init__(self, in_channels: int, code_dim: int, image_size: int, bottleneck_size: int,
                 base_channels: int, max_channels: int):
        super().__init__()
        self.image_size = image_size
        channels = _level_channels(_num_levels(image_size, bottleneck_size), base_channels, max_channels)
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2)]
            previous = width
        self.convs = nn.Sequential(*layers)
        self.to_code = nn.Linear(previous * bottleneck_size**2, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.image_size, self.image_size), f"expected {self.image_size}² input, got {tuple(x.shape)}"
        return self.to_code(self.convs(x).flatten(1))


class ConvDecoder(nn.Module):
    """Code ``[B, code_dim]`` -> logits ``[B, out_channels, S, S]`` (the mirror of :class:`ConvEncoder`)."""

    def __init__(self, out_channels: int, code_dim: int, image_size: int, bottleneck_size: int,
                 base_channels: int, max_channels: int):
        super().__init__()
        channels = _level_channels(_num_levels(image_size, bottleneck_size), base_channels, max_channels)[::-1]
        self.bottleneck_shape = (channels[0], bottleneck_size, bottleneck_size)
        self.from_code = nn.Linear(code_dim, channels[0] * bottleneck_size**2)
        layers: list[nn.Module] = []
        for width, next_width in zip(channels, channels[1:] + [channels[-1]]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, next_width, 3, padding=1),
                       nn.LeakyReLU(0.2), nn.Conv2d(next_width, next_width, 3, padding=1), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*layers)
        self.to_logits = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_code(code), 0.2).view(code.shape[0], *self.bottleneck_shape)
        return self.to_logits(self.convs(x))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) against a binary target, per image then averaged (``eps`` smooths empties)."""
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(dim=1)
    return (1 - (2 * overlap + eps) / (probs.sum(dim=1) + target.sum(dim=1) + eps)).mean()


class _Autoencoder(nn.Module):
    """Shared encoder/decoder wiring; subclasses say how inputs become tensors and how loss is measured."""

    def __init__(self, channels: int, code_dim: int, image_size: int, bottleneck_size: int, base_channels: int,
                 max_channels: int):
        super().__init__()
        self.code_dim, self.image_size = code_dim, image_size
        sizes = (code_dim, image_size, bottleneck_size, base_channels, max_channels)
        self.encoder = ConvEncoder(channels, *sizes)
        self.decoder = ConvDecoder(channels, *sizes)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input at any size -> code ``[B, code_dim]``."""
        return self.encoder(self.inputs(x))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Code ``[B, code_dim]`` -> logits at ``image_size``."""
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits of ``x``."""
        return self.decode(self.encode(x))


class MaskAutoencoder(_Autoencoder, PyTorchModelHubMixin):
    """19-class face masks <-> codes.

    Args:
        num_classes: mask classes (19, CelebAMask-HQ ids).
        code_dim: size of the code the mapper reads (512).
        image_size: masks are resized (nearest) to this side.
        bottleneck_size: side of the smallest feature map.
        base_channels: channels of the first level.
        max_channels: channel cap.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, code_dim: int = 512, image_size: int = 256,
                 bottleneck_size: int = 4, base_channels: int = 32, max_channels: int = 256):
        super().__init__(num_classes, code_dim, image_size, bottleneck_size, base_channels, max_channels)
        self.num_classes = num_classes

    def resize_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Index maps ``[B, H, W]`` (long) -> ``[B, image_size, image_size]`` (nearest)."""
        if ids.ndim != 3:
            raise InvalidImageError(f"masks must be index maps [B, H, W], got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidImageError(f"masks must hold integer class ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
            raise InvalidImageError(f"mask ids must be in 0..{self.num_classes - 1}")
        ids = ids.long()
        if ids.shape[-2:] != (self.image_size, self.image_size):
            ids = F.interpolate(ids[:, None].float(), size=(self.image_size, self.image_size), mode="nearest")[:, 0].long()
        return ids

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.resize_ids(ids.to(self.decoder.to_logits.weight.device))
        return F.one_hot(ids, self.num_classes).permute(0, 3, 1, 2).to(self.decoder.to_logits.weight.dtype)

    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, reconstruction logits) of a batch of index maps."""
        logits = self(ids)
        return F.cross_entropy(logits.float(), self.resize_ids(ids.to(logits.device))), logits


class SketchAutoencoder(_Autoencoder, PyTorchModelHubMixin):
    """Binary sketches <-> codes.

    Args:
        code_dim: size of the code the mapper reads (512).
        image_size: sketches are resized to this side (max-pooled when shrinking, so thin strokes survive).
        bottleneck_size: side of the smallest feature map.
        base_channels: channels of the first level.
        max_channels: channel cap.
        dice_weight: weight of the Dice term next to BCE.
    """

    def __init__(self, code_dim: int = 512, image_size: int = 256, bottleneck_size: int = 4,
                 base_channels: int = 32, max_channels: int = 256, dice_weight: float = 1.0):
        super().__init__(1, code_dim, image_size, bottleneck_size, base_channels, max_channels)
        self.dice_weight = dice_weight

    def resize_strokes(self, sketch: torch.Tensor) -> torch.Tensor:
        """Sketches ``[B, H, W]`` or ``[B, 1, H, W]`` (bool or 0..1) -> ``[B, 1, image_size, image_size]`` in {0, 1}."""
        if sketch.ndim == 3:
            sketch = sketch[:, None]
        if sketch.ndim != 4 or sketch.shape[1] != 1:
            raise InvalidImageError(f"sketches must be [B, H, W] or [B, 1, H, W], got {tuple(sketch.shape)}")
        strokes = (sketch > 0.5).float()
        size = self.image_size
        height, width = strokes.shape[-2:]
        if height >= size and width >= size and (height, width) != (size, size):
            strokes = F.adaptive_max_pool2d(strokes, size)
        elif (height, width) != (size, size):
            strokes = F.interpolate(strokes, size=(size, size), mode="nearest")
        return strokes

    def inputs(self, sketch: torch.Tensor) -> torch.Tensor:
        weight = self.decoder.to_logits.weight
        return self.resize_strokes(sketch.to(weight.device)).to(weight.dtype)

    def loss(self, sketch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE + dice_weight · Dice, reconstruction logits) of a batch of sketches."""
        logits = self(sketch).float()
        target = self.resize_strokes(sketch.to(logits.device))
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return bce + self.dice_weight * dice_loss(logits, target), logits


def tiny_autoencoder_config(code_dim: int = 32) -> dict:
    """Toy sizes (tests, the ``tiny-mm2latent`` preset): 32² inputs, three levels of 8/16/16 channels."""
    return dict(code_dim=code_dim, image_size=32, bottleneck_size=4, base_channels=8, max_channels=16)
