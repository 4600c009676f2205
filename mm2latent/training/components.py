"""Loading the frozen parts (E, G) and fresh trainable ones for training."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..models.mapping import MappingNetwork, StyleModulationNetwork
from ..pipelines.generation import FacePipeline
from ..pipelines.hub import DEFAULT_COMPONENTS, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION


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
        for name, cls in (("mapper", MappingNetwork), ("modulator", StyleModulationNetwork)):
            if entries[name] == {"path": name}:  # not released yet: SD-1.5 / 1024² sizes, re-initialised below
                cls().save_pretrained(tmp / name)
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


def module_config(module) -> dict:
    """The constructor arguments a PyTorchModelHubMixin module was built with."""
    config = getattr(module, "_hub_mixin_config", None)
    if config is None:
        raise ValueError(f"{type(module).__name__} does not record its config")
    return dict(config)
