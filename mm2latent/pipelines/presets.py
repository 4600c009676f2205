"""Built-in presets. ``tiny`` and ``tiny-eg3d``: every component at toy size, with deterministic random weights.

``full-random``: every component at its real size with random weights (benchmarks). ``public``: every network
the method needs from public files (SD-1.5, the scribble ControlNet, FFHQ StyleGAN2, e4e, BiSeNet, IR-SE50,
CLIP; :data:`~mm2latent.pipelines.hub.PUBLIC_COMPONENTS`), with M at the mean latent and T at identity until
trained weights are published: its faces come from the training-free mode (``mode="invert"``).


The tiny preset has the same classes and the same SD-1.5 *structure* as the real model (4 down blocks, 3 cross-attention
layers in each of up blocks 1..3, two ControlNets, a CLIP text encoder, a VAE, a StyleGAN2), only narrow.
It needs no download, runs the whole pipeline in seconds on a CPU, and is never trained: outputs are
noise-like faces at best. Tests and the offline demo use it. ``tiny-eg3d`` is the same with a toy EG3D
(3D-aware: camera control, multi-view rendering) in place of the StyleGAN2. ``full-random`` has every
component at its real size, for benchmarks.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.diffusion_encoder import DiffusionEncoder, LazyComponent
from ..models.generator import Generator
from ..models.mapping import MappingNetwork, StyleModulationNetwork
from ..models.stylegan2 import StyleGAN2Generator
from ..models.tiny import (
    build_tiny_diffusion_encoder,
    build_tiny_editing_networks,
    build_tiny_stylegan2,
    build_tiny_tokenizer,
    with_mean_latent,
)
from .components import ComponentCache
from .registry import PRESETS

TINY_SEED = 20240617

def _build_tiny_heads(encoder: DiffusionEncoder, generator) -> dict:
    """Tiny M and T sized from ``encoder`` and ``generator`` (from the current global RNG): the preset's components."""
    mapper = MappingNetwork(**mapper_config(encoder, generator, reduce_channels=32, head_channels=16))
    modulator = StyleModulationNetwork(**modulator_config(encoder, generator, hidden_channels=16, head_channels=8))
    return {"encoder": encoder, "generator": generator, "mapper": mapper, "modulator": modulator}


def _build_full_size_stylegan2(seed: int) -> StyleGAN2Generator:
    """The full-size presets' 1024² StyleGAN2 from the current global RNG; its w̄ from ``seed``."""
    return with_mean_latent(StyleGAN2Generator(), seed)


def build_tiny_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """All components of the tiny preset, initialised from ``seed`` (same weights on every machine)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_tiny_diffusion_encoder()
        generator = build_tiny_stylegan2(seed)
        return _build_tiny_heads(encoder, generator)


def build_tiny_eg3d_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """The ``tiny-eg3d`` preset: the tiny diffusion encoder, the tiny EG3D and M, T sized from it (8 W+ layers of 64).

    The encoder's weights equal the ``tiny`` preset's (same seed, same draws); the EG3D is
    :func:`~mm2latent.models.eg3d.build_tiny_eg3d` (64² images, 16² neural rendering, 8 + 8 samples per ray).
    The whole 3D path runs on a CPU in well under a second per image.
    """
    from ..models.eg3d import build_tiny_eg3d

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_tiny_diffusion_encoder()
        generator = build_tiny_eg3d(seed)  # draws from its own forked RNG
        return _build_tiny_heads(encoder, generator)


def mapper_config(encoder: DiffusionEncoder, generator: Generator, **overrides) -> dict:
    """M's size derived from the encoder's and the generator's configs."""
    config = dict(in_channels=encoder.mid_channels, in_spatial=encoder.mid_size,
                  num_ws=generator.num_ws, style_dim=generator.style_dim)
    config.update(overrides)
    return config


def modulator_config(encoder: DiffusionEncoder, generator: Generator, **overrides) -> dict:
    """T's size derived from the encoder's and the generator's configs (features at half the latent size)."""
    config = dict(block_channels=encoder.block_channels, feature_size=encoder.latent_size // 2,
                  num_ws=generator.num_ws, style_dim=generator.style_dim)
    config.update(overrides)
    return config


def build_full_size_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """Every component at its real size (SD-1.5, two ControlNets, 1024² StyleGAN2) with random weights.

    For speed and memory measurements without downloads: timings do not depend on weight values.
    The tokenizer is the tiny one (token ids are all the text encoder sees). The ControlNets and the VAE are
    built on first use (seeded, so always the same weights), as loaded models read them from disk on first
    use: a request that needs neither never holds them in memory.
    """
    vae_config = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD-1.5's
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
        )
        generator = _build_full_size_stylegan2(seed)

    def seeded(build, offset: int):
        def load(target_dtype: torch.dtype):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + offset)
                return build().to(dtype=target_dtype)
        return load

    controlnets = {name: LazyComponent(load=seeded(lambda: ControlNetModel.from_unet(unet), offset))
                   for offset, name in enumerate(("mask", "scribble"), start=1)}
    vae = LazyComponent(load=seeded(lambda: AutoencoderKL(**vae_config), 3), config=vae_config)
    encoder = DiffusionEncoder(unet, text_encoder, tokenizer, scheduler, controlnets, vae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        mapper = MappingNetwork(**mapper_config(encoder, generator))
        modulator = StyleModulationNetwork(**modulator_config(encoder, generator))
    return {"encoder": encoder, "generator": generator, "mapper": mapper, "modulator": modulator}


def public_manifest(pipeline: str = "generation") -> dict:
    """The public preset's manifest entries of one pipeline ("generation" or "editing")."""
    from .components import COMPONENTS
    from .hub import PUBLIC_COMPONENTS

    return {"components": {name: dict(spec) for name, spec in PUBLIC_COMPONENTS.items()
                           if COMPONENTS[name].pipeline == pipeline}}


def build_public_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None,
                            cache: ComponentCache | None = None) -> dict:
    """The public preset's generation parts: public files for E and G; M at the mean latent, T at identity.

    M's heads are zeroed so that w^m = w̄ (the average face) rather than random offsets: fast mode then
    shows plainly what untrained M and T give. Downloads (or reads from the Hub cache) every public file;
    with ``cache``, files another pipeline already loaded through it are shared, not read again.
    """
    from .components import load_components

    _, parts = load_components(public_manifest("generation"), dtype=dtype or torch.float32, cache=cache)
    encoder = DiffusionEncoder(
        unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"], vae=parts.get("vae"),
        controlnets={m: parts[f"controlnet_{m}"] for m in ("mask", "scribble") if f"controlnet_{m}" in parts})
    generator = parts["generator"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = MappingNetwork(**mapper_config(encoder, generator))
        modulator = StyleModulationNetwork(**modulator_config(encoder, generator))
    with torch.no_grad():
        mapper.heads.weight.zero_()
        mapper.heads.bias.zero_()
    return {"encoder": encoder, "generator": generator, "mapper": mapper, "modulator": modulator}


#: Presets that come with toy editing networks (their generator is the tiny 2D StyleGAN2 the toy inverter fits).
TINY_EDITING_PRESETS = ("tiny", "tiny-mm2latent")


def build_tiny_editing_components(generator, seed: int = 1234) -> dict:
    """The tiny presets' editing components: :func:`~mm2latent.models.tiny.build_tiny_editing_networks`."""
    return build_tiny_editing_networks(generator, seed)


#: Presets whose diffusion encoders are the same network (same seed, same draws): one copy serves them all
#: when they are loaded through one :class:`~.components.ComponentCache`.
SHARED_ENCODERS = {"tiny": "tiny", "tiny-eg3d": "tiny"}


def build_preset(name: str, dtype: torch.dtype | None = None, cache: ComponentCache | None = None) -> dict:
    """The generation components of the built-in preset ``name``; with ``cache``, parts another pipeline of the
    process already holds (the public files, the tiny presets' common encoder) are that pipeline's objects."""
    if name == "public":
        return build_public_components(dtype=dtype, cache=cache)
    parts = globals()[PRESETS[name]](dtype=dtype)
    if cache is not None and name in SHARED_ENCODERS:
        encoder = parts["encoder"]
        parts["encoder"] = cache.get_or_load(("preset-encoder", SHARED_ENCODERS[name], str(dtype)), lambda: encoder)
    return parts


def build_editing_components(preset: str, generator) -> dict:
    """The editing components a preset comes with: toy networks for :data:`TINY_EDITING_PRESETS`, the public
    files for ``"public"``, none for the others (their generators have no public photo encoder)."""
    if preset in TINY_EDITING_PRESETS:
        return build_tiny_editing_components(generator)
    if preset == "public":
        from .components import load_components

        return load_components(public_manifest("editing"), pipeline="editing")[1]
    return {}


def public_few_step():
    """The published LCM-LoRA for the public preset's fast drawing (None, with a warning, when it cannot be read)."""
    import warnings

    from ..errors import WeightsNotFoundError
    from ..models.few_step import FewStepLoRA

    try:
        return FewStepLoRA.from_pretrained()
    except WeightsNotFoundError as error:
        warnings.warn(f"the fast drawing is unavailable ({error}); the training-free mode draws with 20 DDIM steps",
                      stacklevel=3)
        return None


def build_tiny_mm2latent_pipeline_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """The ``tiny-mm2latent`` preset: the tiny StyleGAN2 and the toy MM2Latent engine (tiny CLIP towers, 32²
    autoencoders, a small mapper) with deterministic random weights; no diffusion model. Runs offline in well
    under a second per face on a CPU.

    Returns ``{"mm2latent_engine", "generator"}`` (the :class:`~.mm2latent_engine.MM2LatentPipeline` arguments).
    """
    from ..models.latent_mapper import MM2LatentEngine, build_tiny_mm2latent_components

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = build_tiny_stylegan2(seed)
    return {"mm2latent_engine": MM2LatentEngine(**build_tiny_mm2latent_components(generator)), "generator": generator}


def build_tiny_eg3d_mm2latent_pipeline_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """The ``tiny-eg3d-mm2latent`` preset: the toy MM2Latent engine sized for the tiny EG3D (8 W+ layers of 64) and
    that EG3D (the ``tiny-eg3d`` preset's): cameras, depth and multi-view rendering without a diffusion model."""
    from ..models.eg3d import build_tiny_eg3d
    from ..models.latent_mapper import MM2LatentEngine, build_tiny_mm2latent_components

    generator = build_tiny_eg3d(seed)  # draws from its own forked RNG
    return {"mm2latent_engine": MM2LatentEngine(**build_tiny_mm2latent_components(generator)), "generator": generator}


def build_full_size_mm2latent_pipeline_components(seed: int = TINY_SEED, dtype: torch.dtype | None = None) -> dict:
    """The ``full-random-mm2latent`` preset: a 1024² StyleGAN2 (the architecture of ``full-random``'s) and the MM2Latent
    engine at its real sizes (CLIP ViT-B/16, 256² autoencoders, 18 x 512 mapper heads) with random weights: for
    speed and memory measurements beside DDGI at the same generator."""
    from ..models.latent_mapper import MM2LatentEngine, build_full_size_mm2latent_components

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = _build_full_size_stylegan2(seed)
    return {"mm2latent_engine": MM2LatentEngine(**build_full_size_mm2latent_components(generator)),
            "generator": generator}
