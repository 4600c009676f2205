"""Alignment of the diffusion drawing I^d_0 before the photo encoder (the training-free mode).

e4e / pSp were trained on FFHQ-aligned faces. A drawing that follows a CelebAMask-HQ-layout mask usually has
its face on the FFHQ template already; a mask or sketch drawn smaller, larger or off-centre gives a drawing
whose face is not, and the encoder then answers with a poor latent. :func:`align_drawing` runs the photo
alignment (:func:`~mm2latent.editing.align.align_face`: dlib's 68 points, FFHQ's crop) on I^d_0:

* when the face already sits on the template (``AlignedFace.already_aligned``), nothing changes;
* otherwise the aligned crop is what gets inverted and refined against, and the user's mask, which the drawing
  follows, is warped by the same transform (nearest neighbour, background outside the drawing), so that the
  refinement's parser term and the closeness mIoU compare like with like;
* when dlib finds no face (an untrained or toy model draws none), the drawing is inverted as drawn, with a note:
  the Haar fallback of photo alignment is not used here, as it finds "faces" in textures a toy model draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .align import FaceTooSmallError, NoFaceError, align_face

__all__ = ["DrawingAlignment", "align_drawing", "warp_to_crop"]


@dataclass
class DrawingAlignment:
    """What the encoder inverts, and the mask in the same frame.

    Attributes:
        image: the drawing (unchanged) or its FFHQ-aligned crop, same size as the drawing.
        mask_ids: the user's mask ids in that frame (None without a mask).
        moved: True when the crop differs from the drawing.
        quad: the crop's corners in drawing pixels (FFHQ's quad), None when nothing moved.
        messages: notes for the user.
    """

    image: Image.Image
    mask_ids: np.ndarray | None
    moved: bool = False
    quad: np.ndarray | None = None
    messages: list[str] = field(default_factory=list)


def warp_to_crop(ids: np.ndarray, quad: np.ndarray, source_size: int, size: int) -> np.ndarray:
    """Class ids [H, W] of an image ``source_size`` px wide, resampled into the ``size``² crop of ``quad``.

    ``quad`` is in the source image's pixels (an :class:`~mm2latent.editing.align.AlignedFace`'s: pixel edges at
    quad + 0.5, as FFHQ samples); the ids may be at another resolution than that image and are scaled to it.
    Nearest neighbour keeps them class ids; outside the image they are background (0).
    """
    scale = ids.shape[1] / source_size
    corners = ((np.asarray(quad, np.float64) + 0.5) * scale).flatten().tolist()
    warped = Image.fromarray(ids.astype(np.uint8), "L").transform(
        (size, size), Image.Transform.QUAD, corners, Image.Resampling.NEAREST, fillcolor=0)
    return np.asarray(warped)


def align_drawing(drawing: Image.Image, mask_ids: np.ndarray | None = None) -> DrawingAlignment:
    """Put the face of I^d_0 on the FFHQ template (see the module docstring).

    Args:
        drawing: I^d_0 as an RGB image (square).
        mask_ids: the user's mask [h, w] (CelebAMask-HQ ids) in the drawing's frame, or None.

    Returns a :class:`DrawingAlignment`; its mask ids keep their own resolution.
    """
    size = drawing.width
    try:
        aligned = align_face(drawing, size=size, keep_aligned=True)
    except (NoFaceError, FaceTooSmallError):
        aligned = None
    if aligned is None or aligned.method != "dlib-68":
        return DrawingAlignment(drawing, mask_ids, messages=["no face was found in the diffusion drawing, so it was "
                                                             "inverted as drawn (not aligned)"])
    if aligned.already_aligned:
        return DrawingAlignment(drawing, mask_ids)
    warped = warp_to_crop(mask_ids, aligned.quad, size, mask_ids.shape[0]) if mask_ids is not None else None
    return DrawingAlignment(aligned.image, warped, moved=True, quad=aligned.quad,
                            messages=["the face in the diffusion drawing was off the FFHQ template, so its aligned "
                                      "crop was inverted (and the mask moved with it)"])
