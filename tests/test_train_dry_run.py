"""--dry-run: real steps of the configured stage, timed, with memory and the projected run time."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mm2latent.training import dry_run as dry_run_module
from mm2latent.training.cli import main
from mm2latent.training.config import ConfigError, load_config
from mm2latent.training.dry_run import dry_run
from mm2latent.training.trainer import Trainer


def resident_kib(field: str) -> int:
    """A line of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak so far)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")))


def test_dry_run_times_real_steps_and_projects_the_run(capsys, tmp_path, monkeypatch):
    # A clock that only the training steps move (5 s for the first, with its warm-up, then 1 s each), so the
    # report's figures are known: the warm-up is left out of the time per step, and the projection is the
    # configured run's 1000 steps, not the 3 timed ones.
    clock = [0.0]
    step_times = iter([5.0, 1.0, 1.0])
    real_train = Trainer.train

    def timed_train(self, *args, **kwargs):
        history = real_train(self, *args, **kwargs)
        clock[0] += next(step_times)
        return history

    monkeypatch.setattr(Trainer, "train", timed_train)
    monkeypatch.setattr(dry_run_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    config = tmp_path / "run.yaml"
    config.write_text("stage: 2\npipeline: tiny\ndata: {kind: synthetic, modalities: [scribble]}\n"
                      "train: {batch_size: 2, max_steps: 1000}\nloss: {lpips: 0.0, id: 0.0}\n")
    resident_before = resident_kib("VmRSS") * 1024
    main(["--config", str(config), "--dry-run", "--steps", "3"])
    peak_after = resident_kib("VmHWM") * 1024
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["step_seconds"] == [5.0, 1.0, 1.0] and report["pipeline"] == "tiny"
    assert report["seconds_per_step"] == 1.0 and report["projected_hours"] == pytest.approx(1000 / 3600)
    assert "  projected: 1000 steps -> 0.3 h on this device" in lines
    # CPU: the process's peak resident set, in bytes (the kernel counts KiB).
    assert resident_before <= report["peak_memory_bytes"] <= peak_after
    assert set(report["last_losses"]) >= {"loss/l2", "loss/total"}  # stage 2 ran its real loss


def test_dry_run_plans_stages_1_and_2_only():
    with pytest.raises(ConfigError, match="stages 1 and 2"):
        dry_run(load_config(None, {"stage": 0, "pipeline": "tiny"}), 1)
