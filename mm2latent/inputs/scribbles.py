"""Scribbles from photos as the paper draws them: PiDiNet edges + ControlNet's scribble post-processing.

:func:`scribble_from_photo` is what training data, "sketch from a photo" and the MM2Latent engine's photo
sketch call. It runs PiDiNet (``table5_pidinet.pth`` from ``lllyasviel/Annotators``, converted once to
safetensors like the other public files; ``MM2LATENT_PIDINET_REPO`` overrides it) and thins its edges as
ControlNet's scribble preprocessor does. When the weights cannot be had (offline without them in the cache),
it falls back, with one warning, to :func:`~mm2latent.inputs.conditions.edges_from_photo`: the hand-written
Sobel detector, kept only as this offline fallback.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InvalidSettingError, MM2LatentError
from ..pipelines.hub import PIDINET_SPEC
from .conditions import edges_from_photo, load_image

__all__ = ["PIDINET_SPEC", "load_scribble_detector", "scribble_from_photo"]

logger = logging.getLogger(__name__)



@functools.lru_cache(maxsize=1)
def load_scribble_detector():
    """The PiDiNet of :data:`PIDINET_SPEC` (eval mode, CPU), or None when its weights are not available here."""
    from ..models.networks.pidinet import PiDiNet
    from ..pipelines.hub import resolve_component

    try:
        folder = resolve_component("pidinet", PIDINET_SPEC, None, None)
    except MM2LatentError as error:
        warnings.warn(f"PiDiNet's weights are not available ({error}); scribbles come from the offline Sobel "
                      "fallback (edges_from_photo), which differs from the paper's.", UserWarning, stacklevel=3)
        return None
    return PiDiNet.from_pretrained(folder).eval().requires_grad_(False)


def scribble_from_photo(photo: Any, *, size: int = 512, detector=None) -> np.ndarray:
    """Scribble strokes (bool ``size`` x ``size``) of a photo, centre-cropped to a square.

    Args:
        photo: a path, PIL image or array.
        size: the side of the result.
        detector: a :class:`~mm2latent.models.networks.pidinet.PiDiNet`; default :func:`load_scribble_detector`
            (None there: the Sobel fallback).
    """
    from ..models.networks.pidinet import scribble_from_edges

    detector = detector if detector is not None else load_scribble_detector()
    if detector is None:
        return edges_from_photo(photo, size=size)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise InvalidSettingError(f"size must be an integer of at least 16 pixels, got {size!r}")
    size = int(size)
    image = ImageOps.fit(load_image(photo).convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1], dtype=np.float32) / 255.0  # ControlNet feeds BGR
    parameter = next(detector.parameters())
    with torch.no_grad():
        edges = detector(torch.from_numpy(bgr).permute(2, 0, 1)[None].to(parameter))[0, 0].float().cpu().numpy()
    return scribble_from_edges((edges * 255.0).clip(0, 255).astype(np.uint8))
