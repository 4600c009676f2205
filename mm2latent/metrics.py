"""The paper's Table 1 metrics: FID, LPIPS, MS-SSIM, ID similarity, mask accuracy / mIoU, CLIP score.

Established implementations are used where they exist: torchmetrics for FID (with any feature
network) and MS-SSIM; open_clip for the CLIP score (optional). LPIPS, ArcFace and the face parser are
the networks of :mod:`mm2latent.networks`. Images are [B, 3, H, W] in [-1, 1] throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conditions import NUM_CLASSES


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
    """Cosine similarity of ArcFace embeddings (pSp's crop), [B]."""
    return (arcface.embed(images) * arcface.embed(targets)).sum(dim=1)


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
    """CLIP score, 100 · max(cos(image, text), 0), with open_clip (``pip install open_clip_torch``).

    Args:
        model_name: open_clip architecture ("ViT-B-32").
        pretrained: open_clip weights tag ("openai"), or ``hf-hub:org/name`` for Hub weights.
        device: where to run it.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai", device: str | torch.device = "cpu"):
        try:
            import open_clip
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the CLIP score needs open_clip: `pip install open_clip_torch` (it needs the "
                              "torchvision that matches your torch), or run evaluate with --no-clip") from error
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model = self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device)[None, :, None, None]
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device)[None, :, None, None]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = F.interpolate((images.float().to(self.device) + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False, antialias=True)
        image_features = F.normalize(self.model.encode_image((x - self.mean) / self.std), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
        return 100 * (image_features * text_features).sum(-1).clamp(min=0)
