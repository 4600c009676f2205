"""The training-free mode, fast and faithful: LCM drawing with a fused LCM-LoRA, the faithfulness budgets,
the alignment of I^d_0 and the closeness figures of every output."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent import FaceEditPipeline
from mm2latent.editing.closeness import FAITHFULNESS, measure_closeness
from mm2latent.editing.inversion import encode_images
from mm2latent.errors import InvalidSettingError
from mm2latent.inputs.images import image_to_tensor
from mm2latent.models.few_step import FewStepLoRA, make_scheduler, save_random_lora, step_generators
from mm2latent.pipelines.request import GenerationRequest

PROMPT = "She has long wavy blonde hair."


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    """The tiny edit pipeline with a LoRA of its U-Net in the published LCM-LoRA layout."""
    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    editor.generation.show_progress = False
    path = save_random_lora(editor.generation.encoder.unet, tmp_path_factory.mktemp("lcm") / "lora.safetensors",
                            rank=4, alpha=4, seed=2, std=0.02)
    editor.few_step = FewStepLoRA.from_file(path)
    return editor


def test_the_fast_drawing_is_four_lcm_steps_on_the_fused_unet(editor, mask_path):
    pipe, unet = editor.generation, editor.generation.encoder.unet
    assert editor.default_drawing == "fast"
    out = editor(PROMPT, mask=mask_path, seed=3, mode="invert", faithfulness="encoder")
    assert (out.settings["drawing"], out.settings["num_steps"], out.settings["guidance_scale"]) == ("fast", 4, 1.0)
    assert editor.few_step.is_fused(unet)
    # By hand: the same noise through LCM on the fused U-Net (no unconditional pass), then the encoder.
    controls, _ = pipe.prepare_conditions(mask=mask_path)
    noise = pipe.prepare_noise([3])
    drawing = pipe.draw(pipe.encode_prompts([PROMPT]), controls, noise, num_steps=4, guidance_scale=1.0,
                        scheduler=make_scheduler("lcm", pipe.encoder.scheduler_config),
                        generator=step_generators([3], tuple(noise.shape[1:])))
    torch.testing.assert_close(out.latents, encode_images(editor.inverter, drawing.images, pipe.generator),
                               rtol=0, atol=1e-6)
    # A fast-mode pass (M and T read SD-1.5's features) unfuses the LoRA first.
    editor(PROMPT, mask=mask_path, seed=3, mode="fast")
    assert not editor.few_step.is_fused(unet)
    quality = editor(PROMPT, mask=mask_path, seed=3, mode="invert", drawing="quality", num_steps=3,
                     faithfulness="encoder")
    assert (quality.settings["drawing"], quality.settings["guidance_scale"]) == ("quality", 7.5)
    assert not editor.few_step.is_fused(unet) and not torch.allclose(quality.latents, out.latents)


def test_lcm_step_noise_makes_a_face_the_same_alone_and_in_a_batch(editor, mask_path):
    pair = editor(PROMPT, mask=mask_path, seed=10, mode="invert", num_images=2, faithfulness="encoder")
    alone = editor(PROMPT, mask=mask_path, seed=11, mode="invert", faithfulness="encoder")
    torch.testing.assert_close(pair.latents[1:], alone.latents, atol=1e-4, rtol=1e-4)


def test_refinement_is_on_by_default_with_the_balanced_budget(editor, mask_path):
    balanced = FAITHFULNESS["balanced"]
    out = editor(PROMPT, mask=mask_path, seed=3, mode="invert")
    assert out.settings["refine_steps"] == balanced.steps and len(out.settings["refine_loss"]) == 2
    encoder_only = editor(PROMPT, mask=mask_path, seed=3, mode="invert", faithfulness="encoder")
    assert encoder_only.settings["refine_steps"] == 0 and "refine_loss" not in encoder_only.settings
    # Refinement pulls G(w) toward I^d_0: closer in L2 + LPIPS than the encoder's latent alone.
    score = [c["l2"] + 0.8 * c["lpips"] for c in (out.closeness[0], encoder_only.closeness[0])]
    assert score[0] < score[1]
    explicit = GenerationRequest.create(PROMPT, mode="invert", refine_steps=7, faithfulness="close")
    assert explicit.refine_steps == 7  # explicit steps win over a named budget
    close = GenerationRequest.create(PROMPT, mode="invert", faithfulness="close")
    assert (close.refine_steps, close.refine_patience) == (FAITHFULNESS["close"].steps, FAITHFULNESS["close"].patience)


def test_every_output_says_how_close_the_face_is_to_the_drawing(editor, mask_path):
    out = editor(PROMPT, mask=mask_path, seed=4, mode="invert", num_images=2, faithfulness="encoder",
                 return_diffusion_image=True)
    assert len(out.closeness) == 2 and all(c["miou"] is not None and c["lpips"] is not None for c in out.closeness)
    # The figures are those of the returned face against the returned drawing (tiny drawings have no face to align).
    faces = torch.cat([image_to_tensor(image) for image in out.images])
    drawings = torch.cat([image_to_tensor(image) for image in out.diffusion_images])
    by_hand = measure_closeness(faces, drawings, editor.lpips)
    assert [c["l2"] for c in out.closeness] == pytest.approx([c.l2 for c in by_hand], abs=1e-3)
    no_mask = editor(PROMPT, seed=4, mode="invert", faithfulness="encoder")
    assert no_mask.closeness[0]["miou"] is None


def test_an_off_template_drawing_is_aligned_before_the_encoder(editor, testdata):
    photo = Image.open(testdata / "photos" / "celebamaskhq_1.jpg").convert("RGB").resize((512, 512), Image.LANCZOS)
    moved = Image.new("RGB", (512, 512), (128, 128, 128))
    moved.paste(photo.resize((358, 358), Image.LANCZOS), (120, 40))
    ids = np.zeros((512, 512), np.uint8)
    ids[40:398, 120:478] = 1
    on, off = image_to_tensor(photo), image_to_tensor(moved)
    targets, mask_ids, notes = editor.align_drawings(torch.cat([on, off]), ids)
    assert torch.equal(targets[0], on[0])  # on the template: inverted as drawn, bit for bit
    assert not torch.allclose(targets[1], off[0]) and len(notes) == 1 and "off the FFHQ template" in notes[0]
    np.testing.assert_array_equal(mask_ids[0].numpy(), ids)
    assert (mask_ids[1] == 1).float().mean() > 0.9  # the moved face's box fills the aligned crop


def test_bad_drawing_settings_are_refused(editor, mask_path):
    with pytest.raises(InvalidSettingError, match="drawing must be one of"):
        editor(PROMPT, mask=mask_path, mode="invert", drawing="turbo")
    with pytest.raises(InvalidSettingError, match="faithfulness must be one of"):
        editor(PROMPT, mask=mask_path, mode="invert", faithfulness="perfect")
    plain = FaceEditPipeline(editor.generation, inverter=editor.inverter)
    plain.few_step = None
    assert plain.default_drawing == "quality"
    with pytest.raises(InvalidSettingError, match="LCM-LoRA"):
        plain(PROMPT, mask=mask_path, mode="invert", drawing="fast")


def test_the_training_cache_may_draw_with_lcm_and_says_so(editor, tmp_path):
    from mm2latent.training.config import load_config
    from mm2latent.training.idd_cache import build_idd_cache, cache_settings, prepare_cache_folder
    from mm2latent.training.stages import build_dataset

    def config(sampler):
        return load_config(None, {
            "stage": 2, "seed": 0, "pipeline": "tiny", "output_dir": str(tmp_path / sampler),
            "data": {"kind": "synthetic", "num_samples": 2, "modalities": ["mask"], "num_workers": 0},
            "diffusion": {"idd_steps": 3, "idd_strength": 0.5, "idd_batch_size": 2, "idd_sampler": sampler}})

    pipe, unet = editor.generation, editor.generation.encoder.unet
    editor.few_step.unfuse(unet)
    lcm, ddim = config("lcm"), config("ddim")
    combos = [("mask",)]
    assert cache_settings(lcm, pipe, combos)["sampler"] == {"name": "lcm", "steps": 4,
                                                           "lora": "latent-consistency/lcm-lora-sdv1-5"}
    assert "sampler" not in cache_settings(ddim, pipe, combos)  # DDIM caches made before the option stay valid
    images = {}
    for name, cfg in (("lcm", lcm), ("ddim", ddim)):
        folder = tmp_path / f"{name}_cache"
        prepare_cache_folder(folder, cache_settings(cfg, pipe, combos), "refuse")
        build_idd_cache(cfg, pipe, build_dataset(cfg, pipe), folder, few_step=editor.few_step)
        images[name] = sorted(folder.glob("*.png"))
        assert not editor.few_step.is_fused(unet)  # fused for the build only: training reads SD-1.5's features
    assert len(images["lcm"]) == len(images["ddim"]) == 2
    assert not np.array_equal(np.asarray(Image.open(images["lcm"][0])), np.asarray(Image.open(images["ddim"][0])))
