"""Loading the frozen parts (E, G) and fresh trainable ones for training."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights

from ..models.generator import generator_class
from ..models.mapping import MappingNetwork, StyleModulationNetwork
from ..pipelines.generation import FacePipeline
from ..pipelines.hub import (
    DEFAULT_COMPONENTS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    resolve_component,
)


def load_training_pipeline(source: str, components: dict | None = None, fresh: tuple[str, ...] = ()) -> FacePipeline:
    """A float32 CPU pipeline to train from.

    Args:
        source: "tiny", "sd15" (the default Hub components with freshly initialised M and T) or a
            folder / Hub repository holding an ``mm2latent.json``.
        components: with "sd15", manifest entries to replace (a spec dict) or drop (None).
        fresh: "mapper" / "modulator" to re-initialise (seeded by the caller) instead of loading.
    """
    if source == "sd15":
        tmp = Path(tempfile.mkdtemp(prefix="mm2latent-base-"))
        entries = {k: dict(v) for k, v in DEFAULT_COMPONENTS.items()}
        for name, spec in (components or {}).items():
            if spec is None:
                entries.pop(name, None)
            else:
                entries[name] = dict(spec)
        sizes = None
        for name, cls in (("mapper", MappingNetwork), ("modulator", StyleModulationNetwork)):
            if entries[name] == {"path": name}:  # not released yet: SD-1.5 sizes and G's W+, re-initialised below
                sizes = sizes or generator_latent_sizes(entries["generator"], tmp)
                cls(**sizes).save_pretrained(tmp / name)
        manifest = {"_format": MANIFEST_FORMAT, "_version": MANIFEST_VERSION, "components": entries,
                    "pipeline": {"trained": False, "source": "sd15"}}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        pipe = FacePipeline.from_pretrained(tmp, device="cpu", dtype=None)
        pipe.name = "sd15"
        fresh = tuple(set(fresh) | {"mapper", "modulator"})
    else:
        pipe = FacePipeline.from_pretrained(source, device="cpu", dtype=None)
    pipe.to("cpu", torch.float32)
    if "mapper" in fresh:
        pipe.mapper = type(pipe.mapper)(**module_config(pipe.mapper))
    if "modulator" in fresh:
        pipe.modulator = type(pipe.modulator)(**module_config(pipe.modulator))
    return pipe


def generator_latent_sizes(spec: dict, base: Path | None = None) -> dict:
    """``num_ws`` and ``style_dim`` of the generator a manifest entry names (18 x 512 for StyleGAN2 at 1024²,
    14 x 512 for EG3D), read from its config: the network is built on the meta device, no weights are read.

    Args:
        spec: the generator's manifest entry (``"class"``: "stylegan2" by default, or "eg3d").
        base: the folder relative ``"path"`` entries are resolved against.
    """
    folder = resolve_component("generator", spec, base, None)
    config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        generator = generator_class(spec.get("class", "stylegan2"))(**config)
    return {"num_ws": generator.num_ws, "style_dim": generator.style_dim}


def module_config(module) -> dict:
    """The constructor arguments a PyTorchModelHubMixin module was built with."""
    config = getattr(module, "_hub_mixin_config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} does not record its config")
    return dict(config)
