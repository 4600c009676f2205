"""The Space's engine selector: DDGI and the MM2Latent engine behind the same tabs and endpoints."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

from mm2latent.inputs.metadata import read_png_settings
from mm2latent.inputs.templates import template_sketch
from mm2latent.ui import canvases, outputs
from mm2latent.ui.loading import LoadedModel, load_fast_engine
from mm2latent.ui.settings import Settings

PROMPT = "She has long wavy blonde hair and is smiling."


@pytest.fixture(scope="module")
def two_engines(tiny_pipe, tiny_mm2latent_pipe, tmp_path_factory):
    from mm2latent.ui.handlers import SpaceHandlers

    return SpaceHandlers(tiny_pipe, settings=Settings(model_repo="tiny"), engines={"mm2latent": tiny_mm2latent_pipe},
                         store=outputs.OutputStore(tmp_path_factory.mktemp("engine-runs")))


def test_the_selected_engine_makes_the_faces(two_engines, tiny_pipe, tiny_mm2latent_pipe):
    assert two_engines.engine_choices == ["ddgi", "mm2latent"]
    picture = canvases.template_canvas("long hair")
    results = {}
    for engine in ("ddgi", "mm2latent"):
        gallery, seed, summary, attention, files, diffusion = two_engines.generate_from_mask(
            PROMPT, picture, seed=5, randomize_seed=False, engine=engine)
        results[engine] = np.load(next(path for path in files if path.endswith(".npy")))
        assert read_png_settings(gallery[0][0])["engine"] == engine  # the PNG says which engine made it
    assert ("MM2Latent engine" in summary) and not attention  # no cross-attention maps without a diffusion model
    ids = canvases.mask_from_canvas(picture)
    expected = tiny_mm2latent_pipe(PROMPT, mask=ids, seed=5)
    np.testing.assert_array_equal(results["mm2latent"][0], expected.latents[0].numpy())
    np.testing.assert_array_equal(results["ddgi"][0], tiny_pipe(PROMPT, mask=ids, seed=5).latents[0].numpy())
    assert results["ddgi"].shape == results["mm2latent"].shape  # same generator, same W+


def test_diffusion_only_settings_do_not_break_the_fast_engine(two_engines, tiny_mm2latent_pipe):
    """Quality mode or the diffusion image with the fast engine: a note, then the engine's one mode."""
    gallery, *_, files, diffusion = two_engines.generate_from_sketch(
        PROMPT, canvases.sketch_canvas(template_sketch("short hair")), mode="quality", steps=3, seed=2,
        randomize_seed=False, show_diffusion=True, engine="mm2latent")
    assert not diffusion and read_png_settings(gallery[0][0])["engine"] == "mm2latent"


def test_an_unknown_engine_is_refused_in_plain_words(two_engines):
    with pytest.raises(gr.Error, match="Engine must be one of: ddgi, mm2latent"):
        two_engines.generate_from_mask(PROMPT, canvases.template_canvas("glasses"), engine="stylegan")


def _main(name: str, engine: str = "ddgi") -> LoadedModel:
    return LoadedModel(editor=SimpleNamespace(generation=SimpleNamespace(name=name, engine=engine)), status=None,
                       details=None, requested=name)


@pytest.mark.parametrize("requested, main, engine, loaded", [
    ("auto", "tiny", "ddgi", "tiny-mm2latent"),       # the offline demo shows both engines
    ("auto", "org/trained", "ddgi", None),            # no toy engine beside real weights
    (None, "tiny", "ddgi", None),                     # MM2LATENT_FAST_ENGINE_REPO=off
    ("org/fast", "org/trained", "ddgi", "org/fast"),  # a named MM2Latent model
    ("auto", "tiny-mm2latent", "mm2latent", None),    # the main model is already the fast engine
])
def test_which_fast_engine_is_offered(requested, main, engine, loaded):
    asked = []

    def load(name, **options):
        asked.append(name)
        return SimpleNamespace(name=name, engine="mm2latent", trained=False)

    engine = load_fast_engine(Settings(fast_engine_repo=requested), _main(main, engine), load=load)
    assert (engine.name if engine else None) == loaded
    # The tiny engine of the offline demo is built on its first use; a named model is loaded (and checked) now.
    assert asked == ([loaded] if loaded and requested != "auto" else [])
    if engine is not None:
        assert engine.get().name == loaded and asked == [loaded]


def test_a_fast_engine_that_fails_or_is_not_mm2latent_is_left_out():
    def broken(name, **options):
        raise OSError("offline")

    assert load_fast_engine(Settings(fast_engine_repo="org/fast"), _main("org/trained"), load=broken) is None
    ddgi = load_fast_engine(Settings(fast_engine_repo="org/other"), _main("org/trained"),
                            load=lambda name, **options: SimpleNamespace(name=name, engine="ddgi"))
    assert ddgi is None


def test_the_setting_reads_off_and_names():
    assert Settings.from_env({}).fast_engine_repo == "auto"
    assert Settings.from_env({"MM2LATENT_FAST_ENGINE_REPO": "off"}).fast_engine_repo is None
    assert Settings.from_env({"MM2LATENT_FAST_ENGINE_REPO": "org/fast"}).fast_engine_repo == "org/fast"


def test_training_free_mode_in_the_space(tmp_path):
    """On public weights (untrained M, T) the Space runs the edit pipeline's training-free mode, examples too."""
    from mm2latent import FaceEditPipeline
    from mm2latent.ui.handlers import SpaceHandlers

    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    editor.generation.show_progress = False
    assert editor.default_mode == "invert"  # untrained M and T with a photo encoder: the public preset's case
    handlers = SpaceHandlers(editor.generation, run=editor, settings=Settings(model_repo="tiny"),
                             default_mode=editor.default_mode, store=outputs.OutputStore(tmp_path))
    picture = canvases.template_canvas("glasses")
    gallery, seed, summary, attention, files, diffusion = handlers.generate_from_mask(
        PROMPT, picture, mode="invert", steps=2, seed=3, randomize_seed=False)
    assert read_png_settings(gallery[0][0])["mode"] == "invert" and "training-free" in summary
    expected = editor(PROMPT, mask=canvases.mask_from_canvas(picture), seed=3, mode="invert", num_steps=2)
    np.testing.assert_array_equal(np.load(next(p for p in files if p.endswith(".npy")))[0],
                                  expected.latents[0].numpy())
    # How close the face came to the drawing is shown with it: the library's own figures for this face.
    closeness = expected.closeness[0]
    assert f"L2 {closeness['l2']:.3f}" in summary and f"mask mIoU {100 * closeness['miou']:.0f} %" in summary
    example = handlers.example_from_mask(PROMPT, picture)
    assert read_png_settings(example[0][0][0])["mode"] == "invert"
    with pytest.raises(ValueError, match="default_mode"):
        SpaceHandlers(editor.generation, default_mode="slow")


@pytest.mark.parametrize("mode, show_diffusion, note", [
    ("fast", False, None),                       # nothing chosen: no note on every run
    ("invert", False, None),                     # the Space's default mode on these weights: no choice either
    ("quality", False, "the quality mode do"),
    ("fast", True, "the diffusion image do"),
])
def test_the_fast_engine_notes_only_a_choice_it_ignores(tiny_pipe, tiny_mm2latent_pipe, tmp_path, monkeypatch,
                                                        mode, show_diffusion, note):
    from mm2latent.ui.handlers import SpaceHandlers

    handlers = SpaceHandlers(tiny_pipe, settings=Settings(model_repo="tiny"), engines={"mm2latent": tiny_mm2latent_pipe},
                             store=outputs.OutputStore(tmp_path), default_mode="invert")
    notes = []
    monkeypatch.setattr(gr, "Info", notes.append)
    handlers.generate_from_mask(PROMPT, canvases.template_canvas("long hair"), mode=mode, steps=2,
                                show_diffusion=show_diffusion, engine="mm2latent")
    assert len(notes) == (0 if note is None else 1) and (note is None or note in notes[0])
