"""The training-free mode in the Space: the diffusion drawing shown while it forms, then the face."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from mm2latent.ui import canvases, outputs
from mm2latent.ui.drawing import PREVIEW_EVERY, PREVIEW_SIZE, with_drawing_previews
from mm2latent.ui.settings import Settings

PROMPT = "She has long wavy blonde hair and is smiling."
STEPS = 4
NUM_OUTPUTS = 6  # gallery, seed, summary, attention, files, diffusion image


@pytest.fixture(scope="module")
def editor_handlers(tmp_path_factory):
    from mm2latent import FaceEditPipeline
    from mm2latent.ui.handlers import SpaceHandlers

    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    editor.generation.show_progress = False
    return SpaceHandlers(editor.generation, run=editor, settings=Settings(model_repo="tiny"),
                         default_mode=editor.default_mode,
                         store=outputs.OutputStore(tmp_path_factory.mktemp("drawing-runs")))


def test_the_drawing_shows_while_it_forms_then_the_face(editor_handlers):
    generate = with_drawing_previews(editor_handlers.generate_from_mask, NUM_OUTPUTS)
    picture = canvases.template_canvas("long hair")
    shown = list(generate(PROMPT, picture, mode="invert", steps=STEPS, seed=3, randomize_seed=False))
    previews, final = shown[:-1], shown[-1]
    assert len(previews) == STEPS // PREVIEW_EVERY  # steps 2 and 4 of 4
    for index, preview in enumerate(previews):
        step = (index + 1) * PREVIEW_EVERY
        (image, caption), = preview[0]
        assert caption == f"drawing… step {step} of {STEPS}" and f"step {step} of {STEPS}" in preview[2]
        assert isinstance(image, Image.Image) and image.size == (PREVIEW_SIZE, PREVIEW_SIZE)
        assert all(isinstance(value, type(gr.skip())) for i, value in enumerate(preview) if i not in (0, 2))
    # Previews of successive steps differ: the drawing forms.
    assert not np.array_equal(np.asarray(previews[0][0][0][0]), np.asarray(previews[-1][0][0][0]))
    # The last yield is the handler's own result: the same face as without previews.
    plain = editor_handlers.generate_from_mask(PROMPT, picture, mode="invert", steps=STEPS, seed=3,
                                               randomize_seed=False)
    latents = [np.load(next(p for p in result[4] if p.endswith(".npy"))) for result in (final, plain)]
    np.testing.assert_array_equal(*latents)
    assert final[1] == 3 and "training-free" in final[2]


def test_other_modes_have_no_drawing_and_errors_reach_the_page(editor_handlers):
    generate = with_drawing_previews(editor_handlers.generate_from_mask, NUM_OUTPUTS)
    shown = list(generate(PROMPT, canvases.template_canvas("long hair"), mode="fast", seed=1, randomize_seed=False))
    assert len(shown) == 1 and "fast mode" in shown[0][2]
    with pytest.raises(gr.Error, match="mode must be one of"):
        list(generate(PROMPT, canvases.template_canvas("long hair"), mode="slow"))
