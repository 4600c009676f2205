"""The engines and the built-in presets, by name.

:meth:`~mm2latent.pipelines.base.FacePipelineBase.from_pretrained` finds the class that runs an engine here from
the name a preset or manifest gives, so the base never imports its engines (as diffusers' ``DiffusionPipeline``
finds a pipeline class from ``model_index.json``'s ``"_class_name"``). A pipeline class that names an ``engine``
registers itself when its module is imported (``FacePipelineBase.__init_subclass__``); the built-in engines are
also listed by module, so that loading one imports it.
"""

from __future__ import annotations

import importlib

from ..errors import CheckpointFormatError

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ENGINE_MODULES", "PRESETS", "PRESET_ENGINES", "pipeline_class",
           "register_engine"]

#: The built-in engines: DDGI's diffusion features -> M, T (:class:`~mm2latent.pipelines.ddgi.FacePipeline`),
#: or MM2Latent's CLIP text embedding and mask / sketch autoencoder codes -> one mapper
#: (:class:`~mm2latent.pipelines.mm2latent_engine.MM2LatentPipeline`). A manifest names its engine in
#: ``"engine"``; absent means DDGI.
ENGINES = ("ddgi", "mm2latent")
DEFAULT_ENGINE = "ddgi"
#: The module that defines each built-in engine's class.
ENGINE_MODULES = {"ddgi": "mm2latent.pipelines.ddgi", "mm2latent": "mm2latent.pipelines.mm2latent_engine"}
# Built-in presets: name -> builder in presets.py. "tiny", "tiny-eg3d", "tiny-mm2latent", "tiny-eg3d-mm2latent",
# "full-random" and "full-random-mm2latent" have deterministic random (untrained) weights; "public" gathers the
# public networks (untrained M and T: use the training-free mode).
PRESETS = {"tiny": "build_tiny_components", "tiny-eg3d": "build_tiny_eg3d_components",
           "tiny-mm2latent": "build_tiny_mm2latent_pipeline_components",
           "tiny-eg3d-mm2latent": "build_tiny_eg3d_mm2latent_pipeline_components",
           "full-random": "build_full_size_components",
           "full-random-mm2latent": "build_full_size_mm2latent_pipeline_components",
           "public": "build_public_components"}
#: The engine of each preset that is not DDGI's.
PRESET_ENGINES = {"tiny-mm2latent": "mm2latent", "tiny-eg3d-mm2latent": "mm2latent", "full-random-mm2latent": "mm2latent"}

_CLASSES: dict[str, type] = {}


def register_engine(engine: str, pipeline_cls: type) -> None:
    """Make ``pipeline_cls`` the class that runs ``engine`` (what ``FacePipelineBase.__init_subclass__`` calls)."""
    _CLASSES[engine] = pipeline_cls


def pipeline_class(engine: str) -> type:
    """The pipeline class of an engine ("ddgi", "mm2latent" or a registered one), importing a built-in one's module.

    Raises:
        CheckpointFormatError: an engine nobody registered.
    """
    if engine not in _CLASSES and engine in ENGINE_MODULES:
        importlib.import_module(ENGINE_MODULES[engine])
    if engine not in _CLASSES:
        known = ", ".join(sorted(set(ENGINES) | set(_CLASSES)))
        raise CheckpointFormatError(f"unknown engine {engine!r}; known engines: {known}")
    return _CLASSES[engine]
