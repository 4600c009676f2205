"""mm2latent: multi-modal face generation and editing by diffusion-driven GAN inversion."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointFormatError,
    EmptyMaskError,
    EmptyPromptError,
    ImageTooLargeError,
    InputError,
    InvalidImageError,
    InvalidSeedError,
    InvalidSettingError,
    InvalidStepsError,
    MM2LatentError,
    UnsupportedConditionError,
    WeightsNotFoundError,
)

# Importing torch/diffusers takes seconds; the heavy modules load only when one of these is used.
_LAZY = {
    "FacePipeline": "pipelines.ddgi", "FacePipelineOutput": "pipelines.outputs",
    "LatentPrediction": "pipelines.outputs", "GenerationRequest": "pipelines.request",
    "FaceEditPipeline": "pipelines.editing", "FacePipelineBase": "pipelines.base",
    "MM2LatentPipeline": "pipelines.mm2latent_engine", "StyleGAN2Generator": "models.stylegan2", "Generator": "models.generator",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mm2latent' has no attribute {name!r}")


__all__ = [
    *_LAZY, "MM2LatentError", "InputError", "EmptyPromptError", "InvalidImageError",
    "ImageTooLargeError", "EmptyMaskError", "InvalidSeedError", "InvalidStepsError", "InvalidSettingError",
    "UnsupportedConditionError", "WeightsNotFoundError", "CheckpointFormatError",
]
