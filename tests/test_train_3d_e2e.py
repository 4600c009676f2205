"""The 3D path end to end on the tiny EG3D preset: `prepare --generator eg3d` on real test photos -> stage 1 ->
stage 2 -> evaluation at each photo's camera -> a multi-view sample grid."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent import FacePipeline
from mm2latent.training.cameras import read_dataset_json
from mm2latent.training.cli import main as train_main
from mm2latent.training.evaluate import main as evaluate_main

# Real photos with their masks (masks of other faces stand in for the FFHQ photos: the path, not the pairing,
# is under test). Photos are shrunk to 256² so dlib and the crops stay quick.
PHOTOS = [("celebamaskhq_0.jpg", "celebamaskhq_0_index.png"), ("celebamaskhq_1.jpg", "celebamaskhq_1_index.png"),
          ("ffhq_3.jpg", "label_index_a.png")]


def tiny_run(stage: int, pipeline: str, data: str, output: str) -> list[str]:
    return ["--config", "configs/stage1_mapper_eg3d.yaml" if stage == 1 else "configs/stage2_modulator_eg3d.yaml",
            "--set", f"pipeline={pipeline}", f"output_dir={output}", f"data.root={data}", "components={}",
            "data.num_workers=0", "data.modalities=[mask]", "train.batch_size=2", "train.max_steps=1",
            'train.mixed_precision="no"', "train.checkpoint_every=0", "train.sample_every=0", "train.log_with=null",
            "train.progress=false", "networks.lpips=tiny", "networks.arcface=tiny", "diffusion.idd_steps=1",
            "diffusion.idd_captions_per_image=2"]


def test_eg3d_prepare_train_evaluate(testdata, tmp_path, monkeypatch):
    root, masks, text = tmp_path / "raw", tmp_path / "masks", tmp_path / "text"
    for folder in (root / "CelebA-HQ-img", masks, text):
        folder.mkdir(parents=True)
    for i, (photo, mask) in enumerate(PHOTOS):
        if not (testdata / "photos" / photo).is_file():
            pytest.skip(f"{photo} is not in the test data")
        with Image.open(testdata / "photos" / photo) as image:
            image.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS).save(root / "CelebA-HQ-img" / f"{i}.jpg")
        shutil.copy(testdata / "masks" / mask, masks / f"{i}.png")
        (text / f"{i}.txt").write_text("a face with a smile\nthe person has short hair\nshe or he looks young\n")
    (tmp_path / "test_ids.txt").write_text("2\n")
    prepared = tmp_path / "prepared"
    train_main(["prepare", "--generator", "eg3d", "--root", str(root), "--mask-dir", str(masks), "--text-dir",
                str(text), "--output", str(prepared), "--test-ids", str(tmp_path / "test_ids.txt")])
    labels = read_dataset_json(prepared / "cameras.json")
    assert sorted(labels) == [f"{i}.png" for i in range(3)]
    assert (prepared / "test.txt").read_text().split() == ["2"]

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # the configs/ folder
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train_main(tiny_run(1, "tiny-eg3d", str(prepared), str(stage1)))
    train_main(tiny_run(2, str(stage1 / "final"), str(prepared), str(stage2)))
    # Stage 2 cached I^d_0 for two captions of each training image (one combination: the mask).
    entries = [json.loads(line) for line in (stage2 / "idd_cache" / "entries.jsonl").read_text().splitlines()]
    assert len(entries) == 2 * 2 and len({(e["image_id"], e["caption"]) for e in entries}) == 4

    out = tmp_path / "eval"
    evaluate_main(["--model", str(stage2 / "final"), "--data", str(prepared), "--output", str(out),
                   "--num-samples", "1", "--modalities", "mask", "--lpips", "tiny", "--arcface", "tiny",
                   "--face-parser", "tiny", "--fid-feature", "none", "--no-clip", "--multiview", "1"])
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert rows["mm2latent (ours)"]["mask"]["num_samples"] == 1 and rows["mm2latent (ours)"]["mask"]["lpips"] > 0
    grid = Image.open(out / "multiview.png")
    pipe = FacePipeline.from_pretrained(str(stage2 / "final"), device="cpu")
    size = pipe.resolution
    assert grid.size == (6 * size, size)  # the photo, then five yaws
    tiles = np.asarray(grid).reshape(size, 6, size, 3).transpose(1, 0, 2, 3).astype(float)
    assert np.abs(tiles[1] - tiles[5]).mean() > 1.0  # the views differ: G was rendered from several cameras


def test_evaluation_renders_each_sample_at_its_camera():
    """The images the evaluation scores are the pipeline's renders at the item's camera, not the frontal view."""
    from mm2latent.inputs.images import image_to_tensor
    from mm2latent.training.evaluate import mm2latent_images, pil_inputs

    pipe = FacePipeline.from_pretrained("tiny-eg3d", device="cpu")
    pipe.show_progress = False
    mask = torch.zeros(3, pipe.encoder.image_size, pipe.encoder.image_size)
    mask[0, 8:24, 8:24] = 0.8
    camera = pipe.generator.camera_labels([[35.0, 10.0]])[0]
    item = {"caption": "a face", "controls": {"mask": mask}, "camera": camera}
    image = mm2latent_images(pipe)(item, "mask", 0)
    at_camera = pipe("a face", seed=0, mask=pil_inputs(item, "mask"), camera=camera).images[0]
    frontal = pipe("a face", seed=0, mask=pil_inputs(item, "mask")).images[0]
    torch.testing.assert_close(image, image_to_tensor(at_camera))
    assert not torch.allclose(image, image_to_tensor(frontal), atol=1e-2)
