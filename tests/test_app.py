"""The Space: its UI helpers and handlers directly, then `python app.py` driven through gradio_client.

The server is started as a subprocess, offline, asked for a model repository that cannot be had, so it
also shows that a fresh machine without network reaches a working page on the ``tiny`` preset.
"""

from __future__ import annotations

import concurrent.futures
import os
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import edit_identity, huge_png, image_size, not_an_image, running_space
from PIL import Image

from mm2latent.errors import EmptyMaskError
from mm2latent.inputs.conditions import CELEBAMASK_CLASSES, mask_to_color, mask_to_palette_image, parse_mask
from mm2latent.inputs.metadata import read_png_settings
from mm2latent.inputs.templates import template_mask, template_sketch
from mm2latent.pipelines.hub import DEFAULT_MODEL_REPO
from mm2latent.ui import canvases, examples, outputs
from mm2latent.ui.loading import load_order, load_pipeline
from mm2latent.ui.photo_tab import DISPLAY_SIZE
from mm2latent.ui.settings import Settings, SettingsError
from mm2latent.ui.text import model_status

HAIR = CELEBAMASK_CLASSES.index("hair")
OFFLINE_REPO = "mm2latent-tests/not-on-this-machine"

# --------------------------------------------------------------------------------------------
# Bad files, made small
# --------------------------------------------------------------------------------------------


def animated_gif(path: Path) -> Path:
    """Three frames; the first is the 'glasses' template."""
    frames = [mask_to_palette_image(template_mask(name)) for name in ("glasses", "hat", "short hair")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)
    return path


def hair_only_mask(path: Path) -> Path:
    ids = np.zeros((512, 512), dtype=np.uint8)
    ids[50:200, 100:400] = HAIR
    mask_to_color(ids).save(path)
    return path


def flat_colour_png(path: Path) -> Path:
    """A 'photo' of one flat colour: nothing in it looks like a face."""
    Image.new("RGB", (320, 320), (40, 160, 90)).save(path)
    return path


def photo_like(path: Path) -> Path:
    """A smooth synthetic 'photo' with a face-like blob, for the edge detector."""
    y, x = np.mgrid[0:300, 0:300]
    image = np.stack([120 + 0.2 * x, 100 + 0.1 * y, 90 + 0 * x], axis=-1)
    face = ((x - 150) / 80) ** 2 + ((y - 150) / 105) ** 2 < 1
    image[face] = (220, 180, 160)
    for eye_x in (120, 180):
        image[((x - eye_x) / 14) ** 2 + ((y - 130) / 7) ** 2 < 1] = (40, 30, 30)
    Image.fromarray(image.astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_defaults_work_on_a_space():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.model_repo == DEFAULT_MODEL_REPO
    assert settings.max_images == 4 and settings.cache_examples == "lazy" and settings.concurrency == 1
    assert settings.server_port is None and settings.device is None


def test_settings_are_read_from_the_environment():
    settings = Settings.from_env({
        "MM2LATENT_MODEL_REPO": "tiny", "MM2LATENT_MAX_IMAGES": "2", "MM2LATENT_CACHE_EXAMPLES": "OFF",
        "MM2LATENT_LOAD_VAE": "no", "MM2LATENT_SERVER_PORT": "7999", "MM2LATENT_DEVICE": " cpu ",
        "MM2LATENT_MAX_PROMPT_CHARS": "", "MM2LATENT_DTYPE": "BFloat16", "UNRELATED": "x",
    })
    assert settings.model_repo == "tiny" and settings.max_images == 2 and settings.cache_examples == "off"
    assert settings.load_vae is False and settings.server_port == 7999 and settings.device == "cpu"
    assert settings.max_prompt_chars == 1000  # empty = default
    assert settings.dtype == "bfloat16"


@pytest.mark.parametrize("name, value, words", [
    ("MAX_IMAGES", "0", "from 1 to 16"), ("MAX_IMAGES", "four", "whole number"),
    ("CACHE_EXAMPLES", "sometimes", "lazy, eager, off"), ("LOAD_VAE", "maybe", "1/0"),
    ("DTYPE", "float8", "auto, float32, bfloat16, float16"),
])
def test_bad_settings_are_refused_in_plain_words(name, value, words):
    with pytest.raises(SettingsError, match=f"MM2LATENT_{name}.*{words}"):
        Settings.from_env({f"MM2LATENT_{name}": value})


# --------------------------------------------------------------------------------------------
# Load order
# --------------------------------------------------------------------------------------------


def test_load_order_is_requested_then_public_then_tiny():
    assert load_order(OFFLINE_REPO) == [OFFLINE_REPO, "public", "tiny"]
    assert load_order("public") == ["public", "tiny"] and load_order("tiny") == ["tiny"]


def test_offline_fallback_chain_reaches_tiny_and_the_status_names_both_problems(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing cached
    loaded = load_pipeline(Settings(model_repo=OFFLINE_REPO, device="cpu", load_vae=False))
    assert loaded.pipe.name == "tiny" and loaded.editor.inverter is not None  # the fallback edits photos too
    assert [failure.model for failure in loaded.failures] == [OFFLINE_REPO, "public"]
    assert all("HF_HUB_OFFLINE" in failure.reason for failure in loaded.failures)  # the log keeps the full message
    assert "Demo mode" in loaded.status and "not faces" in loaded.status and "\n" not in loaded.status
    assert f"`{OFFLINE_REPO}`: its files are not on this machine" in loaded.details
    assert "`public`: its files are not on this machine" in loaded.details
    # What visitors read names no exception and no path of the server.
    shown = loaded.status + loaded.details
    assert "Error" not in shown and str(tmp_path) not in shown and "/" + "root" not in shown
    assert "HF_HUB_OFFLINE" not in shown and "cache" not in shown.lower()


def test_unpublished_repositories_are_skipped_without_a_request(monkeypatch):
    from mm2latent.ui import loading

    tried = []

    def load(name, **options):
        tried.append(name)
        if name != "tiny":
            raise OSError("offline")
        return SimpleNamespace(generation=SimpleNamespace(name="tiny", trained=False, device="cpu", engine="ddgi"))

    assert not loading.is_published("mm2latent/mm2latent-celebahq") and loading.is_published("org/trained")
    loaded = load_pipeline(Settings(model_repo="mm2latent/mm2latent-celebahq"), load=load)
    assert tried == ["public", "tiny"] and loaded.skipped == ["mm2latent/mm2latent-celebahq"]
    assert "`mm2latent/mm2latent-celebahq`: not published yet, so it was not tried." in loaded.details
    assert [failure.model for failure in loaded.failures] == ["public"]


def test_requested_folder_loads_first_and_the_status_says_its_weights_are_untrained(tmp_path):
    from mm2latent.pipelines.editing import FaceEditPipeline

    folder = FaceEditPipeline.from_pretrained("tiny", device="cpu").save_pretrained(tmp_path / "saved")
    loaded = load_pipeline(Settings(model_repo=str(folder), device="cpu"))
    assert loaded.failures == [] and loaded.editor.inverter is not None
    assert "untrained mapping networks" in loaded.status and "could not" not in loaded.details
    assert model_status(str(folder), loaded.pipe.name, True, []) == (None, None)  # trained as requested: nothing


def test_the_status_links_to_the_spaces_own_guide_on_a_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/faces")
    status, _ = model_status("tiny", "tiny", False, [])
    assert "(https://huggingface.co/spaces/someone/faces/blob/main/docs/weights.md)" in status


# --------------------------------------------------------------------------------------------
# Canvases
# --------------------------------------------------------------------------------------------


def test_palette_and_legend_cover_the_19_classes():
    colours = canvases.palette_hex()
    assert len(colours) == len(set(colours)) == 19 and colours[0] == "#000000"
    assert canvases.class_colour_hex("skin") == "#cc0000"
    legend = canvases.legend_html()
    assert legend.count("mm2l-swatch") == 19 and "glasses" in legend and "lower lip" in legend
    assert "rgb(0, 0, 204)" in canvases.swatch_names_script() and "#mask-editor" in canvases.swatch_names_script()


@pytest.mark.parametrize("name", canvases.TEMPLATE_CHOICES)
def test_template_canvas_reads_back_as_the_template(name):
    value = canvases.template_canvas(name)
    assert value["background"].size == (canvases.CANVAS_SIZE, canvases.CANVAS_SIZE)
    ids = canvases.mask_from_canvas(value)
    if name == canvases.BLANK_CANVAS:
        assert ids is None
    else:
        assert np.array_equal(ids, template_mask(name))


def test_brush_strokes_with_soft_edges_read_as_their_class():
    """A composite like the browser's: template + an anti-aliased hair stroke across the cheeks."""
    picture = np.asarray(canvases.template_canvas("short hair")["composite"].convert("RGBA")).copy()
    hair = np.array([0, 0, 204], dtype=np.float32)
    rows = slice(290, 306)
    for offset, weight in ((-2, 0.3), (-1, 0.7), (0, 1.0), (1, 0.7), (2, 0.3)):
        band = picture[rows.start + offset : rows.stop + offset, 180:330, :3].astype(np.float32)
        picture[rows.start + offset : rows.stop + offset, 180:330, :3] = np.rint(band * (1 - weight) + hair * weight)
    ids = canvases.mask_from_canvas({"background": None, "layers": [], "composite": Image.fromarray(picture)})
    changed = ids != template_mask("short hair")
    assert set(np.unique(ids[changed])) <= {HAIR}
    assert (ids[292:304, 190:320] == HAIR).all()


def test_transparent_canvas_is_empty_and_faceless_paint_is_refused():
    transparent = Image.new("RGBA", (512, 512), (255, 255, 255, 0))
    assert canvases.mask_from_canvas({"background": None, "layers": [], "composite": transparent}) is None
    assert canvases.mask_from_canvas(None) is None
    ids = np.zeros((512, 512), dtype=np.uint8)
    ids[:100] = HAIR
    with pytest.raises(EmptyMaskError, match="no face"):
        canvases.mask_from_canvas(canvases.mask_canvas(ids))


def test_returned_pictures_are_found_by_name_in_the_cache_only(tmp_path):
    from mm2latent.ui.returned_files import ReturnableCanvas, find_returned, returned_name
    from mm2latent.ui.security import DrawingCanvas

    # The browser gets the image editor's name and every one of its settings.
    canvas, plain_canvas = ReturnableCanvas(type="pil", label="Mask"), DrawingCanvas(type="pil", label="Mask")
    assert canvas.get_block_name() == canvas.get_block_class() == "imageeditor"
    assert canvas.get_config().keys() == plain_canvas.get_config().keys() and canvas.get_config()["label"] == "Mask"
    name = returned_name("mask")
    cached = tmp_path / "0a1b2c" / name
    cached.parent.mkdir()
    cached.write_bytes(b"\x89PNG")
    (cached.parent / "image.png").write_bytes(b"\x89PNG")
    assert find_returned(tmp_path, f"/home/caller/downloads/9f8e/{name}") == cached
    assert find_returned(tmp_path, f"C:\\Users\\caller\\{name}") == cached
    assert find_returned(tmp_path, "/anywhere/image.png") is None  # a name Gradio chose: not a returned picture
    assert find_returned(tmp_path, returned_name("mask")) is None  # the right form, never returned
    assert find_returned(tmp_path, str(cached.parent)) is None


def test_sketch_canvas_round_trip():
    assert canvases.strokes_from_canvas(canvases.sketch_canvas()) is None
    strokes = template_sketch("short hair")
    value = canvases.sketch_canvas(strokes)
    assert value["background"].getpixel((0, 0)) == (255, 255, 255)  # black on white for the visitor
    assert np.array_equal(canvases.strokes_from_canvas(value), strokes)
    # Strokes on a transparent layer with no paper behind them (after "clear canvas").
    layer = np.zeros((512, 512, 4), dtype=np.uint8)
    layer[200:210, 100:400, 3] = 255
    got = canvases.strokes_from_canvas({"background": None, "layers": [], "composite": Image.fromarray(layer)})
    assert got[205, 250] and not got[100, 250]


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def test_attention_overlay_and_heat_colours():
    ramp = outputs.heat_colours(np.linspace(0, 1, 11))
    assert ramp.shape == (11, 3) and (np.diff(ramp.sum(axis=1)) > 0).all()  # stronger is brighter, all along
    base = mask_to_color(template_mask("glasses"))
    attention = np.zeros((8, 8), dtype=np.float32)
    attention[2, 3] = 1.0
    overlay = outputs.overlay_attention(base, attention)
    assert overlay.size == (outputs.OVERLAY_SIZE, outputs.OVERLAY_SIZE) and overlay.mode == "RGB"
    # The heat is drawn where the attention is: elsewhere the overlay is the one of no attention at all.
    unattended = outputs.overlay_attention(base, np.zeros_like(attention))
    changed = (np.asarray(overlay, np.int16) != np.asarray(unattended, np.int16)).any(axis=-1)
    cell = outputs.OVERLAY_SIZE // 8
    rows, columns = np.nonzero(changed)
    assert changed[2 * cell + cell // 2, 3 * cell + cell // 2]
    assert cell <= rows.min() and rows.max() < 4 * cell and 2 * cell <= columns.min() and columns.max() < 5 * cell
    items = outputs.attention_gallery(base, ["she", "smiles"], np.stack([attention, attention[::-1]]))
    assert [caption for _, caption in items] == ["she", "smiles"]
    assert outputs.attention_gallery(base, [], None) == []


def test_saved_files_carry_metadata_and_latents(tmp_path):
    store = outputs.OutputStore(tmp_path / "runs")
    images = [Image.new("RGB", (16, 16), (i * 50, 0, 0)) for i in range(2)]
    latents = np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)
    saved = outputs.save_run(store.new_folder(), images, latents, [7, 8], {"prompt": "A man.", "seed": 7}, "stem")
    assert [p.name for p in saved.pngs] == ["stem-seed7.png", "stem-seed8.png"]
    with Image.open(saved.pngs[1]) as png:
        assert png.text["ai_generated"] == "true" and png.text["seed"] == "8" and png.text["prompt"] == "A man."
    assert np.array_equal(np.load(saved.latents), latents)
    old = store.new_folder()
    os.utime(old, (0, 0))
    store.prune()
    assert not old.exists() and saved.latents.exists()
    assert outputs.file_stem("She has long, wavy hair!", "mask") == "mm2latent-mask-she-has-long-wavy-hair"


# --------------------------------------------------------------------------------------------
# Handlers, called directly on the tiny pipeline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def handlers(tiny_pipe, tmp_path_factory):
    from mm2latent.ui.handlers import SpaceHandlers

    return SpaceHandlers(tiny_pipe, settings=Settings(model_repo="tiny"),
                         store=outputs.OutputStore(tmp_path_factory.mktemp("space-runs")))


def test_handler_generates_everything_a_visitor_sees(handlers, tiny_pipe):
    gallery, seed, summary, attention, files, diffusion = handlers.generate_from_mask(
        "She has long wavy blonde hair and is smiling.", canvases.template_canvas("long hair"), seed=11,
        randomize_seed=False, num_images=2, show_diffusion=True, steps=2)
    assert seed == 11 and "`11`, `12`" in summary and "text + mask" in summary
    assert [caption for _, caption in gallery] == ["seed 11", "seed 12"]
    for path, _ in gallery:
        with Image.open(path) as image:
            assert image.size == (tiny_pipe.resolution,) * 2 and image.text["ai_generated"] == "true"
    latents = np.load(next(f for f in files if f.endswith(".npy")))
    assert latents.shape[:1] == (2,) and latents.ndim == 3
    assert len(attention) >= 5 and attention[0][1] == "she"
    assert len(diffusion) == 2 and diffusion[0][0].size == (tiny_pipe.encoder.image_size,) * 2


def test_handler_refuses_bad_input_in_plain_words(handlers):
    import gradio as gr

    blank, paper = canvases.template_canvas(canvases.BLANK_CANVAS), canvases.sketch_canvas()
    cases = [
        (handlers.generate_from_mask, ("", blank), {}, "Nothing to generate from"),
        (handlers.generate_from_sketch, ("  ", paper), {}, "Nothing to generate from"),
        (handlers.generate_from_mask, ("x" * 5000, blank), {}, "5,000 characters"),
        (handlers.generate_from_mask, ("A face.", blank), {"seed": -1, "randomize_seed": False}, "seed must be"),
        (handlers.generate_from_mask, ("A face.", blank), {"seed": 2**64, "randomize_seed": False}, "seed must be"),
        (handlers.generate_from_mask, ("A face.", blank), {"seed": None, "randomize_seed": False}, "Enter a seed"),
        (handlers.generate_from_mask, ("A face.", blank), {"num_images": 5}, "from 1 to 4"),
        (handlers.generate_from_mask, ("A face.", blank), {"mode": "quality", "steps": 3, "feature_steps": "2-7"},
         "from 0 to 2"),
        (handlers.generate_from_mask, ("A face.", blank), {"mode": "quality", "feature_steps": "early"},
         "not a step number"),
        (handlers.load_template, ("mohawk",), {}, "Unknown template"),
        (handlers.upload_mask, (None,), {}, "Choose a mask"),
    ]
    for function, args, kwargs, words in cases:
        with pytest.raises(gr.Error, match=words):
            function(*args, **kwargs)


def test_handler_text_only_quality_mode_and_examples(handlers, tiny_pipe):
    blank = canvases.template_canvas(canvases.BLANK_CANVAS)
    gallery, *_ = handlers.generate_from_mask("A man with a beard.", blank, mode="quality", steps=3,
                                              feature_steps="0, 2", combine="coarse-to-fine")
    assert len(gallery) == 1
    mask_prompt, mask_file = examples.mask_example_rows()[0]
    result = handlers.example_from_mask(mask_prompt, {"background": None, "layers": [], "composite": mask_file})
    assert result[1] == 42
    sketch_prompt, sketch_file = examples.sketch_example_rows()[0]
    tab_result = handlers.generate_from_active_tab("sketch", sketch_prompt, None, canvases.sketch_canvas(
        template_sketch("short hair")), randomize_seed=False, seed=3)
    assert "sketch" in tab_result[2] and tab_result[1] == 3


def test_handler_uploads(handlers, tmp_path):
    value, status = handlers.upload_mask(str(examples.mask_path(examples.DEFAULT_FOLDER, "glasses")))
    assert np.array_equal(parse_mask(value["background"]), template_mask("glasses"))
    assert "glasses" in status and "glasses.png" in status
    with pytest.warns(UserWarning, match="first frame"):
        value, _ = handlers.upload_mask(str(animated_gif(tmp_path / "moving.gif")))
    assert np.array_equal(parse_mask(value["background"]), template_mask("glasses"))
    with pytest.warns(UserWarning, match="no face"):
        handlers.upload_mask(str(hair_only_mask(tmp_path / "hair.png")))
    sketch = handlers.sketch_from_photo(str(photo_like(tmp_path / "photo.png")), "thick")
    assert canvases.strokes_from_canvas(sketch) is not None


def test_handler_errors_hide_server_paths_and_unexpected_failures(handlers, tmp_path, caplog):
    import gradio as gr

    from mm2latent.ui.handlers import friendly_errors, plain

    with pytest.raises(gr.Error) as caught:
        handlers.upload_mask(str(not_an_image(tmp_path / "notes.png")))
    assert "'notes.png'" in caught.value.message and str(tmp_path) not in caught.value.message
    with pytest.raises(gr.Error, match="too large"):
        handlers.upload_sketch(str(huge_png(tmp_path / "huge.png")))
    assert plain("image file '/tmp/gradio/abc/x.gif' has 3 frames") == "Image file 'x.gif' has 3 frames."

    @friendly_errors("testing")
    def broken():
        raise KeyError("internal detail")

    with pytest.raises(gr.Error, match="Something went wrong on the server while testing") as caught:
        broken()
    assert "internal detail" not in caught.value.message
    assert "Unexpected error while testing" in caplog.text


# --------------------------------------------------------------------------------------------
# The launched app, through gradio_client
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The Space, asked for weights it cannot download: it must fall back to `tiny` with a banner."""
    workdir = tmp_path_factory.mktemp("space")
    with running_space(workdir, MM2LATENT_MODEL_REPO=OFFLINE_REPO) as url:
        yield url, workdir


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space[0], verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    index_map = folder / "glasses_ids.png"
    Image.fromarray(template_mask("glasses")).save(index_map)
    jpeg = folder / "hat_colour.jpg"
    mask_to_color(template_mask("hat")).save(jpeg, quality=90)
    return {
        "index_map": index_map, "jpeg": jpeg, "palette": examples.mask_path(examples.DEFAULT_FOLDER, "long hair"),
        "sketch": examples.sketch_path(examples.DEFAULT_FOLDER, "short hair"), "photo": photo_like(folder / "p.png"),
        "gif": animated_gif(folder / "moving.gif"), "text_png": not_an_image(folder / "notes.png"),
        "huge": huge_png(folder / "huge.png"), "hair_only": hair_only_mask(folder / "hair.png"),
        "flat": flat_colour_png(folder / "flat.png"),
    }


def canvas(path: Path | str) -> dict:
    """An ImageEditor value for gradio_client: the picture as background and composite."""
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path)), "id": None}


def blank_mask_file(folder: Path) -> Path:
    path = folder / "blank.png"
    canvases.template_canvas(canvases.BLANK_CANVAS)["background"].save(path)
    return path


def white_paper_file(folder: Path) -> Path:
    path = folder / "paper.png"
    canvases.sketch_canvas()["background"].save(path)
    return path


def generate(client, api_name: str, prompt: str, picture: dict, **settings):
    arguments = {"mode": "fast", "steps": 20, "feature_steps": "all", "combine": "mean", "seed": 0,
                 "randomize_seed": True, "truncation": 1.0, "num_images": 1, "show_diffusion": False, **settings}
    return client.predict(prompt, picture, *arguments.values(), api_name=api_name)


def test_fresh_offline_machine_reaches_a_working_page_with_a_status(space, client):
    url, workdir = space
    with urllib.request.urlopen(url + "config", timeout=10) as response:
        config = response.read().decode()
    assert "Demo mode" in config and "MM2LATENT_MODEL_REPO" in config
    # The details name both failures of the load order, the requested repository, then the public preset, in
    # plain words: no exception name, no server path (the log keeps those).
    assert f"`{OFFLINE_REPO}`: its files are not on this machine" in config
    assert "`public`: its files are not on this machine" in config
    assert "HF_HUB_OFFLINE is set" not in config and "WeightsNotFoundError" not in config
    log = (workdir / "app.log").read_text()
    assert f"Could not load '{OFFLINE_REPO}'" in log and "trying 'public' next" in log
    assert "Could not load 'public'" in log and "trying 'tiny' next" in log and "Loaded tiny" in log
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate_from_mask", "/generate_from_sketch", "/load_template", "/upload_mask", "/upload_sketch",
            "/sketch_from_photo"} <= endpoints


@pytest.mark.parametrize("template", ["glasses", "blank canvas"])
def test_api_load_template(client, template):
    value = client.predict(template, api_name="/load_template")
    assert image_size(value["background"]) == (512, 512)
    ids = parse_mask(value["background"], require_face=False)
    expected = np.zeros((512, 512), np.uint8) if template == "blank canvas" else template_mask(template)
    assert np.array_equal(ids, expected)


@pytest.mark.parametrize("kind, template", [("index_map", "glasses"), ("palette", "long hair"), ("jpeg", "hat")])
def test_api_upload_mask_shows_the_colour_map_the_model_reads(client, files, kind, template):
    value, status = client.predict(__import__("gradio_client").handle_file(str(files[kind])), api_name="/upload_mask")
    assert image_size(value["background"]) == (512, 512)
    agreement = (parse_mask(value["background"]) == template_mask(template)).mean()
    assert agreement > (0.995 if kind == "jpeg" else 0.99999), agreement
    assert "Loaded" in status and files[kind].name in status


def test_api_upload_sketch_and_sketch_from_photo(client, files):
    from gradio_client import handle_file

    value = client.predict(handle_file(str(files["sketch"])), api_name="/upload_sketch")
    assert image_size(value["background"]) == (512, 512)
    assert canvases.strokes_from_canvas({"composite": value["background"]}).sum() == template_sketch("short hair").sum()
    value = client.predict(handle_file(str(files["photo"])), "thin", api_name="/sketch_from_photo")
    assert image_size(value["background"]) == (512, 512)
    assert canvases.strokes_from_canvas({"composite": value["background"]}) is not None


def test_api_generate_from_mask(client, files, tiny_pipe):
    gallery, seed, summary, attention, downloads, diffusion = generate(
        client, "/generate_from_mask", "She has long wavy blonde hair and is smiling.", canvas(files["palette"]),
        seed=1234, randomize_seed=False, num_images=2)
    assert seed == 1234 and "`1234`, `1235`" in summary
    assert len(gallery) == 2
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (tiny_pipe.resolution, tiny_pipe.resolution)
            assert image.text["ai_generated"] == "true" and image.text["prompt"].startswith("She has")
    assert attention and attention[0]["caption"] == "she"
    names = sorted(Path(path).suffix for path in downloads)
    assert names == [".npy", ".png", ".png"]
    latents = np.load(next(path for path in downloads if path.endswith(".npy")))
    assert latents.shape[0] == 2 and latents.dtype == np.float32
    assert not diffusion


def test_api_generate_from_sketch_with_quality_mode_and_preview(client, files, tiny_pipe):
    gallery, seed, summary, attention, downloads, diffusion = generate(
        client, "/generate_from_sketch", "The man has short brown hair and bushy eyebrows.", canvas(files["sketch"]),
        mode="quality", steps=3, feature_steps="0-2", combine="coarse-to-fine", show_diffusion=True)
    assert len(gallery) == 1 and image_size(gallery[0]["image"]) == (tiny_pipe.resolution,) * 2
    assert 0 <= seed < 2**32 and "quality mode (3 steps" in summary and "sketch" in summary
    assert len(diffusion) == 1 and image_size(diffusion[0]["image"]) == (tiny_pipe.encoder.image_size,) * 2


def test_api_animated_gif_uses_its_first_frame(client, files):
    from gradio_client import handle_file

    value, _ = client.predict(handle_file(str(files["gif"])), api_name="/upload_mask")
    assert np.array_equal(parse_mask(value["background"]), template_mask("glasses"))


def test_api_bad_inputs_give_clear_errors(client, files, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    blank, paper = canvas(blank_mask_file(tmp_path)), canvas(white_paper_file(tmp_path))
    template = canvas(files["palette"])
    cases = [
        ("empty canvas + empty prompt (mask)", lambda: generate(client, "/generate_from_mask", "", blank),
         "Nothing to generate from"),
        ("empty canvas + empty prompt (sketch)", lambda: generate(client, "/generate_from_sketch", "", paper),
         "Nothing to generate from"),
        ("mask with no face", lambda: generate(client, "/generate_from_mask", "A man.", canvas(files["hair_only"])),
         "contains no face"),
        ("upload that is not an image", lambda: client.predict(handle_file(str(files["text_png"])),
                                                               api_name="/upload_mask"), "cannot read 'notes.png'"),
        ("upload with a non-image type", lambda: client.predict(handle_file(str(write_text(tmp_path / "a.txt"))),
                                                                api_name="/upload_sketch"), "Invalid file type"),
        ("100-megapixel image", lambda: client.predict(handle_file(str(files["huge"])), api_name="/upload_mask"),
         "too large"),
        ("100-megapixel photo", lambda: client.predict(handle_file(str(files["huge"])), "thin",
                                                       api_name="/sketch_from_photo"), "too large"),
        ("5,000-character prompt", lambda: generate(client, "/generate_from_mask", "She smiles. " * 417, template),
         "characters long; the limit is 1,000"),
        ("seed -1", lambda: generate(client, "/generate_from_mask", "A man.", template, seed=-1,
                                     randomize_seed=False), "seed must be a whole number from 0 to"),
        ("seed 2**64", lambda: generate(client, "/generate_from_sketch", "A man.", paper, seed=2**64,
                                        randomize_seed=False), "seed must be a whole number from 0 to"),
    ]
    for what, call, words in cases:
        with pytest.raises(AppError) as caught:
            call()
        assert words.lower() in str(caught.value).lower(), f"{what}: {caught.value}"


def write_text(path: Path) -> Path:
    path.write_text("hello")
    return path


# --------------------------------------------------------------------------------------------
# The "Edit a photo" tab, through gradio_client
# --------------------------------------------------------------------------------------------

ALIGNED_SIZE = 256  # invert_photo aligns to max(256, generator resolution) pixels


def invert(client, photo: Path, refine_steps: int = 0):
    from gradio_client import handle_file

    return client.predict(handle_file(str(photo)), refine_steps, api_name="/invert_photo")


def edit(client, photo: Path | None, prompt: str, mask: dict | None, **settings):
    from gradio_client import handle_file

    arguments = {"refine_steps": 0, "use_mask": True, "strength": 1.0, "layers": "all", "method": "modulate",
                 "seed": 0, "clip_steps": 0, **settings}
    return client.predict(None if photo is None else handle_file(str(photo)), arguments.pop("refine_steps"), prompt,
                          mask, *arguments.values(), api_name="/edit_photo")


def identity_score(text: str) -> float:
    """The number the identity box starts with (words after it explain it)."""
    return float(text.split()[0])


def saved_latent(files: list[str]) -> dict:
    """The edit tab's downloads: a PNG holding the settings and the W+ latent as ``.npy``."""
    from mm2latent.inputs.metadata import read_png_settings

    assert sorted(Path(path).suffix for path in files) == [".npy", ".png"], files
    png, npy = sorted(files, key=lambda path: Path(path).suffix != ".png")
    return {"latent": np.load(npy, allow_pickle=False), "settings": read_png_settings(png)}


@pytest.fixture(scope="module")
def inverted(client, testdata):
    """/invert_photo on a real FFHQ photo: (photo path, its outputs)."""
    photo = testdata / "photos" / "ffhq_0.jpg"
    return photo, invert(client, photo)


def test_app_registers_the_edit_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/invert_photo", "/edit_photo"} <= set(endpoints)
    assert [p["parameter_name"] for p in endpoints["/edit_photo"]["parameters"]][:4] == [
        "photo", "refine_steps", "prompt", "mask_value"]
    # Every argument is optional, so `client.predict(prompt=..., api_name="/edit_photo")` is a whole call.
    required = [p["parameter_name"] for name in ("/invert_photo", "/edit_photo")
                for p in endpoints[name]["parameters"] if not p["parameter_has_default"]]
    assert required == [], required
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoints["/edit_photo"]["parameters"]}
    assert defaults["method"] == "auto" and defaults["mask_value"] is None and defaults["photo"] is None


def test_api_invert_photo_returns_aligned_reconstruction_and_mask(inverted, tiny_pipe):
    _, (aligned, reconstruction, mask, latent, info) = inverted
    assert image_size(aligned) == (ALIGNED_SIZE, ALIGNED_SIZE)
    assert tiny_pipe.resolution == 64 and image_size(reconstruction) == (DISPLAY_SIZE, DISPLAY_SIZE)  # enlarged
    assert image_size(mask["background"]) == (canvases.CANVAS_SIZE, canvases.CANVAS_SIZE)
    assert Path(mask["background"]).name.startswith("mask-")  # a name /edit_photo takes back
    ids = canvases.mask_from_canvas({"composite": mask["background"]})  # raises if the mask holds no face
    assert ids.shape == (512, 512) and ids.max() < len(CELEBAMASK_CLASSES) and len(np.unique(ids)) > 2
    saved = saved_latent(latent)
    assert saved["latent"].shape == (1, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    assert saved["settings"].get("source") == "inversion"
    assert "Inverted to W+" in info


@pytest.mark.parametrize("method, layers", [("modulate", "all"), ("mix", "middle")])
def test_api_edit_photo_returns_before_after_identity_and_latent(client, inverted, tiny_pipe, method, layers):
    photo, (aligned, reconstruction, mask, _, _) = inverted
    pair, edited, identity, latent, info = edit(client, photo, "with glasses", canvas(mask["background"]),
                                                method=method, layers=layers, seed=5)
    assert len(pair) == 2 and all(image_size(image) == (DISPLAY_SIZE, DISPLAY_SIZE) for image in pair)
    before, after = (np.asarray(Image.open(image).convert("RGB"), dtype=np.int16) for image in pair)
    assert np.abs(before - after).mean() > 1  # the photo beside the (untrained) model's edit
    assert image_size(edited) == (DISPLAY_SIZE, DISPLAY_SIZE)
    # The score is the photo's against the edit's (the aligned photo comes back as WebP: a little off); tiny has a
    # random ArcFace, and the words say so.
    npy = next(path for path in latent if path.endswith(".npy"))
    assert identity_score(identity) == pytest.approx(edit_identity(tiny_pipe, aligned, npy), abs=0.02)
    assert "meaningless" in identity
    saved = saved_latent(latent)
    with Image.open(next(path for path in latent if path.endswith(".png"))) as download:
        assert download.size == (tiny_pipe.resolution,) * 2  # the download keeps the model's resolution
    assert saved["latent"].shape == (1, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    assert np.isfinite(saved["latent"]).all()
    settings = saved["settings"]
    assert settings["prompt"] == "with glasses" and settings["method"] == method and settings["layers"] == layers
    assert settings["seed"] == 5 and settings["inputs"] == ["mask"]
    assert f"Edited layers: {layers}" in info and f"Method: {method}" in info


def test_api_edit_photo_text_only_without_inverting_first(client, testdata, tiny_pipe):
    """A new client (fresh session state) goes straight to Edit with no mask: the photo is inverted on the way."""
    from gradio_client import Client

    fresh = Client(client.src, verbose=False)
    pair, edited, identity, latent, _ = edit(fresh, testdata / "photos" / "ffhq_1.jpg", "with glasses", None,
                                             use_mask=False)
    assert len(pair) == 2 and image_size(edited) == (DISPLAY_SIZE, DISPLAY_SIZE)
    assert saved_latent(latent)["settings"]["inputs"] == []
    # The photo inverted on the way is the one scored: the "before" picture is its aligned face.
    npy = next(path for path in latent if path.endswith(".npy"))
    assert identity_score(identity) == pytest.approx(edit_identity(tiny_pipe, pair[0], npy), abs=0.02)


def test_api_edit_photo_auto_method_says_which_ran_and_why(client, inverted):
    """Defaults: no photo (the session's inverted one), /invert_photo's mask passed back as returned."""
    _, (_, _, mask, _, _) = inverted
    pair, _, _, files, info = edit(client, None, "with glasses", mask, method="auto")
    settings = saved_latent(files)["settings"]
    assert settings["method"] == "guided" and settings["clip_steps"] > 0 and settings["inputs"] == ["mask"]
    assert "Method: guided" in info and "T is untrained" in info
    before, after = (np.asarray(Image.open(image).convert("RGB"), dtype=np.int16) for image in pair)
    assert np.abs(before - after).mean() > 1
    # Asked for explicitly, the untrained (identity) modulation changes nothing, and the result says why.
    *_, info = edit(client, None, "with glasses", None, method="modulate")
    assert "Method: modulate" in info and "practically unchanged" in info and "choose **auto** or **guided**" in info


def test_api_edit_photo_refuses_mask_names_it_did_not_return(client, inverted):
    from gradio_client.exceptions import AppError

    photo, _ = inverted
    for name in ("/etc/passwd", "/tmp/gradio/0123/mask-0123456789abcdef.png", "C:\\Users\\me\\mask.png"):
        with pytest.raises(AppError) as caught:
            edit(client, photo, "with glasses", {"background": name, "layers": [], "composite": name})
        message = str(caught.value)
        assert "not a picture this Space returned" in message and "handle_file" in message, message
        assert "root:" not in message and "/etc" not in message  # the path is reduced to its name, never read


def test_api_photo_without_a_face_is_refused_and_the_server_keeps_serving(client, files, testdata, tiny_pipe):
    from gradio_client.exceptions import AppError

    calls = {"invert": lambda: invert(client, files["flat"]),
             "edit": lambda: edit(client, files["flat"], "with glasses", None)}
    for what, call in calls.items():
        with pytest.raises(AppError) as caught:
            call()
        message = str(caught.value)
        assert "no face" in message.lower(), f"{what}: {message}"
        assert "upload a photo" in message.lower() and str(files["flat"].parent) not in message, message
    # The same server still inverts a real photo, and the other tabs still generate.
    _, reconstruction, *_ = invert(client, testdata / "photos" / "ffhq_2.jpg")
    assert image_size(reconstruction) == (DISPLAY_SIZE, DISPLAY_SIZE)
    gallery, *_ = generate(client, "/generate_from_mask", "A face.", canvas(files["index_map"]))
    assert len(gallery) == 1


def test_api_survives_fifty_rapid_clicks(space, files):
    """50 generation requests at once: each finishes or is turned away (queue full); the server keeps serving."""
    from gradio_client import Client

    # A patient client: on a loaded machine httpx's default 5 s can run out while the server takes 50 requests in.
    client = Client(space[0], verbose=False, httpx_kwargs={"timeout": 60})
    template = canvas(files["index_map"])
    jobs = [client.submit("A face.", template, "fast", 20, "all", "mean", i, False, 1.0, 1, False,
                          api_name="/generate_from_mask") for i in range(50)]
    answers, refused = {}, []
    for seed, job in enumerate(jobs):
        try:
            gallery, answered_seed, *_ = job.result(timeout=240)
            answers[seed] = (len(gallery), answered_seed)
        except (concurrent.futures.TimeoutError, TimeoutError):
            raise
        except Exception as error:  # queue full: gradio_client raises its own error types
            refused.append(f"{type(error).__name__}: {error}")
    # The first `queue_size` requests always find room in the queue; each answer is its own request's face (its
    # seed, not a neighbour's); the others are turned away as such.
    assert len(answers) >= Settings.from_env(os.environ).queue_size and len(answers) + len(refused) == len(jobs)
    assert all(answer == (1, seed) for seed, answer in answers.items()), answers
    assert all("queue" in message.lower() for message in refused), refused[:3]
    gallery, *_ = generate(Client(space[0], verbose=False), "/generate_from_mask", "Still here?", template)
    assert len(gallery) == 1


def test_api_engine_selector_reaches_the_fast_engine(client, files):
    """On the offline tiny demo both engines are loaded: `engine` picks one through the same endpoint."""
    engines = {}
    for engine in ("ddgi", "mm2latent"):
        gallery, seed, summary, attention, downloads, diffusion = generate(
            client, "/generate_from_mask", "She is smiling.", canvas(files["palette"]), seed=7,
            randomize_seed=False, engine=engine)
        engines[engine] = np.load(next(path for path in downloads if path.endswith(".npy")))
        assert read_png_settings(gallery[0]["image"])["engine"] == engine
    assert not np.allclose(engines["ddgi"], engines["mm2latent"])
