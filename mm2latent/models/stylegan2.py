"""Pure-PyTorch StyleGAN2 generator (no compiled extensions).

The module tree, the state-dict key names and the arithmetic follow rosinality's
``stylegan2-pytorch`` ``model.Generator`` (fused grouped-convolution path), so a rosinality
``g_ema`` state dict loads as is and renders the same image. Differences on purpose:

* the blur / upsample FIR kernels are non-persistent buffers (constants rebuilt in
  ``__init__``): our safetensors files never store them; rosinality files may or may not;
* the mean latent ``latent_avg`` (kept next to ``g_ema`` in rosinality checkpoints) is a
  persistent buffer of the generator;
* the input is a W+ code ``ws`` of shape ``[B, num_ws, style_dim]``; the mapping network is
  exposed separately as :meth:`StyleGAN2Generator.mapping`.

Why this module is over 600 lines: it is the whole generator in rosinality's flat layout (FIR filters,
modulated convolutions, noise, ToRGB, mapping, synthesis) so that its key names and arithmetic can be read side
by side with the official ``model.py``; checkpoint conversion lives in :mod:`.stylegan2_checkpoints`.

Images are in ``[-1, 1]`` (not clamped), layout ``[B, 3, R, R]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import CheckpointFormatError, InvalidSettingError
from .generator import broadcast_ws, truncate_latents

__all__ = [
    "NOISE_MODES",
    "StyleGAN2Generator",
    "fused_leaky_relu",
    "make_kernel",
    "upfirdn2d",
]

NOISE_MODES = ("const", "random", "none")
MIN_RESOLUTION = 8
MAX_RESOLUTION = 1024
LRELU_SLOPE = 0.2
LRELU_GAIN = 2**0.5
DEMOD_EPS = 1e-8
LATENT_AVG_SAMPLES = 4096
LATENT_AVG_SEED = 0
KERNEL_ATOL = 1e-6
MAX_NAMES_IN_ERROR = 20


# ----------------------------------------------------------------------------------------------
# Functional ops.


def make_kernel(taps: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """2-D FIR kernel: outer product of the 1-D ``taps``, normalised to sum 1, times ``gain``."""
    k = torch.tensor([float(t) for t in taps], dtype=torch.float32)
    if k.ndim != 1 or k.numel() < 2 or float(k.sum()) == 0.0:
        raise ValueError(f"blur kernel taps must be >= 2 numbers with a non-zero sum, got {taps!r}")
    k = k[None, :] * k[:, None]
    k = k / k.sum()
    return k * gain


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter each channel, downsample.

    Same pads on both axes; negative pads crop. The filter is a true convolution (kernel
    flipped), as in rosinality's / NVIDIA's ``upfirdn2d``.
    """
    assert x.ndim == 4 and kernel.ndim == 2, (x.shape, kernel.shape)
    batch, channels, height, width = x.shape
    kh, kw = kernel.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(batch, channels, height * up, width * up)
    pad0, pad1 = pad
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    weight = kernel.flip((0, 1)).to(x.dtype).expand(channels, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=channels)


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor, negative_slope: float = LRELU_SLOPE, scale: float = LRELU_GAIN
) -> torch.Tensor:
    """``leaky_relu(x + bias, 0.2) * sqrt(2)`` with ``bias`` broadcast over dimension 1."""
    shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


# ----------------------------------------------------------------------------------------------
# Layers. Attribute names are rosinality's: they are the state-dict keys.


class PixelNorm(nn.Module):
    """Normalise each vector to unit root-mean-square over dimension 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights are scaled at run time.

    Args:
        in_dim: input features.
        out_dim: output features.
        bias_init: initial value of the bias.
        lr_mul: learning-rate multiplier (scales weight and bias at run time).
        activate: apply the fused leaky ReLU after the bias.
    """

    def __init__(
        self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.weight.shape[1], (x.shape, self.weight.shape)
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias then leaky ReLU (slope 0.2) times sqrt(2).

    Args:
        channels: number of channels (length of the bias).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """Depthwise FIR filter with fixed padding (the low-pass after a transposed conv).

    Args:
        taps: 1-D kernel taps; the 2-D kernel is their normalised outer product.
        pad: (before, after) padding on both axes.
        upsample_factor: the kernel is multiplied by its square to keep the gain after zero insertion.
    """

    def __init__(self, taps: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps, gain=upsample_factor**2), persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """FIR upsampling by ``factor`` (used on the RGB skip path).

    Args:
        taps: 1-D kernel taps; the 2-D kernel is their normalised outer product times factor**2.
        factor: integer upsampling factor.
    """

    def __init__(self, taps: Sequence[float], factor: int = 2):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps, gain=factor**2), persistent=False)
        self.factor = factor
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (optionally demodulated, optionally upsampling by 2).

    Args:
        in_channel: input channels.
        out_channel: output channels.
        kernel_size: square kernel size.
        style_dim: size of the w vector that drives the modulation.
        demodulate: normalise each output filter to unit norm per sample.
        upsample: transposed convolution with stride 2 followed by a blur.
        blur_kernel: 1-D taps of the blur used when upsampling.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``[B, out, in, k, k]`` for styles ``[B, style_dim]``."""
        batch = style.shape[0]
        s = self.modulation(style).view(batch, 1, self.in_channel, 1, 1)
        weight = self.scale * self.weight * s
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + DEMOD_EPS)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        batch, in_channel, height, width = x.shape
        assert in_channel == self.in_channel and style.shape[0] == batch, (x.shape, style.shape)
        weight = self.modulated_weight(style)
        k = self.kernel_size
        x = x.reshape(1, batch * in_channel, height, width)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, *out.shape[2:])
            return self.blur(out)
        weight = weight.reshape(batch * self.out_channel, in_channel, k, k)
        out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, *out.shape[2:])


class NoiseInjection(nn.Module):
    """Add a learned multiple of a one-channel noise image."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            return x
        return x + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4x4 constant that starts the synthesis.

    Args:
        channel: number of channels.
        size: spatial size.
    """

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated 3x3 convolution, noise, bias and leaky ReLU.

    Args:
        in_channel: input channels.
        out_channel: output channels.
        style_dim: size of w.
        upsample: upsample by 2 before the convolution output.
        blur_kernel: 1-D taps of the upsampling blur.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel, out_channel, 3, style_dim, upsample=upsample, blur_kernel=blur_kernel
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to RGB plus bias, added to the upsampled previous RGB.

    Args:
        in_channel: input channels.
        style_dim: size of w.
        upsample: the previous RGB (skip) is upsampled by 2 before the addition.
        blur_kernel: 1-D taps of the upsampling filter.
    """

    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ----------------------------------------------------------------------------------------------
# Generator.


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    more = len(names) - MAX_NAMES_IN_ERROR
    return shown + (f" ... and {more} more" if more > 0 else "")


class StyleGAN2Generator(nn.Module, PyTorchModelHubMixin):
    """StyleGAN2 generator (config-f layout) driven by W+ codes; a 2D :class:`~.generator.Generator`.

    ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``;
    ``from_pretrained(dir_or_repo)`` loads them (strictly). Rosinality checkpoints load
    with :meth:`from_rosinality`.

    Args:
        resolution: output size, a power of two from 8 to 1024.
        style_dim: size of z and w.
        n_mlp: number of layers of the mapping MLP.
        channel_base: channels at resolution r are min(channel_max, channel_base // r)
            (rosinality's table is channel_base = 16384 * channel_multiplier).
        channel_max: maximum number of channels of any layer.
        blur_kernel: 1-D taps of the upsampling FIR filter.
        lr_mlp: learning-rate multiplier of the mapping MLP (run-time weight scale).
    """

    def __init__(
        self,
        resolution: int = 1024,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_base: int = 32768,
        channel_max: int = 512,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        lr_mlp: float = 0.01,
    ):
        super().__init__()
        if not (isinstance(resolution, int) and _is_power_of_two(resolution)):
            raise ValueError(f"resolution must be a power of two, got {resolution!r}")
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
        if style_dim < 1 or n_mlp < 1:
            raise ValueError(f"style_dim and n_mlp must be >= 1, got {style_dim}, {n_mlp}")
        if channel_max < 1 or channel_base // resolution < 1:
            raise ValueError(
                f"channel_base={channel_base} / channel_max={channel_max} give layers without channels"
            )
        blur_kernel = tuple(blur_kernel)
        make_kernel(blur_kernel)  # validates the taps

        self.resolution = resolution
        self.style_dim = style_dim
        self.camera_dim = 0  # a 2D generator: no camera
        self.blur_kernel = blur_kernel
        self.log_size = int(math.log2(resolution))
        self.num_ws = 2 * self.log_size - 2
        self.num_noise_layers = 2 * (self.log_size - 2) + 1
        self.channels = {2**i: min(channel_max, channel_base // 2**i) for i in range(2, self.log_size + 1)}

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True) for _ in range(n_mlp)],
        )
        c4 = self.channels[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = c4
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(
                StyledConv(in_channel, out_channel, style_dim, upsample=True, blur_kernel=blur_kernel)
            )
            self.convs.append(StyledConv(out_channel, out_channel, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel

        self.noise_sizes = [2 ** ((i + 5) // 2) for i in range(self.num_noise_layers)]
        self.noises = nn.Module()
        for i, size in enumerate(self.noise_sizes):
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, size, size))
        self.register_buffer("latent_avg", torch.zeros(style_dim))

    # -- hub loading ---------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        """Hub loader hook: strict by default; key or shape mismatches raise CheckpointFormatError."""
        try:
            return super()._from_pretrained(strict=strict, **kwargs)
        except RuntimeError as exc:
            raise CheckpointFormatError(f"weights do not match the StyleGAN2 config: {exc}") from exc

    # -- latents -------------------------------------------------------------------------------

    def _param_like(self) -> torch.Tensor:
        return self.input.input

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Map z ``[B, style_dim]`` to w ``[B, style_dim]`` (PixelNorm + MLP)."""
        if z.ndim != 2 or z.shape[1] != self.style_dim:
            raise ValueError(f"z must be [B, {self.style_dim}], got {tuple(z.shape)}")
        ref = self._param_like()
        return self.style(z.to(device=ref.device, dtype=ref.dtype))

    @torch.no_grad()
    def mean_latent(
        self, num_samples: int = LATENT_AVG_SAMPLES, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean of ``mapping(z)`` over ``num_samples`` standard-normal z: ``[style_dim]``."""
        ref = self._param_like()
        device = generator.device if generator is not None else ref.device
        z = torch.randn(num_samples, self.style_dim, generator=generator, device=device)
        return self.mapping(z).float().mean(0).to(ref.dtype)

    def truncate(self, ws: torch.Tensor, psi: float | torch.Tensor) -> torch.Tensor:
        """``latent_avg + psi * (ws - latent_avg)``; ``psi`` a float (1.0 returns ``ws`` unchanged) or ``[B]``."""
        return truncate_latents(ws, self.latent_avg, psi)

    # -- synthesis -----------------------------------------------------------------------------

    def _broadcast_ws(self, ws: torch.Tensor) -> torch.Tensor:
        return broadcast_ws(ws, self.num_ws, self.style_dim, self._param_like())

    def _noise_inputs(
        self,
        noise_mode: str,
        noise: Sequence[torch.Tensor] | None,
        generator: torch.Generator | None,
        batch: int,
        like: torch.Tensor,
    ) -> list[torch.Tensor | None]:
        if noise_mode not in NOISE_MODES:
            raise InvalidSettingError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise is not None:
            if len(noise) != self.num_noise_layers:
                raise ValueError(f"noise must hold {self.num_noise_layers} tensors, got {len(noise)}")
            out = []
            for i, (n, size) in enumerate(zip(noise, self.noise_sizes)):
                if n.ndim != 4 or n.shape[0] not in (1, batch) or tuple(n.shape[1:]) != (1, size, size):
                    raise ValueError(
                        f"noise[{i}] must be [1 or {batch}, 1, {size}, {size}], got {tuple(n.shape)}"
                    )
                out.append(n.to(device=like.device, dtype=like.dtype))
            return out
        if noise_mode == "const":
            return [getattr(self.noises, f"noise_{i}") for i in range(self.num_noise_layers)]
        if noise_mode == "none":
            return [None] * self.num_noise_layers
        device = generator.device if generator is not None else like.device
        return [
            torch.randn(batch, 1, size, size, generator=generator, device=device).to(like.device, like.dtype)
            for size in self.noise_sizes
        ]

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "const",
        noise: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        **render_kwargs,
    ) -> torch.Tensor:
        """Render ``ws`` (``[B, num_ws, style_dim]`` or ``[B, style_dim]``) to ``[B, 3, R, R]``.

        ``noise_mode``: "const" uses the stored noise buffers, "random" draws fresh noise
        (from ``generator`` if given), "none" adds no noise. An explicit ``noise`` list
        (``num_noise_layers`` tensors ``[1 or B, 1, r, r]``) overrides the mode. A 2D generator takes
        no other rendering option (a camera, say): passing one is an error, not silently ignored.
        """
        if render_kwargs:
            raise InvalidSettingError(f"StyleGAN2 is a 2D generator and takes no {', '.join(sorted(render_kwargs))}")
        ws = self._broadcast_ws(ws)
        batch = ws.shape[0]
        noises = self._noise_inputs(noise_mode, noise, generator, batch, ws)

        x = self.input(batch)
        x = self.conv1(x, ws[:, 0], noises[0])
        skip = self.to_rgb1(x, ws[:, 1])
        for j, to_rgb in enumerate(self.to_rgbs):
            i = 2 * j + 1
            x = self.convs[2 * j](x, ws[:, i], noises[i])
            x = self.convs[2 * j + 1](x, ws[:, i + 1], noises[i + 1])
            skip = to_rgb(x, ws[:, i + 2], skip)
        assert skip.shape == (batch, 3, self.resolution, self.resolution), skip.shape
        return skip

    def forward(
        self,
        ws: torch.Tensor,
        truncation: float = 1.0,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
        noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Truncate ``ws`` towards ``latent_avg`` by ``truncation`` then render it."""
        return self.synthesis(
            self.truncate(ws, truncation), noise_mode=noise_mode, noise=noise, generator=generator
        )

    # -- rosinality interoperability -----------------------------------------------------------

    def rosinality_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in rosinality's ``g_ema`` layout, blur/upsample kernels included.

        ``latent_avg`` is not part of ``g_ema``: rosinality keeps it as ``ckpt["latent_avg"]``.
        """
        state = self.state_dict()
        state.pop("latent_avg")
        for name, buffer in self.named_buffers():
            if name not in state and name != "latent_avg":
                state[name] = buffer.detach()
        return state

    @classmethod
    def from_rosinality(
        cls, checkpoint: Mapping[str, object], use_ema: bool = True, lr_mlp: float = 0.01
    ) -> StyleGAN2Generator:
        """Build a generator from a rosinality checkpoint (already loaded, e.g. by ``torch.load``).

        Args:
            checkpoint: ``{"g_ema": sd, "g": sd, "latent_avg": t, ...}`` or a bare ``g_ema``
                state dict (which may carry a ``latent_avg`` entry).
            use_ema: take ``g_ema`` (True) or ``g`` (False) from a full checkpoint.
            lr_mlp: mapping learning-rate multiplier (not stored in checkpoints; 0.01 in rosinality).

        Resolution, style_dim, n_mlp, channel_base and channel_max are inferred from the keys
        and shapes. Loading is strict except for the kernel buffers (dropped when present and
        equal to ours, rebuilt when absent). Without ``latent_avg`` it is estimated with
        :meth:`mean_latent` (4096 samples, fixed seed) and a warning.
        """
        state, latent_avg = _split_rosinality_checkpoint(checkpoint, use_ema)
        config = _infer_rosinality_config(state)
        model = cls(**config, lr_mlp=lr_mlp)
        model._load_rosinality_state(state, config)
        if latent_avg is None:
            warnings.warn(
                f"checkpoint has no latent_avg: estimating it as the mean of mapping(z) over "
                f"{LATENT_AVG_SAMPLES} samples (seed {LATENT_AVG_SEED})",
                stacklevel=2,
            )
            latent_avg = model.mean_latent(
                LATENT_AVG_SAMPLES, generator=torch.Generator().manual_seed(LATENT_AVG_SEED)
            )
        elif latent_avg.numel() != model.style_dim:
            raise CheckpointFormatError(
                f"latent_avg has shape {tuple(latent_avg.shape)}, expected {model.style_dim} values"
            )
        with torch.no_grad():
            model.latent_avg.copy_(latent_avg.reshape(model.style_dim))
        return model

    def _load_rosinality_state(self, state: dict[str, torch.Tensor], config: dict) -> None:
        expected = self.state_dict()
        expected.pop("latent_avg")
        kernels = {
            name: b for name, b in self.named_buffers() if name not in expected and name != "latent_avg"
        }
        loaded, unexpected, problems = {}, [], []
        for name, value in state.items():
            if name in kernels:
                ours = kernels[name]
                if value.shape != ours.shape or not torch.allclose(value.float(), ours, atol=KERNEL_ATOL):
                    problems.append(f"{name} differs from the kernel of blur_kernel={self.blur_kernel}")
            elif name not in expected:
                unexpected.append(name)
            elif value.shape != expected[name].shape:
                problems.append(
                    f"{name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
                )
            else:
                loaded[name] = value
        missing = [name for name in expected if name not in state]
        if missing or unexpected or problems:
            parts = []
            if missing:
                parts.append(f"missing keys: {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_names(unexpected)}")
            if problems:
                parts.append(f"mismatches: {_names(problems)}")
            raise CheckpointFormatError(
                f"rosinality state dict does not match a StyleGAN2 generator {config}: " + "; ".join(parts)
            )
        loaded["latent_avg"] = self.latent_avg
        self.load_state_dict(loaded, strict=True)


# ----------------------------------------------------------------------------------------------
# Rosinality checkpoint parsing.


def _split_rosinality_checkpoint(
    checkpoint: Mapping[str, object], use_ema: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Return (generator state dict, latent_avg or None) from a full or bare checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"a rosinality checkpoint is a dict, got {type(checkpoint).__name__}")
    if "g_ema" in checkpoint or "g" in checkpoint:
        key = "g_ema" if use_ema else "g"
        if key not in checkpoint:
            raise CheckpointFormatError(
                f"checkpoint has no {key!r} generator (top-level keys: {_names(sorted(map(str, checkpoint)))})"
            )
        state = checkpoint[key]
        latent_avg = checkpoint.get("latent_avg") if use_ema else None
        if not isinstance(state, Mapping):
            raise CheckpointFormatError(f"checkpoint[{key!r}] is not a state dict")
        state = dict(state)
    else:
        state = dict(checkpoint)
        latent_avg = state.pop("latent_avg", None)
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointFormatError(f"state dict entries are not tensors: {_names(not_tensors)}")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointFormatError(f"latent_avg is a {type(latent_avg).__name__}, not a tensor")
    return state, latent_avg


def _require(state: Mapping[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    if name not in state:
        raise CheckpointFormatError(f"rosinality state dict is missing key {name!r}")
    value = state[name]
    if value.ndim != ndim:
        raise CheckpointFormatError(f"{name} has shape {tuple(value.shape)}, expected {ndim} dimensions")
    return value


def _infer_rosinality_config(state: Mapping[str, torch.Tensor]) -> dict:
    """Infer the constructor arguments of the generator that wrote ``state``."""
    n_mlp = 0
    while f"style.{n_mlp + 1}.weight" in state:
        n_mlp += 1
    style_dim = int(_require(state, "style.1.weight", 2).shape[1])

    rgb_indices = {
        int(k.split(".")[1]) for k in state if k.startswith("to_rgbs.") and k.split(".")[1].isdigit()
    }
    num_up = max(rgb_indices) + 1 if rgb_indices else 0
    resolution = 4 * 2**num_up
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise CheckpointFormatError(
            f"found {num_up} to_rgbs layers: resolution {resolution} is not supported"
        )

    channels = {4: int(_require(state, "conv1.conv.weight", 5).shape[1])}
    for j in range(num_up):
        channels[8 * 2**j] = int(_require(state, f"convs.{2 * j}.conv.weight", 5).shape[1])
    channel_max = max(channels.values())
    below_max = [r for r in sorted(channels) if channels[r] < channel_max]
    channel_base = channels[below_max[0]] * below_max[0] if below_max else channel_max * resolution
    if any(min(channel_max, channel_base // r) != c for r, c in channels.items()):
        raise CheckpointFormatError(
            f"channels per resolution {channels} do not follow min(channel_max, channel_base // r)"
        )
    return {
        "resolution": resolution,
        "style_dim": style_dim,
        "n_mlp": n_mlp,
        "channel_base": channel_base,
        "channel_max": channel_max,
    }
