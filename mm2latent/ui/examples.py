"""The Space's examples: prompts with masks and sketches drawn from the project's own templates.

``python -m mm2latent.ui.examples [folder]`` (re)writes the files; the app also writes any that are
missing at start-up. Masks are palette PNGs (index = class id, palette = CelebAMask-HQ colours), so
they read as class ids and still look like colour maps; sketches are black lines on white.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs.conditions import mask_to_palette_image
from ..inputs.templates import template_mask, template_sketch

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "examples"

MASK_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("She has long wavy blonde hair and is smiling.", "long hair"),
    ("He has short black hair, a beard and wears eyeglasses.", "glasses"),
    ("This young woman has her mouth slightly open and wears lipstick.", "open mouth"),
    ("This smiling man wears a hat and has a mustache.", "hat"),
)
SKETCH_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("The man has short brown hair and bushy eyebrows.", "short hair"),
    ("She has straight black hair and high cheekbones.", "long hair"),
    ("This young man has wavy hair and a pointy nose.", "turned head"),
)


def slug(template: str) -> str:
    return template.replace(" ", "_")


def mask_path(folder: Path, template: str) -> Path:
    return Path(folder) / "masks" / f"{slug(template)}.png"


def sketch_path(folder: Path, template: str) -> Path:
    return Path(folder) / "sketches" / f"{slug(template)}.png"


def draw_mask(template: str) -> Image.Image:
    return mask_to_palette_image(template_mask(template))


def draw_sketch(template: str) -> Image.Image:
    return Image.fromarray(np.where(template_sketch(template), 0, 255).astype(np.uint8))


def write_examples(folder: Path = DEFAULT_FOLDER, overwrite: bool = True) -> list[Path]:
    """Draw every example input into ``folder``; returns the paths written."""
    written = []
    jobs = [(mask_path(folder, t), draw_mask, t) for _, t in MASK_EXAMPLES]
    jobs += [(sketch_path(folder, t), draw_sketch, t) for _, t in SKETCH_EXAMPLES]
    for path, draw, template in jobs:
        if path.exists() and not overwrite:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(template).save(path, format="PNG", optimize=True)
        written.append(path)
    return written


def mask_example_rows(folder: Path = DEFAULT_FOLDER) -> list[list[str]]:
    """``[prompt, mask file]`` rows for ``gr.Examples``."""
    return [[prompt, str(mask_path(folder, template))] for prompt, template in MASK_EXAMPLES]


def sketch_example_rows(folder: Path = DEFAULT_FOLDER) -> list[list[str]]:
    return [[prompt, str(sketch_path(folder, template))] for prompt, template in SKETCH_EXAMPLES]


if __name__ == "__main__":
    for written_path in write_examples(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FOLDER):
        print(written_path)
