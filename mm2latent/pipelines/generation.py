"""The generation API in one place: every public name of the pipelines, importable from here as before the split.

The code lives in smaller modules, each with one job:

* :mod:`.base` — :class:`FacePipelineBase`: loading, saving, the call, batching, stage 5 (truncation, G, cameras);
* :mod:`.ddgi` — :class:`FacePipeline`, the DDGI engine (stages 1-4, the denoising loop, I^d_0);
* :mod:`.mm2latent_engine` — the MM2Latent engine (imported on first use, through :mod:`.registry`);
* :mod:`.registry` — engines and presets by name; :mod:`.outputs` — what the stages return;
* :mod:`.rendering` — rendering options and the generator pass; :mod:`.sampling` — the loop's callback and
  previews; :mod:`.request` — request validation.
"""

from .base import (
    CONDITIONED_MEAN_CACHE_SIZE,
    CONDITIONED_MEAN_SAMPLES,
    CONDITIONED_MEAN_SEED,
    FacePipelineBase,
    parse_visual_inputs,
    resolve_dtype,
)
from .ddgi import FacePipeline, combine_steps
from .outputs import DiffusionDrawing, FacePipelineOutput, LatentPrediction, word_maps
from .registry import DEFAULT_ENGINE, ENGINES, PRESET_ENGINES, PRESETS, pipeline_class
from .rendering import CAMERA_OPTIONS, MAX_NEURAL_RENDERING_RESOLUTION, RenderedImages, RenderSettings
from .request import COMBINE, MAX_IMAGES, MAX_SEED, MAX_STEPS, MODES, GenerationRequest

__all__ = [
    "CAMERA_OPTIONS", "COMBINE", "CONDITIONED_MEAN_CACHE_SIZE", "CONDITIONED_MEAN_SAMPLES", "CONDITIONED_MEAN_SEED",
    "DEFAULT_ENGINE", "ENGINES", "MAX_IMAGES", "MAX_NEURAL_RENDERING_RESOLUTION", "MAX_SEED", "MAX_STEPS", "MODES",
    "PRESETS", "PRESET_ENGINES", "DiffusionDrawing", "FacePipeline", "FacePipelineBase", "FacePipelineOutput",
    "GenerationRequest", "LatentPrediction", "RenderSettings", "RenderedImages", "combine_steps",
    "parse_visual_inputs", "pipeline_class", "resolve_dtype", "word_maps",
]
