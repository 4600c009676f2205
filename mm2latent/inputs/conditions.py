"""Visual conditions: loading images, semantic face masks and scribbles.

Masks use the 19 CelebAMask-HQ classes (ids and colours in :data:`CELEBAMASK_CLASSES` and
:data:`CELEBAMASK_PALETTE`). A mask may be given as an index map (mode ``L``/``P``, 16-bit, or a
2-D integer array) or as a colour rendering (RGB/RGBA, nearest palette colour per pixel).
Scribbles are white strokes on black inside the model; black-on-white input is inverted.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import EmptyMaskError, InvalidImageError, InvalidSettingError
from .images import (
    MAX_IMAGE_PIXELS,
    check_pixel_count,
    first_frame_oriented,
    open_image_file,
    read_image_size,
)

__all__ = [
    "CELEBAMASK_CLASSES",
    "CELEBAMASK_PALETTE",
    "FACE_CLASS_IDS",
    "check_face",
    "has_face",
    "FACE_PARSER_TO_CELEBAMASK",
    "MAX_IMAGE_PIXELS",
    "load_image",
    "read_image_size",
    "parse_mask",
    "mask_to_color",
    "mask_to_palette_image",
    "parse_scribble",
    "scribble_is_empty",
    "scribble_to_image",
    "edges_from_photo",
]

CELEBAMASK_CLASSES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip

CELEBAMASK_PALETTE: np.ndarray = np.array(
    [
        [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255],
        [204, 0, 204], [0, 255, 255], [255, 204, 204], [102, 51, 0], [255, 0, 0],
        [102, 204, 0], [255, 255, 0], [0, 0, 153], [0, 0, 204], [255, 51, 153],
        [0, 204, 204], [0, 51, 0], [255, 153, 51], [0, 204, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip
CELEBAMASK_PALETTE.setflags(write=False)

NUM_CLASSES = len(CELEBAMASK_CLASSES)
MAX_CLASS_ID = NUM_CLASSES - 1

# Glasses (eye_g) alone, hair, hat, neck or cloth do not make a face.
_FACE_CLASS_NAMES = (
    "skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip",
)  # fmt: skip
FACE_CLASS_IDS: frozenset[int] = frozenset(CELEBAMASK_CLASSES.index(name) for name in _FACE_CLASS_NAMES)

# Label order of the BiSeNet face parser (zllrunning/face-parsing.PyTorch). Verified in that repo:
# face_dataset.py (commit 814d854) builds its training masks with
#   atts = ['skin', 'l_brow', 'r_brow', 'l_eye', 'r_eye', 'eye_g', 'l_ear', 'r_ear', 'ear_r',
#           'nose', 'mouth', 'u_lip', 'l_lip', 'neck', 'neck_l', 'cloth', 'hair', 'hat']
#   for l, att in enumerate(atts, 1): mask[sep_mask == 225] = l
# so 0 is background and the names above take ids 1..18; test.py uses n_classes = 19.
FACE_PARSER_CLASSES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip

#: ``celebamask_ids = FACE_PARSER_TO_CELEBAMASK[face_parser_ids]``.
FACE_PARSER_TO_CELEBAMASK: np.ndarray = np.array(
    [CELEBAMASK_CLASSES.index(name) for name in FACE_PARSER_CLASSES], dtype=np.uint8
)
FACE_PARSER_TO_CELEBAMASK.setflags(write=False)

_OUTPUT_MODES = ("L", "P", "RGB", "RGBA")
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MASK_SOURCE_ORDERS = ("celebamask", "face_parser")

# Colour-map reading (see _nearest_palette_ids_locally); distances are Euclidean in RGB units.
_CORE_COLOUR_DISTANCE = 40.0
_EXACT_COLOUR_DISTANCE = 3.0
_NEIGHBOURHOOD_RADIUS = 3
# Colour maps larger than this (a side, in pixels) are read on a downscaled copy (see _colour_to_ids).
_MAX_SNAPPING_SIDE = 1024


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(image: Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``image`` (PIL image, numpy array or path) as a new PIL image.

    The result's mode is one of ``"L"``, ``"P"``, ``"RGB"``, ``"RGBA"``: ``1`` becomes ``L``;
    16/32-bit gray becomes ``L`` (values kept when they all fit in 0..255, so small label maps
    survive, otherwise scaled from the 16-bit range); float gray in [0, 1] is scaled to 0..255;
    ``LA``/``PA``/``La``/``RGBa`` become ``RGBA``; CMYK, YCbCr, LAB and other colour modes become
    ``RGB``. EXIF orientation is applied. Only the first frame of an animation is used (with a
    warning). The caller's object is never modified.

    Raises :class:`ImageTooLargeError` when the image has more than ``max_pixels`` pixels (for
    files this is checked from the header, before decoding) and :class:`InvalidImageError` when
    it cannot be read or is empty.
    """
    return _normalise_mode(_open_image(image, max_pixels=max_pixels))


def _open_image(image: Any, *, max_pixels: int) -> Image.Image:
    """Return a new, fully loaded PIL image (first frame, EXIF-oriented) in any mode."""
    if isinstance(image, (str, os.PathLike)):
        return open_image_file(image, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        if image.ndim < 2:
            raise InvalidImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        check_pixel_count(image.shape[1], image.shape[0], max_pixels, "the array")
        return _array_to_image(image)
    if isinstance(image, Image.Image):
        check_pixel_count(image.width, image.height, max_pixels, "the image")
        return first_frame_oriented(image, "the image")
    raise InvalidImageError(
        f"expected an image (PIL image, numpy array or file path), got {type(image).__name__}"
    )


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError("the image array contains NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise InvalidImageError(
                f"a float image array must hold values in [0, 1], got {array.min():g}..{array.max():g}"
            )
        array = np.rint(array * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise InvalidImageError(f"an integer image array must hold values in 0..65535, got {low}..{high}")
        if high <= 255:
            array = array.astype(np.uint8)
        elif array.ndim == 2:
            array = array.astype(np.uint16)  # becomes "I;16"; _normalise_mode decides how to scale
        else:
            array = _scale_16_to_8(array)
    else:
        raise InvalidImageError(f"unsupported image array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def _normalise_mode(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _OUTPUT_MODES:
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 255:
            return Image.fromarray(values.astype(np.uint8))
        return Image.fromarray(_scale_16_to_8(values))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))
    if mode in ("LA", "La", "PA", "RGBa"):
        return image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise InvalidImageError(f"unsupported image mode {mode!r}") from error


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def parse_mask(
    mask: Any,
    *,
    size: int | tuple[int, int] | None = None,
    source_order: str = "celebamask",
    require_face: bool = True,
) -> np.ndarray:
    """Turn a mask into a uint8 HxW map of CelebAMask-HQ class ids (0..18).

    - Gray (``L``, 16-bit, 2-D integer array): values are class ids; values above 18 are an error.
    - ``P``: indices are class ids when they all are <= 18 and the palette is not a quantised
      CelebAMask colour rendering; otherwise the palette colours are read like an RGB image.
    - RGB/RGBA: nearest palette colour per pixel; pixels on fringes between regions choose only
      among the classes found nearby, so JPEG noise and anti-aliased brush edges do not create a
      third class. Fully transparent pixels are background; every pixel gets a valid id.

    ``source_order="face_parser"`` remaps index values from the BiSeNet face-parser order
    (:data:`FACE_PARSER_TO_CELEBAMASK`); colour renderings always use the CelebAMask palette.
    ``size`` (int or ``(width, height)``) resizes the id map with nearest neighbour.
    With ``require_face`` an :class:`EmptyMaskError` is raised when no face class is present.
    """
    if source_order not in _MASK_SOURCE_ORDERS:
        raise InvalidSettingError(
            f"source_order must be one of {', '.join(_MASK_SOURCE_ORDERS)}, got {source_order!r}"
        )
    target_size = _parse_size(size)
    if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.dtype == np.bool_:
        raise InvalidImageError("a boolean array is not a mask: pass class ids (0..18) or a colour rendering")
    image = _open_image(mask, max_pixels=MAX_IMAGE_PIXELS)

    if image.mode in _WIDE_INTEGER_MODES:
        ids = _checked_ids(np.asarray(image), source_order)  # keep raw values: no 16->8 bit scaling
    else:
        image = _normalise_mode(image)
        if image.mode == "L":
            ids = _checked_ids(np.asarray(image), source_order)
        elif image.mode == "P" and _palette_indices_are_ids(image):
            ids = _checked_ids(np.asarray(image), source_order)
        else:
            ids = _colour_to_ids(image, max(_MAX_SNAPPING_SIDE, *(target_size or (0,))))

    output_size = target_size or image.size
    if output_size != (ids.shape[1], ids.shape[0]):
        ids = np.asarray(Image.fromarray(ids).resize(output_size, Image.Resampling.NEAREST))
    if require_face:
        check_face(ids)
    return np.ascontiguousarray(ids, dtype=np.uint8)


def has_face(ids: np.ndarray) -> bool:
    """Whether a class-id map contains any face class (skin, nose, eyes, brows, ears, mouth, lips)."""
    return bool(np.isin(ids, list(FACE_CLASS_IDS)).any())


def check_face(ids: np.ndarray) -> None:
    """Raise :class:`EmptyMaskError` when a class-id map has no face class."""
    if not has_face(ids):
        raise EmptyMaskError(
            "the mask contains no face: paint at least skin (or eyes, nose, mouth, ...); "
            "hair, hat, neck, cloth, glasses and background alone are not a face"
        )


def _checked_ids(values: np.ndarray, source_order: str) -> np.ndarray:
    high = int(values.max())
    if values.min() < 0 or high > MAX_CLASS_ID:
        raise InvalidImageError(
            f"this gray mask has values up to {high}, but class ids go from 0 to {MAX_CLASS_ID}: it is "
            "neither a label map nor a colour map (a gray rendering of a mask cannot be read; "
            "pass the label map itself or the colour rendering)"
        )
    ids = values.astype(np.uint8)
    if source_order == "face_parser":
        ids = FACE_PARSER_TO_CELEBAMASK[ids]
    return ids


def _palette_indices_are_ids(image: Image.Image) -> bool:
    """Whether a ``P`` image's indices are class ids rather than a quantised colour rendering."""
    indices = np.asarray(image)
    used = np.unique(indices)
    if used.max() > MAX_CLASS_ID:
        return False
    palette = image.getpalette("RGB") or []
    colours = np.zeros((256, 3), dtype=np.int32)
    colours[: len(palette) // 3] = np.asarray(palette, dtype=np.int32).reshape(-1, 3)
    used_colours = colours[used]
    if np.array_equal(used_colours, CELEBAMASK_PALETTE[used]):
        return True
    # A colour rendering re-saved as a palette PNG (e.g. by an optimiser) reuses the canonical
    # colours in another order: every used entry is a distinct canonical colour.
    distance = np.abs(used_colours[:, None, :] - CELEBAMASK_PALETTE[None, :, :].astype(np.int32)).max(axis=2)
    nearest = distance.argmin(axis=1)
    is_quantised_rendering = (distance.min(axis=1) <= 10).all() and len(set(nearest.tolist())) == len(used)
    return not is_quantised_rendering


def _colour_to_ids(image: Image.Image, max_side: int) -> np.ndarray:
    """Class ids of a colour rendering, read on a copy of at most ``max_side`` pixels a side (nearest neighbour,
    so no new colours): the snapping needs ~40 bytes a pixel, and masks are used at the model's size anyway."""
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    pixels = np.asarray(image)
    rgb = pixels[:, :, :3]
    if pixels.shape[2] == 4:
        # Fully transparent pixels are background whatever colour they store.
        rgb = np.where(pixels[:, :, 3:] == 0, np.uint8(0), rgb)
    return _nearest_palette_ids_locally(rgb)


def _nearest_palette_ids_locally(rgb: np.ndarray) -> np.ndarray:
    """Nearest palette class per pixel, with fringe pixels limited to the classes around them.

    A blend of two class colours (anti-aliased brush edge, JPEG chroma smear) often lies next to
    a third class's colour: black/hair blends look like lower lip, black/skin blends like an ear.
    So only "core" pixels (close to a palette colour, with a 3x3 neighbourhood of the same
    nearest class) are trusted as they are; every other pixel that is not an exact palette colour
    takes the nearest colour among the classes that have core pixels within a 7x7 window (or its
    plain nearest class when there are none). Lossless renderings are exact, and on the test
    masks JPEG q75 renderings agree on >= 99.5% of pixels (~98% without the local step).
    """
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    unique_keys, inverse = np.unique(keys.ravel(), return_inverse=True)
    inverse = inverse.reshape(keys.shape)
    unique_rgb = np.stack([(unique_keys >> 16) & 255, (unique_keys >> 8) & 255, unique_keys & 255], axis=1)
    palette = CELEBAMASK_PALETTE.astype(np.float32)
    # Distances are computed once per distinct colour, not once per pixel.
    squared = ((unique_rgb[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(axis=2)
    ids = squared.argmin(axis=1).astype(np.uint8)[inverse]
    distance = np.sqrt(squared.min(axis=1))[inverse]

    padded = np.pad(ids, 1, mode="edge")
    shifted = [padded[dy : dy + ids.shape[0], dx : dx + ids.shape[1]] for dy in range(3) for dx in range(3)]
    homogeneous = np.minimum.reduce(shifted) == np.maximum.reduce(shifted)
    core = homogeneous & (distance <= _CORE_COLOUR_DISTANCE)
    to_fix = ~core & (distance > _EXACT_COLOUR_DISTANCE)
    if not to_fix.any() or not core.any():
        return ids

    result = ids.copy()
    best = np.full(ids.shape, np.inf, dtype=np.float32)
    for class_id in np.unique(ids[core]):
        nearby = _window_sum(core & (ids == class_id), _NEIGHBOURHOOD_RADIUS) > 0
        class_distance = squared[:, class_id][inverse]
        better = to_fix & nearby & (class_distance < best)
        best[better] = class_distance[better]
        result[better] = class_id
    return result


def _window_sum(flags: np.ndarray, radius: int) -> np.ndarray:
    """Number of True values in the (2r+1)x(2r+1) window around each pixel (integral image)."""
    size = 2 * radius + 1
    integral = np.pad(np.pad(flags, radius).astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (
        integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    )


def _validated_index_map(index_map: Any) -> np.ndarray:
    ids = np.asarray(index_map)
    if ids.ndim != 2 or ids.size == 0:
        raise InvalidImageError(f"an index map must be a non-empty HxW array, got shape {ids.shape}")
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_):
        raise InvalidImageError(f"an index map must hold integer class ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() > MAX_CLASS_ID:
        raise InvalidImageError(
            f"an index map must hold class ids 0..{MAX_CLASS_ID}, got {int(ids.min())}..{int(ids.max())}"
        )
    return ids.astype(np.uint8)


def mask_to_color(index_map: np.ndarray) -> Image.Image:
    """RGB rendering of a class-id map with the canonical CelebAMask-HQ colours."""
    return Image.fromarray(CELEBAMASK_PALETTE[_validated_index_map(index_map)])


def mask_to_palette_image(index_map: np.ndarray) -> Image.Image:
    """Mode ``P`` image whose indices are the class ids and whose palette is CelebAMask-HQ's."""
    ids = _validated_index_map(index_map)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids).tobytes())
    image.putpalette(CELEBAMASK_PALETTE.ravel().tolist())
    return image


# --------------------------------------------------------------------------------------------
# Scribbles
# --------------------------------------------------------------------------------------------

# Share of transparent pixels from which an RGBA scribble counts as a stroke layer.
_TRANSPARENT_LAYER_FRACTION = 0.01
# Strokes must be at least this much brighter than the background (in 0..255 after inversion).
_MIN_STROKE_CONTRAST = 40.0
# Edge detector: percentile of the gradient magnitude above which thinned pixels are edges.
_EDGE_PERCENTILE = 88.0


def parse_scribble(scribble: Any, *, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Boolean HxW map, True on strokes.

    - RGBA with >= 1% transparent pixels (a sketch layer): the opaque pixels are the strokes.
    - Otherwise luminance (RGBA composited on white). When most pixels are bright the input is
      black-on-white and is inverted. Stroke pixels are those above the midpoint between the
      background level (median) and the stroke level (99.9th percentile), at least 40 levels
      above the background, so JPEG noise and an empty canvas give no strokes.
    - ``size``: when shrinking, the binary map is max-pooled (a pixel is a stroke when any source
      pixel it covers is) so thin strokes never vanish; when enlarging, the stroke strength is
      resized bilinearly and thresholded again.
    """
    target_size = _parse_size(size)
    image = load_image(scribble)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "L")
    strength = _stroke_strength(image)
    threshold = _stroke_threshold(strength)
    height, width = strength.shape
    if target_size is None or target_size == (width, height):
        return strength > threshold
    if target_size[0] < width or target_size[1] < height:
        strokes = Image.fromarray((strength > threshold).astype(np.float32))
        coverage = np.asarray(strokes.resize(target_size, Image.Resampling.BOX))
        return coverage > 1e-3
    enlarged = Image.fromarray(strength).resize(target_size, Image.Resampling.BILINEAR)
    return np.asarray(enlarged) > threshold


def _stroke_strength(image: Image.Image) -> np.ndarray:
    """Float32 HxW, high on strokes."""
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).mean() >= _TRANSPARENT_LAYER_FRACTION:
            return alpha.astype(np.float32)
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        image = white
    luminance = np.asarray(image.convert("L"), dtype=np.float32)
    if (luminance > 127.5).mean() > 0.5:  # majority bright: black strokes on white paper
        luminance = 255.0 - luminance
    return luminance


def _stroke_threshold(strength: np.ndarray) -> float:
    background, strokes = np.percentile(strength, [50.0, 99.9])
    return float(background + max((strokes - background) / 2.0, _MIN_STROKE_CONTRAST))


def scribble_is_empty(binary: np.ndarray) -> bool:
    """Whether a binary scribble has no stroke pixel."""
    return not bool(np.any(binary))


def scribble_to_image(binary: np.ndarray) -> Image.Image:
    """Mode ``L`` image with white (255) strokes on black."""
    strokes = np.asarray(binary)
    if strokes.ndim != 2 or strokes.size == 0:
        raise InvalidImageError(f"a scribble must be a non-empty HxW array, got shape {strokes.shape}")
    return Image.fromarray(np.where(strokes.astype(bool), 255, 0).astype(np.uint8))


def edges_from_photo(photo: Any, *, size: int = 512) -> np.ndarray:
    """Thin edge map (bool ``size`` x ``size``) of a photo, for "sketch from a photo".

    The photo is centre-cropped to a square and resized, converted to gray, Gaussian-blurred
    (radius ``size / 256``), and its Sobel gradient magnitude is thinned by non-maximum
    suppression along the gradient direction (as in Canny); thinned pixels whose magnitude is in
    the top 12% of the image are the edges (about 2-4% of a face photo's pixels).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise InvalidSettingError(f"size must be an integer of at least 16 pixels, got {size!r}")
    size = int(size)
    image = load_image(photo)
    gray = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS).convert("L")
    gray = gray.filter(ImageFilter.GaussianBlur(radius=size / 256))
    values = np.asarray(gray, dtype=np.float32)

    padded = np.pad(values, 1, mode="edge")
    grad_x = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2]
    )
    grad_y = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (
        padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:]
    )
    magnitude = np.hypot(grad_x, grad_y)
    thin = magnitude * _is_ridge(magnitude, grad_x, grad_y)
    if not thin.any():
        return np.zeros((size, size), dtype=bool)
    threshold = np.percentile(magnitude, _EDGE_PERCENTILE)
    return (thin > threshold) & (thin > 1e-3)


def _is_ridge(magnitude: np.ndarray, grad_x: np.ndarray, grad_y: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep pixels not smaller than both neighbours across the edge."""
    padded = np.pad(magnitude, 1)
    center = (slice(1, -1), slice(1, -1))

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]

    # Gradient direction quantised to 0, 45, 90, 135 degrees (rows grow downwards).
    angle = (np.degrees(np.arctan2(grad_y, grad_x)) + 180.0) % 180.0
    sector = (np.floor((angle + 22.5) / 45.0).astype(np.int8)) % 4
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    ridge = np.zeros(magnitude.shape, dtype=bool)
    for index, (dy, dx) in offsets.items():
        keep = (padded[center] >= neighbour(dy, dx)) & (padded[center] >= neighbour(-dy, -dx))
        ridge |= (sector == index) & keep
    return ridge


def _parse_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(width, height)`` -> ``(width, height)``."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return int(size[0]), int(size[1])
    raise InvalidSettingError(f"size must be a positive int or a (width, height) pair, got {size!r}")
