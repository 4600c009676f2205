"""The two trained networks: the mapping network M and the attention-based style modulation network T.

M maps the U-Net mid-block features h_t to w^m (added to StyleGAN2's mean latent, as pSp does).
T (AbSMNet) turns the decoder features f_t and cross-attention a_t into a per-layer scale w^γ and shift
w^β, and the latent is w = w^m ⊙ w^γ + w^β. See METHOD.md for the equations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .diffusion_encoder import EncoderFeatures, resize_features


class Map2StyleHeads(nn.Module):
    """``num_ws`` pSp GradualStyleBlocks, evaluated together as grouped convolutions.

    Head l is: (3x3 stride-2 conv + LeakyReLU) repeated log2(spatial) times down to 1x1, then an
    equalized linear layer to ``style_dim``. The first conv of every head reads the same input, so the
    heads' first convs are one convolution with ``num_ws * head_channels`` outputs; the later convs are
    grouped, one group per head.

    Args:
        in_channels: channels of the input map.
        head_channels: channels inside each head.
        num_ws: number of heads (W+ layers).
        style_dim: output size of each head.
        spatial: input height and width (a power of two).
    """

    def __init__(self, in_channels: int, head_channels: int, num_ws: int, style_dim: int, spatial: int):
        super().__init__()
        num_down = int(math.log2(spatial))
        if 2**num_down != spatial or num_down < 1:
            raise ValueError(f"spatial must be a power of two >= 2, got {spatial}")
        self.spatial, self.num_ws, self.head_channels = spatial, num_ws, head_channels
        width = num_ws * head_channels
        convs = [nn.Conv2d(in_channels, width, 3, stride=2, padding=1)]
        convs += [nn.Conv2d(width, width, 3, stride=2, padding=1, groups=num_ws) for _ in range(num_down - 1)]
        self.convs = nn.ModuleList(convs)
        self.weight = nn.Parameter(torch.randn(num_ws, style_dim, head_channels))
        self.bias = nn.Parameter(torch.zeros(num_ws, style_dim))
        self.scale = 1 / math.sqrt(head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (self.spatial, self.spatial), f"expected {self.spatial}² input, got {tuple(x.shape)}"
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.01)
        x = x.view(x.shape[0], self.num_ws, self.head_channels)
        return torch.einsum("blc,loc->blo", x, self.weight * self.scale) + self.bias


class MappingNetwork(nn.Module, PyTorchModelHubMixin):
    """M: U-Net mid-block features h_t -> w^m in W+ (offset from the generator's mean latent).

    Args:
        in_channels: channels of h_t (1280 for SD-1.5).
        in_spatial: height/width of h_t (8 for SD-1.5 at 512²).
        num_ws: W+ layers of the generator (18 at 1024²).
        style_dim: latent size of the generator (512).
        reduce_channels: channels of the shared first conv that shrinks h_t before the heads
            (0 disables it and the heads read h_t directly).
        head_channels: channels inside each map2style head.
    """

    def __init__(
        self,
        in_channels: int = 1280,
        in_spatial: int = 8,
        num_ws: int = 18,
        style_dim: int = 512,
        reduce_channels: int = 512,
        head_channels: int = 256,
    ):
        super().__init__()
        self.num_ws, self.style_dim = num_ws, style_dim
        if reduce_channels:
            self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduce_channels, 3, padding=1), nn.LeakyReLU(0.01))
        else:
            self.reduce = nn.Identity()
        self.heads = Map2StyleHeads(reduce_channels or in_channels, head_channels, num_ws, style_dim, in_spatial)

    def forward(self, h: torch.Tensor, latent_avg: torch.Tensor) -> torch.Tensor:
        """h: [B, C, S, S]; latent_avg: [style_dim] -> w^m: [B, num_ws, style_dim]."""
        return self.heads(self.reduce(h)) + latent_avg.to(h.dtype)


@dataclass
class Modulation:
    """Output of T: w = w^m ⊙ gamma + beta."""

    gamma: torch.Tensor  # [B, L, D]
    beta: torch.Tensor  # [B, L, D]
    attention: torch.Tensor  # Ā, [B, 1, H, W]


def _conv_stack(in_channels: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.2),
    )


def word_attention_maps(attn_probs: list[torch.Tensor], size: int) -> torch.Tensor:
    """Cross-attention probabilities of all layers, resized to size², max-pooled over layers: [B, T, size, size]."""
    maps = [resize_features(p.float(), size) for p in attn_probs]
    return torch.stack(maps).amax(dim=0)


class StyleModulationNetwork(nn.Module, PyTorchModelHubMixin):
    """T (AbSMNet): decoder features and cross-attention -> per-layer scale w^γ and shift w^β.

    Args:
        block_channels: output channels of the U-Net decoder blocks, in order
            ((1280, 1280, 640, 320) for SD-1.5).
        feature_size: common height/width H = W the block features are resized to (32).
        num_ws: W+ layers of the generator.
        style_dim: latent size of the generator.
        hidden_channels: channels of the scale/shift nets.
        head_channels: channels inside each map2style head.
        use_attention_outputs: gate F with the attention outputs A (F̂ = F ⊙ A); False is Table 2's
            "w/o A" ablation (F̂ = F).
        use_attention_maps: gate F̄ with the word attention maps Ā (F̄̂ = F̄ ⊙ Ā); False is Table 2's
            "w/o Ā" ablation (F̄̂ = F̄).
    """

    def __init__(
        self,
        block_channels: tuple[int, ...] | list[int] = (1280, 1280, 640, 320),
        feature_size: int = 32,
        num_ws: int = 18,
        style_dim: int = 512,
        hidden_channels: int = 256,
        head_channels: int = 128,
        use_attention_outputs: bool = True,
        use_attention_maps: bool = True,
    ):
        super().__init__()
        self.use_attention_outputs, self.use_attention_maps = use_attention_outputs, use_attention_maps
        self.block_channels = list(block_channels)
        self.feature_size = feature_size
        total = sum(self.block_channels)
        self.scale_local = _conv_stack(total, hidden_channels)
        self.scale_global = _conv_stack(1, hidden_channels)
        self.shift_local = _conv_stack(total, hidden_channels)
        self.shift_global = _conv_stack(1, hidden_channels)
        # Mixing weights between the local (F̂) and global (F̄̂) branches.
        self.alpha_gamma = nn.Parameter(torch.tensor(0.5))
        self.alpha_beta = nn.Parameter(torch.tensor(0.5))
        self.gamma_heads = Map2StyleHeads(hidden_channels, head_channels, num_ws, style_dim, feature_size)
        self.beta_heads = Map2StyleHeads(hidden_channels, head_channels, num_ws, style_dim, feature_size)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make T the identity modulation: w^γ = 1, w^β = 0 for any input."""
        for heads, value in ((self.gamma_heads, 1.0), (self.beta_heads, 0.0)):
            heads.weight.zero_()
            heads.bias.fill_(value)

    def attention_gates(self, features: EncoderFeatures) -> torch.Tensor:
        """A: per block, the max over its cross-attention outputs (ones for blocks without any)."""
        size = self.feature_size
        gates = []
        for f, outs in zip(features.f, features.attn_out):
            if outs:
                gates.append(torch.stack([resize_features(a, size) for a in outs]).amax(dim=0))
            else:
                gates.append(torch.ones(f.shape[0], f.shape[1], size, size, device=f.device, dtype=f.dtype))
        return torch.cat(gates, dim=1)

    def forward(self, features: EncoderFeatures, word_mask: torch.Tensor) -> Modulation:
        """features: one U-Net pass; word_mask: [B, T] bool (True = word token) -> Modulation."""
        size = self.feature_size
        assert [f.shape[1] for f in features.f] == self.block_channels, "decoder channels differ from config"
        feats = [resize_features(f, size) for f in features.f]
        full = torch.cat(feats, dim=1)  # F
        gated = full * self.attention_gates(features) if self.use_attention_outputs else full  # F̂ = F ⊙ A
        mean_map = torch.stack([f.mean(dim=1, keepdim=True) for f in feats]).mean(dim=0)  # F̄

        word_maps = word_attention_maps(features.attn_probs, size)  # [B, T, H, W]
        mask = word_mask.to(word_maps.dtype)[:, :, None, None]
        count = mask.sum(dim=1, keepdim=True)
        # A prompt without words (text-free generation) leaves the global branch ungated.
        attention = torch.where(count > 0, (word_maps * mask).sum(dim=1, keepdim=True) / count.clamp(min=1), 1.0)
        global_in = mean_map * attention.to(mean_map.dtype) if self.use_attention_maps else mean_map  # F̄̂ = F̄ ⊙ Ā

        gamma_map = self.alpha_gamma * self.scale_local(gated) + (1 - self.alpha_gamma) * self.scale_global(global_in)
        beta_map = self.alpha_beta * self.shift_local(gated) + (1 - self.alpha_beta) * self.shift_global(global_in)
        return Modulation(gamma=self.gamma_heads(gamma_map), beta=self.beta_heads(beta_map), attention=attention)
