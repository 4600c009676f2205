"""Stage 1 / stage 2 losses (METHOD.md, pSp-style): L2, LPIPS, ArcFace identity, W regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.generator import w_norm

__all__ = ["LatentLoss", "w_norm"]


def _pool(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Downsample to ``resolution`` (pSp's face_pool) when larger; leave smaller images alone."""
    if images.shape[-1] > resolution:
        return F.adaptive_avg_pool2d(images, resolution)
    return images


class LatentLoss(nn.Module):
    """L = λ0·MSE(I, I_rec) + λ1·LPIPS(I, I_rec) + λ2·(1 − cos(ArcFace(I_id), ArcFace(I))) + λ3·‖w − w̄‖.

    Args:
        weights: {"l2", "lpips", "id", "w_reg"} loss weights (0 skips a term).
        lpips: the LPIPS network (frozen), or None when its weight is 0.
        arcface: the IR-SE50 network (frozen), or None when its weight is 0.
        resolution: images are pooled to this size before LPIPS and ArcFace (pSp: 256).
    """

    def __init__(self, weights: dict, lpips: nn.Module | None, arcface: nn.Module | None, resolution: int = 256):
        super().__init__()
        self.weights = {k: float(weights[k] if isinstance(weights, dict) else getattr(weights, k))
                        for k in ("l2", "lpips", "id", "w_reg")}
        self.lpips, self.arcface, self.resolution = lpips, arcface, resolution
        for name, net in (("lpips", lpips), ("id", arcface)):
            if self.weights[name] and net is None:
                raise ValueError(f"the {name} loss has weight {self.weights[name]} but no network")

    def forward(self, images: torch.Tensor, recon_target: torch.Tensor, id_target: torch.Tensor,
                w: torch.Tensor, latent_avg: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert images.shape == recon_target.shape == id_target.shape, "generated and target images differ in shape"
        images = images.float()
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(images, recon_target.float())}
        if self.weights["lpips"]:
            terms["lpips"] = self.lpips(_pool(images, self.resolution), _pool(recon_target.float(), self.resolution)).mean()
        if self.weights["id"]:
            with torch.no_grad():
                target_embedding = self.arcface.embed(_pool(id_target.float(), self.resolution))
            embedding = self.arcface.embed(_pool(images, self.resolution))
            terms["id"] = (1 - (embedding * target_embedding).sum(dim=1)).mean()
        if self.weights["w_reg"]:
            terms["w_reg"] = w_norm(w.float(), latent_avg.float())
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {f"loss/{k}": float(v.detach()) for k, v in terms.items()} | {"loss/total": float(total.detach())}
