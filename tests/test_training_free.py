"""The training-free mode (public weights, untrained M/T): mode="invert", guided editing, the public preset."""


import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent import FaceEditPipeline, FacePipeline
from mm2latent.editing.inversion import encode_images, refine_latent
from mm2latent.errors import EmptyPromptError, UnsupportedConditionError
from mm2latent.inputs.conditions import parse_mask
from mm2latent.inputs.templates import mask_edges
from mm2latent.models.diffusion_encoder import DiffusionEncoder
from mm2latent.pipelines.components import EDITING_COMPONENTS
from mm2latent.pipelines.editing import MASK_AS_SCRIBBLE_WIDTH

PROMPT = "She has long wavy blonde hair."
STEPS = 3  # DDIM steps of I^d_0 (tiny preset)


@pytest.fixture(scope="module")
def editor():
    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    editor.generation.show_progress = False
    return editor


@pytest.fixture(scope="module")
def mask_ids(mask_path):
    return np.asarray(Image.open(mask_path))


def test_untrained_models_default_to_the_training_free_mode(editor, mask_path):
    assert editor.trained is False and editor.default_mode == "invert" and editor.default_edit_method == "guided"
    out = editor(PROMPT, mask=mask_path, seed=4, num_steps=STEPS)
    assert out.settings["mode"] == "invert" and out.settings["guidance_scale"] == 7.5
    # Invert mode renders through the pipeline's shared path: its settings are every mode's (engine included).
    assert out.settings["engine"] == "ddgi" and out.settings["model"] == "tiny"
    with pytest.raises(UnsupportedConditionError, match="FaceEditPipeline"):
        editor.generation(PROMPT, mask=mask_path, mode="invert")


def test_editing_components_are_optional_parts_of_the_one_pipeline(editor, tiny_pipe):
    assert type(editor) is type(tiny_pipe) is FacePipeline
    assert set(editor.components()) == set(tiny_pipe.components()) | set(EDITING_COMPONENTS)
    # FaceEditPipeline(pipe, ...) is from_pipe: the same networks and lock, the components added to a new object.
    added = FaceEditPipeline(tiny_pipe, inverter=editor.inverter)
    assert added.encoder is tiny_pipe.encoder and added.lock is tiny_pipe.lock and added.inverter is editor.inverter
    assert tiny_pipe.inverter is None and tiny_pipe.default_mode == "fast" and added.default_mode == "invert"


def test_invert_mode_is_the_inverters_latent_of_the_diffusion_image(editor, mask_path):
    out = editor(PROMPT, mask=mask_path, seed=5, mode="invert", num_steps=STEPS, return_diffusion_image=True,
                 faithfulness="encoder")
    # By hand: the same noise, text and mask through the diffusion model, then the photo encoder.
    pipe = editor.generation
    controls, _ = pipe.prepare_conditions(mask=mask_path)
    drawing = pipe.draw(pipe.encode_prompts([PROMPT]), controls, pipe.prepare_noise([5]), num_steps=STEPS,
                        guidance_scale=7.5)
    expected = encode_images(editor.inverter, drawing.images, pipe.generator)
    torch.testing.assert_close(out.latents, expected, rtol=0, atol=1e-6)
    assert out.diffusion_images[0].size == (pipe.encoder.image_size,) * 2
    np.testing.assert_array_equal(np.asarray(out.diffusion_images[0]),
                                  np.asarray(Image.fromarray(((drawing.images[0].permute(1, 2, 0) + 1) * 127.5)
                                                             .round().clamp(0, 255).to(torch.uint8).numpy())))


def test_invert_mode_is_deterministic_per_seed_and_batches(editor, mask_path):
    first = editor(PROMPT, mask=mask_path, seed=7, mode="invert", num_steps=STEPS, num_images=2, faithfulness="encoder")
    again = editor(PROMPT, mask=mask_path, seed=7, mode="invert", num_steps=STEPS, num_images=2, faithfulness="encoder")
    assert torch.equal(first.latents, again.latents) and first.seeds == [7, 8]
    single = editor(PROMPT, mask=mask_path, seed=8, mode="invert", num_steps=STEPS, faithfulness="encoder")
    torch.testing.assert_close(first.latents[1:], single.latents, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first.latents[0], first.latents[1])


def test_a_step_callback_watches_the_drawing_and_can_stop_it(editor, mask_path):
    steps = []

    def watch(pipe, step_index, timestep, state):
        steps.append((step_index, state["latents"].shape))
        return {"stop": True} if step_index == 1 else None

    out = editor(PROMPT, mask=mask_path, seed=5, mode="invert", num_steps=STEPS, callback_on_step_end=watch)
    assert [index for index, _ in steps] == [0, 1]
    assert steps[0][1] == (1, 4, editor.generation.encoder.latent_size, editor.generation.encoder.latent_size)
    full = editor(PROMPT, mask=mask_path, seed=5, mode="invert", num_steps=STEPS)
    # Stopped one step early, the encoder inverts a still noisy drawing: another latent.
    assert not torch.allclose(out.latents, full.latents)


def test_refinement_lowers_its_loss_and_a_mask_pulls_the_parse_toward_it(editor, mask_ids):
    generator, parser = editor.generator, editor.face_parser
    pipe = editor.generation
    drawing = pipe.draw(pipe.encode_prompts([PROMPT]), {}, pipe.prepare_noise([1]), num_steps=STEPS)
    start = encode_images(editor.inverter, drawing.images, generator)
    target_ids = torch.from_numpy(parse_mask(mask_ids, size=64).astype(np.int64))[None]

    def mask_loss(latent):
        with torch.no_grad():
            logits = parser.celebamask_logits(generator.synthesis(latent), size=64)
        return float(torch.nn.functional.cross_entropy(logits, target_ids))

    plain = refine_latent(generator, start, drawing.images, steps=15, lr=0.05, progress=False)
    assert plain.losses[-1] < plain.losses[0]
    with_mask = refine_latent(generator, start, drawing.images, steps=15, lr=0.05, progress=False,
                              face_parser=parser, mask_ids=target_ids, mask_weight=5.0)
    assert mask_loss(with_mask.latent) < mask_loss(start)
    assert mask_loss(with_mask.latent) < mask_loss(plain.latent)


def test_a_mask_reaches_a_scribble_only_model_as_class_boundaries(editor, mask_ids):
    pipe = editor.generation
    enc = pipe.encoder
    scribble_only = FacePipeline(DiffusionEncoder(enc.unet, enc.text_encoder, enc.tokenizer, enc.make_scheduler(),
                                                  {"scribble": enc.controlnets["scribble"]}, enc.vae),
                                 pipe.generator, pipe.mapper, pipe.modulator)
    public_like = FaceEditPipeline(scribble_only, **editor.editing_components)
    public_like.show_progress = False
    with_mask = public_like(PROMPT, mask=mask_ids, seed=2, mode="invert", num_steps=STEPS, faithfulness="encoder")
    edges = mask_edges(parse_mask(mask_ids, size=enc.image_size), MASK_AS_SCRIBBLE_WIDTH).astype(np.uint8) * 255
    with_edges = public_like(PROMPT, scribble=edges, seed=2, mode="invert", num_steps=STEPS, faithfulness="encoder")
    assert torch.equal(with_mask.latents, with_edges.latents)
    assert set(with_mask.condition_images) == {"mask", "scribble"}
    # ... and the mask does steer: without it the face differs.
    assert not torch.equal(public_like(PROMPT, seed=2, mode="invert", num_steps=STEPS).latents, with_mask.latents)


def test_guided_edit_changes_the_photo_when_t_is_the_identity(editor, testdata):
    inversion = editor.invert(testdata / "photos" / "ffhq_1.jpg", progress=False)
    modulated = editor.edit(inversion, "She is wearing glasses.", method="modulate")
    assert torch.equal(modulated.latent, inversion.latent)  # untrained T: the identity modulation
    guided = editor.edit(inversion, "She is wearing glasses.", clip_steps=4, layers="fine")
    assert guided.settings["method"] == "guided" and "untrained" in guided.message
    assert not torch.equal(guided.latent, inversion.latent)
    assert torch.equal(guided.latent[:, :8], inversion.latent[:, :8])  # only the fine layers move
    with pytest.raises(EmptyPromptError, match="repaint"):
        editor.edit(inversion, "", mask=inversion.mask)  # the photo's own mask, no text: nothing to aim for


def test_a_repainted_mask_alone_drives_the_guided_edit(editor, testdata, mask_ids):
    inversion = editor.invert(testdata / "photos" / "ffhq_1.jpg", progress=False)
    edit = editor.edit(inversion, "", mask=mask_ids, clip_steps=6)
    assert "mask" in edit.clip_losses[0] and "clip" not in edit.clip_losses[0]
    assert edit.clip_losses[-1]["mask"] < edit.clip_losses[0]["mask"]


def test_trained_t_keeps_modulate_as_the_default(editor):
    trained = editor.from_pipe(editor)
    trained.trained = True
    assert trained.default_edit_method == "modulate" and trained.default_mode == "fast"
    assert editor.default_mode == "invert" and not editor.generation.editing_components


def test_public_preset_from_local_folders(editor, tmp_path, monkeypatch, mask_path):
    """The public preset resolves every public network through its MM2LATENT_*_REPO override (here tiny folders)."""
    folder = editor.save_pretrained(tmp_path / "tiny")
    overrides = {"MM2LATENT_SD_REPO": folder, "MM2LATENT_CONTROLNET_SCRIBBLE_REPO": folder / "controlnet_scribble",
                 "MM2LATENT_GENERATOR_REPO": folder / "generator", "MM2LATENT_INVERTER_REPO": folder / "inverter",
                 "MM2LATENT_FACE_PARSER_REPO": folder / "face_parser", "MM2LATENT_ARCFACE_REPO": folder / "identity",
                 "MM2LATENT_CLIP_REPO": folder / "clip", "MM2LATENT_LPIPS_REPO": folder / "lpips"}
    for name, value in overrides.items():
        monkeypatch.setenv(name, str(value))
    public = FaceEditPipeline.from_pretrained("public", device="cpu")
    public.generation.show_progress = False
    assert public.name == "public" and not public.trained and public.generation.modalities == ["scribble"]
    assert public.default_mode == "invert" and public.lpips is not None  # L2 + LPIPS refinement (public LPIPS)
    torch.testing.assert_close(public.generator.latent_avg, editor.generator.latent_avg)
    # M starts at the mean latent (zeroed heads) and T at identity: fast mode draws the average face.
    fast = public.generation(PROMPT, seed=0)
    torch.testing.assert_close(fast.latents[0], public.generator.latent_avg.expand_as(fast.latents[0]))
    out = public(PROMPT, mask=mask_path, seed=3, num_steps=STEPS, refine_steps=2)
    assert out.settings["mode"] == "invert" and len(out.settings["refine_loss"]) == 2
