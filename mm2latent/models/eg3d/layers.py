"""StyleGAN2 layers of EG3D's tri-plane backbone and super-resolution, NVIDIA style, pure PyTorch.

Module tree and parameter names are those of NVlabs/eg3d ``training/networks_stylegan2.py`` (the
G_ema state dict), so official weights load as they are. The arithmetic follows the CPU reference
paths of NVIDIA's custom ops, operation by operation, so outputs match the official code on the
CPU bit for bit where the same PyTorch kernels run:

* ``bias_act``: bias, activation, gain, then clamp to ±``conv_clamp`` (NVIDIA clamps in fp32 too);
* ``upfirdn2d``: zero insertion, padding, true convolution with the FIR filter (our
  :func:`~mm2latent.models.stylegan2.upfirdn2d`, the same equations);
* ``modulated_conv2d`` with ``fused_modconv=True`` (what evaluation mode runs): per-sample weights
  ``w * s`` demodulated by ``rsqrt(sum w² + 1e-8)``, one grouped convolution; upsampling is a
  stride-2 transposed convolution followed by the [1, 3, 3, 1] filter (``conv2d_resample``).

Differences on purpose: no fp16 execution (NVIDIA runs the super-resolution in fp16 on CUDA only),
only the 'skip' architecture (the one EG3D uses), and the resample filters are constants rebuilt in
``__init__`` rather than saved buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..stylegan2 import NOISE_MODES, PixelNorm, fused_leaky_relu, make_kernel, upfirdn2d

__all__ = [
    "FullyConnectedLayer",
    "MappingNetwork",
    "StyleGAN2Backbone",
    "SynthesisBlock",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToRGBLayer",
    "bias_act",
    "modulated_conv2d",
]

ACTIVATIONS = ("linear", "lrelu")
LRELU_GAIN = math.sqrt(2)
DEMOD_EPS = 1e-8
RESAMPLE_TAPS = (1, 3, 3, 1)
UPSAMPLE = 2


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, activation: str = "linear", clamp: float | None = None
) -> torch.Tensor:
    """Add ``bias`` over dimension 1, apply ``activation`` with its gain (√2 for lrelu), clamp to ±clamp."""
    if activation == "lrelu":
        x = fused_leaky_relu(x, bias) if bias is not None else F.leaky_relu(x, 0.2) * LRELU_GAIN
    elif bias is not None:
        x = x + bias.reshape((1, -1) + (1,) * (x.ndim - 2))
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def upsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Upsample by 2 with the FIR ``kernel`` (gain 4 included), NVIDIA's ``upfirdn2d.upsample2d``."""
    taps = kernel.shape[-1]
    return upfirdn2d(x, kernel, up=UPSAMPLE, pad=((taps + UPSAMPLE - 1) // 2, (taps - UPSAMPLE) // 2))


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: bool = False,
    kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """Style-modulated convolution as one grouped convolution (NVIDIA's fused path).

    Args:
        x: input ``[B, I, H, W]``.
        weight: ``[O, I, k, k]`` (k odd).
        styles: per-sample input-channel scales ``[B, I]``.
        demodulate: scale each output filter to unit norm per sample.
        up: upsample by 2 (transposed convolution, then the FIR ``kernel``).
        kernel: the 2-D resampling filter with the upsampling gain, needed when ``up``.

    Returns:
        ``[B, O, H, W]``, or ``[B, O, 2H, 2W]`` when upsampling.
    """
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    assert weight.shape[1] == in_channels, (x.shape, weight.shape)
    assert styles.shape == (batch, in_channels), (x.shape, styles.shape)
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt()
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, batch * in_channels, height, width)
    if not up:
        w = w.reshape(batch * out_channels, in_channels, kh, kw)
        x = F.conv2d(x, w, padding=kh // 2, groups=batch)
        return x.reshape(batch, out_channels, *x.shape[2:])
    assert kernel is not None and kh == kw, "upsampling needs the resample kernel and a square weight"
    # conv2d_resample: the transposed convolution runs the (unflipped) per-group transposed weights;
    # the padding it leaves to the filter is the 'same' padding of the upsampled image.
    w = w.transpose(1, 2).reshape(batch * in_channels, out_channels, kh, kw)
    x = F.conv_transpose2d(x, w, stride=UPSAMPLE, groups=batch)
    taps = kernel.shape[-1]
    pad0 = kh // 2 + (taps + UPSAMPLE - 1) // 2 - (kw - 1)
    pad1 = kh // 2 + (taps - UPSAMPLE) // 2 - (kw - UPSAMPLE)
    x = upfirdn2d(x, kernel, pad=(pad0, pad1))
    return x.reshape(batch, out_channels, *x.shape[2:])


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate (weights and bias scaled at run time).

    Args:
        in_features: input features.
        out_features: output features.
        activation: "linear" or "lrelu" (leaky ReLU 0.2 times √2).
        lr_multiplier: learning-rate multiplier: the stored weight is divided by it.
        bias_init: initial bias (1 for the style affines, so styles start at one).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[1] == self.in_features, x.shape
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, self.activation)


class MappingNetwork(nn.Module):
    """z and a conditioning label c -> one w (EG3D's mapping: c is embedded, both normalised, concatenated).

    Args:
        z_dim: size of z.
        c_dim: size of the label (25 for EG3D's camera).
        w_dim: size of w; also the label embedding and hidden sizes.
        num_layers: fully connected layers after the concatenation.
        lr_multiplier: learning-rate multiplier of those layers.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_layers: int = 2, lr_multiplier: float = 0.01):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_layers = num_layers
        self.normalize = PixelNorm()
        self.embed = FullyConnectedLayer(c_dim, w_dim)
        features = [z_dim + w_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(features[i], features[i + 1], "lrelu", lr_multiplier))
        # NVIDIA's running mean of w over training (z, c) pairs: what official truncation pulls toward.
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, z.shape
        assert c.shape == (z.shape[0], self.c_dim), (z.shape, c.shape)
        z = self.normalize(z.to(torch.float32))
        x = torch.cat([z, self.normalize(self.embed(c.to(torch.float32)))], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        return x


def _noise(
    mode: str, batch: int, resolution: int, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Fresh per-image noise ``[B, 1, r, r]`` from ``generator`` (the global RNG when None)."""
    assert mode == "random", mode
    device = generator.device if generator is not None else like.device
    noise = torch.randn([batch, 1, resolution, resolution], generator=generator, device=device)
    return noise.to(device=like.device, dtype=like.dtype)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally upsampling by 2), noise, bias, leaky ReLU, clamp.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        w_dim: size of w.
        resolution: output side (size of the constant noise image).
        up: upsample by 2.
        conv_clamp: clamp the activations to ±conv_clamp (None: no clamp).
        kernel_size: convolution size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: bool = False,
        conv_clamp: float | None = None,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("resample_kernel", make_kernel(RESAMPLE_TAPS, gain=UPSAMPLE**2), persistent=False)

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        in_resolution = self.resolution // 2 if self.up else self.resolution
        assert x.shape[1:] == (self.in_channels, in_resolution, in_resolution), (x.shape, self.resolution)
        assert noise_mode in NOISE_MODES, noise_mode
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up, kernel=self.resample_kernel)
        if noise_mode == "random":
            x = x.add_(_noise(noise_mode, x.shape[0], self.resolution, x, generator) * self.noise_strength)
        elif noise_mode == "const":
            x = x.add_(self.noise_const * self.noise_strength)
        return bias_act(x, self.bias.to(x.dtype), "lrelu", self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to ``out_channels`` (not demodulated), bias, clamp.

    Args:
        in_channels: input channels.
        out_channels: image channels (3, or 96 = 3 x 32 tri-plane features for the backbone).
        w_dim: size of w.
        conv_clamp: clamp the output to ±conv_clamp (None: no clamp).
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias.to(x.dtype), "linear", self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of a 'skip' StyleGAN2 synthesis network: (const |) conv0, conv1, torgb.

    The image skip is upsampled by 2 and added to torgb's output.

    Args:
        in_channels: input channels; 0 for the first block (a learned constant input).
        out_channels: channels of this block.
        w_dim: size of w.
        resolution: output side.
        img_channels: channels of the image skip.
        up: conv0 upsamples by 2 and so does the skip (False: EG3D's ``SynthesisBlockNoUp``).
        conv_clamp: activation clamp of every layer (None: no clamp).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        up: bool = True,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.up = up
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=up, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1
        self.register_buffer("resample_kernel", make_kernel(RESAMPLE_TAPS, gain=UPSAMPLE**2), persistent=False)

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ws ``[B, num_conv + num_torgb, w_dim]``; returns (features, image skip)."""
        assert ws.ndim == 3 and ws.shape[1] == self.num_conv + self.num_torgb, ws.shape
        ws = ws.unbind(dim=1)
        if self.in_channels == 0:
            x = self.const.to(ws[0].dtype).unsqueeze(0).repeat([ws[0].shape[0], 1, 1, 1])
            x = self.conv1(x, ws[0], noise_mode, generator)
        else:
            x = self.conv0(x, ws[0], noise_mode, generator)
            x = self.conv1(x, ws[1], noise_mode, generator)
        y = self.torgb(x, ws[-1])
        if img is None:
            img = y
        elif self.up:
            img = upsample2d(img, self.resample_kernel).add_(y)
        else:
            # Out of place: without upsampling, img is the caller's tensor (NVIDIA's in-place add
            # writes into the raw rendered image when the super-resolution input needs no resize).
            img = img + y
        assert img.shape[1:] == (self.img_channels, self.resolution, self.resolution), img.shape
        return x, img


class SynthesisNetwork(nn.Module):
    """W+ -> image: 'skip' StyleGAN2 synthesis from 4x4 to ``img_resolution`` (blocks ``b4``, ``b8``, ...).

    Args:
        w_dim: size of w.
        img_resolution: output side, a power of two >= 4.
        img_channels: output channels.
        channel_base: channels at resolution r are min(channel_base // r, channel_max).
        channel_max: most channels of any block.
        conv_clamp: activation clamp (None: no clamp).
    """

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        if min(channels.values()) < 1:
            raise ValueError(f"channel_base={channel_base} leaves blocks without channels")
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, channels[res], w_dim, res, img_channels, conv_clamp=conv_clamp)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last torgb's w; every other torgb shares the next block's first w

    def forward(
        self, ws: torch.Tensor, noise_mode: str = "const", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), ws.shape
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), noise_mode, generator)
            w_idx += block.num_conv
        return img


class StyleGAN2Backbone(nn.Module):
    """EG3D's tri-plane backbone: a conditional mapping network and a synthesis network.

    Args:
        z_dim: size of z.
        c_dim: size of the conditioning label.
        w_dim: size of w.
        img_resolution: side of the generated feature image (the tri-plane resolution).
        img_channels: channels of the feature image (3 planes x plane channels).
        mapping_layers: fully connected layers of the mapping network.
        mapping_lr_multiplier: their learning-rate multiplier.
        channel_base: synthesis channels at resolution r are min(channel_base // r, channel_max).
        channel_max: most channels of any synthesis block.
        conv_clamp: synthesis activation clamp (None: no clamp).
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_layers: int = 2,
        mapping_lr_multiplier: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.synthesis = SynthesisNetwork(
            w_dim, img_resolution, img_channels, channel_base, channel_max, conv_clamp
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, mapping_layers, mapping_lr_multiplier)
