"""Training as the paper trains: per-(image, modality, caption) I^d_0 cache with guidance, per-sample t, loss targets,
a float32 frozen M in stage 2."""

import copy
import json
from pathlib import Path

import pytest
import torch

from mm2latent.training.cli import build
from mm2latent.training.config import load_config, loss_targets
from mm2latent.training.data import collate
from mm2latent.training.idd_cache import DiffusionImageCache, StaleCacheError, cache_key, draw_targets
from mm2latent.training.stages import step_generator


def config_for(tmp_path: Path, stage: int, **overrides):
    """Tiny synthetic config with both visual inputs, one per micro-batch (the shipped stage-2 setting)."""
    values = {
        "stage": stage, "seed": 0, "pipeline": "tiny", "output_dir": str(tmp_path / f"stage{stage}"),
        "data": {"kind": "synthetic", "num_samples": 4, "modalities": ["mask", "scribble"],
                 "modality_sampling": "one", "num_workers": 0},
        "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "log_with": None, "checkpoint_every": 0,
                  "sample_every": 0, "log_every": 1, "resume": None, "progress": False},
        "diffusion": {"timestep_range": [0, 999], "idd_steps": 3, "idd_strength": 0.5, "idd_batch_size": 4},
        "loss": {"lpips": 0.0, "id": 0.0},
        "networks": {"lpips": "tiny", "arcface": "tiny"},
    }
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(None, values)


def test_stage2_target_was_drawn_with_the_samples_modality_and_caption(tiny_pipe, tmp_path, monkeypatch):
    trainer = build(config_for(tmp_path, 2), copy.deepcopy(tiny_pipe))
    cache = DiffusionImageCache(Path(trainer.config.output_dir) / "idd_cache")
    assert len(cache.entries) == 4 * 2  # every image, once per modality
    stage = trainer.stage
    seen = []  # the visual inputs the U-Net really got, observed at the encoder
    extract = stage.pipe.encoder.extract

    def recording_extract(z, t, embeds, controls, scale):
        seen.append(sorted(controls))
        return extract(z, t, embeds, controls, scale)

    monkeypatch.setattr(stage.pipe.encoder, "extract", recording_extract)
    modalities_seen = set()
    for step in range(6):
        batch = collate([trainer.dataset[(p, 0)] for p in ((2 * step) % 4, (2 * step + 1) % 4)])
        stage.loss(batch, trainer.model, step_generator(0, step, 0))
        (modality,) = seen[-1]
        modalities_seen.add(modality)
        expected = [cache_key(i, [modality], c) for i, c in zip(batch["image_id"].tolist(), batch["caption"])]
        assert stage.last_target_keys == expected
        for key, image_id, caption in zip(expected, batch["image_id"].tolist(), batch["caption"]):
            entry = cache.entries[key]
            assert (entry["image_id"], entry["modalities"], entry["caption"]) == (image_id, [modality], caption)
    assert modalities_seen == {"mask", "scribble"}
    # The two entries of one image differ: each was drawn under its own ControlNet.
    item = trainer.dataset[(0, 0)]
    assert not torch.equal(item["idd"]["mask"], item["idd"]["scribble"])


def test_changed_cache_setting_is_refused_or_rebuilt(tiny_pipe, tmp_path):
    build(config_for(tmp_path, 2), copy.deepcopy(tiny_pipe))
    cache_dir = tmp_path / "stage2" / "idd_cache"
    key = next(iter(DiffusionImageCache(cache_dir).entries))
    before = DiffusionImageCache(cache_dir).image(key, 32)
    with pytest.raises(StaleCacheError, match="guidance_scale: cache 7.5, run 3.0"):
        build(config_for(tmp_path, 2, diffusion={"idd_guidance_scale": 3.0}), copy.deepcopy(tiny_pipe))
    with pytest.raises(StaleCacheError, match="steps: cache 3, run 4"):
        build(config_for(tmp_path, 2, diffusion={"idd_steps": 4}), copy.deepcopy(tiny_pipe))
    build(config_for(tmp_path, 2, diffusion={"idd_guidance_scale": 3.0, "idd_stale_cache": "rebuild"}),
          copy.deepcopy(tiny_pipe))
    rebuilt = DiffusionImageCache(cache_dir)
    assert rebuilt.settings["guidance_scale"] == 3.0 and len(rebuilt.entries) == 8
    assert not torch.equal(rebuilt.image(key, 32), before)


def test_guidance_changes_idd_and_one_equals_the_unguided_sampler(tiny_pipe, tmp_path):
    """I^d_0 through FacePipeline.draw: guidance 1 is the plain DDIM img2img loop written out here by hand."""
    config = config_for(tmp_path, 2, diffusion={"idd_guidance_scale": 1.0})
    pipe = copy.deepcopy(tiny_pipe)
    from mm2latent.training.stages import build_dataset

    items = [build_dataset(config, pipe)[(p, 0)] for p in range(2)]
    unguided = draw_targets(config, pipe, items, ("mask",))

    encoder, diffusion = pipe.encoder, config.diffusion
    seeds = [torch.Generator().manual_seed(int(it["image_id"])) for it in items]  # seed 0: 0 * 1_000_003 + id
    z0 = torch.cat([encoder.encode_images(it["pixel_values"][None], generator=g) for it, g in zip(items, seeds)])
    latents = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in seeds])
    scheduler = encoder.make_scheduler()
    scheduler.set_timesteps(diffusion.idd_steps)
    timesteps = scheduler.timesteps[int(round(diffusion.idd_steps * (1 - diffusion.idd_strength))):]
    latents = scheduler.add_noise(z0, latents, timesteps[:1])
    embeds = pipe.encode_prompts([it["caption"] for it in items]).embeds
    controls = {"mask": torch.stack([it["controls"]["mask"] for it in items])}
    with torch.no_grad():
        for t in timesteps:
            _, noise_pred = encoder.extract(latents, t, embeds, controls)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        by_hand = encoder.decode_latents(latents)
    torch.testing.assert_close(unguided, by_hand, rtol=1e-5, atol=1e-5)

    config.diffusion.idd_guidance_scale = 7.5
    guided = draw_targets(config, pipe, items, ("mask",))
    assert (guided - unguided).abs().mean() > 1e-3


def test_t_is_drawn_per_sample_and_its_histogram_logged(tiny_pipe, tmp_path):
    config = config_for(tmp_path, 1, train={"batch_size": 4, "max_steps": 3})
    trainer = build(config, copy.deepcopy(tiny_pipe))
    t = trainer.stage.sample_timesteps(4, step_generator(0, 0, 0))
    assert len(set(t.tolist())) > 1
    assert set(t.tolist()) <= set(trainer.stage.timesteps.tolist())
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "stage1" / "logs" / "timesteps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert sum(line["counts"].values()) == 4  # one t per sample of the step's batch
        assert len(line["counts"]) > 1


@pytest.mark.parametrize("stage", [1, 2])
def test_target_idd_makes_every_loss_term_read_idd(tiny_pipe, tmp_path, stage):
    """With ``loss.target: idd`` the terms depend on I^d_0 only: changing I^gt changes none of them, changing
    I^d_0 changes each. Stage 1 builds the cache it needs."""
    config = config_for(tmp_path, stage, loss={"target": "idd", "lpips": 0.8, "id": 0.1},
                        data={"modality_sampling": "all"})
    trainer = build(config, copy.deepcopy(tiny_pipe))
    assert (Path(config.output_dir) / "idd_cache" / "settings.json").is_file()
    batch = collate([trainer.dataset[(p, 0)] for p in range(2)])

    def terms(b):
        _, logs, _ = trainer.stage.loss(b, trainer.model, step_generator(0, 0, 0))
        return {k: logs[f"loss/{k}"] for k in ("l2", "lpips", "id")}

    base = terms(batch)
    other_gt = dict(batch, target=-batch["target"])
    assert terms(other_gt) == base  # bit-exact: I^gt is never read
    other_idd = dict(batch, idd={k: v.flip(-1) for k, v in batch["idd"].items()})
    changed = terms(other_idd)
    assert all(changed[k] != base[k] for k in base), (base, changed)

    # The paper's stage 2 ("both"): L2 and LPIPS read I^d_0, identity reads I^gt.
    config.loss.target = "both"
    trainer.stage.recon_target, trainer.stage.id_target = loss_targets(config)
    base = terms(batch)
    gt_changed = terms(other_gt)
    assert gt_changed["l2"] == base["l2"] and gt_changed["lpips"] == base["lpips"] and gt_changed["id"] != base["id"]


def test_frozen_mapper_runs_in_float32_under_bf16_autocast(tiny_pipe, tmp_path):
    """Stage 2's w^m under bf16 mixed precision is bit-identical to M in float32 (T at identity: w = w^m · 1 + 0)."""
    trainer = build(config_for(tmp_path, 2), copy.deepcopy(tiny_pipe))
    stage, pipe = trainer.stage, trainer.stage.pipe
    stage.setup(torch.device("cpu"), torch.bfloat16)  # what the trainer does with mixed_precision: bf16
    assert next(pipe.encoder.unet.parameters()).dtype == torch.bfloat16
    assert next(pipe.mapper.parameters()).dtype == torch.float32
    encoder = pipe.encoder
    prompts = pipe.encode_prompts(["a face with bangs"] * 2)
    with torch.no_grad():
        features, _ = encoder.extract(encoder.initial_noise([0, 1]), torch.tensor([500, 20]), prompts.embeds)
        expected = pipe.mapper(features.h.float(), pipe.generator.latent_avg.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = stage.latents(features, prompts.word_mask, trainer.unwrapped_model())
            autocast_mapper = pipe.mapper(features.h.float(), pipe.generator.latent_avg.float())
    assert not torch.equal(autocast_mapper, expected)  # what stage 2 computed before: M's convs in bf16
    # Bit-exact: the same float32 operations on the same inputs, and identity T multiplies by 1 and adds 0.
    assert torch.equal(w, expected)


def test_style_transfer_caches_idd_for_the_styled_captions(tiny_pipe, tmp_path):
    """configs/style_transfer.yaml's settings on the tiny preset: T sees the styled caption, I^d_0 is drawn with it."""
    config = config_for(tmp_path, 1, loss={"target": "idd"},
                        data={"caption_template": "a Greek statue, {caption}", "modalities": ["mask"]})
    trainer = build(config, copy.deepcopy(tiny_pipe))
    entries = DiffusionImageCache(Path(config.output_dir) / "idd_cache").entries.values()
    assert len(entries) == 4 and all(e["caption"].startswith("a Greek statue, a face with ") for e in entries)
    assert trainer.dataset[(0, 0)]["caption"].startswith("a Greek statue, ")
    assert trainer.train()[-1]["loss/l2"] > 0
