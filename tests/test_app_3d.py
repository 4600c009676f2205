"""The Space's 3D tab: its handlers on the tiny-eg3d preset, then its endpoints through gradio_client."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from helpers import running_space
from PIL import Image

from mm2latent.inputs.templates import template_sketch
from mm2latent.ui import canvases, outputs
from mm2latent.ui.loading import LoadedModel
from mm2latent.ui.settings import Settings, SettingsError

PROMPT = "She has long wavy blonde hair and is smiling."


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_text(path: str) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def video_frames(path: str) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# --------------------------------------------------------------------------------------------
# Settings and loading
# --------------------------------------------------------------------------------------------


def test_3d_settings_from_the_environment():
    assert Settings.from_env({}).model_3d_repo == "auto"
    for off in ("off", "OFF", " none ", "0"):
        assert Settings.from_env({"MM2LATENT_3D_MODEL_REPO": off}).model_3d_repo is None
    settings = Settings.from_env({"MM2LATENT_3D_MODEL_REPO": "someone/eg3d-faces",
                                  "MM2LATENT_3D_MODEL_REVISION": "v2", "MM2LATENT_TURNTABLE_MAX_FRAMES": "12"})
    assert (settings.model_3d_repo, settings.model_3d_revision, settings.turntable_max_frames) == (
        "someone/eg3d-faces", "v2", 12)
    with pytest.raises(SettingsError, match="MM2LATENT_TURNTABLE_MAX_FRAMES.*from 4 to 240"):
        Settings.from_env({"MM2LATENT_TURNTABLE_MAX_FRAMES": "1000"})


def _main(name: str) -> LoadedModel:
    return LoadedModel(editor=SimpleNamespace(generation=SimpleNamespace(name=name, engine="ddgi")), status=None,
                       details=None, requested=name)


@pytest.mark.parametrize("requested, main, tab", [
    ("auto", "tiny", "tiny-eg3d"),         # the offline demo: a toy 3D tab beside a toy model
    ("auto", "org/trained", None),         # no untrained 3D tab beside real weights
    (None, "tiny", None),                  # MM2LATENT_3D_MODEL_REPO=off
    ("tiny", "tiny", "tiny-eg3d"),         # a 2D model named: the toy tab, beside a toy model only
    ("tiny", "org/trained", None),
])
def test_which_3d_tab_is_offered(requested, main, tab):
    from mm2latent.ui.three_d import load_3d_pipeline

    model = load_3d_pipeline(Settings(model_3d_repo=requested, device="cpu"), _main(main))
    assert (model.pipe.name if model else None) == tab
    if model is not None:
        assert not model.pipe.is_loaded  # the toy 3D model is built when the tab is first used
        assert "Untrained 3D demo" in model.banner and "Error" not in model.banner


def test_a_3d_model_that_is_2d_falls_back_with_a_plain_note():
    from mm2latent.models.generator import is_3d
    from mm2latent.ui.three_d import load_3d_pipeline

    model = load_3d_pipeline(Settings(model_3d_repo="tiny", device="cpu"), _main("tiny"))
    assert "2D" in model.problem and "`tiny` could not be used: its generator" in model.banner
    assert is_3d(model.pipe.get().generator) and model.pipe.get().name == "tiny-eg3d"


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eg3d_pipe():
    from mm2latent import FacePipeline

    pipe = FacePipeline.from_pretrained("tiny-eg3d", device="cpu")
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="module")
def handlers(eg3d_pipe, tmp_path_factory):
    from mm2latent.ui.three_d import ThreeDHandlers

    return ThreeDHandlers(eg3d_pipe, settings=Settings(turntable_max_frames=12),
                          store=outputs.OutputStore(tmp_path_factory.mktemp("space-3d-runs")))


@pytest.fixture(scope="module")
def generated(handlers):
    return handlers.generate_3d(PROMPT, "mask", canvases.template_canvas("long hair"), None, seed=5,
                                randomize_seed=False, truncation=0.7, yaw=20, pitch=-5, show_depth=True)


def test_generate_3d_returns_the_face_its_depth_and_the_camera_in_the_png(generated, eg3d_pipe):
    image, depth, seed, summary, files, face = generated
    assert seed == 5 and "`5`" in summary and "yaw 20°, pitch -5°" in summary and "text + mask" in summary
    text = png_text(image)
    assert text["ai_generated"] == "true" and json.loads(text["camera"]) == [20, -5]
    settings = json.loads(text["parameters"])
    assert settings["camera"] == [20, -5] and settings["truncation"] == 0.7 and settings["inputs"] == ["mask"]
    assert pixels(image).shape == (eg3d_pipe.resolution, eg3d_pipe.resolution, 3)
    with Image.open(depth) as depth_image:
        assert depth_image.mode == "L" and depth_image.size == (16, 16)  # tiny-eg3d's neural rendering side
        grey = np.asarray(depth_image)
    assert grey.min() == 0 and grey.max() == 255  # stretched per map: the face has near and far parts
    assert sorted(Path(f).suffix for f in files) == [".npy", ".png", ".png"]
    latents = np.load(next(f for f in files if f.endswith(".npy")))
    assert np.array_equal(latents, face["latents"]) and latents.shape == (1, 8, 64)
    # The image is the pipeline's own call with these settings (same seed, ψ, camera).
    again = eg3d_pipe(PROMPT, mask=canvases.mask_from_canvas(canvases.template_canvas("long hair")), seed=5,
                      truncation=0.7, camera=(20, -5))
    assert np.array_equal(np.asarray(again.images[0]), pixels(image))


def test_render_view_turns_the_same_face_without_encoding_again(handlers, generated, monkeypatch):
    image, _, _, _, _, face = generated

    def no_encoding(*args, **kwargs):
        raise AssertionError("render_view ran the diffusion encoder")

    monkeypatch.setattr(handlers.pipe, "predict_latents", no_encoding)
    # Same latent, same camera, "const" noise, the same rendering code: the same pixels, bit for bit.
    same, same_depth, files = handlers.render_view(face, 20, -5, False)
    assert np.array_equal(pixels(same), pixels(image)) and same_depth is None
    assert [Path(f).suffix for f in files] == [".png", ".npy"]
    turned, turned_depth, _ = handlers.render_view(face, -40, 10, True)
    assert not np.array_equal(pixels(turned), pixels(image))
    assert json.loads(png_text(turned)["camera"]) == [-40, 10]
    assert json.loads(png_text(turned)["parameters"])["seed"] == 5
    assert turned_depth is not None and Image.open(turned_depth).size == (16, 16)


def test_the_sliders_turn_the_face_and_the_summary_names_the_new_camera(handlers, generated):
    face = generated[-1]
    image, depth, files, summary = handlers.turn_view(face, 40, 5, False)
    assert json.loads(png_text(image)["camera"]) == [40, 5] and depth is None
    assert "yaw 40°, pitch 5°" in summary and "yaw 20°" not in summary and "`5`" in summary  # the face's seed


def test_the_sliders_before_a_face_exists_give_one_hint_and_leave_the_pictures(handlers):
    import gradio as gr

    image, depth, files, summary = handlers.turn_view(None, 40, 5, False)  # no error: no pop-up, no badges
    assert all(isinstance(value, type(gr.skip())) for value in (image, depth, files))
    assert summary.startswith("Generate a face first")


def test_turntable_is_an_h264_loop_of_the_face(handlers, generated, eg3d_pipe):
    face = generated[-1]
    path = handlers.turntable(face, 8)
    frames = video_frames(path)
    assert path.endswith(".mp4") and len(frames) == 8
    assert frames[0].shape == (eg3d_pipe.resolution, eg3d_pipe.resolution, 3)
    assert not np.array_equal(frames[0], frames[2])  # the camera moves


def test_3d_handlers_refuse_bad_input_in_plain_words(handlers, generated):
    import gradio as gr

    face = generated[-1]
    sketch = canvases.sketch_canvas(template_sketch("short hair"))
    cases = [
        (lambda: handlers.render_view(None, 0, 0, False), "Generate a face first"),
        (lambda: handlers.turntable(None, 8), "Generate a face first"),
        (lambda: handlers.render_view(face, 90, 0, False), "Yaw must be a number from -60 to 60, got 90"),
        (lambda: handlers.render_view(face, 0, float("nan"), False), "Pitch must be a number from -30 to 30"),
        (lambda: handlers.turntable(face, 500), "Frames must be a whole number from 4 to 12"),
        (lambda: handlers.generate_3d("", "text only", None, sketch), "Text only needs a prompt"),
        (lambda: handlers.generate_3d(PROMPT, "photo", None, sketch), "Draw from must be one of"),
        (lambda: handlers.generate_3d("", "mask", canvases.template_canvas(canvases.BLANK_CANVAS), sketch),
         "Nothing to generate from"),
    ]
    for call, words in cases:
        with pytest.raises(gr.Error, match=words):
            call()


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    workdir = tmp_path_factory.mktemp("space-3d")
    with running_space(workdir, MM2LATENT_MODEL_REPO="tiny", MM2LATENT_CACHE_EXAMPLES="off") as url:
        yield Client(url, verbose=False)


def test_space_endpoints_return_images_and_video(client, tmp_path):
    from gradio_client import handle_file

    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate_3d", "/render_view", "/turntable"} <= endpoints

    sketch = tmp_path / "sketch.png"
    canvases.sketch_canvas(template_sketch("short hair"))["background"].save(sketch)
    sketch_value = {"background": handle_file(str(sketch)), "layers": [], "composite": handle_file(str(sketch)),
                    "id": None}
    image, depth, seed, summary, files = client.predict(
        PROMPT, "sketch", None, sketch_value, 77, False, 1.0, 30, 0, True, api_name="/generate_3d")
    assert seed == 77 and "sketch" in summary and "yaw 30°" in summary
    assert json.loads(png_text(image)["camera"]) == [30, 0] and pixels(image).shape == (64, 64, 3)
    assert Image.open(depth).size == (16, 16) and len(files) == 3

    # The client's session holds the face: the view at the same camera is that image again.
    same, no_depth, _ = client.predict(30, 0, False, api_name="/render_view")
    assert np.array_equal(pixels(same), pixels(image)) and no_depth is None
    turned, _, _ = client.predict(-30, 0, False, api_name="/render_view")
    assert not np.array_equal(pixels(turned), pixels(image))

    video = client.predict(6, api_name="/turntable")
    path = video["video"] if isinstance(video, dict) else video
    assert path.endswith(".mp4") and len(video_frames(path)) == 6


def test_space_render_view_before_generating_is_a_clear_error(tmp_path_factory, client):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    fresh = Client(client.src, verbose=False)  # a new session: no face yet
    with pytest.raises(AppError, match="Generate a face first"):
        fresh.predict(0, 0, False, api_name="/render_view")
    image, *_ = client.predict(PROMPT, "text only", None, None, 1, False, 1.0, 0, 0, False, api_name="/generate_3d")
    assert Path(image).suffix == ".png"  # the server kept serving
