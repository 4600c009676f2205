"""The pSp objective, written once: training (stages 1, 2, the inverter, MM2Latent), inversion refinement, guided
editing and the Table 1 metrics all import it.

The terms (METHOD.md Eq. 1; pSp, Richardson et al. 2021, ``training/coach.py`` ``calc_loss``):

* ``l2``     MSE(G(w), target), averaged over pixels and channels;
* ``lpips``  LPIPS(G(w), target);
* ``id``     1 − cos(ArcFace(G(w)), ArcFace(target)) (pSp's ``IDLoss``);
* ``w_reg``  ‖w − w̄‖₂ (pSp's ``WNormLoss``, :func:`mm2latent.models.generator.w_norm`);
* ``mask``   cross-entropy of the face parser's logits on G(w) against CelebAMask-HQ class ids (not pSp's: the
  inversion refinement and the guided edit pull G(w) toward a mask with it).

Resizing, the one rule for every term (pSp's own, made explicit):

* pSp compares faces at 256²: ``pSp.forward`` passes G's 1024² output through ``face_pool =
  AdaptiveAvgPool2d((256, 256))`` and its data loader gives targets at 256². Here every pixel-aligned term (L2,
  LPIPS) compares both images at :func:`comparison_size` = min(``resolution``, both sizes), ``resolution`` = 256
  by default: faces are brought down to pSp's 256², never up (a tiny 64² preset compares at 64²; a 128² target of
  a 64² generator is pooled to 64²).
* :func:`resize_faces` brings an image to that size: unchanged when it already is; larger by adaptive average
  pooling (pSp's ``face_pool``: 1024² → 256² is the mean of each 4×4 block, 512² → 256² of each 2×2 block);
  smaller by bilinear upsampling (only the evaluation's fixed-resolution protocol ever asks for that).
* ArcFace: each face is pooled to min(``resolution``, its size) on its own (the crop is a fixed fraction of the
  face, so the two faces need not share a size), then ``arcface.embed`` crops pSp's rows 35:223 and columns
  32:220 (of 256) and pools to 112². (The edit's displayed score first brings both faces to 256², so that a face
  scores the same as a PIL image or a tensor: :func:`mm2latent.editing.methods.identity_similarity`.)
* The mask term compares at the mask's size (the parser resizes its own input, as its official inference does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models.generator import w_norm

__all__ = [
    "LOSS_RESOLUTION",
    "LOSS_TERMS",
    "LatentLoss",
    "comparison_size",
    "identity_embedding",
    "identity_similarity",
    "l2_loss",
    "lpips_loss",
    "mask_loss",
    "resize_faces",
    "w_norm",
]

#: pSp computes its losses on faces pooled to 256² (``face_pool``); so do ours and Table 1's metrics.
LOSS_RESOLUTION = 256
#: The weighted terms of :class:`LatentLoss`, in the order they are logged.
LOSS_TERMS = ("l2", "lpips", "id", "w_reg", "mask")


def resize_faces(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square faces [B, C, S, S] at ``size``²: unchanged when S == size, adaptive average pooling when larger (pSp's
    ``face_pool``; a whole factor k averages each k×k block), bilinear upsampling when smaller."""
    height, width = images.shape[-2:]
    assert height == width, f"faces are square, got {height}x{width}"
    if height == size:
        return images
    if height > size:
        return F.adaptive_avg_pool2d(images, size)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def comparison_size(*images: torch.Tensor, resolution: int = LOSS_RESOLUTION) -> int:
    """The size two images are compared at: min(``resolution``, their sizes) (pooled down, never up)."""
    return min(resolution, *(int(x.shape[-1]) for x in images))


def l2_loss(images: torch.Tensor, targets: torch.Tensor, resolution: int = LOSS_RESOLUTION) -> torch.Tensor:
    """Per-image mean squared error at :func:`comparison_size`, [B] (float32)."""
    size = comparison_size(images, targets, resolution=resolution)
    difference = resize_faces(images.float(), size) - resize_faces(targets.float(), size)
    return difference.pow(2).mean(dim=(1, 2, 3))


def lpips_loss(lpips: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               resolution: int = LOSS_RESOLUTION) -> torch.Tensor:
    """Per-image LPIPS distance at :func:`comparison_size`, [B]."""
    size = comparison_size(images, targets, resolution=resolution)
    return lpips(resize_faces(images.float(), size), resize_faces(targets.float(), size)).reshape(-1)


def identity_embedding(arcface: nn.Module, images: torch.Tensor, resolution: int = LOSS_RESOLUTION) -> torch.Tensor:
    """Unit ArcFace embeddings [B, D] (float32) of faces in [-1, 1]: pooled to min(``resolution``, S)², then pSp's
    crop and 112² pool (``arcface.embed``), on the network's device and dtype."""
    param = next(arcface.parameters())
    faces = resize_faces(images.float(), min(resolution, images.shape[-1]))
    return arcface.embed(faces.to(param.device, param.dtype)).float()


def identity_similarity(arcface: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                        resolution: int = LOSS_RESOLUTION) -> torch.Tensor:
    """Per-pair cosine of ArcFace embeddings, [B] (the identity loss is 1 minus it)."""
    return (identity_embedding(arcface, images, resolution) * identity_embedding(arcface, targets, resolution)).sum(1)


def mask_loss(face_parser: nn.Module, images: torch.Tensor, mask_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the parser's CelebAMask-HQ logits on ``images`` against class ids [B, h, w], at h (scalar)."""
    logits = face_parser.celebamask_logits(images, size=mask_ids.shape[-1])
    return F.cross_entropy(logits.float(), mask_ids.to(logits.device, torch.long))


def _weight(weights: Mapping | Any, name: str) -> float:
    """A term's weight from a dict or a config object; the mask term (not pSp's) defaults to 0."""
    if isinstance(weights, Mapping):
        return float(weights[name] if name != "mask" else weights.get(name, 0.0))
    return float(getattr(weights, name) if name != "mask" else getattr(weights, name, 0.0))


class LatentLoss(nn.Module):
    """L = λ_l2·L2 + λ_lpips·LPIPS + λ_id·(1 − cos ArcFace) + λ_w_reg·‖w − w̄‖ [+ λ_mask·CE(parser)], each averaged
    over the batch, with the module's resizing rule (images compared at min(``resolution``, sizes)).

    Args:
        weights: {"l2", "lpips", "id", "w_reg"[, "mask"]} weights (a dict or a config with those attributes);
            0 skips a term.
        lpips: the LPIPS network (frozen), or None when its weight is 0.
        arcface: the IR-SE50 network (frozen), or None when its weight is 0.
        resolution: faces are compared at most at this size (pSp: 256).
        face_parser: a BiSeNet for the mask term, or None when its weight is 0.
    """

    def __init__(self, weights: Mapping | Any, lpips: nn.Module | None = None, arcface: nn.Module | None = None,
                 resolution: int = LOSS_RESOLUTION, face_parser: nn.Module | None = None):
        super().__init__()
        self.weights = {name: _weight(weights, name) for name in LOSS_TERMS}
        self.lpips, self.arcface, self.face_parser, self.resolution = lpips, arcface, face_parser, resolution
        for name, net in (("lpips", lpips), ("id", arcface), ("mask", face_parser)):
            if self.weights[name] and net is None:
                raise ValueError(f"the {name} loss has weight {self.weights[name]} but no network")

    def forward(self, images: torch.Tensor, recon_target: torch.Tensor, id_target: torch.Tensor | None = None,
                w: torch.Tensor | None = None, latent_avg: torch.Tensor | None = None,
                mask_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted total, {"loss/<term>": value, "loss/total": value}).

        Args:
            images: G(w), [B, 3, S, S] in [-1, 1].
            recon_target: what L2 and LPIPS compare with, [B, 3, S', S'] (any size: see the module's resizing).
            id_target: what the identity term compares with (needed when its weight is not 0).
            w: the latents, [B, L, D] (for the regulariser).
            latent_avg: w̄, [D] or [L, D] (for the regulariser).
            mask_ids: [B, h, w] CelebAMask-HQ class ids G(w)'s parse should follow (for the mask term).
        """
        assert images.shape[0] == recon_target.shape[0], "one target per generated image"
        images = images.float()
        # L2 is always computed and logged (cheap; the training logs show it even at weight 0).
        terms: dict[str, torch.Tensor] = {"l2": l2_loss(images, recon_target, self.resolution).mean()}
        if self.weights["lpips"]:
            terms["lpips"] = lpips_loss(self.lpips, images, recon_target, self.resolution).mean()
        if self.weights["id"]:
            with torch.no_grad():
                target_embedding = identity_embedding(self.arcface, id_target, self.resolution)
            embedding = identity_embedding(self.arcface, images, self.resolution)
            terms["id"] = (1 - (embedding * target_embedding).sum(dim=1)).mean()
        if self.weights["w_reg"]:
            terms["w_reg"] = w_norm(w.float(), latent_avg.float())
        if self.weights["mask"]:
            terms["mask"] = mask_loss(self.face_parser, images, mask_ids)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {f"loss/{k}": float(v.detach()) for k, v in terms.items()} | {"loss/total": float(total.detach())}
