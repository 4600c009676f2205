"""Training: real learning on the tiny preset, ControlNet stage 0, exact resume, 2-process DDP (gloo)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from mm2latent.training.cli import build, run
from mm2latent.training.config import ConfigError, TrainingConfig, load_config
from mm2latent.training.model_card import model_card

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, stage: int | str, **train) -> TrainingConfig:
    """The tiny synthetic-data config the tests share (and what the 2-process test writes to YAML)."""
    overrides = {
        "stage": stage, "seed": 0, "pipeline": "tiny", "output_dir": str(tmp_path / f"stage{stage}"),
        "data": {"kind": "synthetic", "num_samples": 8, "modalities": ["scribble"], "num_workers": 0},
        "train": {"batch_size": 2, "max_steps": 10, "learning_rate": 1e-3, "log_with": None, "checkpoint_every": 0,
                  "sample_every": 0, "log_every": 1000, "resume": None, "progress": False,
                  "gradient_checkpointing": False, **train},
        "diffusion": {"timestep_range": [0, 100], "idd_steps": 3, "idd_strength": 0.5, "idd_batch_size": 8},
        "loss": {"lpips": 0.0, "id": 0.0},
        "networks": {"lpips": "tiny", "arcface": "tiny"},
    }
    return load_config(None, overrides)


@pytest.mark.slow
def test_stage1_then_stage2_learn(tiny_pipe, tmp_path):
    """200 steps of stage 1 halve the reconstruction loss; stage 2 then lowers its own loss."""
    torch.manual_seed(0)
    config = tiny_config(tmp_path, 1, max_steps=200)
    trainer = build(config, copy.deepcopy(tiny_pipe))
    before = trainer.evaluate()["loss/l2"]
    trainer.train()
    after = trainer.evaluate()["loss/l2"]
    print(f"stage 1 L2: {before:.4f} -> {after:.4f}")
    assert after <= 0.5 * before, (before, after)

    # Stage 2 on the trained M: T starts at identity, targets are the cached I^d_0.
    pipe = trainer.stage.pipe
    pipe.mapper = trainer.unwrapped_model().eval().requires_grad_(False)
    config2 = tiny_config(tmp_path, 2, max_steps=40, learning_rate=1e-3)
    trainer2 = build(config2, pipe)
    cache = Path(config2.output_dir) / "idd_cache"
    assert len(list(cache.glob("*.png"))) == 8
    before2 = trainer2.evaluate()["loss/l2"]
    trainer2.train()
    after2 = trainer2.evaluate()["loss/l2"]
    print(f"stage 2 L2 (vs I^d_0): {before2:.4f} -> {after2:.4f}")
    assert after2 < 0.9 * before2, (before2, after2)


@pytest.mark.slow
def test_stage0_controlnet_loss_falls(tiny_pipe, tmp_path):
    config = tiny_config(tmp_path, 0, max_steps=100, learning_rate=1e-3, batch_size=2)
    config.controlnet.modality, config.controlnet.proportion_empty_prompts = "scribble", 0.0
    config.data.num_samples = 2  # one fixed batch
    trainer = build(config, copy.deepcopy(tiny_pipe))
    before = trainer.evaluate()["loss/denoise"]
    trainer.train()
    after = trainer.evaluate()["loss/denoise"]
    print(f"stage 0 denoising loss on the fixed batch: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    from diffusers import ControlNetModel

    trainer.stage.export(trainer.unwrapped_model(), tmp_path / "final")
    assert ControlNetModel.from_pretrained(tmp_path / "final" / "controlnet_scribble").config.in_channels == 4


def test_resume_gives_the_same_next_step(tiny_pipe, tmp_path):
    """Stop after 3 steps (checkpoint), resume in a new trainer: steps 4-5 equal the uninterrupted run's."""
    extra = {"lr_scheduler": "linear", "lr_warmup_steps": 2}
    straight = tiny_config(tmp_path / "a", 1, max_steps=5, **extra)
    straight.loss.lpips, straight.loss.id = 0.8, 0.1  # the full loss, with the tiny LPIPS and ArcFace nets
    uninterrupted = build(straight, copy.deepcopy(tiny_pipe)).train()

    interrupted = tiny_config(tmp_path / "b", 1, max_steps=5, checkpoint_every=3, **extra)
    interrupted.loss.lpips, interrupted.loss.id = 0.8, 0.1
    first = build(interrupted, copy.deepcopy(tiny_pipe))
    first.train(max_steps=3)
    assert (Path(interrupted.output_dir) / "checkpoints" / "step_3" / "trainer_state.json").is_file()
    second = build(interrupted, copy.deepcopy(tiny_pipe))
    assert second.resume("latest") and second.step == 3
    resumed = second.train()
    assert [r["step"] for r in resumed] == [4, 5]
    for a, b in zip(uninterrupted[3:], resumed):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-6, abs=1e-7), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])


def test_run_exports_pipeline_and_model_card(tiny_pipe, tmp_path):
    from mm2latent import FacePipeline

    config = tiny_config(tmp_path, 1, max_steps=2, sample_every=2)
    run(config, copy.deepcopy(tiny_pipe))
    final = Path(config.output_dir) / "final"
    pipe = FacePipeline.from_pretrained(final, device="cpu")
    assert pipe.trained
    assert (Path(config.output_dir) / "samples" / "step_0000002.png").is_file()
    card = (final / "README.md").read_text()
    assert "non-commercial" in card and "loss/l2" in card and "stage: 1" in card
    _, front, body = model_card(config).split("---\n", 2)
    assert yaml.safe_load(front)["license_name"] == "celebamask-hq-non-commercial"
    dumped = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(dumped) == config.to_dict()  # the card's config reproduces the run


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_with_its_own_values(name):
    raw = yaml.safe_load((REPO_ROOT / "configs" / name).read_text())
    config = load_config(REPO_ROOT / "configs" / name)
    # Every value the file sets is what the typed config holds (nothing dropped, renamed or retyped).
    def check(section, values, where):
        for key, value in values.items():
            held = getattr(section, key)
            if isinstance(value, dict) and key != "components" and not isinstance(held, dict):
                check(held, value, f"{where}.{key}")
            else:
                assert held == value, f"{where}.{key}: file {value!r}, config {held!r}"
    check(config, raw, name)


def test_config_overrides_and_errors():
    config = load_config(REPO_ROOT / "configs" / "stage1_mapper.yaml", {"train": {"batch_size": 3}, "seed": 7})
    assert config.train.batch_size == 3 and config.seed == 7
    assert config.train.learning_rate == load_config(REPO_ROOT / "configs" / "stage1_mapper.yaml").train.learning_rate
    with pytest.raises(ConfigError, match=r"unknown key 'train\.batchsize'; did you mean 'train\.batch_size'\?"):
        load_config(None, {"train": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'staeg'; did you mean 'stage'\?"):
        load_config(None, {"staeg": 1})
    with pytest.raises(ConfigError, match=r"train\.max_steps must be a whole number, got 'many'"):
        load_config(None, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match=r"loss must be a mapping"):
        load_config(None, {"loss": 3})
    with pytest.raises(ConfigError, match="stage must be one of"):
        load_config(None, {"stage": 5})


@pytest.mark.slow
def test_accelerate_two_processes_agree(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine = torchrun + gloo DDP: the ranks agree.

    (`--cpu --num_processes 2` alone starts one process unless launched through MPI.)
    """
    config = tiny_config(tmp_path, 1, max_steps=3, save_rank_weights=True)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mm2latent.training",
               "--config", str(path)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(config.output_dir)
    rank0, rank1 = load_file(out / "rank_0.safetensors"), load_file(out / "rank_1.safetensors")
    initial = clone_state(config)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "the weights did not change"
    assert (out / "final" / "mm2latent.json").is_file()
    assert json.loads((out / "final" / "mm2latent.json").read_text())["pipeline"]["trained"] is True


def clone_state(config: TrainingConfig) -> dict:
    from mm2latent import FacePipeline

    return {k: v.float() for k, v in FacePipeline.from_pretrained("tiny", device="cpu").mapper.state_dict().items()}


def test_inverter_stage_learns_with_the_shared_trainer_and_loss(tiny_pipe, testdata, tmp_path):
    """The photo inverter trains through the same Trainer and pSp loss as M and T; only the encoder changes."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("ffhq_0.jpg", "ffhq_1.jpg"):
        shutil.copy(testdata / "photos" / name, photos / name)
    config = tiny_config(tmp_path, "inverter", max_steps=30, learning_rate=1e-3)
    config.data.kind, config.data.root, config.inverter.input_size = "photos", str(photos), 64
    config.loss.lpips, config.loss.id = 0.8, 0.1
    pipe = copy.deepcopy(tiny_pipe)
    generator_before = {k: v.clone() for k, v in pipe.generator.state_dict().items()}
    trainer = build(config, pipe)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"inverter total loss: {before['loss/total']:.4f} -> {after['loss/total']:.4f}")
    assert after["loss/total"] < 0.8 * before["loss/total"], (before, after)
    assert {"loss/l2", "loss/lpips", "loss/id", "loss/w_reg"} <= set(after)
    assert all(torch.equal(generator_before[k], v) for k, v in pipe.generator.state_dict().items())


def test_losses_are_zero_on_targets(tiny_pipe):
    from mm2latent.models.networks import load_network
    from mm2latent.training.losses import LatentLoss

    loss = LatentLoss({"l2": 1, "lpips": 0.8, "id": 0.1, "w_reg": 0.0}, load_network("lpips", "tiny"),
                      load_network("arcface", "tiny"), 256)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    w = torch.zeros(2, 10, 64)
    total, logs = loss(images, images, images, w, torch.zeros(64))
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    total, logs = loss(images, F.avg_pool2d(images, 3, 1, 1), images, w, torch.zeros(64))
    assert logs["loss/l2"] > 0 and logs["loss/lpips"] > 0
