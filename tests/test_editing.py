"""Editing a real photo's latent (tiny preset, CPU): layer ranges, strength, methods, CLIP refinement, UI."""

import copy

import gradio as gr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm2latent.editing.methods import LAYER_RANGES, apply_edit, clip_refine, identity_similarity, layer_ranges
from mm2latent.errors import EmptyPromptError, InvalidSettingError
from mm2latent.inputs.conditions import FACE_PARSER_TO_CELEBAMASK
from mm2latent.inputs.images import image_to_tensor, tensor_to_pil
from mm2latent.inputs.metadata import read_png_settings
from mm2latent.pipelines.editing import FaceEditPipeline
from mm2latent.pipelines.presets import build_tiny_editing_components


@pytest.fixture(scope="module")
def edit_pipe(tiny_pipe):
    """The tiny edit pipeline on a copy of the tiny pipeline with a non-identity T (tiny T starts at γ=1, β=0)."""
    pipe = copy.copy(tiny_pipe)
    pipe.modulator = copy.deepcopy(tiny_pipe.modulator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for heads in (pipe.modulator.gamma_heads, pipe.modulator.beta_heads):
            heads.weight.normal_(0, 1.0)
    return FaceEditPipeline(pipe, **build_tiny_editing_components(pipe.generator))


@pytest.fixture(scope="module")
def inversion(edit_pipe, testdata):
    return edit_pipe.invert(testdata / "photos" / "ffhq_0.jpg")


def arcface_cosine(identity, a: Image.Image, b: Image.Image) -> float:
    """The identity score computed by hand: unit ArcFace embeddings of the faces at 256², dot product."""
    with torch.no_grad():
        return float((identity.embed(image_to_tensor(a, 256)) * identity.embed(image_to_tensor(b, 256))).sum())


def test_layer_ranges():
    assert LAYER_RANGES["coarse"] == [0, 1, 2, 3] and LAYER_RANGES["middle"] == [4, 5, 6, 7]
    assert LAYER_RANGES["fine"] == list(range(8, 18)) and LAYER_RANGES["all"] == list(range(18))
    tiny = layer_ranges(10)
    assert tiny["fine"] == [8, 9] and sorted(tiny["coarse"] + tiny["middle"] + tiny["fine"]) == list(range(10))
    small = layer_ranges(6)
    assert all(small[k] for k in ("coarse", "middle", "fine"))


def test_strength_zero_returns_the_reconstruction(edit_pipe, inversion):
    result = edit_pipe.edit(inversion, "she has blonde hair", mask=inversion.mask, strength=0.0)
    assert torch.equal(result.latent, inversion.latent)
    assert np.array_equal(np.asarray(result.image), np.asarray(inversion.reconstruction))


@pytest.mark.parametrize("method", ["modulate", "mix"])
def test_layer_range_leaves_other_layers_bit_identical(edit_pipe, inversion, method):
    edit = edit_pipe.edit_latent(inversion.latent, "he has a beard", seed=3, layers="middle", method=method)
    outside = [i for i in range(edit_pipe.generator.num_ws) if i not in LAYER_RANGES["middle"]]
    assert torch.equal(edit.latent[:, outside], inversion.latent[:, outside])
    assert not torch.equal(edit.latent[:, 4:8], inversion.latent[:, 4:8])
    if method == "mix":
        torch.testing.assert_close(edit.latent[:, 4:8], edit.w_m[:, 4:8])
    else:
        expected = inversion.latent * edit.modulation.gamma + edit.modulation.beta
        torch.testing.assert_close(edit.latent[:, 4:8], expected[:, 4:8])


def test_strength_interpolates(edit_pipe, inversion):
    full = edit_pipe.edit_latent(inversion.latent, "smiling", seed=1)
    half = apply_edit(inversion.latent, full.w_m, full.modulation, strength=0.5)
    torch.testing.assert_close(half, (inversion.latent + full.latent) / 2)


def test_a_different_prompt_or_mask_changes_the_latent(edit_pipe, inversion, testdata):
    mask = np.asarray(Image.open(testdata / "masks" / "celebamaskhq_0_index.png"))
    bald = np.where(mask == 13, 0, mask).astype(np.uint8)  # the visitor paints the hair over with background
    base = edit_pipe.edit_latent(inversion.latent, "she has blonde hair", mask=mask, method="mix")
    other_prompt = edit_pipe.edit_latent(inversion.latent, "he has a beard", mask=mask, method="mix")
    other_mask = edit_pipe.edit_latent(inversion.latent, "she has blonde hair", mask=bald, method="mix")
    # The tiny model is untrained, so the differences are small but far above float noise (~1e-7).
    assert (other_prompt.latent - base.latent).abs().max() > 1e-5
    assert (other_mask.latent - base.latent).abs().max() > 1e-5
    modulated = [edit_pipe.edit_latent(inversion.latent, p, mask=m).latent
                 for p, m in (("she has blonde hair", mask), ("he has a beard", mask), ("she has blonde hair", None))]
    assert (modulated[1] - modulated[0]).abs().max() > 1e-5
    assert (modulated[2] - modulated[0]).abs().max() > 1e-5


def test_bad_settings_raise(edit_pipe, inversion):
    with pytest.raises(EmptyPromptError):
        edit_pipe.edit_latent(inversion.latent, "  ")
    with pytest.raises(InvalidSettingError):
        edit_pipe.edit_latent(inversion.latent, "smiling", strength=3.0)
    with pytest.raises(InvalidSettingError):
        edit_pipe.edit_latent(inversion.latent, "smiling", layers="eyes")
    with pytest.raises(InvalidSettingError):
        edit_pipe.edit(torch.zeros(1, 3, 4), "smiling")


def test_clip_refinement_moves_only_the_chosen_layers(edit_pipe, inversion):
    result = clip_refine(edit_pipe.generator, inversion.latent, "she is smiling", edit_pipe.clip, steps=3,
                         identity_net=edit_pipe.identity, layers="fine", lr=0.05, progress=False)
    assert len(result.losses) == 3 and {"clip", "identity", "l2", "total"} <= set(result.losses[0])
    assert torch.equal(result.latent[:, :8], inversion.latent[:, :8])
    assert not torch.equal(result.latent[:, 8:], inversion.latent[:, 8:])


def test_identity_similarity_is_the_arcface_cosine(edit_pipe, inversion):
    expected = arcface_cosine(edit_pipe.identity, inversion.aligned, inversion.reconstruction)
    assert identity_similarity(edit_pipe.identity, inversion.aligned, inversion.reconstruction) == pytest.approx(
        expected, abs=1e-5)
    # 256² tensors go in as they are and give the same score.
    tensors = [image_to_tensor(x, 256) for x in (inversion.aligned, inversion.reconstruction)]
    assert identity_similarity(edit_pipe.identity, *tensors) == pytest.approx(expected, abs=1e-5)


def test_photo_mask_is_the_parsers_argmax_in_celebamask_order(edit_pipe, inversion):
    parser = edit_pipe.face_parser
    # Downscaled with antialiasing, as the official inference's PIL resize does (not a plain bilinear sample).
    x = F.interpolate(image_to_tensor(inversion.aligned), size=(parser.input_size,) * 2, mode="bilinear",
                      align_corners=False, antialias=True)
    with torch.no_grad():
        logits = parser(((x + 1) / 2 - parser.mean) / parser.std)
    logits = F.interpolate(logits, size=(512, 512), mode="bilinear", align_corners=False)
    expected = FACE_PARSER_TO_CELEBAMASK[logits.argmax(dim=1)[0].numpy()]
    assert inversion.mask.shape == (512, 512) and inversion.mask.dtype == np.uint8
    np.testing.assert_array_equal(inversion.mask, expected)


# ---------------------------------------------------------------------------------------------- UI handlers


@pytest.fixture(scope="module")
def handlers(edit_pipe):
    from mm2latent.ui.photo_tab import EditHandlers

    return EditHandlers(edit_pipe)


def test_ui_invert_then_edit(handlers, edit_pipe, testdata):
    from mm2latent.ui.photo_tab import DISPLAY_SIZE  # smaller results are enlarged for display

    photo = Image.open(testdata / "photos" / "ffhq_2.jpg")
    aligned, reconstruction, canvas, files, info, state = handlers.invert(photo, 0, progress=None)
    assert aligned.size == (256, 256) and reconstruction.size == (DISPLAY_SIZE,) * 2 and "Inverted" in info
    assert canvas["background"].size == (512, 512)
    png, npy = files
    np.testing.assert_array_equal(np.load(npy), state.inversion.latent.numpy())
    assert read_png_settings(png) == {"source": "inversion"}
    pair, edited, identity, files, info, state = handlers.edit(
        state, photo, 0, "she is smiling", canvas, True, 1.0, "middle", "modulate", 0, 0, progress=None)
    assert pair[0].size == pair[1].size == edited.size == (DISPLAY_SIZE,) * 2  # 64² enlarged for display
    png, npy = files
    # The shown score is the ArcFace cosine of the aligned photo and the rendered edit, to the 3 decimals shown.
    rendered = F.interpolate(edit_pipe.generation.render(torch.from_numpy(np.load(npy))).float(), size=(256, 256),
                             mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = float((edit_pipe.identity.embed(image_to_tensor(state.inversion.aligned, 256))
                          * edit_pipe.identity.embed(rendered)).sum())
    assert float(identity.split()[0]) == pytest.approx(expected, abs=1e-3)
    assert read_png_settings(png)["layers"] == "middle"


def test_ui_edit_without_inverting_first_and_errors(handlers, testdata):
    photo = Image.open(testdata / "photos" / "ffhq_3.jpg")
    outputs = handlers.edit(None, photo, 0, "smiling", None, True, 0.0, "all", "mix", 0, 0, progress=None)
    assert outputs[-1].inversion.latent.shape == (1, 10, 64)
    with pytest.raises(gr.Error, match="(?i)no face"):
        handlers.invert(Image.new("RGB", (300, 300), (40, 160, 90)), 0, progress=None)
    with pytest.raises(gr.Error, match="(?i)upload a photo"):
        handlers.invert(None, 0, progress=None)
    with pytest.raises(gr.Error, match="1x1"):
        handlers.invert(Image.new("RGB", (1, 1)), 0, progress=None)


# ---------------------------------------------------------------------------------------------- Space endpoint


@pytest.fixture(scope="module")
def edit_app(edit_pipe):
    """A small Blocks with only the edit tab, served locally (the Space wires the same tab)."""
    from mm2latent.ui.photo_tab import build_edit_tab

    with gr.Blocks() as demo:
        build_edit_tab(edit_pipe)
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=True)
    yield demo
    demo.close()


def test_edit_endpoint_through_gradio_client(edit_app, edit_pipe, testdata):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(edit_app.local_url, verbose=False)
    photo = gradio_client.handle_file(str(testdata / "photos" / "ffhq_4.jpg"))
    aligned, reconstruction, canvas, latent, info = client.predict(photo, 0, api_name="/invert_photo")
    assert "Inverted" in info
    result = client.predict(photo, 0, "she has blonde hair", None, False, 1.0, "all", "modulate", 0, 0,
                            api_name="/edit_photo")
    pair, edited, identity, latent, info = result
    assert len(pair) == 2 and identity.startswith(("0.", "-0.", "1.0"))
    npy = next(path for path in latent if path.endswith(".npy"))
    png = next(path for path in latent if path.endswith(".png"))
    # The downloaded latent renders to the downloaded (lossless) edit: the same latent through the same G.
    with Image.open(png) as saved:
        rendered = tensor_to_pil(edit_pipe.generation.render(torch.from_numpy(np.load(npy))))[0]
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(rendered))
