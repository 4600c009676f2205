"""What the pipelines return: the call's output and the DDGI stages' outputs (diffusers' ``pipeline_output``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..models.diffusion_encoder import EncoderFeatures
from ..models.mapping import Modulation

__all__ = ["DiffusionDrawing", "FacePipelineOutput", "LatentPrediction", "word_maps"]


@dataclass
class FacePipelineOutput:
    """What one call returns.

    Attributes:
        images: the generated faces.
        latents: their W+ latents, [B, L, style_dim] (float32, CPU).
        seeds: the seed of each image (image i of a call with seed s uses s + i).
        settings: everything needed to reproduce the call (also written into PNG metadata).
        condition_images: the visual inputs as the model saw them ("mask" colour map, "scribble").
        step_latents: with ``return_intermediates``: w_t of each feature step, [S, B, L, D].
        timesteps: the diffusion timestep of each feature step.
        attention_words: with ``return_intermediates``: the prompt's words (sub-word pieces merged).
        attention_maps: per-word cross-attention maps Ā, [B, n_words, H, W], each scaled to peak 1.
        diffusion_images: with ``return_diffusion_image``: I^d_0, what the diffusion model itself draws.
        warnings: notes for the user (e.g. the prompt was truncated to what CLIP reads).
        cameras: 3D generators: the camera label each image was rendered from, [B, 25]. The settings hold
            the camera as given (``"camera"``; default [0, 0]: frontal yaw and pitch) and the conditioning
            camera (``"conditioning_camera"``; None: the checkpoint's w̄).
        depth: 3D, with ``return_depth``: expected ray depth in world units, [B, 1, n, n] (float32, CPU;
            :func:`~mm2latent.pipelines.views.depth_to_image` shows one).
        raw_images: 3D, with ``return_raw_image``: the neural renderings before super-resolution (n x n).
        closeness: the training-free mode: per image, how close G(w) is to I^d_0 (``l2``, ``lpips``, ``miou``;
            :func:`~mm2latent.editing.closeness.measure_closeness`).
    """

    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    settings: dict
    condition_images: dict[str, Image.Image] = field(default_factory=dict)
    step_latents: torch.Tensor | None = None
    timesteps: list[int] = field(default_factory=list)
    attention_words: list[str] = field(default_factory=list)
    attention_maps: torch.Tensor | None = None
    diffusion_images: list[Image.Image] | None = None
    warnings: list[str] = field(default_factory=list)
    cameras: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    raw_images: list[Image.Image] | None = None
    closeness: list[dict] | None = None


@dataclass
class LatentPrediction:
    """Stage 4's output for a batch of B samples and S feature steps.

    Attributes:
        latents: the latent of each sample, the per-step latents combined, [B, L, D] (not truncated).
        step_latents: w_t = w^m_t ⊙ w^γ_t + w^β_t of each step, [S, B, L, D].
        w_m: M's latents w^m_t, [S, B, L, D].
        gamma: T's scales w^γ_t, [S, B, L, D].
        beta: T's shifts w^β_t, [S, B, L, D].
        attention: T's word-averaged attention Ā_t, [S, B, 1, H, W].
        timesteps: the diffusion timestep of each step.
        token_maps: with ``return_attention``: per-token cross-attention maps averaged over the steps,
            [B, 77, H, W] (float32, CPU).
        features: with ``return_features``: the encoder's features of each step.
        diffusion_images: with ``decode``: I^d_0, [B, 3, H, W] in [-1, 1].
    """

    latents: torch.Tensor
    step_latents: torch.Tensor
    w_m: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    attention: torch.Tensor
    timesteps: list[int]
    token_maps: torch.Tensor | None = None
    features: list[EncoderFeatures] | None = None
    diffusion_images: torch.Tensor | None = None

    def modulation(self, step: int = 0) -> Modulation:
        """T's modulation at one feature step."""
        return Modulation(gamma=self.gamma[step], beta=self.beta[step], attention=self.attention[step])


@dataclass
class DiffusionDrawing:
    """What the diffusion model itself draws (:meth:`~mm2latent.pipelines.ddgi.FacePipeline.draw`).

    Attributes:
        images: I^d_0, [B, 3, H, W] in [-1, 1] at the diffusion model's resolution.
        token_maps: per-token cross-attention maps of the first step, [B, 77, h, w] (when asked).
        timesteps: the timestep of the first step (whose attention maps these are).
        latents: the latents that were decoded, [B, 4, h, w].
        stopped: whether a step callback ended the sampling early (the images are then still noisy).
    """

    images: torch.Tensor
    token_maps: torch.Tensor | None
    timesteps: list[int]
    latents: torch.Tensor | None = None
    stopped: bool = False


def word_maps(token_maps: torch.Tensor, word_tokens: list[list[int]]) -> torch.Tensor:
    """Per-word maps from per-token maps: the mean over each word's tokens, scaled to peak 1.

    Args:
        token_maps: [B, T, H, W] per-token maps.
        word_tokens: the token positions of each word (shared by the B samples).

    Returns:
        [B, n_words, H, W] in [0, 1].
    """
    if not word_tokens:
        return token_maps.new_zeros(token_maps.shape[0], 0, *token_maps.shape[2:])
    maps = torch.stack([token_maps[:, positions].mean(dim=1) for positions in word_tokens], dim=1)
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)
