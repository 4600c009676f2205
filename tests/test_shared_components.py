"""Pipelines loaded through one ComponentCache hold what they have in common once (issue: the Space held
Stable Diffusion twice, once for the 2D model and once for the 3D tab)."""

from __future__ import annotations

import torch

from mm2latent import FacePipeline
from mm2latent.pipelines.components import ComponentCache
from mm2latent.ui.loading import load_pipeline
from mm2latent.ui.settings import Settings
from mm2latent.ui.three_d import load_3d_pipeline


def test_presets_with_one_encoder_share_it_through_a_cache():
    cache = ComponentCache()
    two_d = FacePipeline.from_pretrained("tiny", device="cpu", component_cache=cache)
    three_d = FacePipeline.from_pretrained("tiny-eg3d", device="cpu", component_cache=cache)
    assert three_d.encoder is two_d.encoder
    alone = FacePipeline.from_pretrained("tiny-eg3d", device="cpu")
    assert alone.encoder is not two_d.encoder
    # The shared encoder is the one the 3D preset builds itself (same seed, same draws), so its faces are the same:
    # the same weights through the same kernels give the same numbers.
    shared = three_d("She has short hair.", seed=3).latents
    assert torch.equal(shared, alone("She has short hair.", seed=3).latents)


def test_saved_pipelines_naming_the_same_files_load_them_once(tmp_path, tiny_pipe):
    folder = tiny_pipe.save_pretrained(tmp_path / "model")
    cache = ComponentCache()
    first = FacePipeline.from_pretrained(folder, device="cpu", component_cache=cache)
    second = FacePipeline.from_pretrained(folder, device="cpu", component_cache=cache)
    assert second.encoder.unet is first.encoder.unet and second.generator is first.generator
    # Lazy parts (the ControlNets) are read once too, whichever pipeline needs them first.
    assert second.encoder.controlnet("mask") is first.encoder.controlnet("mask")
    uncached = FacePipeline.from_pretrained(folder, device="cpu")
    assert uncached.encoder.unet is not first.encoder.unet


def test_the_spaces_3d_tab_shares_the_2d_models_encoder():
    settings = Settings(model_repo="tiny", model_3d_repo="auto", device="cpu", load_vae=False)
    main = load_pipeline(settings)
    three_d = load_3d_pipeline(settings, main)
    assert three_d.pipe.get().encoder is main.pipe.encoder
