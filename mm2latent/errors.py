"""Typed exceptions. Every user mistake raises a subclass of :class:`MM2LatentError`.

The UI turns these into ``gr.Error`` messages; library users can catch the base class.
"""


class MM2LatentError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(MM2LatentError, ValueError):
    """Base class of errors caused by what the user passed in."""


class EmptyPromptError(InputError):
    """The prompt is empty or whitespace and there is no mask or scribble either."""


class InvalidImageError(InputError):
    """An image cannot be read, is empty, or has a layout we cannot interpret."""


class ImageTooLargeError(InvalidImageError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""


class EmptyMaskError(InputError):
    """A mask contains no face classes (skin, eyes, nose, mouth, ...)."""


class InvalidSeedError(InputError):
    """A seed is not an integer in ``[0, 2**32 - 1]``."""


class InvalidStepsError(InputError):
    """A number of steps, or a feature-step index, is out of range."""


class InvalidSettingError(InputError):
    """Another generation setting (truncation, number of images, mode, ...) is out of range."""


class UnsupportedConditionError(InputError):
    """The model has no ControlNet for the requested visual input (or for both at once)."""


class WeightsNotFoundError(MM2LatentError, FileNotFoundError):
    """Model weights could not be found locally or downloaded from the Hub."""


class CheckpointFormatError(MM2LatentError, ValueError):
    """A checkpoint file does not have the layout its format requires."""
