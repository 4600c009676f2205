"""ZeroGPU support: ``spaces.GPU`` when the ``spaces`` package is installed, a no-op otherwise.

Import this module before torch: on ZeroGPU, ``spaces`` must be imported first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

try:  # pragma: no cover - only on Hugging Face Spaces
    import spaces
except ImportError:  # the usual case off Spaces
    spaces = None

F = TypeVar("F", bound=Callable)


def gpu_task(duration: int) -> Callable[[F], F]:
    """Decorator: run the function on a ZeroGPU slice of ``duration`` seconds when on ZeroGPU."""
    if spaces is None:
        return lambda function: function
    return spaces.GPU(duration=duration)  # pragma: no cover

