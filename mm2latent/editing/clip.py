"""CLIP for text-guided editing: transformers' ``CLIPModel`` with differentiable image preprocessing.

The preprocessing (resize + CLIP normalisation) is done in torch so gradients reach the latent;
``CLIPProcessor`` works on PIL/numpy and cannot be differentiated.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipGuide"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipGuide:
    """transformers' CLIP with differentiable image preprocessing.

    Args:
        model: a ``CLIPModel``.
        tokenizer: its ``CLIPTokenizer``.
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = model.config.vision_config.image_size

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipGuide:
        """Load a Hub-format CLIP folder (``config.json``, ``model.safetensors``, tokenizer files)."""
        return cls(CLIPModel.from_pretrained(folder, use_safetensors=True), CLIPTokenizer.from_pretrained(folder))

    def to(self, device=None, dtype=None) -> ClipGuide:
        self.model.to(device=device, dtype=dtype)
        return self

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        return output.pooler_output if hasattr(output, "pooler_output") else output

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding [1, E]."""
        param = next(self.model.parameters())
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        features = self._pooled(self.model.get_text_features(input_ids=tokens.input_ids.to(param.device)))
        return F.normalize(features.float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, E] of images [B, 3, H, W] in [-1, 1] (differentiable)."""
        param = next(self.model.parameters())
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[None, :, None, None]
        x = (((x + 1) / 2) - mean) / std
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x.to(param.dtype))).float(), dim=-1)
