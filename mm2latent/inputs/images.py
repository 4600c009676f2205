"""Images at the edges: opening image files safely, and PIL <-> tensor (models work in [-1, 1], users see uint8).

:func:`open_image_file` is the one way an image file (or its encoded bytes) is opened, in the library and in the
Space: the header is read and its size checked before a single pixel is decoded, and every failure is a typed
error (:mod:`mm2latent.errors`) whose message names the file by its base name, never by a server path.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageTooLargeError, InvalidImageError

#: The most pixels an input image may have (checked from the header before decoding).
MAX_IMAGE_PIXELS = 40_000_000


def _describe(source: str | os.PathLike | bytes, name: str | None) -> tuple[str, str]:
    """How messages name ``source``: (``'x.png'``, ``image file 'x.png'``) with its base name only, or
    (``the image data``, ``the image data``) for bytes."""
    if name is None and isinstance(source, (bytes, bytearray, memoryview)):
        return "the image data", "the image data"
    shown = repr(name or os.path.basename(os.fspath(source)))
    return shown, f"image file {shown}"


def _open_header(source: str | os.PathLike | bytes, name: str, what: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (which parses the header only) with its failures as this library's errors."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and errors above 2x its own limit) when the header is huge; that is our
            # ImageTooLargeError too, raised before any pixel is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                return Image.open(io.BytesIO(source))
            return Image.open(os.fspath(source))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow complains above its own limit; whichever limit is lower was passed.
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageTooLargeError(f"{what} is too large: more than {limit:,} pixels") from error
    except FileNotFoundError as error:
        raise InvalidImageError(f"{what} does not exist") from error
    except IsADirectoryError as error:
        raise InvalidImageError(f"{name} is a directory, not an image file") from error
    except (OSError, SyntaxError, ValueError) as error:  # includes a name too long for the file system
        raise InvalidImageError(f"cannot read {name} as an image (unknown or damaged format)") from error


def check_pixel_count(width: int, height: int, max_pixels: int, what: str) -> None:
    """:class:`InvalidImageError` for an empty image, :class:`ImageTooLargeError` above ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{what} is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is too large: {width}x{height} = {width * height:,} pixels, the limit is {max_pixels:,} pixels")


def first_frame_oriented(image: Image.Image, what: str) -> Image.Image:
    """Copy of the first frame with EXIF orientation applied; ``image`` is left as it was."""
    if getattr(image, "n_frames", 1) > 1:
        warnings.warn(f"{what} has {image.n_frames} frames (animation); only the first frame is used",
                      UserWarning, stacklevel=4)
        position = image.tell()
        image.seek(0)
        try:
            frame = image.copy()
        finally:
            image.seek(position)
    else:
        image.load()
        frame = image.copy()
    oriented = ImageOps.exif_transpose(frame)
    return frame if oriented is None else oriented


def read_image_size(source: str | os.PathLike | bytes, *, name: str | None = None,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image file (or its encoded bytes), read from the header alone.

    Nothing is decoded: this is the check to run on an upload before anything else opens it. Raises
    what :func:`open_image_file` raises for a bad header.
    """
    shown, what = _describe(source, name)
    with _open_header(source, shown, what, max_pixels) as opened:
        check_pixel_count(opened.width, opened.height, max_pixels, what)
        return opened.size


def open_image_file(source: str | os.PathLike | bytes, *, name: str | None = None,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The first frame of an image file (or its encoded bytes), EXIF-oriented and fully decoded, in its own mode.

    Args:
        source: a path, or the encoded bytes of an image.
        name: what messages call the file (default: the path's base name; "the image data" for bytes).
        max_pixels: the most pixels accepted, checked from the header before anything is decoded.

    Raises:
        ImageTooLargeError: the header claims more than ``max_pixels`` pixels.
        InvalidImageError: the file is missing, empty, not an image, or truncated or damaged.
    """
    shown, what = _describe(source, name)
    with _open_header(source, shown, what, max_pixels) as opened:
        check_pixel_count(opened.width, opened.height, max_pixels, what)
        try:
            return first_frame_oriented(opened, what)
        except (OSError, SyntaxError, ValueError) as error:
            raise InvalidImageError(f"cannot decode {what}: it is truncated or damaged") from error


def image_to_tensor(image: Image.Image, size: int | None = None):
    """RGB PIL image -> [1, 3, size, size] float32 torch tensor in [-1, 1] (Lanczos resize when ``size`` differs)."""
    import torch  # here, so that opening images does not import torch

    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (array / 127.5 - 1.0).permute(2, 0, 1)[None]


def tensor_to_pil(images) -> list[Image.Image]:
    """[B, 3, H, W] torch tensor in [-1, 1] -> RGB PIL images."""
    import torch

    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
