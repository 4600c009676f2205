"""EG3D's super-resolution: the neural-rendering image and features -> the final image.

Two 'skip' StyleGAN2 blocks driven by the last w of the backbone (repeated 3 times), after a
bilinear (antialiased) resize of the rendered features to the module's input resolution. The
layouts of NVIDIA's modules (``training/superresolution.py``) are listed in
:data:`SUPERRESOLUTION_LAYOUTS`; parameter names (``block0.*``, ``block1.*``) are theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SynthesisBlock

__all__ = ["SUPERRESOLUTION_LAYOUTS", "SuperResolution", "SuperResolutionLayout"]

NUM_SR_WS = 3  # each block's conv0, conv1 and torgb; all take the backbone's last w


@dataclass(frozen=True)
class SuperResolutionLayout:
    """The shape of an NVIDIA super-resolution module.

    Attributes:
        img_resolution: output side.
        input_resolution: side the rendered features are resized to.
        channels: output channels of block0 and block1.
        first_block_upsamples: block0 upsamples by 2 (False: ``SynthesisBlockNoUp``).
    """

    img_resolution: int
    input_resolution: int
    channels: tuple[int, int]
    first_block_upsamples: bool


#: NVIDIA class path (``rendering_kwargs['superresolution_module']``) -> layout.
SUPERRESOLUTION_LAYOUTS: dict[str, SuperResolutionLayout] = {
    "training.superresolution.SuperresolutionHybrid8XDC": SuperResolutionLayout(512, 128, (256, 128), True),
    "training.superresolution.SuperresolutionHybrid8X": SuperResolutionLayout(512, 128, (128, 64), True),
    "training.superresolution.SuperresolutionHybrid4X": SuperResolutionLayout(256, 128, (128, 64), False),
    "training.superresolution.SuperresolutionHybrid2X": SuperResolutionLayout(128, 64, (128, 64), False),
}


class SuperResolution(nn.Module):
    """Rendered RGB + features at the neural-rendering resolution -> image at ``img_resolution``.

    Args:
        in_channels: channels of the rendered feature image (the decoder's output features).
        w_dim: size of w.
        img_resolution: output side.
        input_resolution: the features are resized (bilinear) to this side first.
        channels: output channels of block0 and block1.
        first_block_upsamples: block0 upsamples by 2; block1 always does. Their product with
            ``input_resolution`` must be ``img_resolution``.
        antialias: antialiased bilinear resize (``rendering_kwargs['sr_antialias']``).
        conv_clamp: activation clamp of both blocks (NVIDIA: 256 whenever the module was built
            for fp16, i.e. ``sr_num_fp16_res > 0``, which applies in fp32 too).
        img_channels: output image channels.
    """

    def __init__(
        self,
        in_channels: int,
        w_dim: int,
        img_resolution: int,
        input_resolution: int,
        channels: Sequence[int],
        first_block_upsamples: bool = True,
        antialias: bool = True,
        conv_clamp: float | None = 256,
        img_channels: int = 3,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"super-resolution channels must be two positive numbers, got {channels}")
        mid_resolution = input_resolution * 2 if first_block_upsamples else input_resolution
        if mid_resolution * 2 != img_resolution:
            raise ValueError(
                f"super-resolution from {input_resolution} (first block upsamples: {first_block_upsamples}) "
                f"does not reach {img_resolution}"
            )
        self.input_resolution = input_resolution
        self.antialias = antialias
        self.block0 = SynthesisBlock(
            in_channels, channels[0], w_dim, mid_resolution, img_channels, first_block_upsamples, conv_clamp
        )
        self.block1 = SynthesisBlock(channels[0], channels[1], w_dim, img_resolution, img_channels, True, conv_clamp)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.input_resolution:
            return x
        size = (self.input_resolution, self.input_resolution)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def forward(
        self,
        rgb: torch.Tensor,
        features: torch.Tensor,
        ws: torch.Tensor,
        noise_mode: str = "none",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """rgb ``[B, 3, n, n]``, features ``[B, C, n, n]``, ws ``[B, L, w_dim]`` -> ``[B, 3, R, R]``."""
        ws = ws[:, -1:, :].repeat(1, NUM_SR_WS, 1)
        x, img = self.block0(self._resize(features), self._resize(rgb), ws, noise_mode, generator)
        _, img = self.block1(x, img, ws, noise_mode, generator)
        return img
