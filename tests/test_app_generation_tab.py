"""The generation tabs' handlers: truncation notes, checked uploads, the template choice following the canvas."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
from helpers import huge_png, not_an_image

from mm2latent.inputs.conditions import CELEBAMASK_CLASSES, mask_to_palette_image
from mm2latent.inputs.templates import template_mask
from mm2latent.ui import canvases, examples, outputs
from mm2latent.ui.settings import Settings

HAIR = CELEBAMASK_CLASSES.index("hair")


@pytest.fixture(scope="module")
def handlers(tiny_pipe, tmp_path_factory):
    from mm2latent.ui.handlers import SpaceHandlers

    return SpaceHandlers(tiny_pipe, settings=Settings(model_repo="tiny"),
                         store=outputs.OutputStore(tmp_path_factory.mktemp("space-runs")))


def test_a_truncated_prompt_is_a_toast_naming_what_was_kept(handlers, monkeypatch):
    toasts = []
    monkeypatch.setattr(gr, "Warning", toasts.append)
    sentence = "She has long wavy blonde hair and is smiling. "
    prompt = sentence * 12  # 9 words (10 tokens with the period) a sentence: 7.5 sentences fit in 77 tokens
    handlers.generate_from_mask(prompt, canvases.template_canvas("long hair"), seed=1, randomize_seed=False)
    assert len(toasts) == 1 and "longer than the 77 tokens" in toasts[0]
    kept = int(re.search(r"the first (\d+) words", toasts[0])[1])
    words = re.findall(r"[a-z]+", prompt.lower())
    assert 50 < kept < len(words)
    assert toasts[0].endswith(f"up to “…{' '.join(words[kept - 8:kept])}”.")  # the end of what was kept
    toasts.clear()
    handlers.generate_from_mask("She is smiling.", canvases.template_canvas("long hair"), seed=1, randomize_seed=False)
    assert toasts == []


def test_uploads_are_checked_before_they_reach_the_canvas(handlers, tmp_path):
    text_file = not_an_image(tmp_path / "notes.png")
    huge = huge_png(tmp_path / "huge.png")
    for check in (handlers.check_mask_upload, handlers.check_sketch_upload, handlers.check_photo_upload):
        with pytest.raises(gr.Error, match="Cannot read 'notes.png' as an image"):
            check(str(text_file))
        with pytest.raises(gr.Error, match="(?i)pixels"):
            check(str(huge))
    palette = examples.mask_path(examples.DEFAULT_FOLDER, "hat")
    assert handlers.check_mask_upload(str(palette)) is None
    assert handlers.check_sketch_upload(str(examples.sketch_path(examples.DEFAULT_FOLDER, "short hair"))) is None


@pytest.mark.parametrize("name", ["long hair", "hat", canvases.BLANK_CANVAS])
def test_template_choice_follows_the_canvas(handlers, name):
    assert handlers.template_on_canvas(canvases.template_canvas(name)) == name


def test_template_choice_is_cleared_for_a_canvas_that_is_no_template(handlers, tmp_path):
    ids = template_mask("short hair").copy()
    ids[300:400, 100:400] = HAIR  # a painted band: 6% of the picture differs
    path = tmp_path / "painted.png"
    mask_to_palette_image(ids).save(path)
    assert handlers.template_on_canvas({"background": str(path), "layers": [], "composite": str(path)}) is None
    assert handlers.template_on_canvas(None) is None
    # An example's palette PNG (what an example click puts on the canvas) reads as its template.
    example = str(examples.mask_path(examples.DEFAULT_FOLDER, "glasses"))
    assert handlers.template_on_canvas({"background": example, "layers": [], "composite": None}) == "glasses"


def test_matching_template_tolerates_a_few_resampled_edge_pixels():
    ids = template_mask("glasses").copy()
    edge = np.argwhere(ids != np.roll(ids, 1, axis=1))[:200]  # 200 pixels on class borders
    ids[edge[:, 0], edge[:, 1]] = np.roll(ids, 1, axis=1)[edge[:, 0], edge[:, 1]]
    assert canvases.matching_template(ids) == "glasses"
    assert canvases.matching_template(np.full_like(ids, HAIR)) is None
