"""Tests for mm2latent.inputs.conditions: image loading, masks, scribbles and edges."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from mm2latent.errors import (
    EmptyMaskError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidSettingError,
)
from mm2latent.inputs.conditions import (
    CELEBAMASK_CLASSES,
    CELEBAMASK_PALETTE,
    FACE_CLASS_IDS,
    MAX_IMAGE_PIXELS,
    edges_from_photo,
    load_image,
    mask_to_color,
    mask_to_palette_image,
    parse_mask,
    parse_scribble,
    scribble_is_empty,
    scribble_to_image,
)

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
MASK_FILES = sorted((TESTDATA / "masks").glob("*.png")) if TESTDATA.is_dir() else []
SKETCH_FILES = sorted((TESTDATA / "sketches").glob("*.jpg")) if TESTDATA.is_dir() else []
PHOTO_FILES = sorted((TESTDATA / "photos").glob("*.jpg")) if TESTDATA.is_dir() else []

# Parser order as published by zllrunning/face-parsing.PyTorch (background + its `atts` list).
FACE_PARSER_NAMES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip

# A class "is present" in the JPEG tests when it covers at least this share of the image
# (0.1% = 262 pixels at 512x512; the smallest real class in the test masks has 314).
MIN_CLASS_SHARE = 0.001


def _need(files: list[Path]) -> None:
    if not files:
        pytest.skip(f"test data not found under {TESTDATA}")


def _mask_params(files: list[Path]) -> list:
    return files or [pytest.param(None, marks=pytest.mark.skip(reason=f"no test data under {TESTDATA}"))]


def _raw_ids(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def _present_classes(ids: np.ndarray) -> set[int]:
    counts = np.bincount(ids.ravel(), minlength=len(CELEBAMASK_CLASSES))
    return {int(c) for c in np.flatnonzero(counts >= MIN_CLASS_SHARE * ids.size)}


def _face_mask(size: int = 32) -> np.ndarray:
    ids = np.zeros((size, size), dtype=np.uint8)
    ids[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = CELEBAMASK_CLASSES.index("skin")
    ids[: size // 4] = CELEBAMASK_CLASSES.index("hair")
    return ids


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (the pixel data stays 8x8)."""
    data = bytearray(_png_bytes(Image.new("1", (8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------


def test_class_table_matches_the_datasets_documented_colours(testdata):
    """Ids, names and colours equal the CelebAMask-HQ table in the test data's README (the source of truth)."""
    import re

    rows = re.findall(r"\|\s*(\d+)\s*\|\s*(\w+)[^|]*\|\s*(\d+),(\d+),(\d+)\s*", (testdata / "README.md").read_text())
    documented = {int(i): (name, (int(r), int(g), int(b))) for i, name, r, g, b in rows}
    assert sorted(documented) == list(range(19))
    for class_id, (name, rgb) in documented.items():
        assert CELEBAMASK_CLASSES[class_id] == name
        assert tuple(CELEBAMASK_PALETTE[class_id].tolist()) == rgb
    # Face classes: what `has_face` requires (glasses, hair, hat, neck, cloth alone are no face).
    assert {CELEBAMASK_CLASSES[i] for i in FACE_CLASS_IDS} >= {"skin", "nose", "l_eye", "mouth", "u_lip"}
    assert not {CELEBAMASK_CLASSES[i] for i in FACE_CLASS_IDS} & {"eye_g", "background", "hair", "hat", "neck", "cloth"}
    assert MAX_IMAGE_PIXELS == 40_000_000


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _mask_params(MASK_FILES), ids=lambda p: getattr(p, "name", "none"))
def test_index_mask_files_parse_to_their_raw_ids(path):
    ids = parse_mask(path)
    assert ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, _raw_ids(path))


@pytest.mark.parametrize("path", _mask_params(MASK_FILES), ids=lambda p: getattr(p, "name", "none"))
def test_lossless_renderings_round_trip_exactly(path, tmp_path):
    ids = parse_mask(path)
    np.testing.assert_array_equal(parse_mask(mask_to_color(ids)), ids)
    palette_file = tmp_path / "mask.png"
    mask_to_palette_image(ids).save(palette_file)
    with Image.open(palette_file) as saved:
        assert saved.mode == "P"
    np.testing.assert_array_equal(parse_mask(palette_file), ids)
    np.testing.assert_array_equal(parse_mask(ids.astype(np.int64)), ids)


@pytest.mark.parametrize("quality", [75, 90])
@pytest.mark.parametrize("path", _mask_params(MASK_FILES), ids=lambda p: getattr(p, "name", "none"))
def test_jpeg_colour_rendering_round_trips(path, quality):
    ids = parse_mask(path)
    parsed = parse_mask(_jpeg(mask_to_color(ids), quality))
    assert (parsed == ids).mean() >= 0.99
    assert _present_classes(parsed) == _present_classes(ids)


@pytest.mark.parametrize("path", _mask_params(MASK_FILES), ids=lambda p: getattr(p, "name", "none"))
def test_antialiased_colour_renderings_round_trip(path):
    ids = parse_mask(path)
    soft_brush = mask_to_color(ids).filter(ImageFilter.GaussianBlur(radius=1))
    large = mask_to_color(np.kron(ids, np.ones((2, 2), dtype=np.uint8)))
    supersampled = large.filter(ImageFilter.GaussianBlur(radius=1)).resize(
        (ids.shape[1], ids.shape[0]), Image.Resampling.LANCZOS
    )
    for rendering in (soft_brush, supersampled):
        parsed = parse_mask(rendering)
        assert (parsed == ids).mean() >= 0.99
        assert _present_classes(parsed) == _present_classes(ids)


@pytest.mark.parametrize("path", _mask_params(MASK_FILES[:1]), ids=lambda p: getattr(p, "name", "none"))
def test_quantised_palette_rendering_is_read_by_colour(path):
    ids = parse_mask(path)
    quantised = mask_to_color(ids).quantize(colors=32)  # palette order unrelated to class ids
    assert quantised.mode == "P"
    assert not np.array_equal(np.asarray(quantised), ids)
    np.testing.assert_array_equal(parse_mask(quantised), ids)


def test_off_palette_colours_get_the_nearest_palette_class():
    noise = np.random.default_rng(0).integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    ids = parse_mask(noise, require_face=False)
    assert ids.shape == (96, 80) and ids.dtype == np.uint8
    # Pixels whose neighbourhood does not change the answer take the nearest canonical colour.
    distances = ((noise[:, :, None, :].astype(int) - CELEBAMASK_PALETTE[None, None].astype(int)) ** 2).sum(-1)
    nearest = distances.argmin(-1)
    assert (ids == nearest).mean() > 0.5 and len(np.unique(ids)) > 5


def test_rgba_fully_transparent_pixels_are_background():
    ids = _face_mask(40)
    rgba = np.dstack([CELEBAMASK_PALETTE[ids], np.full(ids.shape, 255, np.uint8)])
    rgba[:, :10, :3] = 255  # white colour that is fully transparent
    rgba[:, :10, 3] = 0
    expected = ids.copy()
    expected[:, :10] = 0
    np.testing.assert_array_equal(parse_mask(Image.fromarray(rgba)), expected)


def test_face_parser_order_is_remapped_by_name():
    rng = np.random.default_rng(1)
    parser_ids = rng.integers(0, 19, size=(24, 24)).astype(np.uint8)
    expected = np.vectorize(lambda i: CELEBAMASK_CLASSES.index(FACE_PARSER_NAMES[i]))(parser_ids)
    np.testing.assert_array_equal(parse_mask(parser_ids, source_order="face_parser"), expected)
    np.testing.assert_array_equal(
        parse_mask(Image.fromarray(parser_ids), source_order="face_parser"), expected
    )


@pytest.mark.parametrize("path", _mask_params(MASK_FILES[:1]), ids=lambda p: getattr(p, "name", "none"))
def test_real_mask_converted_to_parser_order_comes_back(path):
    ids = parse_mask(path)
    to_parser = np.array([FACE_PARSER_NAMES.index(name) for name in CELEBAMASK_CLASSES], dtype=np.uint8)
    np.testing.assert_array_equal(parse_mask(to_parser[ids], source_order="face_parser"), ids)


@pytest.mark.parametrize("size", [(200, 300), 128, (1024, 1024)])
def test_resize_is_nearest_neighbour(size):
    ids = np.zeros((64, 64), dtype=np.uint8)
    ids[8:56, 8:56] = 1
    ids[20:30, 12:28] = 4
    ids[20:30, 36:52] = 5
    ids[40:48, 20:44] = 11
    ids[44:48, 20:44] = 12  # thin neighbouring classes whose average would be another id
    resized = parse_mask(Image.fromarray(ids), size=size)
    width, height = (size, size) if isinstance(size, int) else size
    assert resized.shape == (height, width)
    assert set(np.unique(resized).tolist()) <= set(np.unique(ids).tolist())
    assert {1, 4, 5} <= set(np.unique(resized).tolist())


def test_mask_without_face_is_rejected():
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[:8] = CELEBAMASK_CLASSES.index("hair")
    ids[10:14] = CELEBAMASK_CLASSES.index("eye_g")
    ids[20:] = CELEBAMASK_CLASSES.index("cloth")
    with pytest.raises(EmptyMaskError, match="no face"):
        parse_mask(ids)
    with pytest.raises(EmptyMaskError, match="no face"):
        parse_mask(mask_to_color(ids))
    assert parse_mask(ids, require_face=False).max() == CELEBAMASK_CLASSES.index("cloth")


def test_gray_rendering_of_a_mask_is_rejected():
    gray = Image.fromarray((_face_mask() * 13).astype(np.uint8))  # ids stretched for viewing
    with pytest.raises(InvalidImageError, match="neither a label map nor a colour map"):
        parse_mask(gray)


def test_16_bit_masks_keep_their_values(tmp_path):
    ids = _face_mask()
    path = tmp_path / "ids16.png"
    Image.fromarray(ids.astype(np.uint16)).save(path)
    with Image.open(path) as saved:
        assert saved.mode.startswith("I")
    np.testing.assert_array_equal(parse_mask(path), ids)
    wide = (ids.astype(np.uint16) * 257) + 3  # not ids; must not be scaled down into ids
    Image.fromarray(wide).save(path)
    with pytest.raises(InvalidImageError, match="neither a label map"):
        parse_mask(path)


def test_bad_mask_settings_are_rejected():
    ids = _face_mask()
    with pytest.raises(InvalidSettingError, match="source_order"):
        parse_mask(ids, source_order="ade20k")
    with pytest.raises(InvalidSettingError, match="size"):
        parse_mask(ids, size=(0, 10))
    with pytest.raises(InvalidImageError, match="class ids 0..18"):
        mask_to_color(np.full((4, 4), 19))


# --------------------------------------------------------------------------------------------
# Scribbles and edges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _mask_params(SKETCH_FILES), ids=lambda p: getattr(p, "name", "none"))
def test_scribble_polarity_is_detected(path):
    with Image.open(path) as sketch:
        sketch = sketch.convert("RGB")
    strokes = parse_scribble(sketch)
    assert strokes.dtype == np.bool_ and strokes.shape == (sketch.height, sketch.width)
    assert not scribble_is_empty(strokes)
    assert strokes.mean() < 0.5  # strokes are the minority whichever way they were drawn
    np.testing.assert_array_equal(parse_scribble(ImageOps.invert(sketch)), strokes)


def test_transparent_sketch_layer_gives_its_opaque_pixels():
    _need(SKETCH_FILES)
    expected = parse_scribble(SKETCH_FILES[0])
    layer = np.zeros((*expected.shape, 4), dtype=np.uint8)
    layer[expected] = (20, 20, 20, 255)  # dark strokes on a transparent layer
    np.testing.assert_array_equal(parse_scribble(Image.fromarray(layer)), expected)


def test_downscaling_keeps_strokes_where_they_were():
    _need(SKETCH_FILES)
    original = parse_scribble(SKETCH_FILES[0])
    assert original.shape == (256, 256)
    small = parse_scribble(SKETCH_FILES[0], size=128)
    blocks = original.reshape(128, 2, 128, 2).any(axis=(1, 3))
    assert small.sum() > 0
    assert not (small & ~blocks).any()  # no stroke where the original had none
    assert (small[blocks]).mean() > 0.99  # and (almost) every stroke block is kept


@pytest.mark.parametrize("target", [512, 256])
def test_one_pixel_lines_survive_downscaling(target):
    canvas = Image.new("L", (1024, 1024), 255)
    draw = ImageDraw.Draw(canvas)
    draw.line([(100, 100), (900, 300)], fill=0, width=1)
    draw.ellipse([300, 400, 700, 900], outline=0, width=1)
    strokes = parse_scribble(canvas, size=target)
    factor = 1024 // target
    original = np.asarray(canvas) < 128
    blocks = original.reshape(target, factor, target, factor).any(axis=(1, 3))
    assert strokes.shape == (target, target)
    assert (strokes == blocks).mean() > 0.999 and strokes[blocks].all()


def test_blank_and_noisy_canvases_have_no_strokes():
    white = Image.new("RGB", (128, 128), (255, 255, 255))
    assert scribble_is_empty(parse_scribble(white))
    noisy = np.clip(np.random.default_rng(2).normal(240, 4, size=(128, 128)), 0, 255).astype(np.uint8)
    assert scribble_is_empty(parse_scribble(_jpeg(Image.fromarray(noisy), 60)))


def test_scribble_image_round_trip():
    strokes = np.zeros((64, 64), dtype=bool)
    strokes[10, 5:60] = True
    strokes[5:60, 30] = True
    image = scribble_to_image(strokes)
    assert image.mode == "L" and set(np.unique(np.asarray(image)).tolist()) == {0, 255}
    np.testing.assert_array_equal(parse_scribble(image), strokes)


def test_edges_outline_a_square():
    canvas = Image.new("RGB", (256, 256), (30, 30, 30))
    ImageDraw.Draw(canvas).rectangle([64, 64, 191, 191], fill=(220, 220, 220))
    edges = edges_from_photo(canvas, size=256)
    assert edges.shape == (256, 256) and edges.dtype == np.bool_
    rows, cols = np.nonzero(edges)
    distance_to_border = np.minimum.reduce(
        [np.abs(rows - 64), np.abs(rows - 191), np.abs(cols - 64), np.abs(cols - 191)]
    )
    assert (distance_to_border <= 2).all()  # only on the square's outline
    assert edges[128, 60:68].sum() in (1, 2)  # and thin across it


@pytest.mark.parametrize("path", _mask_params(PHOTO_FILES[:2]), ids=lambda p: getattr(p, "name", "none"))
def test_edges_of_real_photos_are_sparse_lines(path):
    edges = edges_from_photo(path, size=512)
    assert edges.shape == (512, 512)
    assert 0.005 < edges.mean() < 0.15
    full_blocks = edges[:-1, :-1] & edges[1:, :-1] & edges[:-1, 1:] & edges[1:, 1:]
    assert full_blocks.sum() < 0.05 * edges.sum()  # lines are thin, not blobs


# --------------------------------------------------------------------------------------------
# Loading and bad inputs
# --------------------------------------------------------------------------------------------


def test_empty_images_are_rejected():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(np.zeros((0, 10), dtype=np.uint8))
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(Image.new("L", (0, 0)))


def test_non_image_and_missing_files_are_rejected(tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(InvalidImageError, match="cannot read .*notes.png"):
        load_image(junk)
    with pytest.raises(InvalidImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(Image.effect_noise((64, 64), 50))[:200])
    with pytest.raises(InvalidImageError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(InvalidImageError, match="expected an image"):
        load_image(12345)


@pytest.mark.parametrize("side", [7_000, 10_000, 20_000])
def test_huge_header_is_rejected_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(side, side))  # would fail to decode: only 8x8 pixels
    with pytest.raises(ImageTooLargeError, match="too large"):
        load_image(path)
    with pytest.raises(ImageTooLargeError, match="too large"):
        parse_mask(path)


def test_max_pixels_applies_to_every_input_kind(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(path)
    for source in (path, Image.new("RGB", (64, 64)), np.zeros((64, 64, 3), np.uint8)):
        with pytest.raises(ImageTooLargeError, match="64x64"):
            load_image(source, max_pixels=1000)
    assert load_image(path).size == (64, 64)


def test_modes_are_normalised(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    assert load_image(rgba).mode == "RGBA"
    assert load_image(Image.new("LA", (8, 8), (100, 0))).mode == "RGBA"
    assert load_image(Image.new("1", (8, 8), 1)).getpixel((0, 0)) == 255

    cmyk_path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk_path, quality=95)
    loaded = load_image(cmyk_path)
    assert loaded.mode == "RGB"
    red, green, blue = loaded.getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60

    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(sixteen)
    loaded = load_image(sixteen)
    assert loaded.mode == "L" and np.asarray(loaded).tolist() == [[0, 128, 255]]

    palette = mask_to_palette_image(_face_mask())
    assert load_image(palette).mode == "P"

    assert np.asarray(load_image(np.array([[0.0, 0.5, 1.0]]))).tolist() == [[0, 128, 255]]
    assert np.asarray(load_image(np.array([[False, True]]))).tolist() == [[0, 255]]
    with pytest.raises(InvalidImageError, match=r"\[0, 1\]"):
        load_image(np.array([[0.0, 2.0]]))
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    with Image.open(path) as opened:
        assert load_image(opened).size == (20, 40)
        assert opened.size == (40, 20)  # the caller's image is untouched


def test_animated_gif_uses_first_frame_with_warning(tmp_path):
    frames = [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(UserWarning, match="first frame"):
        loaded = load_image(path)
    assert np.asarray(loaded.convert("L")).max() == 0
    with Image.open(path) as opened:
        opened.seek(1)
        with pytest.warns(UserWarning, match="first frame"):
            first = load_image(opened)
        assert opened.tell() == 1
    assert np.asarray(first.convert("L")).max() == 0


def test_callers_objects_are_not_modified():
    array = _face_mask()
    before = array.copy()
    image = Image.fromarray(array.astype(np.uint16))
    image_bytes = image.tobytes()
    parse_mask(array, size=64)
    parse_mask(image, size=16)
    load_image(image)
    np.testing.assert_array_equal(array, before)
    assert image.mode == "I;16" and image.tobytes() == image_bytes
