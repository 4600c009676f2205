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


def __getattr__(name):
    # Importing torch/diffusers takes seconds; load the heavy modules only when they are used.
    if name in {"FacePipeline", "FacePipelineOutput"}:
        from .pipelines import generation as pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mm2latent' has no attribute {name!r}")


__all__ = [
    "FacePipeline", "FacePipelineOutput", "MM2LatentError", "InputError", "EmptyPromptError", "InvalidImageError",
    "ImageTooLargeError", "EmptyMaskError", "InvalidSeedError", "InvalidStepsError", "InvalidSettingError",
    "UnsupportedConditionError", "WeightsNotFoundError", "CheckpointFormatError",
]
