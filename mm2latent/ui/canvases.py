"""The two drawing canvases: a 19-colour mask editor and a black-on-white sketchpad.

Gradio's ``ImageEditor`` value is a dict ``{"background", "layers", "composite"}`` of images. These
functions build such values from masks and sketches, and read the picture the visitor made back
into what the model takes (class-id maps, stroke maps). Colour parsing (anti-aliased brush edges,
transparent areas = background) is the library's.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from ..inputs.conditions import (
    CELEBAMASK_CLASSES,
    CELEBAMASK_PALETTE,
    check_face,
    mask_to_color,
    parse_mask,
    parse_scribble,
)
from ..inputs.templates import TEMPLATE_NAMES, blank_mask, template_mask

CANVAS_SIZE = 512
BLANK_CANVAS = "blank canvas"
TEMPLATE_CHOICES: tuple[str, ...] = (*TEMPLATE_NAMES, BLANK_CANVAS)
DEFAULT_TEMPLATE = "short hair"
DEFAULT_BRUSH_CLASS = "skin"
STROKE_WIDTHS = {"thin": 3, "medium": 6, "thick": 12}
DEFAULT_STROKE = "medium"

# What each class is called in the legend (CelebAMask-HQ names are terse).
CLASS_LABELS = {
    "background": "background", "skin": "skin", "nose": "nose", "eye_g": "glasses", "l_eye": "left eye",
    "r_eye": "right eye", "l_brow": "left brow", "r_brow": "right brow", "l_ear": "left ear",
    "r_ear": "right ear", "mouth": "mouth (inside)", "u_lip": "upper lip", "l_lip": "lower lip", "hair": "hair",
    "hat": "hat", "ear_r": "earring", "neck_l": "necklace", "neck": "neck", "cloth": "clothes",
}  # fmt: skip


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def palette_hex() -> list[str]:
    """The 19 class colours, in class-id order, as ``#rrggbb``."""
    return [hex_colour(rgb) for rgb in CELEBAMASK_PALETTE]


def class_colour_hex(name: str) -> str:
    return hex_colour(CELEBAMASK_PALETTE[CELEBAMASK_CLASSES.index(name)])


def legend_html() -> str:
    """A swatch and a name per class; 'left'/'right' are the person's, i.e. mirrored on screen."""
    items = []
    for name, rgb in zip(CELEBAMASK_CLASSES, CELEBAMASK_PALETTE):
        label = html.escape(CLASS_LABELS[name])
        items.append(
            f'<span class="mm2l-legend-item" title="{html.escape(name)}">'
            f'<span class="mm2l-swatch" style="background:{hex_colour(rgb)}"></span>{label}</span>'
        )
    return '<div class="mm2l-legend">' + "".join(items) + "</div>"


def swatch_names_script() -> str:
    """A ``<head>`` script naming the editor's colour swatches after their classes (tooltips, screen readers).

    Gradio draws the swatches as unlabelled coloured buttons; this labels them once they appear.
    """
    names = {f"rgb({r}, {g}, {b})": CLASS_LABELS[name]
             for name, (r, g, b) in zip(CELEBAMASK_CLASSES, CELEBAMASK_PALETTE.tolist())}
    return (
        "<script>(() => {const names = " + json.dumps(names) + ";"
        "const label = () => document.querySelectorAll('#mask-editor button.color, #edit-mask-editor button.color').forEach((b) => {"
        "const n = names[b.style.backgroundColor]; if (n && b.title !== n) {b.title = n; b.setAttribute('aria-label', n);}});"
        "new MutationObserver(label).observe(document.documentElement, {childList: true, subtree: true});"
        "})();</script>"
    )


# --------------------------------------------------------------------------------------------
# Building canvas values
# --------------------------------------------------------------------------------------------


def editor_value(background: Image.Image) -> dict[str, Any]:
    """An ImageEditor value whose background is ``background`` and which has no strokes yet."""
    return {"background": background, "layers": [], "composite": background}


def mask_canvas(ids: np.ndarray) -> dict[str, Any]:
    """Mask editor value showing a class-id map as its canonical colour map, at canvas size."""
    ids = np.asarray(ids, dtype=np.uint8)
    if ids.shape != (CANVAS_SIZE, CANVAS_SIZE):
        ids = np.asarray(Image.fromarray(ids).resize((CANVAS_SIZE, CANVAS_SIZE), Image.Resampling.NEAREST))
    return editor_value(mask_to_color(ids))


def template_canvas(name: str) -> dict[str, Any]:
    """Mask editor value for one of :data:`TEMPLATE_CHOICES`."""
    ids = blank_mask(CANVAS_SIZE) if name == BLANK_CANVAS else template_mask(name, CANVAS_SIZE)
    return mask_canvas(ids)


def template_data_urls() -> dict[str, str]:
    """Each of :data:`TEMPLATE_CHOICES` as the PNG data URL of its colour map, for the page to show by itself.

    The mask editor exports its whole content (WebGL read-back + PNG encode, in software without a GPU)
    whenever the page updates the loading status of an event involving it, so a template sent by the server
    takes seconds to appear; set from these URLs in the page, it appears at once.
    """
    urls = {}
    for name in TEMPLATE_CHOICES:
        buffer = io.BytesIO()
        template_canvas(name)["background"].save(buffer, format="PNG", optimize=True)
        urls[name] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return urls


def strokes_to_paper(strokes: np.ndarray) -> Image.Image:
    """Black strokes on white paper (what the visitor sees and draws on), RGB."""
    paper = np.where(np.asarray(strokes, dtype=bool), 0, 255).astype(np.uint8)
    return Image.fromarray(paper).convert("RGB")


def sketch_canvas(strokes: np.ndarray | None = None) -> dict[str, Any]:
    """Sketchpad value: white paper at canvas size, with ``strokes`` (bool map) drawn in black."""
    if strokes is None:
        strokes = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=bool)
    strokes = np.asarray(strokes, dtype=bool)
    if strokes.shape != (CANVAS_SIZE, CANVAS_SIZE):
        strokes = parse_scribble(strokes_to_paper(strokes), size=CANVAS_SIZE)
    return editor_value(strokes_to_paper(strokes))


# --------------------------------------------------------------------------------------------
# Reading canvases back
# --------------------------------------------------------------------------------------------


def canvas_picture(value: Any) -> Any:
    """The flattened picture of an ImageEditor value (composite, else background), or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        picture = value.get("composite")
        return picture if picture is not None else value.get("background")
    return value  # a plain image (API callers may send one)


def mask_from_canvas(value: Any) -> np.ndarray | None:
    """Class-id map painted on the mask editor, or None when the canvas is empty (all background).

    Raises :class:`EmptyMaskError` when something is painted but it contains no face.
    """
    picture = canvas_picture(value)
    if picture is None:
        return None
    ids = parse_mask(picture, require_face=False)
    if not ids.any():
        return None
    check_face(ids)  # the library's "no face" error
    return ids


def strokes_from_canvas(value: Any) -> np.ndarray | None:
    """Stroke map (True on strokes) drawn on the sketchpad, or None when there are no strokes."""
    picture = canvas_picture(value)
    if picture is None:
        return None
    strokes = parse_scribble(picture)
    return strokes if strokes.any() else None


def matching_template(ids: np.ndarray, min_agreement: float = 0.999) -> str | None:
    """The template (one of :data:`TEMPLATE_CHOICES`) a class-id map shows, or None when it shows none of them.

    ``min_agreement``: the share of pixels that must match (a browser's resampling may move a few edge pixels).
    """
    ids = np.asarray(ids, dtype=np.uint8)
    if ids.shape != (CANVAS_SIZE, CANVAS_SIZE):
        ids = np.asarray(Image.fromarray(ids).resize((CANVAS_SIZE, CANVAS_SIZE), Image.Resampling.NEAREST))
    for name in TEMPLATE_CHOICES:
        template = blank_mask(CANVAS_SIZE) if name == BLANK_CANVAS else template_mask(name, CANVAS_SIZE)
        if (template == ids).mean() >= min_agreement:
            return name
    return None


def describe_mask(ids: np.ndarray) -> str:
    """'skin, hair, nose, ...' ordered by area, for messages."""
    counts = np.bincount(np.asarray(ids).ravel(), minlength=len(CELEBAMASK_CLASSES))
    present = [i for i in np.argsort(-counts) if counts[i] and i != 0]
    return ", ".join(CLASS_LABELS[CELEBAMASK_CLASSES[i]] for i in present) or "background only"


