"""Face-layout templates drawn by code: 19-class CelebAMask-HQ masks and line sketches.

The Space offers these as starting canvases, and ``examples/`` holds files made from them, so the
project never ships third-party masks. Every template is a frontal or slightly turned face on a
512 x 512 canvas with the CelebAMask-HQ geometry: eyes near y = 245, lips near y = 380, chin near
y = 470. As in CelebAMask-HQ, ``l_*`` classes are the person's left, i.e. on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InvalidSettingError
from .conditions import CELEBAMASK_CLASSES

__all__ = ["TEMPLATE_NAMES", "TEMPLATE_SIZE", "template_mask", "template_sketch", "blank_mask", "mask_edges"]

TEMPLATE_SIZE = 512
_ID = {name: index for index, name in enumerate(CELEBAMASK_CLASSES)}


@dataclass(frozen=True)
class _Layout:
    """What varies between templates (coordinates on the 512 x 512 canvas)."""

    hair: str = "short"  # "short", "long" or "under_hat"
    glasses: bool = False
    open_mouth: bool = False
    hat: bool = False
    turn: float = 0.0  # 0 = frontal; 1 = about 35 degrees towards the image's right


_LAYOUTS: dict[str, _Layout] = {
    "short hair": _Layout(hair="short"),
    "long hair": _Layout(hair="long"),
    "glasses": _Layout(hair="short", glasses=True),
    "open mouth": _Layout(hair="long", open_mouth=True),
    "turned head": _Layout(hair="short", turn=1.0),
    "hat": _Layout(hair="under_hat", hat=True),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(_LAYOUTS)


def template_mask(name: str, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The template ``name`` as a ``size`` x ``size`` uint8 map of CelebAMask-HQ class ids."""
    layout = _layout(name)
    ids = _draw(layout)
    if size != TEMPLATE_SIZE:
        ids = np.asarray(Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST))
    return np.ascontiguousarray(ids, dtype=np.uint8)


def template_sketch(name: str, size: int = TEMPLATE_SIZE, line_width: int = 3) -> np.ndarray:
    """A line drawing of the template: True on strokes (the outlines of its face parts)."""
    return mask_edges(template_mask(name, size), line_width=line_width)


def blank_mask(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """An all-background canvas."""
    return np.zeros((size, size), dtype=np.uint8)


def mask_edges(ids: np.ndarray, line_width: int = 3) -> np.ndarray:
    """Boundaries between classes of an id map, thickened to about ``line_width`` pixels.

    The lip line and the borders of hair, skin, eyes, brows, nose, ears, neck and clothes become
    strokes, which is what a person sketching the face would draw.
    """
    ids = np.asarray(ids)
    edges = np.zeros(ids.shape, dtype=bool)
    edges[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edges[1:, :] |= ids[1:, :] != ids[:-1, :]
    return dilate(edges, max(0, (int(line_width) - 1) // 2))


def dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean map by ``radius`` pixels (a square neighbourhood)."""
    if radius <= 0:
        return binary
    padded = np.pad(binary, radius)
    height, width = binary.shape
    grown = np.zeros_like(binary)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _layout(name: str) -> _Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in TEMPLATE_NAMES)
        raise InvalidSettingError(f"unknown template {name!r}; choose one of {known}") from None


class _Canvas:
    """An id map painted in order: later shapes cover earlier ones."""

    def __init__(self, size: int = TEMPLATE_SIZE):
        self.ids = np.zeros((size, size), dtype=np.uint8)
        self.y, self.x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    def paint(self, region: np.ndarray, name: str) -> None:
        self.ids[region] = _ID[name]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0) -> np.ndarray:
        angle = np.deg2rad(angle_deg)
        dx, dy = self.x - cx, self.y - cy
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    def egg(self, cx: float, cy: float, rx: float, top: float, bottom: float, chin: float) -> np.ndarray:
        """An oval whose lower half narrows towards the chin (``chin`` in [0, 1))."""
        below = self.y > cy
        v = np.where(below, (self.y - cy) / bottom, (cy - self.y) / top)
        width = rx * (1.0 - chin * np.clip(v, 0.0, 1.0) ** 2 * below)
        return ((self.x - cx) / width) ** 2 + v**2 <= 1.0

    def polygon(self, points: list[tuple[float, float]]) -> np.ndarray:
        image = Image.new("1", self.ids.shape[::-1], 0)
        ImageDraw.Draw(image).polygon(points, fill=1)
        return np.asarray(image, dtype=bool)


def _draw(layout: _Layout) -> np.ndarray:
    canvas = _Canvas()
    turn = layout.turn
    face_cx = 256.0 + 12.0 * turn
    # Features slide towards the image's right as the head turns; the far (right-hand) side shrinks.
    feature_cx = 256.0 + 48.0 * turn
    near_scale, far_scale = 1.0 + 0.08 * turn, 1.0 - 0.35 * turn

    canvas.paint(canvas.ellipse(256, 590, 330, 150), "cloth")
    if layout.hair == "long":
        canvas.paint(canvas.egg(256, 250, 185, 215, 250, 0.1) & (canvas.y < 500), "hair")
    neck = canvas.polygon([(face_cx - 66, 360), (face_cx + 66, 360), (face_cx + 74, 462), (face_cx, 500),
                           (face_cx - 74, 462)])
    canvas.paint(neck, "neck")
    face = canvas.egg(face_cx, 270, 140 - 10 * turn, 178, 200, 0.42)
    _draw_ears(canvas, face_cx, turn, hidden_by_long_hair=layout.hair == "long")
    if layout.hair != "long":
        canvas.paint(canvas.egg(face_cx - 4 * turn, 235, 160, 195, 120, 0.5) & (canvas.y < 300) & ~face, "hair")
    canvas.paint(face, "skin")
    _draw_fringe(canvas, face, face_cx, layout)
    if layout.hat:
        _draw_hat(canvas, face_cx)

    for side in ("r", "l"):
        sign, scale = (-1.0, near_scale) if side == "r" else (1.0, far_scale)
        cx = feature_cx + sign * 64.0 * (near_scale if side == "r" else far_scale**0.5)
        brow = canvas.ellipse(cx, 212, 38 * scale, 9, angle_deg=-sign * 6) & (canvas.y < 214)
        canvas.paint(brow & face, f"{side}_brow")
        canvas.paint(canvas.ellipse(cx, 245, 27 * scale, 11), f"{side}_eye")
        if layout.glasses:
            _draw_glasses_rim(canvas, cx, 247, 44 * scale, 30)
    if layout.glasses:
        bridge = (np.abs(canvas.y - 240) < 4) & (np.abs(canvas.x - feature_cx) < 22)
        canvas.paint(bridge, "eye_g")

    _draw_nose(canvas, feature_cx + 6 * turn, turn)
    _draw_mouth(canvas, feature_cx + 4 * turn, layout.open_mouth, far_scale)
    return canvas.ids


def _draw_ears(canvas: _Canvas, face_cx: float, turn: float, hidden_by_long_hair: bool) -> None:
    if hidden_by_long_hair:
        return
    canvas.paint(canvas.ellipse(face_cx - 140 + 14 * turn, 300, 20, 36), "r_ear")
    if turn < 0.5:  # a turned head hides its far ear
        canvas.paint(canvas.ellipse(face_cx + 140, 300, 20, 36), "l_ear")


def _draw_fringe(canvas: _Canvas, face: np.ndarray, face_cx: float, layout: _Layout) -> None:
    """Hair over the top of the face, down to a curved hairline."""
    if layout.hair == "long":
        # A side parting: the hairline sweeps down towards the image's left.
        hairline = 140.0 + 60.0 * np.clip((face_cx + 40 - canvas.x) / 180.0, 0, 1) ** 1.5
    elif layout.hair == "under_hat":
        hairline = 165.0 + 0.003 * (canvas.x - face_cx) ** 2
    else:
        hairline = 150.0 + 0.0012 * (canvas.x - face_cx) ** 2
    canvas.paint(face & (canvas.y < hairline), "hair")


def _draw_hat(canvas: _Canvas, face_cx: float) -> None:
    crown = canvas.ellipse(face_cx, 120, 150, 95) & (canvas.y < 150)
    brim = canvas.ellipse(face_cx, 150, 200, 26)
    canvas.paint(crown | brim, "hat")


def _draw_glasses_rim(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float) -> None:
    outer = canvas.ellipse(cx, cy, rx, ry)
    inner = canvas.ellipse(cx, cy, rx - 7, ry - 7)
    canvas.paint(outer & ~inner, "eye_g")


def _draw_nose(canvas: _Canvas, cx: float, turn: float) -> None:
    tip_shift = 20.0 * turn
    bridge = canvas.polygon([(cx - 14, 240), (cx + 14, 240), (cx + 26 + tip_shift, 318), (cx - 26 + tip_shift, 318)])
    tip = canvas.ellipse(cx + tip_shift, 318, 36, 22)
    canvas.paint(bridge | tip, "nose")


def _draw_mouth(canvas: _Canvas, cx: float, open_mouth: bool, far_scale: float) -> None:
    """Upper lip, the mouth opening (a thin line when closed) and the lower lip; corners at y = 380."""
    half = 62.0 if open_mouth else 55.0
    left, right = cx - half, cx + half * (0.75 + 0.25 * far_scale)
    gap = 13.0 if open_mouth else 3.0
    top, bottom = 380.0 - 1.0, 380.0 + gap
    upper = canvas.polygon([(left, 380), (cx - 22, 362), (cx, 367), (cx + 22, 362), (right, 380),
                            (cx + 20, top), (cx - 20, top)])
    opening = canvas.polygon([(left, 380), (cx - 20, top), (cx + 20, top), (right, 380),
                              (cx + 20, bottom), (cx - 20, bottom)])
    lower = canvas.polygon([(left, 380), (cx - 20, bottom), (cx + 20, bottom), (right, 380),
                            (right - 16, bottom + 14), (cx + 22, bottom + 22), (cx - 22, bottom + 22),
                            (left + 16, bottom + 14)])
    canvas.paint(lower, "l_lip")
    canvas.paint(upper, "u_lip")
    canvas.paint(opening & ~upper & ~lower, "mouth")
