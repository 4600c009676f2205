"""Speed-ups are correctness-neutral: each toggle on and off gives the same output (tiny preset).

No timing assertions here: speed is measured by ``benchmarks/speed.py``; this file checks that it runs.

Tolerances (float32, tiny preset, latents of magnitude ~1):
* channels_last, attention kernel, torch.compile: 1e-4 absolute on the W+ latents and at most 1 grey level
  on the 8-bit images (only the order of floating-point sums changes);
* prompt cache: exact (the cache returns the very tensor the encoder computed);
* batching different requests: 1e-4 on the latents (batched kernels may sum in another order);
* bfloat16 vs float32: mean absolute latent difference under 20% of the latents' mean spread around the
  average latent (8 mantissa bits through ~40 layers).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mm2latent import FacePipeline, GenerationRequest
from mm2latent.pipelines import speedups as speed

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "She has long wavy blonde hair and is smiling."
LATENT_ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    pipe = FacePipeline.from_pretrained("tiny", device="cpu")
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="module")
def mask(pipe):
    return speed.synthetic_face_mask(pipe.encoder.image_size)


def assert_same_output(first, second, atol=LATENT_ATOL):
    torch.testing.assert_close(first.latents, second.latents, atol=atol, rtol=0)
    for a, b in zip(first.images, second.images):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_synthetic_mask_is_a_face(pipe, mask):
    from mm2latent.inputs.conditions import FACE_CLASS_IDS, parse_mask

    assert mask.shape == (pipe.encoder.image_size,) * 2 and mask.dtype == np.uint8
    assert set(np.unique(mask)) > {0, 1, 13} and np.isin(mask, list(FACE_CLASS_IDS)).mean() > 0.15
    assert np.array_equal(parse_mask(mask), mask)


def test_channels_last_same_output(pipe, mask):
    reference = pipe(PROMPT, mask=mask, seed=3, mode="quality", num_steps=2)
    speed.enable_channels_last(pipe)
    try:
        assert speed.channels_last_enabled(pipe)
        assert pipe.mapper.reduce[0].weight.is_contiguous(memory_format=torch.channels_last)
        fast = pipe(PROMPT, mask=mask, seed=3, mode="quality", num_steps=2)
    finally:
        speed.disable_channels_last(pipe)
    assert not speed.channels_last_enabled(pipe)
    assert_same_output(reference, fast)
    assert torch.equal(pipe(PROMPT, mask=mask, seed=3, mode="quality", num_steps=2).latents, reference.latents)


def test_attention_kernels_same_output(pipe, mask):
    reference = pipe(PROMPT, mask=mask, seed=5)
    speed.set_attention(pipe, "classic")
    try:
        kinds = {type(p).__name__ for p in pipe.encoder.unet.attn_processors.values()}
        assert kinds == {"AttnProcessor"}
        classic = pipe(PROMPT, mask=mask, seed=5)
        # capture swaps attn2 during a call only and puts the chosen kind back
        assert {type(p).__name__ for p in pipe.encoder.unet.attn_processors.values()} == {"AttnProcessor"}
    finally:
        speed.set_attention(pipe, "sdpa")
    assert {type(p).__name__ for p in pipe.encoder.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert_same_output(reference, classic)
    with pytest.raises(ValueError, match="attention kind"):
        speed.set_attention(pipe, "flash")


def test_prompt_cache_identical(pipe, mask):
    encoder = pipe.encoder
    speed.clear_prompt_cache(pipe)
    cached = encoder.encode_prompt(PROMPT)
    assert encoder.encode_prompt(PROMPT) is cached
    with speed.prompt_cache_disabled(pipe):
        fresh = encoder.encode_prompt(PROMPT)
        assert fresh is not cached and encoder.encode_prompt(PROMPT) is not fresh
        assert torch.equal(fresh.embeds, cached.embeds) and torch.equal(fresh.word_mask, cached.word_mask)
        assert fresh.words == cached.words
        uncached_out = pipe(PROMPT, mask=mask, seed=8)
    assert encoder.prompt_cache_size > 0
    cached_out = pipe(PROMPT, mask=mask, seed=8)
    assert torch.equal(uncached_out.latents, cached_out.latents)
    assert np.array_equal(np.asarray(uncached_out.images[0]), np.asarray(cached_out.images[0]))


def test_batched_requests_match_single_calls(pipe, mask):
    other = np.where(mask == 13, 0, mask).astype(np.uint8)  # bald
    requests = [
        GenerationRequest.create(PROMPT, mask=mask, seed=1),
        GenerationRequest.create("He has a beard and short black hair.", mask=other, seed=2, truncation=0.7),
        GenerationRequest.create(PROMPT, seed=3),  # text only: a second group
        GenerationRequest.create("", mask=mask, seed=4, num_images=2),
    ]
    outputs = pipe.generate_batch(requests)
    assert len(outputs) == len(requests) and len(outputs[3].images) == 2
    for request, output in zip(requests, outputs):
        single = pipe(request.prompt, mask=request.mask, seed=request.seed, truncation=request.truncation,
                      num_images=request.num_images)
        assert_same_output(single, output)
        assert output.settings == single.settings
        assert output.seeds == single.seeds and output.timesteps == single.timesteps
        assert set(output.condition_images) == set(single.condition_images)


def test_warmup_runs_each_batch_size_quietly_and_restores_the_progress_setting(pipe, monkeypatch):
    calls = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs["num_images"], self.show_progress))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    pipe.show_progress = True
    try:
        times = speed.warmup(pipe, batch_sizes=(1, 2), runs=2)
        assert pipe.show_progress is True  # restored
    finally:
        pipe.show_progress = False
    assert len(times) == 4 and calls == [(1, False), (1, False), (2, False), (2, False)]


def test_compile_regions_avoid_capture(pipe):
    hooked, swapped = speed._capture_sensitive(pipe.encoder.unet)
    regions = [name for name, _ in speed._safe_regions(pipe.encoder.unet, hooked, swapped)]
    assert "down_blocks.0" in regions and "time_embedding" in regions
    for name in regions:
        assert name not in hooked and not any(s == name or s.startswith(name + ".") for s in swapped)
        assert not any(h.startswith(name + ".") for h in hooked)
    assert any(name.endswith(".attn1") for name in regions) and not any(name.endswith(".attn2") for name in regions)


def test_compile_eager_backend_same_output(pipe, mask):
    """Dynamo traces every compiled region (backend 'eager': no code generation) and does not recompile."""
    from torch._dynamo.utils import counters

    reference = pipe(PROMPT, mask=mask, seed=6)
    counters.clear()
    handle = speed.compile_pipeline(pipe, backend="eager")
    try:
        first = pipe(PROMPT, mask=mask, seed=6)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        second = pipe(PROMPT, mask=mask, seed=7)
        assert counters["stats"]["unique_graphs"] == graphs, "a second call of the same shape recompiled"
    finally:
        handle.undo()
    assert "forward" not in vars(pipe.encoder.unet.down_blocks[0]) and "synthesis" not in vars(pipe.generator)
    assert_same_output(reference, first)
    assert not torch.equal(second.latents, first.latents)


def test_compile_inductor_same_output(pipe, mask):
    """Real code generation on M only: compiling the whole tiny pipeline with inductor takes ~150 s on 2 cores
    (41 graphs), too slow for the suite; the whole-pipeline tracing is covered by the eager-backend test."""
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    reference = pipe(PROMPT, mask=mask, seed=6)
    handle = speed.compile_pipeline(pipe, parts=("mapper",))
    try:
        start = time.perf_counter()
        compiled = pipe(PROMPT, mask=mask, seed=6)
        elapsed = time.perf_counter() - start
    finally:
        handle.undo()
    assert_same_output(reference, compiled)
    print(f"inductor compile + first call of M: {elapsed:.1f} s")


def test_bfloat16_close_to_float32(pipe, mask):
    low = FacePipeline.from_pretrained("tiny", device="cpu", dtype=torch.bfloat16)
    low.show_progress = False
    high = pipe(PROMPT, mask=mask, seed=1).latents
    half = low(PROMPT, mask=mask, seed=1).latents
    spread = (high - pipe.generator.latent_avg).abs().mean()
    assert (half - high).abs().mean() < 0.2 * spread
    # and the speed-ups keep holding in bfloat16
    speed.enable_channels_last(low)
    assert (low(PROMPT, mask=mask, seed=1).latents - half).abs().mean() < 0.05 * spread


def test_benchmark_report_is_consistent(tmp_path):
    """The tiny benchmark's JSON is internally consistent and its table shows the JSON's numbers."""
    out = tmp_path / "cpu-tiny.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "speed.py"), "--preset", "tiny", "--device", "cpu",
               "--repeats", "1", "--warmup", "0", "--quality-steps", "2", "--batch-sizes", "1", "2",
               "--baseline-steps", "2", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    meta = results["meta"]
    assert meta["preset"] == "tiny" and meta["weights"]["random"] is True and meta["torch_threads"] == 1
    assert meta["options"]["sections"][0] == "build" and "invert_mode" in meta["options"]["sections"]
    stages, e2e = results["stages"], results["end_to_end"]
    for item in [*stages.values(), *e2e.values()]:
        assert item["min_ms"] <= item["median_ms"] <= item["max_ms"] and len(item["runs_ms"]) == item["repeats"]
    # Derived figures follow from the measured ones.
    assert results["stage_sum_ms"] == pytest.approx(sum(stages[k]["median_ms"] for k in (
        "text_encoding_cached", "unet_controlnet_capture", "mapper_M", "modulator_T", "stylegan2_synthesis")))
    for name, item in results["throughput"].items():
        assert item["faces_per_s"] == pytest.approx(item["batch"] / (item["median_ms"] / 1e3))
        assert name == f"batch_{item['batch']}"
    ratios, baseline = results["ratios"], results["baseline"]
    assert ratios["baseline_over_fast"] == pytest.approx(baseline["median_ms"] / e2e["fast_uncached_prompt"]["median_ms"])
    assert ratios["invert_refine_0_over_baseline"] == pytest.approx(
        results["invert_mode"]["refine_0"]["median_ms"] / baseline["median_ms"])
    assert baseline["steps"] == 2 and baseline["shares_modules_with_ours"] is True
    overhead = results["space_overhead"]
    assert overhead["overhead_ms"] == pytest.approx(sum(v["median_ms"] for v in overhead["parts"].values()))
    assert overhead["overhead_share"] == pytest.approx(overhead["overhead_ms"] / overhead["model_ms"])
    assert all(t["met"] is None for t in results["targets"])  # targets apply to the full-size models only
    # The table prints what the JSON holds.
    table = out.with_suffix(".md").read_text()
    assert f"**Speed-up baseline / fast: {ratios['baseline_over_fast']:.1f}×**" in table
    assert f"| **fast** | {e2e['fast']['median_ms']:.1f} |" in table
    assert f"{ratios['invert_refine_0_over_baseline']:.2f}× the baseline" in table
