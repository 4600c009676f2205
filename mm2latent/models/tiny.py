"""Toy-size builders: the tiny presets' networks, with the real classes and structure, only narrow.

One module for every toy network the presets, tests and the offline demo build — the CLIP tokenizer with a
small vocabulary, the tiny diffusion encoder (SD-1.5's structure), the tiny StyleGAN2, the toy CLIP guide and
the toy editing networks — so that model code (e.g. :mod:`mm2latent.editing.clip`) never imports the pipelines
to get one. Builders draw from the global RNG unless they take a seed; the presets seed them.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..editing.clip import ClipGuide
from .diffusion_encoder import DiffusionEncoder
from .stylegan2 import StyleGAN2Generator

__all__ = ["build_tiny_clip", "build_tiny_diffusion_encoder", "build_tiny_editing_networks", "build_tiny_stylegan2",
           "build_tiny_tokenizer", "with_mean_latent"]

# Words of CelebA-style captions; the tiny tokenizer keeps them whole so attention maps are per word.
_CAPTION_WORDS = """
a an the she he her his is has and with of wearing smiling smile mouth open closed slightly lips big
small pointy nose eyes eye brown blue green gray black blonde red wavy straight curly long short hair
bangs receding hairline bald beard mustache goatee sideburns no makeup heavy lipstick earrings necklace
necktie hat eyeglasses glasses young old middle aged man woman person face oval chubby double chin
high cheekbones rosy cheeks pale skin arched bushy eyebrows narrow bags under attractive this pretty
""".split()


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a small vocabulary: all byte symbols plus whole caption words."""
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    for word in _CAPTION_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_diffusion_encoder() -> DiffusionEncoder:
    """The tiny diffusion encoder E, drawn from the current global RNG (the caller seeds it)."""
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    controlnets = {}
    for name in ("mask", "scribble"):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        # diffusers zero-initialises the output convs; an untrained tiny ControlNet would then do nothing.
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.3)
        controlnets[name] = controlnet
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=128,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )
    return DiffusionEncoder(unet, text_encoder, tokenizer, scheduler, controlnets, vae)


def with_mean_latent(generator: StyleGAN2Generator, seed: int) -> StyleGAN2Generator:
    """Set a StyleGAN2's w̄ to the mean of 4096 mapped z drawn from ``seed`` (what a trained checkpoint carries)."""
    if next(generator.parameters()).is_meta:  # built without memory (shape checks): there is no w̄ to estimate
        return generator
    generator.latent_avg.copy_(generator.mean_latent(4096, generator=torch.Generator().manual_seed(seed)).reshape(-1))
    return generator


def build_tiny_stylegan2(seed: int) -> StyleGAN2Generator:
    """The tiny presets' StyleGAN2 (64², 64-d W) from the current global RNG; its w̄ from ``seed``."""
    return with_mean_latent(StyleGAN2Generator(resolution=64, style_dim=64, n_mlp=2, channel_base=2048,
                                               channel_max=32), seed)


def build_tiny_clip(seed: int = 1234) -> ClipGuide:
    """A toy CLIP (random weights, the tiny preset's tokenizer) for tests and the offline demo."""
    tokenizer = build_tiny_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **special),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return ClipGuide(model, tokenizer)


def build_tiny_editing_networks(generator, seed: int = 1234) -> dict:
    """Toy inverter, face parser, identity net, LPIPS and CLIP with deterministic random weights.

    Returns a dict with the pipeline's editing component names: ``inverter``,
    ``face_parser``, ``identity``, ``lpips``, ``clip``.
    """
    from ..editing.inversion import PSPEncoder, tiny_psp_config
    from .networks import build_tiny_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inverter = PSPEncoder(**tiny_psp_config(generator.num_ws, generator.style_dim))
    parts = {"inverter": inverter, "face_parser": build_tiny_network("face_parser", seed),
             "identity": build_tiny_network("arcface", seed), "lpips": build_tiny_network("lpips", seed)}
    for module in parts.values():
        module.eval().requires_grad_(False)
    parts["clip"] = build_tiny_clip(seed)
    return parts
