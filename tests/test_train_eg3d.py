"""Training with EG3D: camera labels from EG3D's dataset.json, G rendered at each sample's camera."""

import pytest
import torch

from mm2latent import FacePipeline
from mm2latent.training.cameras import write_dataset_json
from mm2latent.training.cli import build
from mm2latent.training.config import ConfigError, load_config
from mm2latent.training.data import collate


@pytest.fixture(scope="module")
def eg3d_pipe():
    pipe = FacePipeline.from_pretrained("tiny-eg3d", device="cpu")
    pipe.show_progress = False
    return pipe


def eg3d_config(tmp_path, labels):
    return load_config(None, {
        "stage": 1, "seed": 0, "pipeline": "tiny-eg3d", "output_dir": str(tmp_path / "run"),
        "data": {"kind": "synthetic", "num_samples": 2, "modalities": ["scribble"], "num_workers": 0,
                 "camera_labels": str(labels)},
        "train": {"batch_size": 2, "max_steps": 1, "log_with": None, "checkpoint_every": 0, "sample_every": 0,
                  "resume": None, "progress": False},
        "loss": {"lpips": 0.0, "id": 0.0},
    })


def test_stage1_step_renders_each_sample_at_its_label(eg3d_pipe, tmp_path):
    import copy

    cameras = eg3d_pipe.generator.camera_labels([[-30.0, 0.0], [30.0, 10.0]])
    labels = write_dataset_json({"a.png": cameras[0], "b.png": cameras[1]}, tmp_path / "dataset.json")
    trainer = build(eg3d_config(tmp_path, labels), copy.deepcopy(eg3d_pipe))
    batch = collate([trainer.dataset[(p, 0)] for p in range(2)])
    torch.testing.assert_close(batch["camera"], cameras)  # the labels of dataset.json, in file-name order

    logs = trainer.train()
    assert len(logs) == 1 and logs[0]["loss/l2"] > 0

    generator = trainer.stage.pipe.generator
    w = generator.latent_avg.expand(2, generator.num_ws, -1).clone()  # one latent, two cameras
    with torch.no_grad():
        images = trainer.stage.render(w, batch)
        expected = generator.synthesis(w, camera=cameras)
    assert not torch.allclose(images[0], images[1], atol=1e-3)  # the same face seen from two cameras
    torch.testing.assert_close(images, expected)


def test_3d_training_without_labels_says_what_to_set(eg3d_pipe, tmp_path):
    import copy

    config = eg3d_config(tmp_path, "unused")
    config.data.camera_labels = None
    trainer = build(config, copy.deepcopy(eg3d_pipe))
    batch = collate([trainer.dataset[(p, 0)] for p in range(2)])
    batch.pop("camera")  # what a photo dataset without labels gives
    with pytest.raises(ConfigError, match="data.camera_labels"):
        trainer.stage.render(torch.zeros(2, eg3d_pipe.generator.num_ws, eg3d_pipe.generator.style_dim), batch)


def test_prepared_photos_carry_their_dataset_json_label(testdata, tmp_path):
    """A prepared CelebAMask-HQ folder + EG3D's dataset.json: each item's camera is its photo's label (by file
    name); a photo without one is named in the error."""
    import shutil

    from PIL import Image

    from mm2latent.models.camera import camera_label
    from mm2latent.training.data import FaceDataset, prepare

    root, masks = tmp_path / "raw", tmp_path / "masks"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    masks.mkdir()
    for i, name in enumerate(sorted(p.name for p in (testdata / "masks").glob("*.png"))[:2]):
        shutil.copy(testdata / "masks" / name, masks / f"{i}.png")
        with Image.open(testdata / "photos" / f"ffhq_{i}.jpg") as photo:
            photo.resize((64, 64), Image.Resampling.BILINEAR).save(root / "CelebA-HQ-img" / f"{i}.jpg")
    prepared = prepare(root, tmp_path / "prepared", mask_dir=masks, mask_size=32, scribble_size=32, test_fraction=0)
    labels = {"0.jpg": camera_label(-20.0, 5.0), "1.jpg": camera_label(25.0, -5.0)}
    dataset = FaceDataset(prepared, "train", 16, 16, 16, modalities=("mask",), camera_labels=labels)
    by_id = {dataset[(p, 0)]["image_id"]: dataset[(p, 0)]["camera"] for p in range(2)}
    torch.testing.assert_close(by_id[0], labels["0.jpg"])
    torch.testing.assert_close(by_id[1], labels["1.jpg"])
    with pytest.raises(ValueError, match="1.jpg"):
        FaceDataset(prepared, "train", 16, 16, 16, modalities=("mask",), camera_labels={"0.jpg": labels["0.jpg"]})


def test_3d_stage_crops_identity_in_eg3ds_framing(eg3d_pipe, tmp_path):
    """L_ID on a 3D generator's outputs crops the EG3D box (networks/arcface.py FACE_CROPS), which changes the
    embedding of the same image."""
    import copy

    from mm2latent.models.networks import build_tiny_network

    cameras = eg3d_pipe.generator.camera_labels([[0.0, 0.0]])
    labels = write_dataset_json({"a.png": cameras[0]}, tmp_path / "dataset.json")
    config = eg3d_config(tmp_path, labels)
    config.loss.id = 0.1
    config.networks.arcface = "tiny"
    trainer = build(config, copy.deepcopy(eg3d_pipe))
    arcface = trainer.stage.loss_fn.arcface
    assert arcface.face_crop == "eg3d"
    faces = torch.rand(1, 3, 64, 64) * 2 - 1
    assert not torch.allclose(arcface.embed(faces), arcface.embed(faces, framing="ffhq"))
    assert build_tiny_network("arcface").face_crop == "ffhq"  # 2D keeps pSp's crop


def test_dry_run_plans_a_3d_run_and_its_caption_cache(capsys, tmp_path):
    """--dry-run --generator eg3d times steps on the EG3D generator and plans the I^d_0 cache of every caption."""
    import json

    from mm2latent.training.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("stage: 2\npipeline: tiny\ndata: {kind: synthetic, modalities: [mask, scribble]}\n"
                      "train: {batch_size: 1, max_steps: 100}\nloss: {lpips: 0.0, id: 0.0}\n"
                      "diffusion: {idd_steps: 1, idd_captions_per_image: 0}\n")
    main(["--config", str(config), "--dry-run", "--steps", "1", "--generator", "eg3d"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["pipeline"] == "tiny-eg3d"
    plan = report["idd_cache"]
    # No prepared folder: CelebAMask-HQ's 27 000 training photos x 10 captions x (mask, scribble) are assumed.
    assert plan["entries"] == 27000 * 10 * 2 and plan["bytes"] > 0
    assert plan["hours"] == pytest.approx(plan["entries"] * plan["seconds_per_entry"] / 3600)
    assert any(line.startswith("  I^d_0 cache: 27000 images x 10.0 captions") for line in lines)


def test_3d_sample_grid_shows_each_output_from_other_views(eg3d_pipe, tmp_path):
    """3D sample grids: target, output, then the output rendered at each SAMPLE_YAWS (multi-view samples)."""
    import copy

    import numpy as np

    from mm2latent.training.stages import SAMPLE_YAWS

    cameras = eg3d_pipe.generator.camera_labels([[-20.0, 0.0], [20.0, 0.0]])
    labels = write_dataset_json({"a.png": cameras[0], "b.png": cameras[1]}, tmp_path / "dataset.json")
    trainer = build(eg3d_config(tmp_path, labels), copy.deepcopy(eg3d_pipe))
    batch = collate([trainer.dataset[(p, 0)] for p in range(2)])
    _, _, images = trainer.stage.loss(batch, trainer.stage.model, torch.Generator().manual_seed(0))
    grid = np.asarray(trainer.stage.sample_grid(batch, images)).astype(float)
    size = images.shape[-1]
    assert grid.shape[0] == (2 + len(SAMPLE_YAWS)) * size
    left, right = grid[2 * size:3 * size], grid[3 * size:4 * size]
    assert np.abs(left - right).mean() > 1.0  # two views of the same faces
