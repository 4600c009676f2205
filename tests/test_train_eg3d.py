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
