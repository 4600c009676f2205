"""The MM2Latent engine behind the pipeline API: the engine switch, manifests, seeds, metadata, editing."""

import json

import numpy as np
import pytest
import torch

from mm2latent import FaceEditPipeline, FacePipeline
from mm2latent.editing.methods import layer_ranges
from mm2latent.errors import (
    CheckpointFormatError,
    EmptyPromptError,
    InvalidSettingError,
    MM2LatentError,
    UnsupportedConditionError,
)
from mm2latent.inputs.conditions import parse_mask, parse_scribble
from mm2latent.inputs.metadata import read_png_settings, save_png
from mm2latent.pipelines.mm2latent_engine import DIFFUSION_SETTINGS, MM2LatentPipeline

PROMPT = "She has long wavy blonde hair and is smiling."


@pytest.fixture(scope="module")
def engine_editor():
    editor = FaceEditPipeline.from_pretrained("tiny-mm2latent", device="cpu")
    editor.generation.show_progress = False
    return editor


def pixels(image) -> np.ndarray:
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------- the switch


def test_presets_pick_the_engine_class(tiny_mm2latent_pipe, tiny_pipe):
    assert isinstance(tiny_mm2latent_pipe, MM2LatentPipeline) and tiny_mm2latent_pipe.engine == "mm2latent"
    assert type(tiny_pipe) is FacePipeline and tiny_pipe.engine == "ddgi"
    # No diffusion model in the MM2Latent preset.
    assert set(tiny_mm2latent_pipe.components()) == {"generator", "mm2latent_engine"}
    # An engine's own class refuses a model of the other engine.
    with pytest.raises(InvalidSettingError, match="ddgi engine"):
        MM2LatentPipeline.from_pretrained("tiny", device="cpu")


def test_mm2latent_manifest_round_trips_the_engine(tiny_mm2latent_pipe, mask_path, sketch_path, tmp_path):
    expected = tiny_mm2latent_pipe(PROMPT, mask=mask_path, scribble=sketch_path, seed=4, num_images=2)
    folder = tiny_mm2latent_pipe.save_pretrained(tmp_path / "mm2latent")
    manifest = json.loads((folder / "mm2latent.json").read_text())
    assert manifest["engine"] == "mm2latent"
    assert set(manifest["components"]) == {"generator", "mm2latent_engine"}
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt")) and not list(folder.rglob("*.pth"))
    loaded = FacePipeline.from_pretrained(folder, device="cpu")
    assert isinstance(loaded, MM2LatentPipeline) and loaded.trained is False
    again = loaded(PROMPT, mask=mask_path, scribble=sketch_path, seed=4, num_images=2)
    # Bit-identical: the same weights, realigned after loading, run the same CPU kernels as the preset.
    assert torch.equal(expected.latents, again.latents)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(expected.images, again.images))


def test_ddgi_manifest_with_and_without_engine_loads_ddgi(tiny_pipe, mask_path, tmp_path):
    folder = tiny_pipe.save_pretrained(tmp_path / "ddgi")
    manifest_file = folder / "mm2latent.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["engine"] == "ddgi"
    expected = tiny_pipe(PROMPT, mask=mask_path, seed=2).latents
    # Manifests written before the engine switch have no "engine": they are DDGI's.
    del manifest["engine"]
    manifest_file.write_text(json.dumps(manifest))
    loaded = FacePipeline.from_pretrained(folder, device="cpu")
    loaded.show_progress = False
    assert type(loaded) is FacePipeline and loaded.engine == "ddgi"
    assert torch.equal(loaded(PROMPT, mask=mask_path, seed=2).latents, expected)
    manifest["engine"] = "stable-cascade"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointFormatError, match="stable-cascade"):
        FacePipeline.from_pretrained(folder, device="cpu")


def test_mm2latent_manifest_needs_its_engine_component(tiny_mm2latent_pipe, tmp_path):
    folder = tiny_mm2latent_pipe.save_pretrained(tmp_path / "incomplete")
    manifest_file = folder / "mm2latent.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["components"]["mm2latent_engine"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(MM2LatentError, match="mm2latent_engine"):
        FacePipeline.from_pretrained(folder, device="cpu")


# ---------------------------------------------------------------------------------------------- the call


def test_same_call_same_output_type(tiny_mm2latent_pipe, tiny_pipe, mask_path):
    mm2latent = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=7, truncation=0.8, num_images=2)
    ddgi = tiny_pipe(PROMPT, mask=mask_path, seed=7, truncation=0.8, num_images=2)
    assert type(mm2latent) is type(ddgi)
    assert mm2latent.seeds == ddgi.seeds == [7, 8]
    assert mm2latent.latents.shape == (2, tiny_mm2latent_pipe.generator.num_ws, tiny_mm2latent_pipe.generator.style_dim)
    assert [im.size for im in mm2latent.images] == [(tiny_mm2latent_pipe.resolution,) * 2] * 2
    assert set(mm2latent.condition_images) == {"mask"}


def test_same_seed_same_output_and_what_the_seed_changes(tiny_mm2latent_pipe, mask_path):
    first = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=11)
    second = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=11)
    assert torch.equal(first.latents, second.latents)
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    other = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=12)
    ranges = layer_ranges(tiny_mm2latent_pipe.generator.num_ws)
    kept = ranges["coarse"] + ranges["middle"]
    # The seed moves the fine layers only; the layout layers are the mapper's alone.
    assert torch.equal(first.latents[:, kept], other.latents[:, kept])
    assert (first.latents[:, ranges["fine"]] - other.latents[:, ranges["fine"]]).abs().max() > 1e-3


def test_seed_variation_zero_makes_the_seed_irrelevant(mask_path):
    pipe = FacePipeline.from_pretrained("tiny-mm2latent", device="cpu")
    pipe.seed_variation = 0.0
    out = pipe(PROMPT, mask=mask_path, seed=1, num_images=2)
    assert torch.equal(out.latents[0], out.latents[1])
    assert out.settings["seed_variation"] == 0.0
    # The pipeline's latent is then the engine's one inference call on the same parsed inputs (batch 1 on both
    # sides: the same kernels on the same numbers, so bit-identical).
    single = pipe(PROMPT, mask=mask_path, seed=1).latents
    engine = pipe.mm2latent_engine
    ids = torch.from_numpy(parse_mask(mask_path, size=engine.mask_autoencoder.image_size).astype(np.int64))[None]
    direct = engine.latents(pipe.generator.latent_avg, engine.encode_prompts([PROMPT]), mask_ids=ids)
    assert torch.equal(single, direct)


def test_inputs_change_the_latent(tiny_mm2latent_pipe, mask_path, other_mask_path, sketch_path):
    base = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=3).latents
    other_mask = tiny_mm2latent_pipe(PROMPT, mask=other_mask_path, seed=3).latents
    other_prompt = tiny_mm2latent_pipe("He has a beard and short black hair.", mask=mask_path, seed=3).latents
    with_sketch = tiny_mm2latent_pipe(PROMPT, mask=mask_path, scribble=sketch_path, seed=3).latents
    text_only = tiny_mm2latent_pipe(PROMPT, seed=3).latents
    mask_only = tiny_mm2latent_pipe("", mask=mask_path, seed=3).latents
    for other in (other_mask, other_prompt, with_sketch, text_only, mask_only):
        assert (base - other).abs().max() > 1e-4


def test_batches_match_single_calls(tiny_mm2latent_pipe, mask_path, other_mask_path):
    from mm2latent.pipelines.request import GenerationRequest

    batch = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=20, num_images=3)
    single = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=21)
    torch.testing.assert_close(batch.latents[1], single.latents[0], atol=1e-5, rtol=1e-5)
    # Requests with different prompts (one empty: the null text token) and masks share one mapper pass.
    requests = [GenerationRequest.create(PROMPT, mask_path, seed=5), GenerationRequest.create("", other_mask_path, seed=6)]
    outputs = tiny_mm2latent_pipe.generate_batch(requests)
    for request, output in zip(requests, outputs):
        alone = tiny_mm2latent_pipe.generate(request)
        torch.testing.assert_close(output.latents, alone.latents, atol=1e-5, rtol=1e-5)
    assert outputs[1].settings["prompt"] == ""


def test_truncation_pulls_toward_the_mean(tiny_mm2latent_pipe, mask_path):
    full = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=9).latents
    zero = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=9, truncation=0.0).latents
    half = tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=9, truncation=0.5).latents
    avg = tiny_mm2latent_pipe.generator.latent_avg.float()
    torch.testing.assert_close(zero, avg.expand_as(zero))
    torch.testing.assert_close(half, avg + 0.5 * (full - avg), atol=1e-5, rtol=1e-5)


def test_settings_and_png_metadata_record_the_engine(tiny_mm2latent_pipe, tiny_pipe, mask_path, tmp_path):
    for pipe, engine in ((tiny_mm2latent_pipe, "mm2latent"), (tiny_pipe, "ddgi")):
        out = pipe(PROMPT, mask=mask_path, seed=1)
        assert out.settings["engine"] == engine
        path = tmp_path / f"{engine}.png"
        save_png(out.images[0], path, out.settings)
        assert read_png_settings(path)["engine"] == engine
    settings = tiny_mm2latent_pipe(PROMPT, seed=1).settings
    # Settings the MM2Latent engine does not read are not recorded as if they had been used.
    assert not set(DIFFUSION_SETTINGS) & set(settings)
    assert settings["seed_variation"] == tiny_mm2latent_pipe.seed_variation


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mode": "quality"}, InvalidSettingError, "DDGI engine"),
        ({"mode": "invert"}, InvalidSettingError, "DDGI engine"),
        ({"return_diffusion_image": True}, UnsupportedConditionError, "no diffusion model"),
        ({"guidance_scale": 7.5}, InvalidSettingError, "guidance"),
        ({"prompt": "  "}, EmptyPromptError, "prompt is empty"),
        ({"camera": (10, 0)}, InvalidSettingError, "2D"),
    ],
)
def test_diffusion_only_settings_are_refused(tiny_mm2latent_pipe, kwargs, error, words):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(error, match=words):
        tiny_mm2latent_pipe(**kwargs)


def test_empty_sketch_is_ignored_with_a_warning(tiny_mm2latent_pipe, mask_path):
    blank = np.zeros((64, 64), np.uint8)
    with pytest.warns(UserWarning, match="no strokes"):
        out = tiny_mm2latent_pipe(PROMPT, mask=mask_path, scribble=blank, seed=1)
    assert set(out.condition_images) == {"mask"}
    assert torch.equal(out.latents, tiny_mm2latent_pipe(PROMPT, mask=mask_path, seed=1).latents)


# ---------------------------------------------------------------------------------------------- editing


@pytest.fixture(scope="module")
def inverted(engine_editor, testdata):
    return engine_editor.invert(testdata / "photos" / "ffhq_0.jpg", progress=False)


def test_mm2latent_edit_changes_the_chosen_layers_only(engine_editor, inverted):
    num_ws = engine_editor.generator.num_ws
    middle = layer_ranges(num_ws)["middle"]
    edit = engine_editor.edit(inverted, "she has blonde hair", strength=1.0, layers="middle", method="mix")
    others = [i for i in range(num_ws) if i not in middle]
    assert torch.equal(edit.latent[:, others], inverted.latent[:, others])
    assert (edit.latent[:, middle] - inverted.latent[:, middle]).abs().amax(dim=-1).min() > 1e-4
    assert edit.settings["engine"] == "mm2latent" and edit.settings["method"] == "mix"
    # Without an edited mask or sketch the mapper reads the photo's own.
    assert edit.settings["mapped_inputs"] == ["mask", "scribble"]
    unchanged = engine_editor.edit(inverted, "she has blonde hair", strength=0.0, layers="middle", method="mix")
    assert torch.equal(unchanged.latent, inverted.latent)
    half = engine_editor.edit(inverted, "she has blonde hair", strength=0.5, layers="middle", method="mix")
    torch.testing.assert_close(half.latent, inverted.latent + 0.5 * (edit.latent - inverted.latent))


def test_mm2latent_edit_maps_the_photos_mask_and_sketch(engine_editor, inverted, other_mask_path):
    pipe = engine_editor.generation
    mask, sketch = engine_editor.photo_conditions(inverted, "she has blonde hair")
    assert np.array_equal(mask, inverted.mask)
    size = pipe.mm2latent_engine.sketch_autoencoder.image_size
    assert parse_scribble(sketch, size=size).any()
    edit = engine_editor.edit(inverted, "she has blonde hair", layers="all", method="mix")
    codes, _ = pipe.prepare_conditions(mask, sketch)
    expected = pipe.predict_latents(pipe.encode_prompts(["she has blonde hair"]), codes)
    torch.testing.assert_close(edit.latent, expected.float().cpu())
    repainted = engine_editor.edit(inverted, "she has blonde hair", mask=other_mask_path, layers="all", method="mix")
    assert (repainted.latent - edit.latent).abs().max() > 1e-4


def test_mm2latent_edit_refusals(engine_editor, inverted):
    with pytest.raises(InvalidSettingError, match="no modulation network"):
        engine_editor.edit(inverted, "she has blonde hair", method="modulate")
    with pytest.raises(EmptyPromptError):
        engine_editor.edit(inverted, "", method="mix")
    with pytest.raises(InvalidSettingError, match="diffusion model"):
        engine_editor(PROMPT, mode="invert")
    assert engine_editor.default_mode == "fast"


def test_mm2latent_with_a_3d_generator(mask_path):
    pipe = FacePipeline.from_pretrained("tiny-eg3d-mm2latent", device="cpu")
    pipe.show_progress = False
    assert pipe.engine == "mm2latent" and pipe.generator.num_ws == pipe.mm2latent_engine.mapper.num_ws
    left = pipe(PROMPT, mask=mask_path, seed=2, camera=(-20, 0), return_depth=True)
    right = pipe(PROMPT, mask=mask_path, seed=2, camera=(20, 0))
    # One latent (the camera does not enter the mapper), two views of it.
    assert torch.equal(left.latents, right.latents)
    assert not np.array_equal(pixels(left.images[0]), pixels(right.images[0]))
    assert left.settings["camera"] == [-20, 0] and left.depth.shape[:2] == (1, 1)
    views = pipe.render_views(left.latents, yaws=[-20, 20])
    torch.testing.assert_close(views.images[0, 1], pipe.render(left.latents, camera=(20, 0))[0].float(),
                               atol=1e-5, rtol=1e-5)
