"""Speed-ups are correctness-neutral: each toggle on and off gives the same output (tiny preset).

No timing assertions here: speed is measured by ``benchmarks/speed.py``; this file checks what the benchmark does
with its arguments, its sections and its report (folder output, partial results, failed sections).

Tolerances (float32, tiny preset, latents of magnitude ~1):
* channels_last, attention kernel, torch.compile: 1e-4 absolute on the W+ latents and at most 1 grey level
  on the 8-bit images (only the order of floating-point sums changes);
* prompt cache: exact (the cache returns the very tensor the encoder computed);
* batching different requests: 1e-4 on the latents (batched kernels may sum in another order);
* bfloat16 vs float32: mean absolute latent difference under 20% of the latents' mean spread around the
  average latent (8 mantissa bits through ~40 layers).
"""

import importlib
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


BENCHMARKS = REPO_ROOT / "benchmarks"
TINY = ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--quality-steps", "2",
        "--batch-sizes", "1", "2", "--baseline-steps", "2"]
#: The first five sections only (build, stages, end_to_end, throughput, space_overhead), in this process.
FEW_SECTIONS = [*TINY, "--no-cold-start", "--no-ablations", "--no-baseline", "--no-mm2latent", "--invert-refine-steps"]


@pytest.fixture(scope="module")
def speed_cli():
    """``benchmarks/speed.py`` imported as a module (with ``benchmarks/`` on the path for its ``speedbench`` parts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("speed")


def test_tiny_benchmark_writes_json_and_table_into_an_existing_folder(tmp_path):
    """The CI smoke run, every section, as a user runs it: ``--out`` an existing folder (this used to measure, then
    die with IsADirectoryError) gets ``<device>-<preset>-<dtype>.json`` and ``.md``."""
    command = [sys.executable, str(BENCHMARKS / "speed.py"), *TINY, "--threads", "1", "--out", str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "cpu-tiny-float32.json").read_text())
    assert results["complete"] is True
    assert {name: s["status"] for name, s in results["section_status"].items()} == dict.fromkeys(
        results["meta"]["options"]["sections"], "done")
    assert "invert_mode" in results and results["baseline"]["shares_modules_with_ours"] is True
    assert f"| **fast** | {results['end_to_end']['fast']['median_ms']:.1f} |" in (tmp_path / "cpu-tiny-float32.md").read_text()


def report_fixture(fast_ms: float) -> dict:
    """A results JSON as a partial run leaves it: stages and end_to_end measured, throughput failed, the rest absent."""
    def item(ms):
        return {"median_ms": ms, "min_ms": ms - 1, "max_ms": ms + 1, "repeats": 3, "peak_bytes": 2 * 2**30}

    return {
        "meta": {"preset": "full-random", "device": {"type": "cpu", "name": "a test CPU"}, "dtype": "float32",
                 "date": "2026-12-07", "versions": {"torch": "t", "diffusers": "d", "transformers": "x"},
                 "python": "3.11", "torch_threads": 2, "weights": {"random": True}, "memory_kind": "rss"},
        "stages": {"mapper_M": item(4.2)},
        "end_to_end": {"fast": item(fast_ms)},
        "section_status": {"stages": {"status": "done"}, "end_to_end": {"status": "done"},
                           "throughput": {"status": "failed", "error": "RuntimeError: out of memory"},
                           "space_overhead": {"status": "pending"}},
    }


def test_report_table_shows_the_json_it_is_given(speed_cli):
    from speedbench.report import evaluate_targets, render_markdown

    results = report_fixture(fast_ms=1234.5)
    results["targets"] = evaluate_targets(results)
    table = render_markdown(results)
    assert "| M | 4.2 | 3.2 | 5.2 | 3 |" in table
    assert "| **fast** | 1234.5 | 1233.5 | 1235.5 | 3 | peak 2.00 GiB |" in table
    assert "| throughput | **failed** | RuntimeError: out of memory |" in table
    assert "| space_overhead | **pending** |" in table
    # The CPU target reads the same figure: 1.2345 s per face against 15 s, met.
    target = next(t for t in results["targets"] if t["target"].startswith("fast mode, batch 1 on CPU"))
    assert target["value"] == pytest.approx(1.2345) and target["met"] is True
    slower = report_fixture(fast_ms=20_000.0)
    slower["targets"] = evaluate_targets(slower)
    assert "| **fast** | 20000.0 |" in render_markdown(slower)
    assert next(t for t in slower["targets"] if t["target"] == target["target"])["met"] is False
    # Targets whose section did not run have no value and are not judged.
    overhead = next(t for t in results["targets"] if t["target"].startswith("Space overhead"))
    assert overhead["value"] is None and overhead["met"] is None


@pytest.mark.parametrize("argv, message", [
    (["--out", "{file}/results.json"], "is a file"),
    (["--out", "{tmp}/results.txt"], "a .json file"),
    (["--batch-sizes", "0", "2"], "--batch-sizes must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--invert-refine-steps", "-3"], "--invert-refine-steps must be >= 0"),
    (["--preset", "./no-such-pipeline"], "no such pipeline folder"),
])
def test_bad_arguments_are_refused_before_anything_is_measured(speed_cli, tmp_path, capsys, monkeypatch, argv,
                                                                message):
    (tmp_path / "a-file").write_text("")
    argv = [a.format(file=tmp_path / "a-file", tmp=tmp_path) for a in argv]
    measured = []
    monkeypatch.setattr(speed_cli, "run", lambda *a, **k: measured.append(a))
    with pytest.raises(SystemExit) as exit_info:
        speed_cli.main(["--preset", "tiny", "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert measured == []


def test_out_accepts_a_folder_or_a_json_path(speed_cli, tmp_path):
    args = speed_cli.parse_args(["--preset", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path)])
    assert args.report == (tmp_path / "cpu-tiny-bfloat16.json", tmp_path / "cpu-tiny-bfloat16.md")
    nested = tmp_path / "new" / "run.json"
    args = speed_cli.parse_args(["--preset", "tiny", "--device", "cpu", "--out", str(nested)])
    assert args.report == (nested, nested.with_suffix(".md")) and nested.parent.is_dir()  # created up front
    assert list(nested.parent.iterdir()) == []  # the write probe leaves nothing behind


def test_a_run_interrupted_after_the_first_section_keeps_it(speed_cli, tmp_path, monkeypatch):
    """What a run killed during its second section leaves on disk: the JSON written when the first one finished."""
    out = tmp_path / "partial.json"
    on_disk = {}

    def interrupted_stages(bench):
        on_disk.update(json.loads(out.read_text()))  # the file as a kill at this moment would leave it
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules["speedbench.sections"].SECTIONS, "stages", interrupted_stages)
    assert speed_cli.main([*FEW_SECTIONS, "--out", str(out)]) == 130
    assert on_disk["complete"] is False and on_disk["section_status"]["build"]["status"] == "done"
    assert on_disk["meta"]["model"]["generator_resolution"] == 64 and on_disk["meta"]["build_s"] > 0
    final = json.loads(out.read_text())
    assert final["section_status"]["stages"]["status"] == "interrupted"
    assert final["section_status"]["end_to_end"]["status"] == "pending" and "end_to_end" not in final
    assert "| stages | **interrupted** |" in out.with_suffix(".md").read_text()


def test_a_failing_section_is_recorded_and_the_others_still_run(speed_cli, tmp_path, monkeypatch):
    out = tmp_path / "failed.json"

    def failing(bench):
        raise RuntimeError("no throughput today")

    monkeypatch.setitem(sys.modules["speedbench.sections"].SECTIONS, "throughput", failing)
    assert speed_cli.main([*FEW_SECTIONS, "--out", str(out)]) == 1
    results = json.loads(out.read_text())
    status = results["section_status"]
    assert status["throughput"]["status"] == "failed"
    assert status["throughput"]["error"] == "RuntimeError: no throughput today"
    assert "throughput" not in results
    assert status["space_overhead"]["status"] == "done" and results["space_overhead"]["overhead_ms"] > 0
    assert results["complete"] is True
