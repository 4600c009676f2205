"""Optional speed-ups for a :class:`~mm2latent.pipelines.ddgi.FacePipeline`, each one reversible.

None of these is applied by default; ``benchmarks/speed.py`` measures each one on and off and the tests
check that each gives the same output as the plain pipeline within a stated tolerance.

* :func:`enable_channels_last` / :func:`disable_channels_last`: NHWC weights for the convolutional networks.
* :func:`set_attention` ("sdpa" | "classic"): the attention kernel of every attention layer that is not
  captured. diffusers' default is already SDPA; "classic" (explicit softmax) exists to measure the gain.
  The captured cross-attention layers always compute their probabilities explicitly (T needs them).
* :func:`prompt_cache_disabled` / :func:`clear_prompt_cache`: the encoder caches CLIP embeddings per prompt
  (on by default); these switch it off to measure what it saves.
* :func:`compile_pipeline`: ``torch.compile`` on every region of the networks that does not take part in
  feature capture (see its docstring), with an undo handle.
* :func:`warmup`: one call per batch size on a mask drawn by code (:func:`synthetic_face_mask`), so that the
  first user request does not pay for lazy initialisation, kernel selection or compilation.

Already built into the library (nothing to toggle): SDPA everywhere except the captured ``attn2`` layers,
fast mode without the VAE, ControlNets and the VAE loaded on first use, features captured only at the
requested steps, per-prompt text embedding cache, batched requests (``FacePipeline.generate_batch``),
StyleGAN2 noise buffers and FIR kernels created once at construction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .ddgi import FacePipeline

__all__ = [
    "CHANNELS_LAST_PARTS",
    "COMPILE_PARTS",
    "CompileHandle",
    "channels_last_enabled",
    "clear_prompt_cache",
    "compile_pipeline",
    "disable_channels_last",
    "enable_channels_last",
    "prompt_cache_disabled",
    "set_attention",
    "synthetic_face_mask",
    "warmup",
]

#: Parts converted by :func:`enable_channels_last` by default. The generator is left out: its modulated
#: convolutions build per-sample weights on every call and fold the batch into the channels, which
#: would copy NHWC activations back to NCHW at every layer.
CHANNELS_LAST_PARTS = ("unet", "controlnets", "vae", "mapper", "modulator")
#: Parts compiled by :func:`compile_pipeline` by default (the text encoder runs once per new prompt only).
COMPILE_PARTS = ("unet", "controlnets", "mapper", "modulator", "generator")
ALL_PARTS = ("unet", "controlnets", "text_encoder", "vae", "mapper", "modulator", "generator")


def _modules(pipe: FacePipeline, parts: Iterable[str]) -> list[torch.nn.Module]:
    encoder = pipe.encoder
    found: list[torch.nn.Module] = []
    for part in parts:
        if part not in ALL_PARTS:
            raise ValueError(f"unknown part {part!r}; expected some of {ALL_PARTS}")
        if part == "controlnets":
            found.extend(encoder.controlnets.values())
        elif part in ("unet", "text_encoder", "vae"):
            module = getattr(encoder, part)
            if module is not None:
                found.append(module)
        else:
            found.append({"mapper": pipe.mapper, "modulator": pipe.modulator, "generator": pipe.generator}[part])
    return found


# ---------------------------------------------------------------------------------------------- channels_last


def enable_channels_last(pipe: FacePipeline, parts: Sequence[str] = CHANNELS_LAST_PARTS) -> FacePipeline:
    """Store the 4-D weights of ``parts`` in channels_last (NHWC) order; undo with :func:`disable_channels_last`.

    Inputs need no conversion: a convolution with NHWC weights returns NHWC activations on CPU (oneDNN)
    and CUDA (cuDNN), and diffusers' transformer blocks then flatten them to tokens without a copy.
    Outputs agree with the NCHW pipeline to float rounding (tests: 1e-4 relative in float32).
    """
    for module in _modules(pipe, parts):
        module.to(memory_format=torch.channels_last)
    return pipe


def disable_channels_last(pipe: FacePipeline, parts: Sequence[str] = ALL_PARTS) -> FacePipeline:
    """Back to the default contiguous (NCHW) weights."""
    for module in _modules(pipe, parts):
        module.to(memory_format=torch.contiguous_format)
    return pipe


def channels_last_enabled(pipe: FacePipeline) -> bool:
    """Whether the U-Net's first convolution holds NHWC weights."""
    return pipe.encoder.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- attention


def set_attention(pipe: FacePipeline, kind: str = "sdpa", parts: Sequence[str] = ("unet", "controlnets", "vae")) -> None:
    """Attention kernel of every attention layer of ``parts``: "sdpa" (diffusers' default) or "classic".

    "classic" is diffusers' ``AttnProcessor`` (explicit ``softmax(QKᵀ)V``, the pre-PyTorch-2 path); it is
    here to measure what SDPA saves. Feature capture still swaps the decoder's cross-attention layers for
    its own processor during each call and restores the kind chosen here afterwards.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    kinds = {"sdpa": AttnProcessor2_0, "classic": AttnProcessor}
    if kind not in kinds:
        raise ValueError(f"attention kind must be one of {tuple(kinds)}, got {kind!r}")
    for module in _modules(pipe, parts):
        if hasattr(module, "set_attn_processor"):
            module.set_attn_processor(kinds[kind]())


# ---------------------------------------------------------------------------------------------- prompt cache


def clear_prompt_cache(pipe: FacePipeline) -> None:
    """Forget every cached prompt embedding."""
    pipe.encoder.clear_prompt_cache()


@contextmanager
def prompt_cache_disabled(pipe: FacePipeline):
    """Within the block every prompt is CLIP-encoded again (the cache is emptied and holds nothing)."""
    encoder = pipe.encoder
    size = encoder.prompt_cache_size
    clear_prompt_cache(pipe)
    encoder.prompt_cache_size = 0
    try:
        yield pipe
    finally:
        encoder.prompt_cache_size = size
        clear_prompt_cache(pipe)


# ---------------------------------------------------------------------------------------------- torch.compile


@dataclass
class CompileHandle:
    """What :func:`compile_pipeline` changed; :meth:`undo` puts the eager methods back.

    Attributes:
        regions: names of the compiled modules/methods.
        options: the ``torch.compile`` options used.
        seconds: time spent wrapping (compilation itself happens lazily at the first calls; time those).
    """

    regions: list[str]
    options: dict
    seconds: float
    _patched: list[tuple[Any, str]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        for owner, name in reversed(self._patched):
            if name in vars(owner):
                delattr(owner, name)
        self._patched.clear()
        torch._dynamo.reset()


def _capture_sensitive(unet: torch.nn.Module) -> tuple[set[str], set[str]]:
    """U-Net module names that take part in feature capture.

    Returns (hooked, swapped): modules that get forward hooks during capture (the mid block and every
    up block), and the decoder cross-attention layers whose processor is replaced during capture.
    """
    hooked = {"mid_block"} | {f"up_blocks.{i}" for i in range(len(unet.up_blocks))}
    swapped = {name.rsplit(".processor", 1)[0] for name in unet.attn_processors
               if name.startswith("up_blocks.") and ".attn2." in name}
    return hooked, swapped


def _safe_regions(root: torch.nn.Module, hooked: set[str], swapped: set[str]) -> list[tuple[str, torch.nn.Module]]:
    """Maximal sub-modules that contain no hooked module and no swapped attention layer."""
    regions: list[tuple[str, torch.nn.Module]] = []

    def visit(name: str, module: torch.nn.Module) -> None:
        prefix = name + "." if name else ""
        inside = [n for n in hooked | swapped if n == name or n.startswith(prefix) or not name]
        container = isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict)
        has_weights = any(True for _ in module.parameters(recurse=True))
        if name and not inside and not container and has_weights:
            regions.append((name, module))
            return
        if name in swapped:
            return
        for child_name, child in module.named_children():
            visit(prefix + child_name, child)

    visit("", root)
    return regions


def compile_pipeline(
    pipe: FacePipeline,
    parts: Sequence[str] = COMPILE_PARTS,
    *,
    mode: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = False,
    backend: str = "inductor",
    recompile_limit: int = 64,
) -> CompileHandle:
    """``torch.compile`` every part of the pipeline that does not take part in feature capture.

    Feature capture installs forward hooks on the U-Net's mid and up blocks and swaps the processors of
    the decoder cross-attention layers at every call; compiling a region that contains them would
    recompile at every call. So the U-Net is compiled as its maximal capture-free sub-modules (all down
    blocks and the time embedding whole; inside the mid and up blocks every ResNet, up-sampler,
    self-attention, feed-forward and norm), while ControlNets, M, T and the generator's synthesis are
    compiled whole. Compilation happens lazily at the first call of each shape: time the first calls
    (``warmup``) to get the compile time. ``mode="reduce-overhead"`` (CUDA graphs) is accepted but not
    recommended here: captured features are outputs of many small graphs (see benchmarks/README.md).

    Raises ``torch._dynamo.config.recompile_limit`` to ``recompile_limit`` (process-wide), since one forward
    (e.g. ``ResnetBlock2D.forward``) is compiled once per distinct layer shape.

    Returns:
        A handle whose ``undo()`` restores eager execution.
    """
    import torch._dynamo

    start = time.perf_counter()
    options = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), recompile_limit))

    handle = CompileHandle(regions=[], options=options, seconds=0.0)

    def wrap(owner: Any, method: str, label: str) -> None:
        setattr(owner, method, torch.compile(getattr(owner, method), **options))
        handle._patched.append((owner, method))
        handle.regions.append(label)

    encoder = pipe.encoder
    for part in parts:
        if part == "unet":
            hooked, swapped = _capture_sensitive(encoder.unet)
            for name, module in _safe_regions(encoder.unet, hooked, swapped):
                wrap(module, "forward", f"unet.{name}")
        elif part == "controlnets":
            for name, controlnet in encoder.controlnets.items():
                wrap(controlnet, "forward", f"controlnets.{name}")
        elif part == "generator":
            wrap(pipe.generator, "synthesis", "generator.synthesis")
        else:
            for module in _modules(pipe, [part]):
                wrap(module, "forward", part)
    handle.seconds = time.perf_counter() - start
    return handle


# ---------------------------------------------------------------------------------------------- warm-up


def synthetic_face_mask(size: int = 512) -> np.ndarray:
    """A frontal face drawn with ellipses as a CelebAMask-HQ index map (uint8, size x size, ids 0..18)."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)

    def ellipse(box: tuple[float, float, float, float], class_id: int) -> None:
        draw.ellipse([round(v * size) for v in box], fill=class_id)

    draw.rectangle([round(0.1 * size), round(0.8 * size), round(0.9 * size), size], fill=18)  # cloth
    draw.rectangle([round(0.38 * size), round(0.6 * size), round(0.62 * size), round(0.85 * size)], fill=17)  # neck
    ellipse((0.2, 0.08, 0.8, 0.7), 13)  # hair
    ellipse((0.23, 0.38, 0.31, 0.56), 8)  # left ear
    ellipse((0.69, 0.38, 0.77, 0.56), 9)  # right ear
    ellipse((0.28, 0.2, 0.72, 0.78), 1)  # skin
    ellipse((0.35, 0.37, 0.46, 0.4), 6)  # left brow
    ellipse((0.54, 0.37, 0.65, 0.4), 7)  # right brow
    ellipse((0.37, 0.42, 0.45, 0.47), 4)  # left eye
    ellipse((0.55, 0.42, 0.63, 0.47), 5)  # right eye
    ellipse((0.46, 0.45, 0.54, 0.6), 2)  # nose
    ellipse((0.41, 0.64, 0.59, 0.67), 11)  # upper lip
    ellipse((0.43, 0.665, 0.57, 0.68), 10)  # mouth
    ellipse((0.41, 0.67, 0.59, 0.71), 12)  # lower lip
    return np.asarray(image, dtype=np.uint8).copy()


def warmup(pipe: FacePipeline, batch_sizes: Sequence[int] = (1,), prompt: str = "a smiling face", runs: int = 1,
           modalities: Sequence[str] | None = None) -> list[float]:
    """Run fast mode ``runs`` times per batch size on a synthetic mask; returns each call's seconds.

    The first call includes lazy initialisation (oneDNN/cuDNN kernel choice, CUDA context, torch.compile);
    its duration is the compile / warm-up cost.
    """
    modalities = list(pipe.modalities if modalities is None else modalities)
    size = pipe.encoder.image_size
    inputs: dict[str, Any] = {}
    if "mask" in modalities:
        inputs["mask"] = synthetic_face_mask(size)
    if "scribble" in modalities:
        scribble = np.zeros((size, size), np.uint8)
        scribble[size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = 255
        inputs["scribble"] = scribble
    show = pipe.show_progress
    pipe.show_progress = False
    times = []
    try:
        for batch in batch_sizes:
            for _ in range(runs):
                start = time.perf_counter()
                pipe(prompt, seed=0, num_images=batch, **inputs)
                times.append(time.perf_counter() - start)
    finally:
        pipe.show_progress = show
    return times
