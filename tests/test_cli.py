"""`python -m mm2latent generate` writes PNGs with their settings and the AI-generated mark."""

import subprocess
import sys

import numpy as np
from PIL import Image

from mm2latent.__main__ import main
from mm2latent.inputs.metadata import read_png_settings


def test_generate_writes_png_with_metadata(tiny_pipe, mask_path, tmp_path):
    out = tmp_path / "face.png"
    code = main(["generate", "--preset", "tiny", "--prompt", "she is smiling", "--mask", str(mask_path),
                 "--seed", "5", "--out", str(out), "--save-latent", "--device", "cpu"])
    assert code == 0
    settings = read_png_settings(out)
    assert settings["prompt"] == "she is smiling" and settings["seed"] == 5 and settings["trained"] is False
    with Image.open(out) as image:
        assert image.text["ai_generated"] == "true"
        written = np.asarray(image.convert("RGB"))
    expected = tiny_pipe("she is smiling", mask=mask_path, seed=5)
    assert np.array_equal(written, np.asarray(expected.images[0]))
    np.testing.assert_array_equal(np.load(out.with_suffix(".npy")), expected.latents[0].numpy())


def test_several_images_and_user_errors(tmp_path, capsys):
    out = tmp_path / "batch.png"
    assert main(["generate", "--preset", "tiny", "--prompt", "a man", "--seed", "1", "--num-images", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert read_png_settings(tmp_path / "batch_1.png")["seed"] == 2
    assert main(["generate", "--preset", "tiny", "--prompt", " ", "--out", str(out), "--device", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_module_entry_point_reports_a_bad_seed_plainly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mm2latent", "generate", "--preset", "tiny", "--prompt", "a man",
                             "--seed", str(2**40), "--out", str(tmp_path / "x.png"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not (tmp_path / "x.png").exists()
    assert "error: the seed must be a whole number from 0 to 4294967295" in result.stderr
    assert "Traceback" not in result.stderr


def test_invert_mode_runs_the_training_free_path(mask_path, tmp_path):
    """`--mode invert` loads the editing pipeline and gives what FaceEditPipeline's invert mode gives."""
    from mm2latent.pipelines.editing import FaceEditPipeline

    out = tmp_path / "free.png"
    assert main(["generate", "--preset", "tiny", "--mode", "invert", "--prompt", "she is smiling", "--mask",
                 str(mask_path), "--seed", "3", "--num-images", "1", "--steps", "2", "--refine-steps", "1",
                 "--out", str(out), "--save-latent", "--device", "cpu"]) == 0
    settings = read_png_settings(out)
    assert settings["mode"] == "invert" and settings["refine_steps"] == 1
    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    expected = editor("she is smiling", mask=mask_path, seed=3, mode="invert", num_steps=2, refine_steps=1)
    np.testing.assert_allclose(np.load(out.with_suffix(".npy")), expected.latents[0].numpy(), atol=1e-5)
    fast = editor("she is smiling", mask=mask_path, seed=3, mode="fast")
    assert not np.allclose(np.load(out.with_suffix(".npy")), fast.latents[0].numpy(), atol=1e-3)
