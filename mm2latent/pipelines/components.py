"""The component registry: one entry per manifest component, naming how it loads and how it saves.

The pipelines load, save and move their networks by walking this registry (:func:`load_components`,
:func:`save_components`); nothing else lists the components by hand. Each entry says how to read a component
folder (``config.json`` + safetensors, or diffusers/transformers layouts), whether it is loaded lazily on first
use (the ControlNets and the VAE), and whether it is an engine's ("generation") or one of the optional editing
components every pipeline may carry ("editing": :data:`EDITING_COMPONENTS`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..models.diffusion_encoder import LazyComponent
from .hub import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, load_manifest, resolve_component

__all__ = ["COMPONENTS", "EDITING_COMPONENTS", "ComponentType", "load_components", "realign_", "save_components",
           "write_manifest"]

# Tensors of a loaded checkpoint may sit at any byte offset of the file; oneDNN/MKL pick other kernels
# (other rounding) for unaligned weights. 64 bytes is PyTorch's own CPU allocation alignment.
ALIGNMENT = 64


def realign_(module: nn.Module) -> nn.Module:
    """Copy every parameter and buffer that is not 64-byte aligned into a fresh, aligned allocation.

    After this a loaded network runs exactly the kernels (and so gives exactly the numbers) of the same
    network built in memory; without it, weights read from safetensors at unaligned file offsets make
    CPU matrix kernels take other code paths (differences of ~1e-7 per layer, ~1e-5 at the latent).
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
                tensor.data = tensor.data.clone()
    return module


def _diffusers_model(class_name: str) -> Callable:
    def load(folder: Path, spec: dict, dtype: torch.dtype):
        import diffusers

        # The big networks are read straight in the target dtype (peak memory: no float32 copy first).
        return diffusers.__dict__[class_name].from_pretrained(folder, use_safetensors=True, torch_dtype=dtype)
    return load


def _text_encoder(folder: Path, spec: dict, dtype: torch.dtype):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(folder, use_safetensors=True, dtype=dtype)


def _tokenizer(folder: Path, spec: dict, dtype: torch.dtype):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def _scheduler(folder: Path, spec: dict, dtype: torch.dtype):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(folder)


def _generator(folder: Path, spec: dict, dtype: torch.dtype):
    from ..models.generator import generator_class

    return generator_class(spec.get("class", "stylegan2")).from_pretrained(folder)


def _hub_mixin(module: str, class_name: str) -> Callable:
    def load(folder: Path, spec: dict, dtype: torch.dtype):
        import importlib

        return getattr(importlib.import_module(module), class_name).from_pretrained(folder)
    return load


def _clip(folder: Path, spec: dict, dtype: torch.dtype):
    from ..editing.clip import ClipGuide

    guide = ClipGuide.from_pretrained(folder)
    realign_(guide.model)
    return guide


def _save_clip(clip, folder: Path) -> None:
    clip.model.save_pretrained(folder)
    clip.tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class ComponentType:
    """How one manifest component is read and written.

    Attributes:
        load: ``load(folder, manifest_entry, dtype) -> object``.
        pipeline: "generation" (an engine's networks) or "editing" (the optional editing components).
        required: a manifest without it is refused.
        lazy: read on first use (a request that never needs it never holds it in memory).
        big: read straight in the pipeline's dtype (small networks load in float32 and are cast after).
        save: ``save(object, folder)``; default ``object.save_pretrained(folder)``.
    """

    load: Callable[[Path, dict, torch.dtype], Any]
    pipeline: str = "generation"
    required: bool = False
    lazy: bool = False
    big: bool = False
    save: Callable[[Any, Path], None] | None = None


COMPONENTS: dict[str, ComponentType] = {
    "unet": ComponentType(_diffusers_model("UNet2DConditionModel"), required=True, big=True),
    "text_encoder": ComponentType(_text_encoder, required=True, big=True),
    "tokenizer": ComponentType(_tokenizer, required=True),
    "scheduler": ComponentType(_scheduler, required=True),
    "vae": ComponentType(_diffusers_model("AutoencoderKL"), lazy=True, big=True),
    "controlnet_mask": ComponentType(_diffusers_model("ControlNetModel"), lazy=True, big=True),
    "controlnet_scribble": ComponentType(_diffusers_model("ControlNetModel"), lazy=True, big=True),
    "generator": ComponentType(_generator, required=True),
    "mapper": ComponentType(_hub_mixin("mm2latent.models.mapping", "MappingNetwork"), required=True),
    "modulator": ComponentType(_hub_mixin("mm2latent.models.mapping", "StyleModulationNetwork"), required=True),
    "inverter": ComponentType(_hub_mixin("mm2latent.editing.inversion", "PSPEncoder"), pipeline="editing"),
    "face_parser": ComponentType(_hub_mixin("mm2latent.models.networks.face_parser", "BiSeNet"), pipeline="editing"),
    "identity": ComponentType(_hub_mixin("mm2latent.models.networks.arcface", "IRSE50"), pipeline="editing"),
    "lpips": ComponentType(_hub_mixin("mm2latent.models.networks.lpips", "LPIPS"), pipeline="editing"),
    "clip": ComponentType(_clip, pipeline="editing", save=_save_clip),
    # The MM2Latent engine's networks (CLIP text tower, mask and sketch autoencoders, mapper) in one folder.
    "mm2latent_engine": ComponentType(_hub_mixin("mm2latent.models.latent_mapper", "MM2LatentEngine")),
}


#: The optional editing components of every pipeline, in manifest order: the photo encoder (pSp / e4e), the face
#: parser, the identity network, LPIPS and the CLIP guide.
EDITING_COMPONENTS = tuple(name for name, kind in COMPONENTS.items() if kind.pipeline == "editing")


def _finish(obj: Any, kind: ComponentType) -> Any:
    if isinstance(obj, nn.Module):
        realign_(obj).eval().requires_grad_(False)
    return obj


def load_components(
    name_or_path: str | os.PathLike | dict,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    pipeline: str = "generation",
    skip: tuple[str, ...] = (),
) -> tuple[dict, dict[str, Any]]:
    """Read a manifest and load its components of one pipeline.

    Args:
        name_or_path: a local folder or a Hub repository holding ``mm2latent.json``, or a manifest itself
            (``{"components": {...}}``; entries name Hub repositories, native files or absolute folders).
        revision: Hub revision of that repository.
        dtype: the dtype the big networks are read in.
        pipeline: "generation" or "editing": which components to load.
        skip: components not to load at all (e.g. ``("vae",)``).

    Returns:
        (the manifest, {name: object}); lazy components come as :class:`LazyComponent` loaders.
    """
    if isinstance(name_or_path, dict):
        manifest, base, base_repo = name_or_path, None, None
    else:
        manifest, base, base_repo = load_manifest(name_or_path, revision)
    loaded: dict[str, Any] = {}
    for name, spec in manifest["components"].items():
        kind = COMPONENTS.get(name)
        if kind is None or kind.pipeline != pipeline or name in skip:
            continue
        # Lazy parts are resolved (downloaded to disk) now, so a missing file fails at start-up, but their
        # weights are read into memory only when a request first needs them.
        folder = resolve_component(name, spec, base, base_repo)
        target = dtype if kind.big else torch.float32
        if kind.lazy:
            def load(target_dtype: torch.dtype, folder=folder, spec=spec, kind=kind) -> nn.Module:
                return _finish(kind.load(folder, spec, target_dtype), kind)

            loaded[name] = LazyComponent(load=load, config=_read_config(folder))
        else:
            loaded[name] = _finish(kind.load(folder, spec, target), kind)
    return manifest, loaded


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def save_components(parts: dict[str, Any], root: Path) -> dict[str, dict]:
    """Write each component into ``root/<name>``; returns their manifest entries."""
    entries = {}
    for name, part in parts.items():
        kind = COMPONENTS[name]
        if isinstance(part, LazyComponent):
            part = part.load(torch.float32)
        (kind.save or (lambda obj, folder: obj.save_pretrained(folder)))(part, root / name)
        entries[name] = {"path": name}
        if name == "generator":
            from ..models.generator import generator_class_name

            entries[name]["class"] = generator_class_name(part)
    return entries


def write_manifest(root: Path, components: dict[str, dict], pipeline_info: dict, engine: str = "ddgi") -> Path:
    """Write ``mm2latent.json`` naming the engine ("ddgi" or "mm2latent") and every component."""
    manifest = {"_format": MANIFEST_FORMAT, "_version": MANIFEST_VERSION, "_mm2latent_version": __version__,
                "engine": engine, "pipeline": pipeline_info, "components": components}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
