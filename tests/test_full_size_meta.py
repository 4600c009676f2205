"""Every preset and training config at full size on PyTorch's meta device: shapes only, no memory, seconds.

Each stage runs once on meta tensors (U-Net + ControlNet feature capture -> M -> T -> w -> G; the MM2Latent
engine's mapper -> G), so a shape mismatch between two full-size parts — such as M and T saved at
StyleGAN2's 18 W+ layers in front of EG3D's 14 — fails here, with no download and no weights.

Modules are built with ``accelerate.init_empty_weights`` (parameters on meta, buffers computed on the CPU
where a constructor reads them, e.g. the blur kernels) and then moved to meta whole. The ``public`` preset
reads its files from the Hub, so it is not built here; its parts have ``full-random``'s sizes (SD-1.5, a
1024² StyleGAN2), which is what this test builds.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel

from mm2latent.models.diffusion_encoder import DiffusionEncoder
from mm2latent.models.eg3d import TriPlaneGenerator
from mm2latent.models.generator import is_3d
from mm2latent.models.mapping import MappingNetwork, StyleModulationNetwork
from mm2latent.models.stylegan2 import StyleGAN2Generator
from mm2latent.pipelines import presets
from mm2latent.pipelines.generation import PRESET_ENGINES, PRESETS, FacePipeline
from mm2latent.pipelines.presets import mapper_config, modulator_config
from mm2latent.training.components import generator_latent_sizes
from mm2latent.training.config import load_config

META = torch.device("meta")
CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
DDGI_PRESETS = [p for p in PRESETS if p not in PRESET_ENGINES and p != "public"]
ENGINE_PRESETS = list(PRESET_ENGINES)


def on_meta(build):
    """``build()`` with empty weights, every parameter and buffer then on the meta device."""
    with init_empty_weights():
        built = build()
    if isinstance(built, dict):
        return {k: v.to(META) if isinstance(v, torch.nn.Module) else v for k, v in built.items()}
    return built.to(META).eval()


def meta_encoder(encoder: DiffusionEncoder) -> DiffusionEncoder:
    """The preset's encoder with its ControlNets built now (empty, on meta) instead of on first use."""
    controlnets = {m: on_meta(lambda: ControlNetModel.from_unet(encoder.unet, load_weights_from_unet=False))
                   for m in encoder.modalities}
    return DiffusionEncoder(encoder.unet, encoder.text_encoder, encoder.tokenizer, encoder.make_scheduler(), controlnets)


def run_ddgi_chain(encoder: DiffusionEncoder, generator, mapper, modulator, batch: int = 1) -> torch.Tensor:
    """One U-Net + ControlNet pass with feature capture, then M, T and G, all on meta tensors."""
    pipe = FacePipeline(encoder=encoder, generator=generator, mapper=mapper, modulator=modulator, trained=False)
    size = encoder.latent_size
    embeds = torch.zeros(batch, 77, encoder.text_encoder.config.hidden_size, device=META)
    controls = {m: torch.zeros(batch, 3, size * 8, size * 8, device=META) for m in encoder.modalities}
    noise = torch.zeros(batch, encoder.unet.config.in_channels, size, size, device=META)
    timestep = encoder.make_scheduler().config.num_train_timesteps - 1  # fast mode's t = T
    features, _ = encoder.extract(noise, torch.tensor(timestep), embeds, controls)
    w, w_m, _ = pipe.latents_from_features(features, torch.ones(batch, 77, dtype=torch.bool, device=META))
    assert w.shape == w_m.shape == (batch, generator.num_ws, generator.style_dim)
    return synthesize(generator, w)


def synthesize(generator, ws: torch.Tensor) -> torch.Tensor:
    """G on meta latents: the image of a 2D generator; an EG3D's tri-planes (its whole backbone: the part that
    reads W+). Ray sampling draws from a seeded torch.Generator, which the meta device has not."""
    if is_3d(generator):
        planes = generator.synthesize_planes(ws)
        assert planes.shape[0] == ws.shape[0] and planes.device == META
        return planes
    image = generator.synthesis(ws)
    assert image.shape[:2] == (ws.shape[0], 3) and image.device == META
    return image


@pytest.mark.parametrize("preset", DDGI_PRESETS)
def test_ddgi_presets_run_every_stage_at_full_size(preset):
    parts = on_meta(getattr(presets, PRESETS[preset]))
    image = run_ddgi_chain(meta_encoder(parts["encoder"]), parts["generator"], parts["mapper"], parts["modulator"])
    if preset == "full-random":
        assert image.shape == (1, 3, 1024, 1024)


@pytest.mark.parametrize("preset", ENGINE_PRESETS)
def test_engine_presets_map_to_their_generator_at_full_size(preset):
    parts = on_meta(getattr(presets, PRESETS[preset]))
    engine, generator = parts["mm2latent_engine"], parts["generator"]
    size = engine.mask_autoencoder.image_size
    sketch = torch.zeros(1, size, size, device=META)
    _, sketch_code = engine.codes(sketch=sketch)  # (mask ids are range-checked by value: not on meta)
    mask_code = torch.zeros(1, engine.mask_autoencoder.encoder.to_code.out_features, device=META)
    ws = engine.mapper(generator.latent_avg, mask=mask_code, sketch=sketch_code)
    assert ws.shape == (1, generator.num_ws, generator.style_dim)
    synthesize(generator, ws)


@pytest.fixture(scope="module")
def full_size_encoder() -> DiffusionEncoder:
    """SD-1.5's U-Net and text encoder with both ControlNets, empty, on meta (built once)."""
    return meta_encoder(on_meta(presets.build_full_size_components)["encoder"])


GENERATORS = {"stylegan2": (StyleGAN2Generator, {}), "eg3d": (TriPlaneGenerator, {})}


def _generator_folder(tmp_path: Path, kind: str) -> dict:
    """A manifest entry for a full-size generator folder holding only its config (no weights are read)."""
    cls, config = GENERATORS[kind]
    with init_empty_weights():
        generator = cls(**config)
    folder = tmp_path / f"generator-{kind}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(generator._hub_mixin_config))
    return {"path": str(folder), "class": kind}


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_training_configs_size_m_and_t_from_the_generator(config_path, kind, tmp_path, full_size_encoder):
    """What ``load_training_pipeline`` builds for each config's stage, with a 2D and a 3D generator."""
    config = load_config(config_path)
    spec = _generator_folder(tmp_path, kind)
    sizes = generator_latent_sizes(spec)
    cls = GENERATORS[kind][0]
    generator = on_meta(lambda: cls(**GENERATORS[kind][1]))
    assert sizes == {"num_ws": generator.num_ws, "style_dim": generator.style_dim}
    if config.stage not in (1, 2):
        return  # stage 0 trains a ControlNet, the inverter and MM2Latent stages size their nets from G themselves
    encoder = full_size_encoder
    mapper = on_meta(lambda: MappingNetwork(**sizes))
    modulator = on_meta(lambda: StyleModulationNetwork(**sizes))
    assert mapper_config(encoder, generator) == {**mapper_config(encoder, generator), **sizes}
    assert modulator_config(encoder, generator)["num_ws"] == sizes["num_ws"]
    run_ddgi_chain(encoder, generator, mapper, modulator)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_photo_inverter_and_loss_networks_fit_the_generator_at_full_size(kind):
    """The photo encoder (pSp / e4e at IR-50, 256² faces) sized from G, and the loss networks on G's image size."""
    from mm2latent.editing.inversion import PSPEncoder
    from mm2latent.models.networks import IRSE50, LPIPS, BiSeNet

    generator = on_meta(lambda: GENERATORS[kind][0](**GENERATORS[kind][1]))
    for architecture in ("psp", "e4e"):
        inverter = on_meta(partial(PSPEncoder, num_ws=generator.num_ws, style_dim=generator.style_dim,
                                   architecture=architecture))
        ws = inverter(torch.zeros(1, 3, 256, 256, device=META), generator.latent_avg)
        assert ws.shape == (1, generator.num_ws, generator.style_dim)
    synthesize(generator, ws)
    side = generator.resolution
    image = torch.zeros(1, 3, side, side, device=META)
    assert on_meta(LPIPS)(image, image).shape == (1,)
    assert on_meta(IRSE50)(torch.zeros(1, 3, 112, 112, device=META)).shape == (1, 512)
    assert on_meta(BiSeNet)(torch.zeros(1, 3, 512, 512, device=META)).shape == (1, 19, 512, 512)
