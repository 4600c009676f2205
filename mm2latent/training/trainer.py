"""The training loop on ``accelerate``: DDP / multi-machine, mixed precision, gradient accumulation,
exact resume (weights, optimizer, LR scheduler, RNG via ``save_state``), sample grids, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import TrainingConfig
from .data import StepBatchSampler, collate
from .stages import step_generator

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(config: TrainingConfig) -> Accelerator:
    train = config.train
    log_with = train.log_with
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed; logging to the console only")
            log_with = None
    project = ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=str(Path(config.output_dir) / "logs"))
    # Launched with several processes on a machine without CUDA (torchrun / `accelerate launch --multi_gpu`):
    # tell accelerate to use CPU DDP (gloo), which it otherwise only does under MPI.
    cpu = bool(train.cpu) or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return Accelerator(mixed_precision=train.mixed_precision, log_with=log_with, project_config=project, cpu=cpu)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


class Trainer:
    """Runs a stage (``LatentStage`` or ``ControlNetStage``) for ``train.max_steps`` optimizer steps.

    Args:
        config: the full training config.
        stage: the stage object (its ``model`` is trained).
        dataset: items as ``collate`` expects.
        accelerator: an existing ``Accelerator`` (default: built from the config).
    """

    def __init__(self, config: TrainingConfig, stage, dataset, accelerator: Accelerator | None = None):
        self.config, self.stage, self.dataset = config, stage, dataset
        self.accelerator = accelerator or make_accelerator(config)
        self.output_dir = Path(config.output_dir)
        train = config.train
        acc = self.accelerator
        stage.setup(acc.device, _DTYPES[train.mixed_precision] if acc.device.type != "cpu" else torch.float32)
        params = [p for p in stage.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=tuple(train.adam_betas),
                                      weight_decay=train.weight_decay)
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers' scripts do).
        lr_scheduler = get_scheduler(train.lr_scheduler, optimizer,
                                     num_warmup_steps=train.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=train.max_steps * acc.num_processes)
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(stage.model, optimizer, lr_scheduler)
        self.step = 0
        self.history: list[dict] = []
        self.timestep_counts: Counter[int] = Counter()  # t drawn since the last logged histogram (stages 1, 2)

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        acc, train = self.accelerator, self.config.train
        folder = self.output_dir / "checkpoints" / f"step_{self.step}"
        acc.save_state(str(folder))
        if acc.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps({"step": self.step, "stage": self.config.stage}) + "\n")
            limit = train.checkpoints_total_limit
            if limit:
                for old in list_checkpoints(self.output_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return folder

    def resume(self, which: str | None = "latest") -> bool:
        """Load a checkpoint ("latest" or a folder); returns whether one was loaded."""
        if not which:
            return False
        if which == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                return False
            folder = found[-1]
        else:
            folder = Path(which)
        self.accelerator.load_state(str(folder))
        self.step = json.loads((folder / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", folder, self.step)
        return True

    # ------------------------------------------------------------------ loop
    def _loader(self, accumulation: int) -> DataLoader:
        acc, train = self.accelerator, self.config.train
        sampler = StepBatchSampler(len(self.dataset), train.batch_size, seed=self.config.seed,
                                   rank=acc.process_index, world_size=acc.num_processes,
                                   start_step=self.step * accumulation)
        workers = self.config.data.num_workers if self.config.data.kind != "synthetic" else 0
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                          persistent_workers=workers > 0)

    def train(self, max_steps: int | None = None) -> list[dict]:
        """Train until ``max_steps`` (default ``train.max_steps``); returns the per-step logs of this call."""
        acc, train = self.accelerator, self.config.train
        max_steps = train.max_steps if max_steps is None else max_steps
        accumulation = train.gradient_accumulation_steps
        if acc.is_main_process and acc.trackers == [] and train.log_with:
            acc.init_trackers(f"stage{self.config.stage}", config=_flat(self.config.to_dict()))
        batches = iter(self._loader(accumulation))
        progress = tqdm(total=max_steps, initial=self.step, disable=not (acc.is_local_main_process and train.progress),
                        desc=f"stage {self.config.stage}")
        logs_this_call = []
        while self.step < max_steps:
            logs: dict[str, float] = {}
            for micro in range(accumulation):
                batch = next(batches)
                generator = step_generator(self.config.seed, self.step * accumulation + micro, acc.process_index)
                last = micro == accumulation - 1
                context = acc.no_sync(self.model) if not last else nullcontext()
                with context, acc.autocast():
                    loss, terms, images = self.stage.loss(batch, self.model, generator)
                acc.backward(loss / accumulation)
                for k, v in terms.items():
                    logs[k] = logs.get(k, 0.0) + v / accumulation
            if train.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), train.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if hasattr(self.stage, "pop_timesteps"):
                self.timestep_counts.update(self.stage.pop_timesteps())
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            logs_this_call.append({"step": self.step, **logs})
            progress.update(1)
            if self.step % train.log_every == 0 or self.step == max_steps:
                progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")})
                acc.log(logs, step=self.step)
                self._log_timestep_histogram()
            if train.sample_every and self.step % train.sample_every == 0 and acc.is_main_process:
                self._save_samples(batch, images)
            if train.checkpoint_every and self.step % train.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        self.history.extend(logs_this_call)
        return logs_this_call

    @torch.no_grad()
    def evaluate(self, seed: int = 12345, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss terms over the whole dataset with fixed draws (same numbers before and after training)."""
        train = self.config.train
        batch_size = batch_size or train.batch_size
        totals: dict[str, float] = {}
        size = len(self.dataset)
        steps = -(-size // batch_size)
        for i in range(steps):
            batch = collate([self.dataset[(p, 0)] for p in range(i * batch_size, min(size, (i + 1) * batch_size))])
            _, terms, _ = self.stage.loss(batch, self.model, step_generator(seed, i, 0))
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v / steps
        if hasattr(self.stage, "pop_timesteps"):
            self.stage.pop_timesteps()  # fixed evaluation draws are not training's t
        return totals

    def _log_timestep_histogram(self) -> None:
        """The t drawn since the last log: one line of ``logs/timesteps.jsonl``, and a TensorBoard histogram."""
        counts, self.timestep_counts = self.timestep_counts, Counter()
        if not counts or not self.accelerator.is_main_process:
            return
        path = self.output_dir / "logs" / "timesteps.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": self.step, "counts": {str(t): n for t, n in sorted(counts.items())}}) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                values = np.repeat(np.array(list(counts), dtype=np.int64), list(counts.values()))
                tracker.writer.add_histogram("train/timesteps", values, self.step)

    def _save_samples(self, batch: dict, images) -> None:
        grid = self.stage.sample_grid(batch, images)
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step_{self.step:07d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    def save_rank_weights(self) -> Path:
        """This process's copy of the trained weights (the DDP agreement check)."""
        path = self.output_dir / f"rank_{self.accelerator.process_index}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.unwrapped_model().state_dict().items()}
        save_file(state, str(path))
        return path

    def finish(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _flat(config: dict, prefix: str = "") -> dict:
    """TensorBoard hparams accept scalars only."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out

