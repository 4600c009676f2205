"""Ready-made EG3D configurations: NVIDIA's FFHQ 512² models and a tiny one for tests and demos."""

from __future__ import annotations

import torch

from ..stylegan2 import LATENT_AVG_SAMPLES
from .generator import TriPlaneGenerator
from .options import RenderingOptions

__all__ = ["TINY_EG3D_SEED", "build_tiny_eg3d", "ffhq512_config", "tiny_eg3d_config"]

TINY_EG3D_SEED = 20240617


def ffhq512_config(neural_rendering_resolution: int = 128) -> dict:
    """The architecture of ``ffhq512-128.pkl`` / ``ffhqrebalanced512-128.pkl`` (or ``-64`` with 64).

    NVIDIA's ``train.py --cfg=ffhq --gen_pose_cond=True`` defaults: 2 mapping layers, 14 W+ layers,
    3 x 32-channel planes at 256², 48 + 48 samples per ray over [2.25, 3.3], SuperresolutionHybrid8XDC
    with its fp16 clamp. Random weights in this shape serve speed and memory measurements.
    """
    return {
        "z_dim": 512, "w_dim": 512, "img_resolution": 512, "plane_resolution": 256, "plane_channels": 32,
        "mapping_layers": 2, "mapping_lr_multiplier": 0.01, "channel_base": 32768, "channel_max": 512,
        "conv_clamp": None, "decoder_hidden_features": 64,
        "neural_rendering_resolution": neural_rendering_resolution, "sr_conv_clamp": 256,
        "rendering_kwargs": RenderingOptions().to_dict(),
    }


def tiny_eg3d_config() -> dict:
    """A toy EG3D with the full structure: 64² images, 8-channel planes at 32², 16² rendering, 8 + 8 samples.

    8 W+ layers of 64; super-resolution 16 -> 32 -> 64. Renders in a few tens of milliseconds on a CPU.
    """
    rendering = RenderingOptions(
        depth_resolution=8, depth_resolution_importance=8, superresolution_module=None, image_resolution=64
    )
    return {
        "z_dim": 64, "w_dim": 64, "img_resolution": 64, "plane_resolution": 32, "plane_channels": 8,
        "mapping_layers": 2, "mapping_lr_multiplier": 0.01, "channel_base": 512, "channel_max": 32,
        "conv_clamp": None, "decoder_hidden_features": 16, "neural_rendering_resolution": 16,
        "sr_input_resolution": 16, "sr_channels": [16, 8], "sr_first_block_upsamples": True, "sr_conv_clamp": 256,
        "rendering_kwargs": rendering.to_dict(),
    }


def build_tiny_eg3d(seed: int = TINY_EG3D_SEED) -> TriPlaneGenerator:
    """The tiny EG3D with deterministic random weights (same on every machine) in evaluation mode.

    Its ``latent_avg`` is the mean of ``mapping(z)`` at the frontal camera over 4096 z drawn from ``seed``
    (an untrained network has no running mean).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = TriPlaneGenerator(**tiny_eg3d_config())
    generator.eval().requires_grad_(False)
    if next(generator.parameters()).is_meta:  # built without memory (shape checks): there is no w̄ to estimate
        return generator
    samples = torch.Generator().manual_seed(seed)
    generator.latent_avg.copy_(generator.mean_latent(LATENT_AVG_SAMPLES, generator=samples))
    return generator
