"""The tiny pipeline end to end: determinism, conditioning, batching, intermediates, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent import FacePipeline
from mm2latent.errors import (
    EmptyMaskError,
    EmptyPromptError,
    InvalidImageError,
    InvalidSeedError,
    InvalidSettingError,
    InvalidStepsError,
    MM2LatentError,
    UnsupportedConditionError,
)

PROMPT = "She has long wavy blonde hair and is smiling."


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_same_seed_same_face(tiny_pipe, mask_path):
    first = tiny_pipe(PROMPT, mask=mask_path, seed=11)
    second = tiny_pipe(PROMPT, mask=mask_path, seed=11)
    assert first.images[0].size == (tiny_pipe.resolution, tiny_pipe.resolution)
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    assert torch.equal(first.latents, second.latents)
    assert first.latents.shape == (1, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    other_seed = tiny_pipe(PROMPT, mask=mask_path, seed=12)
    assert not torch.equal(first.latents, other_seed.latents)


def test_prompt_and_mask_change_the_latent(tiny_pipe, mask_path, other_mask_path):
    base = tiny_pipe(PROMPT, mask=mask_path, seed=3).latents
    other_prompt = tiny_pipe("He has a beard and short black hair.", mask=mask_path, seed=3).latents
    other_mask = tiny_pipe(PROMPT, mask=other_mask_path, seed=3).latents
    assert (base - other_prompt).abs().max() > 1e-4
    assert (base - other_mask).abs().max() > 1e-4


def test_text_only_and_scribble_inputs(tiny_pipe, sketch_path, mask_path):
    text_only = tiny_pipe(PROMPT, seed=5)
    sketch = tiny_pipe(PROMPT, scribble=sketch_path, seed=5)
    both = tiny_pipe(PROMPT, mask=mask_path, scribble=sketch_path, seed=5)
    assert text_only.condition_images == {}
    assert set(sketch.condition_images) == {"scribble"} and set(both.condition_images) == {"mask", "scribble"}
    assert not torch.equal(text_only.latents, sketch.latents)
    assert not torch.equal(sketch.latents, both.latents)
    # A visual input alone is enough: no words, so T's global branch is ungated and no attention maps exist.
    mask_only = tiny_pipe("", mask=mask_path, seed=5, return_intermediates=True)
    assert mask_only.attention_words == [] and mask_only.attention_maps.shape[1] == 0
    assert not torch.equal(mask_only.latents, both.latents)


def test_batch_matches_single_calls(tiny_pipe, mask_path):
    batch = tiny_pipe(PROMPT, mask=mask_path, seed=20, num_images=3)
    assert batch.seeds == [20, 21, 22] and len(batch.images) == 3
    single = tiny_pipe(PROMPT, mask=mask_path, seed=21)
    torch.testing.assert_close(batch.latents[1], single.latents[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch.latents[0], batch.latents[1])


def test_quality_mode_and_intermediates(tiny_pipe, mask_path):
    out = tiny_pipe(PROMPT, mask=mask_path, seed=2, mode="quality", num_steps=4, feature_steps=[0, 1, 3],
                    return_intermediates=True, return_diffusion_image=True)
    assert out.step_latents.shape == (3, 1, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    torch.testing.assert_close(out.latents, out.step_latents.mean(dim=0))
    assert len(out.timesteps) == 3 and out.timesteps == sorted(out.timesteps, reverse=True)
    assert out.attention_words == ["she", "has", "long", "wavy", "blonde", "hair", "and", "is", "smiling"]
    maps = out.attention_maps
    assert maps.shape[:2] == (1, len(out.attention_words))
    assert maps.min() >= 0 and torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(1, maps.shape[1]))
    assert out.diffusion_images[0].size == (tiny_pipe.encoder.image_size,) * 2
    fast = tiny_pipe(PROMPT, mask=mask_path, seed=2)
    # Fast mode reads the first step only; quality mode averages more steps.
    torch.testing.assert_close(fast.latents[0], out.step_latents[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast.latents, out.latents)


def test_attention_maps_are_per_word(tiny_pipe, mask_path):
    prompt = "The man has bushy eyebrows."
    out = tiny_pipe(prompt, mask=mask_path, seed=1, return_intermediates=True)
    # Sub-word pieces ("m"+"an", "bu"+"sh"+"y", "eye"+"brow"+"s") are merged, punctuation is left out.
    assert out.attention_words == ["the", "man", "has", "bushy", "eyebrows"]
    prompts = tiny_pipe.encode_prompts([prompt])
    tokens = tiny_pipe.encoder.tokenizer.convert_ids_to_tokens(
        tiny_pipe.encoder.tokenizer(prompt).input_ids)
    bushy = prompts.word_tokens[0][3]
    assert [tokens[i] for i in bushy] == ["bu", "sh", "y</w>"]
    controls, _ = tiny_pipe.prepare_conditions(mask=mask_path)
    prediction = tiny_pipe.predict_latents(prompts, controls, tiny_pipe.prepare_noise([1]), return_attention=True)
    expected = prediction.token_maps[0, bushy].mean(dim=0)
    torch.testing.assert_close(out.attention_maps[0, 3], expected / expected.max())


def test_truncation_pulls_toward_the_mean(tiny_pipe, mask_path):
    full = tiny_pipe(PROMPT, mask=mask_path, seed=9).latents
    zero = tiny_pipe(PROMPT, mask=mask_path, seed=9, truncation=0.0).latents
    half = tiny_pipe(PROMPT, mask=mask_path, seed=9, truncation=0.5).latents
    avg = tiny_pipe.generator.latent_avg.float()
    torch.testing.assert_close(zero, avg.expand_as(zero))
    torch.testing.assert_close(half, avg + 0.5 * (full - avg), atol=1e-5, rtol=1e-5)


def test_save_and_load_give_the_same_output(tiny_pipe, mask_path, tmp_path):
    expected = tiny_pipe(PROMPT, mask=mask_path, seed=4)
    folder = tiny_pipe.save_pretrained(tmp_path / "tiny")
    assert (folder / "mm2latent.json").is_file()
    assert (folder / "mapper" / "model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    loaded = FacePipeline.from_pretrained(folder, device="cpu")
    loaded.show_progress = False
    assert loaded.trained is False
    again = loaded(PROMPT, mask=mask_path, seed=4)
    # Bit-identical: the same weights, copied into 64-byte-aligned memory after loading (realign_), run the
    # same CPU kernels as the in-memory preset. (Without realigning, safetensors' unaligned offsets made
    # oneDNN pick other kernels: ~1e-5 differences at the latent.)
    assert torch.equal(expected.latents, again.latents)
    assert np.array_equal(pixels(expected.images[0]), pixels(again.images[0]))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"prompt": "   "}, EmptyPromptError, "prompt is empty"),
        ({"prompt": PROMPT, "seed": -1}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": 2**32}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": 2**64}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": 1.5}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": True}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "mode": "quality", "num_steps": 0}, InvalidStepsError, "steps"),
        ({"prompt": PROMPT, "mode": "quality", "num_steps": 101}, InvalidStepsError, "steps"),
        ({"prompt": PROMPT, "mode": "quality", "num_steps": 4, "feature_steps": [4]}, InvalidStepsError, "feature steps"),
        ({"prompt": PROMPT, "mode": "fast", "feature_steps": [1]}, InvalidStepsError, "fast mode"),
        ({"prompt": PROMPT, "mode": "slow"}, InvalidSettingError, "mode"),
        ({"prompt": PROMPT, "truncation": 3.0}, InvalidSettingError, "truncation"),
        ({"prompt": PROMPT, "num_images": 0}, InvalidSettingError, "number of images"),
        ({"prompt": PROMPT, "num_images": 17}, InvalidSettingError, "number of images"),
        ({"prompt": 42}, InvalidSettingError, "prompt must be text"),
        ({"prompt": PROMPT, "seed": 10**400}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": float("nan")}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "seed": "abc"}, InvalidSeedError, "seed"),
        ({"prompt": PROMPT, "truncation": float("nan")}, InvalidSettingError, "truncation"),
        ({"prompt": PROMPT, "truncation": 10**400}, InvalidSettingError, "truncation"),
        ({"prompt": PROMPT, "truncation": "abc"}, InvalidSettingError, "truncation"),
        ({"prompt": PROMPT, "noise_mode": "loud"}, InvalidSettingError, "noise_mode"),
        ({"prompt": PROMPT, "guidance_scale": 0.5}, InvalidSettingError, "guidance"),
    ],
)
def test_bad_settings_raise_typed_errors(tiny_pipe, kwargs, error, words):
    with pytest.raises(error, match=words) as info:
        tiny_pipe(**kwargs)
    assert isinstance(info.value, MM2LatentError)


def test_bad_visual_inputs(tiny_pipe, tmp_path):
    no_face = np.zeros((64, 64), np.uint8)
    no_face[:32] = 13  # hair only
    with pytest.raises(EmptyMaskError, match="no face"):
        tiny_pipe(PROMPT, mask=no_face)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(InvalidImageError, match="broken.png"):
        tiny_pipe(PROMPT, mask=broken)
    with pytest.raises(InvalidImageError):
        tiny_pipe(PROMPT, mask=np.zeros((0, 5), np.uint8))


def test_single_controlnet_model_rejects_both_inputs(tiny_pipe, mask_path, sketch_path):
    from mm2latent.models.diffusion_encoder import DiffusionEncoder

    enc = tiny_pipe.encoder
    mask_only = FacePipeline(DiffusionEncoder(enc.unet, enc.text_encoder, enc.tokenizer, enc.make_scheduler(),
                                              {"mask": enc.controlnets["mask"]}, enc.vae),
                             tiny_pipe.generator, tiny_pipe.mapper, tiny_pipe.modulator)
    mask_only.show_progress = False
    with pytest.raises(UnsupportedConditionError, match="both a mask and a scribble"):
        mask_only(PROMPT, mask=mask_path, scribble=sketch_path)
    with pytest.raises(UnsupportedConditionError, match="scribble"):
        mask_only(PROMPT, scribble=sketch_path)
    # The mask still works, with the same result as the two-ControlNet model (the scribble net is unused).
    assert torch.equal(mask_only(PROMPT, mask=mask_path, seed=1).latents, tiny_pipe(PROMPT, mask=mask_path, seed=1).latents)


def test_bfloat16_close_to_float32(mask_path):
    pipe = FacePipeline.from_pretrained("tiny", device="cpu", dtype=torch.bfloat16)
    pipe.show_progress = False
    reference = FacePipeline.from_pretrained("tiny", device="cpu")
    reference.show_progress = False
    low = pipe(PROMPT, mask=mask_path, seed=1).latents
    high = reference(PROMPT, mask=mask_path, seed=1).latents
    spread = (high - reference.generator.latent_avg).abs().mean()
    assert (low - high).abs().mean() < 0.2 * spread


def test_dtype_names():
    from mm2latent.pipelines.generation import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.float16
    with pytest.raises(InvalidSettingError, match="dtype"):
        resolve_dtype("float8", cpu)


def test_photo_editing_components_survive_save_and_load(testdata, tmp_path):
    from mm2latent import FaceEditPipeline

    photo = testdata / "photos" / "ffhq_0.jpg"
    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    inverted = editor.invert(photo, progress=False)
    folder = editor.save_pretrained(tmp_path / "with-editing")
    loaded = FaceEditPipeline.from_pretrained(folder, device="cpu")
    assert all(getattr(loaded, key) is not None for key in ("inverter", "face_parser", "identity", "lpips", "clip"))
    # A generation-only load of the same folder leaves the editing networks on disk.
    assert FacePipeline.from_pretrained(folder, device="cpu").editing_components == {}
    again = loaded.invert(photo, progress=False)
    assert torch.equal(inverted.latent, again.latent)
    assert np.array_equal(inverted.mask, again.mask)
    unchanged = loaded.edit(again, "she has blonde hair", strength=0.0)
    assert torch.equal(unchanged.latent, again.latent)


def test_deepcopy_gives_an_independent_pipeline(tiny_pipe, mask_path):
    import copy

    clone = copy.deepcopy(tiny_pipe)
    assert clone.encoder.unet is not tiny_pipe.encoder.unet and clone.lock is not tiny_pipe.lock
    assert torch.equal(clone(PROMPT, mask=mask_path, seed=3).latents, tiny_pipe(PROMPT, mask=mask_path, seed=3).latents)
    with torch.no_grad():
        clone.mapper.heads.bias.add_(1.0)
    assert not torch.equal(clone(PROMPT, mask=mask_path, seed=3).latents, tiny_pipe(PROMPT, mask=mask_path, seed=3).latents)


def test_fast_mode_preview_decodes_after_the_documented_steps(tiny_pipe, mask_path):
    from mm2latent.inputs.images import tensor_to_pil
    from mm2latent.pipelines.request import DEFAULT_QUALITY_STEPS

    controls, _ = tiny_pipe.prepare_conditions(mask=mask_path)
    prompts = tiny_pipe.encode_prompts([PROMPT])

    def drawn(steps):
        drawing = tiny_pipe.draw(prompts, controls, tiny_pipe.prepare_noise([6]), num_steps=steps, guidance_scale=1.0)
        return pixels(tensor_to_pil(drawing.images)[0])

    # Default: the documented 20 DDIM steps (num_steps), not a decode after the single feature step.
    out = tiny_pipe(PROMPT, mask=mask_path, seed=6, return_diffusion_image=True)
    assert out.settings["num_steps"] == DEFAULT_QUALITY_STEPS
    preview = pixels(out.diffusion_images[0])
    assert np.array_equal(preview, drawn(DEFAULT_QUALITY_STEPS))
    assert np.abs(preview.astype(int) - drawn(1).astype(int)).max() > 8
    fewer = tiny_pipe(PROMPT, mask=mask_path, seed=6, num_steps=5, return_diffusion_image=True)
    assert np.array_equal(pixels(fewer.diffusion_images[0]), drawn(5))
    # The preview does not move fast mode's latent: features still come from the first step, t = T.
    torch.testing.assert_close(out.latents, tiny_pipe(PROMPT, mask=mask_path, seed=6).latents, atol=1e-5, rtol=1e-5)
