"""The paper's Table 1 metrics: FID, LPIPS, MS-SSIM, ID similarity, mask accuracy / mIoU, CLIP score.

Established implementations are used where they exist: torchmetrics for FID (with any feature
network) and MS-SSIM; transformers' CLIP for the CLIP score. LPIPS, ArcFace and the face parser are
the networks of :mod:`mm2latent.models.networks`. Images are [B, 3, H, W] in [-1, 1] throughout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs.conditions import NUM_CLASSES

#: pSp computes identity on faces pooled to 256² (then crops and pools to ArcFace's 112²); Table 1 is at 256².
PAPER_RESOLUTION = 256


def to_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images at ``size``²: adaptive average pooling when shrinking by a whole factor (pSp's ``face_pool``, e.g.
    1024² -> 256² averages 4x4 blocks), bilinear with antialiasing otherwise; unchanged at that size."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if height == width and height > size and height % size == 0:
        return F.adaptive_avg_pool2d(images, size)
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def lpips_distance(lpips: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pair LPIPS distance, [B]."""
    return lpips(images, targets)


def ms_ssim(images: torch.Tensor, targets: torch.Tensor, kernel_size: int = 11, betas: tuple | None = None) -> torch.Tensor:
    """Per-pair MS-SSIM (torchmetrics), [B]. Fewer scales are used automatically for small images.

    With the standard 11-tap window, 5 scales need at least 161 pixels; below that the first scales'
    weights (``betas``) are kept and renormalised by torchmetrics' ``normalize="relu"``.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    default = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    if betas is None:
        size = min(images.shape[-2:])
        scales = 5
        while scales > 1 and size / 2 ** (scales - 1) <= kernel_size - 1:
            scales -= 1
        betas = default[:scales]
    x = (images.float().clamp(-1, 1) + 1) / 2
    y = (targets.float().clamp(-1, 1) + 1) / 2
    return multiscale_structural_similarity_index_measure(
        x, y, data_range=1.0, kernel_size=kernel_size, betas=tuple(betas), reduction="none")


def identity_similarity(arcface: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ArcFace embeddings as pSp computes it, [B]: faces larger than 256² pooled to 256²,
    rows 35:223 and columns 32:220 cropped, pooled to 112² (``arcface.embed``)."""
    def prepared(x: torch.Tensor) -> torch.Tensor:
        return to_resolution(x, PAPER_RESOLUTION) if x.shape[-1] > PAPER_RESOLUTION else x

    return (arcface.embed(prepared(images)) * arcface.embed(prepared(targets))).sum(dim=1)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """[num_classes, num_classes] counts, rows = target class, columns = predicted class."""
    assert pred.shape == target.shape, f"mask shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
    index = target.long().flatten() * num_classes + pred.long().flatten()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mask_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy and mIoU of a confusion matrix.

    mIoU averages IoU over the classes present in the target or the prediction (classes absent from
    both are skipped, as in the usual segmentation benchmarks).
    """
    confusion = confusion.double()
    correct = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - correct
    present = union > 0
    return {
        "pixel_accuracy": float(correct.sum() / confusion.sum().clamp(min=1)),
        "miou": float((correct[present] / union[present]).mean()) if present.any() else 1.0,
    }


class FIDFeatures(nn.Module):
    """Adapter giving any image embedding net the interface torchmetrics' FID expects.

    torchmetrics passes float images in [0, 1] (``normalize=True``); the wrapped net sees [-1, 1].

    Args:
        net: module mapping [B, 3, H, W] in [-1, 1] to [B, D] (or a feature map, mean-pooled).
        num_features: D.
        input_size: images are resized to this before ``net``.
    """

    def __init__(self, net: nn.Module, num_features: int, input_size: int):
        super().__init__()
        self.net, self.num_features, self.input_size = net.eval().requires_grad_(False), num_features, input_size

    def train(self, mode: bool = True) -> FIDFeatures:
        return super().train(False)  # always in eval mode (BatchNorm / dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float() * 2 - 1, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=True)
        features = self.net(x)
        return features.mean(dim=(2, 3)) if features.ndim == 4 else features


def make_fid(feature: str | nn.Module = "inception"):
    """torchmetrics ``FrechetInceptionDistance``.

    ``"inception"`` is the standard 2048-d pool3 InceptionV3 of torch-fidelity (needs ``torch-fidelity``,
    which downloads its weights itself on first use); any :class:`FIDFeatures` module gives FID in that
    feature space instead (tests, offline runs).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, str):
        if feature != "inception":
            raise ValueError(f"FID feature must be 'inception' or a module, got {feature!r}")
        return FrechetInceptionDistance(feature=2048, normalize=True)
    return FrechetInceptionDistance(feature=feature, normalize=True)


def fid_update(fid, images: torch.Tensor, real: bool) -> None:
    """Add images in [-1, 1] to one side of an FID metric."""
    fid.update(((images.float().clamp(-1, 1) + 1) / 2).cpu(), real=real)


class CLIPScorer:
    """CLIP score, 100 · max(cos(image, text), 0), with transformers' CLIP loaded through the Hub loader.

    open_clip would need the torchvision built for the installed torch, which CPU-only installs
    cannot have; transformers' ``CLIPModel`` with the same OpenAI weights gives the same embeddings.

    Args:
        source: None (the manifest's default, ``openai/clip-vit-base-patch32``, or ``MM2LATENT_CLIP_REPO``),
            a local folder, "org/name[@revision]", "tiny" (random toy CLIP for tests), or a ``ClipGuide``.
        device: where to run it.
    """

    def __init__(self, source=None, device: str | torch.device = "cpu"):
        from ..editing.clip import ClipGuide
        from ..models.tiny import build_tiny_clip
        from ..pipelines.hub import (
            DEFAULT_COMPONENTS,
            apply_env_overrides,
            parse_repo_reference,
            resolve_component,
        )

        if isinstance(source, ClipGuide):
            guide = source
        elif source == "tiny":
            guide = build_tiny_clip()
        else:
            spec = apply_env_overrides(DEFAULT_COMPONENTS["clip"])
            if source is not None and Path(str(source)).expanduser().is_dir():
                spec = {"path": str(Path(str(source)).expanduser().resolve())}
            elif source is not None:
                repo_id, revision = parse_repo_reference(str(source))
                spec = {**spec, "repo_id": repo_id, "revision": revision or "main"}
            guide = ClipGuide.from_pretrained(resolve_component("clip", spec, None, None))
        self.guide = guide.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1], one prompt each -> [B] scores in [0, 100]."""
        assert len(prompts) == images.shape[0], "one prompt per image"
        image_features = self.guide.encode_image(images)
        text_features = torch.cat([self.guide.encode_text(p) for p in prompts]).to(image_features.device)
        return 100 * (image_features * text_features).sum(-1).clamp(min=0)
