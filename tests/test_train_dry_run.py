"""--dry-run: real steps of the configured stage, timed, with memory and the projected run time."""

import json

import pytest

from mm2latent.training.cli import main
from mm2latent.training.config import ConfigError, load_config
from mm2latent.training.dry_run import dry_run


def test_dry_run_times_real_steps_and_projects_the_run(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stage: 2\npipeline: tiny\ndata: {kind: synthetic, modalities: [scribble]}\n"
                      "train: {batch_size: 2, max_steps: 1000}\nloss: {lpips: 0.0, id: 0.0}\n")
    main(["--config", str(config), "--dry-run", "--steps", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert len(report["step_seconds"]) == 3 and report["pipeline"] == "tiny"
    assert report["seconds_per_step"] == pytest.approx(sum(report["step_seconds"][1:]) / 2)
    assert report["projected_hours"] == pytest.approx(report["seconds_per_step"] * 1000 / 3600)
    assert report["peak_memory_bytes"] > 0
    assert set(report["last_losses"]) >= {"loss/l2", "loss/total"}  # stage 2 ran its real loss
    assert any(line.startswith("  projected: 1000 steps") for line in lines)


def test_dry_run_plans_stages_1_and_2_only():
    with pytest.raises(ConfigError, match="stages 1 and 2"):
        dry_run(load_config(None, {"stage": 0, "pipeline": "tiny"}), 1)
