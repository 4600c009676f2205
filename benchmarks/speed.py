#!/usr/bin/env python
"""Speed benchmark: mm2latent's fast and quality modes against the diffusion baseline, in one run.

    python benchmarks/speed.py                                   # full-size models, CPU or CUDA
    python benchmarks/speed.py --device cuda --dtype float16
    python benchmarks/speed.py --preset tiny --repeats 1 --warmup 0 --quality-steps 2 --batch-sizes 1 2

Full size = SD-1.5 U-Net, two ControlNets, CLIP-L text encoder, SD VAE, 1024² StyleGAN2 and M, T at
their real sizes, with random weights unless ``--preset`` names a saved or Hub pipeline (speed does not
depend on weight values; the JSON says which were used). The baseline is diffusers'
``StableDiffusionControlNetPipeline`` built from the *same* U-Net, ControlNet, text encoder, tokenizer
and VAE objects, at the same device and dtype: 20 DDIM steps, guidance 7.5 (batched guidance pass, as
diffusers does), 512², VAE decode and PIL output included.

Writes ``--out`` (JSON, default ``benchmarks/results/<device>[-<preset>][-<dtype>].json``) and the same
stem with ``.md`` (a compact table, also printed). See benchmarks/README.md for what each number means.
Only the standard library is imported at module level, so that the cold-start child process times
``import torch`` itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SCHEMA = "mm2latent-speed/2"
PROMPT = "She has long wavy blonde hair and is smiling."
NEGATIVE_PROMPT = ""
GIB = 2**30
GB = 10**9  # targets are in GB (10^9 bytes): stricter than GiB
COLD_START_MARK = "COLD_START_JSON "

# Targets of the issue. Each is (key, description, predicate on the results, scope).
CPU_FAST_S = 15.0
CPU_RSS_GB = 8.0
GPU_FAST_MS = 50.0
GPU_SYNTH_MS = 10.0
GPU_PEAK_GB = 6.0
GPU_BATCH8_FPS = 60.0
MIN_SPEEDUP = 15.0
MAX_OVERHEAD = 0.10
MAX_INVERT_OVER_BASELINE = 1.25
MIN_ENGINE_SPEEDUP = 2.0  # MM2Latent engine over DDGI fast mode, same generator


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[speed {stamp}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ memory


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class Memory:
    """Peak memory of one measured item: CUDA allocator peak, or process peak RSS on CPU.

    On Linux the RSS high-water mark (VmHWM) is reset between items through /proc/self/clear_refs, so each
    item gets its own peak; where that is impossible the lifetime peak (ru_maxrss) is reported instead.
    """

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = False
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.resettable = _proc_status_kib("VmHWM") is not None
            except OSError:
                self.resettable = False

    @property
    def kind(self) -> str:
        if self.cuda:
            return "cuda_max_memory_allocated"
        return "process_peak_rss_per_item" if self.resettable else "process_peak_rss_lifetime"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}
        if self.resettable:
            return {"peak_bytes": int(_proc_status_kib("VmHWM")) * 1024}
        return {"peak_bytes": _ru_maxrss_bytes()}


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    def __init__(self, device, memory: Memory):
        self.device = device
        self.memory = memory

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def measure(self, fn, repeats: int, warmup: int, label: str, per: int = 1, setup=None) -> dict:
        """Median/min/max milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

        ``setup`` (untimed) runs before every call. ``per``: items per call (for per-item figures).
        """
        self.memory.reset()

        def timed(count: int) -> list[float]:
            times = []
            for _ in range(count):
                if setup:
                    setup()
                self.sync()
                start = time.perf_counter()
                fn()
                self.sync()
                times.append((time.perf_counter() - start) * 1e3)
            return times

        warm = timed(max(0, warmup))
        runs = timed(max(1, repeats))
        result = {
            "median_ms": statistics.median(runs), "min_ms": min(runs), "max_ms": max(runs),
            "repeats": len(runs), "warmup": len(warm), "runs_ms": [round(r, 3) for r in runs],
            "warmup_ms": [round(r, 3) for r in warm],
        }
        if per > 1:
            result["per_item_ms"] = result["median_ms"] / per
        result.update(self.memory.peak())
        log(f"{label}: median {result['median_ms']:.1f} ms (min {result['min_ms']:.1f}, max {result['max_ms']:.1f}, "
            f"n={len(runs)}), peak {result['peak_bytes'] / GIB:.2f} GiB")
        return result


# ------------------------------------------------------------------------------------------------ environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def environment(args, device, dtype) -> dict:
    import diffusers
    import torch
    import transformers

    import mm2latent

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "mm2latent": mm2latent.__version__,
                     "numpy": __import__("numpy").__version__, "pillow": __import__("PIL").__version__},
        "device": {"type": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                   "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   "cpu_bf16": bool({"avx512_bf16", "amx_bf16"} & cpu_flags()),
                   "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None},
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "preset": args.preset,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update({"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                              "capability": list(torch.cuda.get_device_capability(device)),
                              "memory_bytes": int(props.total_memory),
                              "cudnn": torch.backends.cudnn.version(),
                              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                              "cudnn_benchmark": torch.backends.cudnn.benchmark})
    else:
        env["device"]["name"] = env["device"]["cpu"]
    return env


def weights_info(preset: str) -> dict:
    if preset in ("tiny", "full-random"):
        sizes = "toy sizes (the tiny preset)" if preset == "tiny" else "real sizes"
        return {"random": True, "source": f"built-in preset {preset!r}: {sizes}, deterministic random weights "
                "built in-process (no download); speed does not depend on weight values"}
    return {"random": False, "source": f"loaded from {preset!r}"}


def parse_dtype(name: str):
    from mm2latent.pipelines.generation import resolve_dtype

    return resolve_dtype(name, None)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(pipe):
    """Mask inputs drawn by code at the ControlNet's resolution: index map (L) and colour rendering (RGB)."""
    from PIL import Image

    from mm2latent.inputs.conditions import CELEBAMASK_PALETTE
    from mm2latent.pipelines.speedups import synthetic_face_mask

    ids = synthetic_face_mask(pipe.encoder.image_size)
    return Image.fromarray(ids, mode="L"), Image.fromarray(CELEBAMASK_PALETTE[ids], mode="RGB")


def build_pipeline(args, device, dtype):
    from mm2latent import FacePipeline

    pipe = FacePipeline.from_pretrained(args.preset, device=device, dtype=dtype)
    pipe.show_progress = False
    return pipe


def build_baseline(pipe):
    """diffusers' ControlNet pipeline on the very same module objects (same weights, device, dtype)."""
    from diffusers import StableDiffusionControlNetPipeline

    encoder = pipe.encoder
    modality = "mask" if "mask" in encoder.controlnets else next(iter(encoder.controlnets))
    baseline = StableDiffusionControlNetPipeline(
        vae=encoder.vae, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, unet=encoder.unet,
        controlnet=encoder.controlnets[modality], scheduler=encoder.make_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    baseline.set_progress_bar_config(disable=True)
    return baseline, modality


# ------------------------------------------------------------------------------------------------ cold start


def cold_start_child(args) -> None:
    """Runs in a fresh process: import, build/load, first image. Prints one JSON line."""
    t_start = time.time()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mm2latent import FacePipeline
    from mm2latent.pipelines.speedups import compile_pipeline, enable_channels_last, synthetic_face_mask

    t_import = time.time()
    device = torch.device(args.device)
    pipe = FacePipeline.from_pretrained(args.preset, device=device, dtype=parse_dtype(args.dtype))
    pipe.show_progress = False
    if args.channels_last:
        enable_channels_last(pipe)
    if args.compile:
        compile_pipeline(pipe, mode=args.compile_mode, backend=args.compile_backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_built = time.time()
    rss_built = _proc_status_kib("VmRSS")
    image = pipe(PROMPT, mask=synthetic_face_mask(pipe.encoder.image_size), seed=0).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_first = time.time()
    report = {
        "t_child_start": t_start, "t_imported": t_import, "t_built": t_built, "t_first_image": t_first,
        "image_size": list(image.size), "rss_after_build_bytes": (rss_built or 0) * 1024,
        "peak_rss_bytes": (_proc_status_kib("VmHWM") or 0) * 1024 or _ru_maxrss_bytes(),
    }
    if device.type == "cuda":
        report["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(COLD_START_MARK + json.dumps(report), flush=True)


def measure_cold_start(args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--cold-start-child", "--preset", args.preset,
               "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.channels_last:
        command.append("--channels-last")
    if args.compile:
        command += ["--compile", "--compile-backend", args.compile_backend]
        if args.compile_mode:
            command += ["--compile-mode", args.compile_mode]
    log("cold start: fresh process, import + build + first image")
    spawned = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=args.cold_start_timeout)
    ended = time.time()
    line = next((text for text in proc.stdout.splitlines() if text.startswith(COLD_START_MARK)), None)
    if proc.returncode != 0 or line is None:
        log(f"cold start failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    child = json.loads(line[len(COLD_START_MARK):])
    result = {
        "seconds_to_first_image": child["t_first_image"] - spawned,
        "interpreter_start_s": child["t_child_start"] - spawned,
        "import_s": child["t_imported"] - child["t_child_start"],
        "build_or_load_s": child["t_built"] - child["t_imported"],
        "first_image_s": child["t_first_image"] - child["t_built"],
        "process_total_s": ended - spawned,
        "peak_rss_bytes": child["peak_rss_bytes"],
        "rss_after_build_bytes": child["rss_after_build_bytes"],
        "weights": ("random weights built in the process (the preset has no files; 'weights cached' = no "
                    "download, building them stands in for loading)" if args.preset in ("tiny", "full-random")
                    else "loaded from local files / Hub cache"),
        "includes": "interpreter start, imports, building the pipeline, moving it to the device, one fast-mode image",
    }
    if "cuda_peak_bytes" in child:
        result["cuda_peak_bytes"] = child["cuda_peak_bytes"]
    log(f"cold start: {result['seconds_to_first_image']:.1f} s to first image (import {result['import_s']:.1f} s, "
        f"build {result['build_or_load_s']:.1f} s, first image {result['first_image_s']:.1f} s)")
    return result


# ------------------------------------------------------------------------------------------------ the benchmark


@dataclass
class Bench:
    """What every section shares: options, device, timer, the pipeline, inputs, results, and values one section
    computes for the next (``shared``: the encoded prompt, ControlNet images, noise, one step's features)."""

    args: argparse.Namespace
    device: Any
    dtype: Any
    timer: Timer
    memory: Memory
    results: dict
    heavy_repeats: int = 1
    heavy_warmup: int = 0
    baseline_repeats: int = 1
    pipe: Any = None
    index_mask: Any = None
    colour_mask: Any = None
    shared: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def measure(self, label: str, fn, heavy: bool = False, per: int = 1, warmup: int | None = None) -> dict:
        """Time ``fn`` (labelled ``label`` in a torch.profiler trace) with the light or heavy repeat counts."""
        import torch

        def labelled():
            with torch.profiler.record_function(f"bench.{label}"):
                return fn()

        repeats = self.heavy_repeats if heavy else self.args.repeats
        warm = (self.heavy_warmup if heavy else self.args.warmup) if warmup is None else warmup
        return self.timer.measure(labelled, repeats, warm, label, per=per)

    def fast_call(self, batch: int = 1, **kwargs):
        return self.pipe(PROMPT, mask=self.index_mask, seed=SEED, num_images=batch, **kwargs)


SEED = 0


def section_build(bench: Bench) -> None:
    """Build (or load) the pipeline, apply the toggles, warm up once per the options."""
    from mm2latent.pipelines import speedups


    args, results = bench.args, bench.results
    log(f"building {args.preset} on {bench.device} in {args.dtype}")
    start = time.perf_counter()
    bench.pipe = build_pipeline(args, bench.device, bench.dtype)
    results["meta"]["build_s"] = time.perf_counter() - start
    pipe = bench.pipe
    encoder = pipe.encoder
    bench.index_mask, bench.colour_mask = make_inputs(pipe)
    if args.channels_last:
        speedups.enable_channels_last(pipe)
    if args.compile:
        bench.shared["compile_handle"] = speedups.compile_pipeline(pipe, mode=args.compile_mode,
                                                                   backend=args.compile_backend)
    log(f"warm-up: {args.warmup} fast call(s)")
    warm = []
    for _ in range(args.warmup + (1 if args.compile else 0)):  # with --compile: >= 2 calls
        bench.timer.sync()
        t0 = time.perf_counter()
        bench.fast_call()
        bench.timer.sync()
        warm.append((time.perf_counter() - t0) * 1e3)
    results["warmup_ms"] = warm
    results["meta"]["model"] = {
        "image_size": encoder.image_size, "latent_size": encoder.latent_size, "generator_resolution": pipe.resolution,
        "num_ws": pipe.generator.num_ws, "controlnets": pipe.modalities,
        "parameters": {name: count_parameters(part) for name, part in pipe.components().items()
                       if hasattr(part, "parameters")},
    }
    if args.compile:
        from torch._dynamo.utils import counters

        results["compile"] = {
            "mode": args.compile_mode, "backend": args.compile_backend,
            "regions": len(bench.shared["compile_handle"].regions),
            "first_call_s": warm[0] / 1e3 if warm else None,
            "second_call_s": warm[1] / 1e3 if len(warm) > 1 else None,
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "note": "compilation is lazy: first_call_s is compile time + one call; every new batch size compiles again",
        }


def section_stages(bench: Bench) -> None:
    """The public pipeline stages one by one, batch 1 (the U-Net pass, M and T also apart)."""
    from mm2latent.inputs.images import tensor_to_pil


    pipe = bench.pipe
    encoder = pipe.encoder
    stages: dict = {}

    def text_uncached():
        encoder.clear_prompt_cache()
        pipe.encode_prompts([PROMPT])

    stages["text_encoding"] = bench.measure("encode_prompts (CLIP, uncached)", text_uncached)
    stages["text_encoding"]["note"] = "tokenise + CLIP text encoder, cache emptied before each call"
    stages["text_encoding_cached"] = bench.measure("encode_prompts (cache hit)", lambda: pipe.encode_prompts([PROMPT]))
    stages["preprocess_mask"] = bench.measure("prepare_conditions (index map)",
                                              lambda: pipe.prepare_conditions(mask=bench.index_mask))
    stages["prepare_noise"] = bench.measure("prepare_noise", lambda: pipe.prepare_noise([SEED]))
    prompts = pipe.encode_prompts([PROMPT])
    controls, _ = pipe.prepare_conditions(mask=bench.index_mask)
    noise = pipe.prepare_noise([SEED])
    holder: dict = {}

    def unet_pass():
        holder["out"] = pipe.denoise(prompts, controls, noise, num_steps=1, feature_steps=[0], run_to_end=False)

    stages["unet_controlnet_capture"] = bench.measure("U-Net + ControlNet pass with feature capture", unet_pass)
    features = holder["out"].features[0]
    stages["mapper_M"] = bench.measure("M", lambda: pipe.mapper(features.h, pipe.generator.latent_avg))
    stages["modulator_T"] = bench.measure("T", lambda: pipe.modulator(features, prompts.word_mask))
    stages["predict_latents"] = bench.measure("predict_latents (U-Net pass, M, T)",
                                              lambda: pipe.predict_latents(prompts, controls, noise))
    latents = pipe.predict_latents(prompts, controls, noise).latents

    def render():
        holder["image"] = pipe.render(latents)

    stages["stylegan2_synthesis"] = bench.measure("render (StyleGAN2 synthesis)", render)
    stages["postprocess_to_pil"] = bench.measure("post-processing (tensor -> PIL)", lambda: tensor_to_pil(holder["image"]))
    bench.results["stages"] = stages
    bench.results["stage_sum_ms"] = sum(stages[k]["median_ms"] for k in (
        "text_encoding_cached", "unet_controlnet_capture", "mapper_M", "modulator_T", "stylegan2_synthesis"))
    bench.shared.update(prompts=prompts, controls=controls, noise=noise, features=features, latents=latents)


def section_end_to_end(bench: Bench) -> None:
    """Whole calls: fast (prompt cached or not), fast without pre/post-processing, quality mode."""
    from mm2latent.pipelines import speedups


    pipe, shared = bench.pipe, bench.shared
    e2e: dict = {}
    warm = 1 if bench.args.compile else 0  # the build section's warm-up already ran this exact call
    e2e["fast"] = bench.measure("fast mode end to end (prompt cached)", bench.fast_call, warmup=warm)
    e2e["fast"]["note"] = ("pipe(prompt, mask=index map, mode='fast'): mask parsing, cached CLIP embedding, U-Net "
                           "pass, M, T, StyleGAN2, PIL")

    def fast_uncached():
        with speedups.prompt_cache_disabled(pipe):
            bench.fast_call()

    e2e["fast_uncached_prompt"] = bench.measure("fast mode end to end (prompt not cached)", fast_uncached, warmup=warm)

    def model_only():
        return pipe.render(pipe.predict_latents(shared["prompts"], shared["controls"], pipe.prepare_noise([SEED])).latents)

    e2e["fast_model_only"] = bench.measure("fast model only (predict_latents + render)", model_only, warmup=warm)
    for steps in bench.args.quality_steps:
        e2e[f"quality_{steps}_steps"] = bench.measure(
            f"quality mode, {steps} steps",
            lambda steps=steps: pipe(PROMPT, mask=bench.index_mask, seed=SEED, mode="quality", num_steps=steps),
            heavy=True)
    bench.results["end_to_end"] = e2e


def section_throughput(bench: Bench) -> None:
    """Fast mode with num_images = each batch size: faces per second."""
    throughput: dict = {}
    for batch in bench.args.batch_sizes:
        if batch == 1:
            item = dict(bench.results["end_to_end"]["fast"])
        else:
            item = bench.measure(f"fast mode, batch {batch}", lambda batch=batch: bench.fast_call(batch=batch),
                                 heavy=True, per=batch)
        item["batch"] = batch
        item["faces_per_s"] = batch / (item["median_ms"] / 1e3)
        item["ms_per_face"] = item["median_ms"] / batch
        throughput[f"batch_{batch}"] = item
    bench.results["throughput"] = throughput


def section_space_overhead(bench: Bench) -> None:
    """What the Space does around the model per request, with the Space's own helpers.

    canvas (colour picture) -> class ids -> pipeline pre-processing -> [model] -> per-word attention maps (the
    Space asks for ``return_intermediates``) -> PIL -> PNG files with metadata + latents .npy -> overlays.
    """
    import io
    import shutil
    import tempfile

    from mm2latent.inputs.metadata import png_info
    from mm2latent.models.mapping import word_attention_maps
    from mm2latent.pipelines.generation import word_maps
    from mm2latent.ui.canvases import mask_from_canvas
    from mm2latent.ui.outputs import attention_gallery, save_run

    pipe, shared = bench.pipe, bench.shared
    canvas = {"background": bench.colour_mask, "layers": [], "composite": bench.colour_mask}
    parts: dict = {}
    parts["canvas_to_ids"] = bench.measure("Space: canvas colour map -> ids", lambda: mask_from_canvas(canvas))
    ids = mask_from_canvas(canvas)
    parts["pipeline_preprocess"] = bench.measure("Space: prepare_conditions", lambda: pipe.prepare_conditions(mask=ids))
    word_tokens = shared["prompts"].word_tokens[0]
    parts["attention_maps"] = bench.measure(
        "Space: per-word attention maps",
        lambda: word_maps(word_attention_maps(shared["features"].attn_probs, pipe.modulator.feature_size).float(),
                          word_tokens))
    parts["to_pil"] = bench.results["stages"]["postprocess_to_pil"]
    output = pipe(PROMPT, mask=ids, seed=SEED, return_intermediates=True)
    image, settings = output.images[0], output.settings
    root = Path(tempfile.mkdtemp(prefix="mm2latent-speed-"))
    counter = iter(range(10**6))

    def save():
        folder = root / str(next(counter))
        folder.mkdir()
        save_run(folder, output.images, output.latents.numpy(), output.seeds, settings, "bench")

    parts["save_png_and_latents"] = bench.measure("Space: PNG (+metadata) and .npy files", save)
    base = output.condition_images.get("mask", image)
    parts["attention_overlays"] = bench.measure(
        "Space: attention overlays",
        lambda: attention_gallery(base, output.attention_words, output.attention_maps[0].numpy()))
    shutil.rmtree(root, ignore_errors=True)

    def encoded(fmt, **kw):
        def fn():
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, **kw)
            return buffer.getvalue()
        return fn

    formats = {
        "png_level6_default": encoded("PNG", pnginfo=png_info(settings)),
        "png_level1": encoded("PNG", pnginfo=png_info(settings), compress_level=1),
        "png_level0": encoded("PNG", pnginfo=png_info(settings), compress_level=0),
        "jpeg_q90_preview": encoded("JPEG", quality=90),
    }
    encodings = {}
    for name, fn in formats.items():
        item = bench.measure(f"encode {name}", fn)
        item["bytes"] = len(fn())
        encodings[name] = item
    model_ms = bench.results["end_to_end"]["fast_model_only"]["median_ms"]
    overhead_ms = sum(item["median_ms"] for item in parts.values())
    png_saving = encodings["png_level6_default"]["median_ms"] - encodings["png_level1"]["median_ms"]
    space_call = bench.measure("Space's pipeline call (ids, return_intermediates)",
                               lambda: pipe(PROMPT, mask=ids, seed=SEED, return_intermediates=True), heavy=True)
    bench.results["space_overhead"] = {
        "source": "the Space's own helpers (mm2latent.ui.canvases.mask_from_canvas, mm2latent.ui.outputs.save_run, "
                  "attention_gallery) and the pipeline's word_maps",
        "parts": parts, "encodings": encodings, "space_pipeline_call": space_call, "model_ms": model_ms,
        "overhead_ms": overhead_ms, "overhead_share": overhead_ms / model_ms,
        "overhead_ms_png_level1": overhead_ms - png_saving,
        "overhead_share_png_level1": (overhead_ms - png_saving) / model_ms,
        "note": "overhead = sum of the parts (per request, one image); model = fast mode without pre/post-processing. "
                "Gradio's own serialisation and transport are not included. *_png_level1: the same with PNG "
                "compress_level=1 (lossless, larger files)",
    }


def section_invert_mode(bench: Bench) -> None:
    """The training-free mode (mode="invert"): I^d_0 with guidance, the e4e encoder, optional refinement, G.

    The e4e encoder has random weights, full size (IR-SE50 body, 18 heads) except on the tiny preset; the
    diffusion part uses the same steps and guidance as the baseline, so the two are comparable.
    """
    import torch

    from mm2latent.editing.inversion import PSPEncoder, tiny_psp_config
    from mm2latent.pipelines.editing import FaceEditPipeline

    pipe, args = bench.pipe, bench.args
    sizes = dict(num_ws=pipe.generator.num_ws, style_dim=pipe.generator.style_dim)
    config = tiny_psp_config(**sizes) if args.preset == "tiny" else sizes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        inverter = PSPEncoder(**config, architecture="e4e")
    editor = FaceEditPipeline(pipe, inverter=inverter).to(bench.device, bench.dtype)
    item: dict = {}
    for refine in args.invert_refine_steps:
        label = f"invert mode, {args.baseline_steps} steps, guidance {args.baseline_guidance}, refine {refine}"
        item[f"refine_{refine}"] = bench.measure(
            label, lambda refine=refine: editor(PROMPT, mask=bench.index_mask, seed=SEED, mode="invert",
                                                num_steps=args.baseline_steps, guidance_scale=args.baseline_guidance,
                                                refine_steps=refine), heavy=True)
    item["what"] = ("FaceEditPipeline(mode='invert'): the diffusion model's I^d_0 (DDIM, batched guidance pass, VAE "
                    "decode), e4e encoder, refine_k = k refinement steps (G forward + backward each), StyleGAN2, PIL")
    bench.results["invert_mode"] = item


def section_ablations(bench: Bench) -> None:
    """Each optimisation on and off."""
    from mm2latent.pipelines import speedups
    from mm2latent.pipelines.request import GenerationRequest


    pipe, shared, args = bench.pipe, bench.shared, bench.args
    encoder = pipe.encoder
    stages, e2e = bench.results["stages"], bench.results["end_to_end"]
    prompts, controls, noise = shared["prompts"], shared["controls"], shared["noise"]
    ablations: dict = {}
    if "mask" in encoder.modalities:
        controlnet = encoder.controlnet("mask")
        scheduler = encoder.make_scheduler()
        scheduler.set_timesteps(1, device=bench.device)
        t_first = scheduler.timesteps[0]

        def unet_no_capture():
            down, mid = controlnet(noise, t_first, encoder_hidden_states=prompts.embeds,
                                   controlnet_cond=controls["mask"], return_dict=False)
            encoder.unet(noise, t_first, encoder_hidden_states=prompts.embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)

        ablations["feature_capture"] = {
            "on": stages["unet_controlnet_capture"],
            "off": bench.measure("U-Net + ControlNet, no capture", unet_no_capture),
            "what": "the same pass without hooks and with SDPA in the captured attn2 layers (features are needed: "
                    "this is the capture's cost)",
        }

    def install_capture():
        with encoder.capturing({}):
            pass

    ablations["capture_install_per_call"] = {
        "cost": bench.measure("installing + removing capture hooks/processors (per U-Net pass)", install_capture),
        "what": "python time to install and remove the capture hooks and attn2 processors, paid on every captured "
                "U-Net pass (5 forward hooks and the 9 decoder attn2 processors, looked up once and swapped directly)",
    }

    def unet_pass():
        pipe.denoise(prompts, controls, noise, num_steps=1, feature_steps=[0], run_to_end=False)

    speedups.set_attention(pipe, "classic")
    try:
        classic = bench.measure("U-Net + ControlNet, classic attention", unet_pass, heavy=True)
    finally:
        speedups.set_attention(pipe, "sdpa")
    ablations["sdpa"] = {"on": stages["unet_controlnet_capture"], "off": classic,
                         "what": "SDPA vs explicit softmax attention in every non-captured layer"}
    ablations["prompt_cache"] = {"on": e2e["fast"], "off": e2e["fast_uncached_prompt"],
                                 "what": "per-prompt CLIP embedding cache, fast mode end to end"}
    if encoder.has_vae:
        ablations["no_vae_in_fast_mode"] = {
            "vae_decode": bench.measure("VAE decode (what fast mode skips)", lambda: encoder.decode_latents(noise),
                                        heavy=True),
            "what": "time a VAE decode would add per image; fast mode never runs it (nor loads the VAE)",
        }
    latents = shared["latents"]
    ablations["stylegan2_noise"] = {
        "const": stages["stylegan2_synthesis"],
        "random": bench.measure("render, fresh random noise", lambda: pipe.render(latents, noise_mode="random")),
        "what": "noise buffers prepared once (const) vs drawn per call",
    }
    if args.channels_last:
        speedups.disable_channels_last(pipe)
    else:
        speedups.enable_channels_last(pipe)
    try:
        toggled = bench.measure("fast mode, channels_last toggled", bench.fast_call, warmup=max(1, args.warmup))
    finally:
        if args.channels_last:
            speedups.enable_channels_last(pipe)
        else:
            speedups.disable_channels_last(pipe)
    ablations["channels_last"] = {"on": toggled if not args.channels_last else e2e["fast"],
                                  "off": e2e["fast"] if not args.channels_last else toggled,
                                  "what": "NHWC weights (U-Net, ControlNets, VAE, M, T), fast mode end to end"}
    # the smallest batch above 1: the gain of batching shows there already, and on CPU it is the cheapest
    size = min([b for b in args.batch_sizes if b > 1], default=1)
    if size > 1:
        requests = [GenerationRequest.create(f"{PROMPT} {i}", mask=bench.index_mask, seed=SEED + i) for i in range(size)]
        batched = bench.measure(f"{size} different requests batched", lambda: pipe.generate_batch(requests),
                                heavy=True, per=size)
        ablations["request_batching"] = {
            "on": batched, "off": {"median_ms": size * e2e["fast"]["median_ms"]},
            "what": f"{size} different requests (prompts, seeds) in one generate_batch call vs {size} sequential "
                    f"fast calls (off = {size} x fast mode batch 1)",
        }
    handle = shared.pop("compile_handle", None)
    if handle is not None:
        handle.undo()
        eager = bench.measure("fast mode, eager (compile undone)", bench.fast_call, warmup=max(1, args.warmup))
        ablations["compile"] = {"on": e2e["fast"], "off": eager,
                                "what": f"torch.compile(mode={args.compile_mode!r}) on capture-free regions"}
    bench.results["ablations"] = ablations


def section_baseline(bench: Bench) -> None:
    """diffusers' StableDiffusionControlNetPipeline on the same modules, and the ratios to it."""
    import torch

    args, results = bench.args, bench.results
    log(f"baseline: StableDiffusionControlNetPipeline, {args.baseline_steps} steps, guidance {args.baseline_guidance}")
    encoder = bench.pipe.encoder
    baseline, modality = build_baseline(bench.pipe)
    size = encoder.image_size
    control_image = bench.colour_mask if modality == "mask" else bench.index_mask.convert("RGB")

    def baseline_call(steps):
        return baseline(PROMPT, image=control_image, num_inference_steps=steps, guidance_scale=args.baseline_guidance,
                        height=size, width=size, output_type="pil", negative_prompt=NEGATIVE_PROMPT,
                        generator=torch.Generator("cpu").manual_seed(SEED)).images

    bench.memory.reset()
    bench.timer.sync()
    t0 = time.perf_counter()
    baseline_call(1)
    bench.timer.sync()
    warm_ms = (time.perf_counter() - t0) * 1e3
    item = bench.timer.measure(lambda: baseline_call(args.baseline_steps), bench.baseline_repeats, 0,
                               f"baseline, {args.baseline_steps} steps")
    item.update({
        "pipeline": "diffusers.StableDiffusionControlNetPipeline", "steps": args.baseline_steps,
        "guidance_scale": args.baseline_guidance, "resolution": size, "controlnet": modality,
        "scheduler": type(baseline.scheduler).__name__, "output_type": "pil", "vae_decode": True,
        "shares_modules_with_ours": all(getattr(baseline, name) is getattr(encoder, name)
                                        for name in ("unet", "vae", "text_encoder", "tokenizer"))
                                    and baseline.controlnet is encoder.controlnet(modality),
        "warmup_1_step_ms": warm_ms,
        "note": "text encoding of prompt and negative prompt every call, batch-2 guidance pass per step, "
                "VAE decode, PIL output; same device, dtype and attention processors (SDPA) as ours",
    })
    results["baseline"] = item
    e2e = results["end_to_end"]
    results["ratios"] = {
        "baseline_over_fast": item["median_ms"] / e2e["fast_uncached_prompt"]["median_ms"],
        "baseline_over_fast_cached_prompt": item["median_ms"] / e2e["fast"]["median_ms"],
        "baseline_over_fast_model_only": item["median_ms"] / e2e["fast_model_only"]["median_ms"],
        "note": "headline = baseline / fast mode end to end with the prompt NOT cached (both sides encode text)",
    }
    for steps in args.quality_steps:
        results["ratios"][f"baseline_over_quality_{steps}_steps"] = item["median_ms"] / e2e[f"quality_{steps}_steps"]["median_ms"]
    for key, value in results.get("invert_mode", {}).items():
        if isinstance(value, dict) and "median_ms" in value:
            results["ratios"][f"invert_{key}_over_baseline"] = value["median_ms"] / item["median_ms"]


def build_mm2latent_pipeline(bench: Bench):
    """The MM2Latent engine around the very same generator object as the DDGI pipeline (same device, dtype):
    toy networks with a tiny preset, else the real sizes (CLIP ViT-B/16, 256² autoencoders) with random weights."""
    from mm2latent.models.latent_mapper import (
        MM2LatentEngine,
        build_full_size_mm2latent_components,
        build_tiny_mm2latent_components,
    )
    from mm2latent.pipelines.mm2latent_engine import MM2LatentPipeline

    generator = bench.pipe.generator
    tiny = bench.args.preset.startswith("tiny")
    build = build_tiny_mm2latent_components if tiny else build_full_size_mm2latent_components
    pipe = MM2LatentPipeline(MM2LatentEngine(**build(generator)), generator, name=f"{bench.args.preset}+mm2latent")
    pipe.show_progress = False
    # Only the engine moves: the generator is DDGI's own (already on the device, in the dtype).
    pipe.mm2latent_engine.to(device=bench.device, dtype=bench.dtype)
    return pipe, "tiny" if tiny else "full-size, random weights"


def section_mm2latent(bench: Bench) -> None:
    """The MM2Latent engine (no diffusion model) beside DDGI fast mode and the baseline, same run, same generator."""
    from mm2latent.inputs.images import tensor_to_pil

    pipe, networks = build_mm2latent_pipeline(bench)
    results = bench.results
    engine = pipe.mm2latent_engine
    log(f"MM2Latent engine ({networks}) on the DDGI pipeline's generator")
    item: dict = {"networks": networks, "parameters": {name: count_parameters(getattr(engine, name))
                                                      for name in engine.COMPONENTS}}

    def call():
        return pipe(PROMPT, mask=bench.index_mask, seed=SEED)

    item["end_to_end"] = bench.measure("MM2Latent end to end (text + mask -> PIL)", call)
    item["end_to_end"]["note"] = ("pipe(prompt, mask=index map): mask parsing, text tower (no prompt cache), mask "
                                  "autoencoder, mapper, seed variation, generator, PIL")
    prompts = pipe.encode_prompts([PROMPT])
    codes, _ = pipe.prepare_conditions(mask=bench.index_mask)
    stages = {
        "encode_prompts": bench.measure("MM2Latent encode_prompts (text tower)", lambda: pipe.encode_prompts([PROMPT])),
        "prepare_conditions": bench.measure("MM2Latent prepare_conditions (mask -> code)",
                                            lambda: pipe.prepare_conditions(mask=bench.index_mask)),
        "predict_latents": bench.measure("MM2Latent predict_latents (mapper)", lambda: pipe.predict_latents(prompts, codes)),
    }
    latents = pipe.vary_latents(pipe.predict_latents(prompts, codes), [SEED])
    stages["render_to_pil"] = bench.measure("MM2Latent render + PIL", lambda: tensor_to_pil(pipe.render(latents)))
    item["stages"] = stages
    results["mm2latent"] = item
    e2e = results["end_to_end"]
    ratios = results.setdefault("ratios", {})
    # DDGI's headline comparison encodes the prompt every call, as the MM2Latent engine always does.
    ratios["ddgi_fast_over_mm2latent"] = e2e["fast_uncached_prompt"]["median_ms"] / item["end_to_end"]["median_ms"]
    if "baseline" in results:
        ratios["baseline_over_mm2latent"] = results["baseline"]["median_ms"] / item["end_to_end"]["median_ms"]


def section_precision(bench: Bench) -> None:
    """Fast mode, the U-Net pass and StyleGAN2 again in the other precisions (last: casts the pipeline)."""
    args, pipe = bench.args, bench.pipe
    alternatives = args.ablation_dtypes
    if alternatives is None:
        if bench.cuda:
            alternatives = [d for d in ("float16", "bfloat16", "float32") if d != args.dtype]
        else:
            alternatives = ["bfloat16"] if bench.results["meta"]["device"]["cpu_bf16"] and args.dtype != "bfloat16" else []
    per_dtype: dict = {}
    for name in alternatives:
        log(f"precision ablation: {name}")
        dtype = parse_dtype(name)
        pipe.to(dtype=dtype)
        pipe.encoder.clear_prompt_cache()
        entry = {"fast": bench.measure(f"fast mode in {name}", bench.fast_call, warmup=max(1, args.warmup))}
        prompts = pipe.encode_prompts([PROMPT])
        controls, _ = pipe.prepare_conditions(mask=bench.index_mask)
        noise = pipe.prepare_noise([SEED])
        entry["unet_controlnet_capture"] = bench.measure(
            f"U-Net pass in {name}",
            lambda p=prompts, c=controls, n=noise: pipe.denoise(p, c, n, num_steps=1, feature_steps=[0], run_to_end=False))
        latents = bench.shared["latents"].to(dtype)
        entry["stylegan2_synthesis"] = bench.measure(f"render in {name}", lambda w=latents: pipe.render(w))
        per_dtype[name] = entry
    if per_dtype:
        bench.results.setdefault("ablations", {})["precision"] = {
            "main_dtype": args.dtype, **per_dtype,
            "what": "fast mode, U-Net pass and StyleGAN2 with the whole pipeline cast"}


#: The sections in order; each reads what the ones before it left in ``Bench.shared`` / ``Bench.results``.
SECTIONS = {
    "build": section_build, "stages": section_stages, "end_to_end": section_end_to_end,
    "throughput": section_throughput, "space_overhead": section_space_overhead, "invert_mode": section_invert_mode,
    "ablations": section_ablations, "baseline": section_baseline, "mm2latent": section_mm2latent,
    "precision": section_precision,
}


def wanted_sections(args) -> list[str]:
    skip = set()
    if args.no_ablations:
        skip |= {"ablations", "precision"}
    if args.no_baseline:
        skip.add("baseline")
    if args.no_mm2latent:
        skip.add("mm2latent")
    if not args.invert_refine_steps:
        skip.add("invert_mode")
    return [name for name in SECTIONS if name not in skip]


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
    dtype = parse_dtype(args.dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark  # fixed shapes: autotune once per shape
    heavy_repeats = args.heavy_repeats if args.heavy_repeats is not None else (args.repeats if cuda else 1)
    heavy_warmup = args.heavy_warmup if args.heavy_warmup is not None else (args.warmup if cuda else 0)
    if args.compile:  # every new shape / input layout compiles: never time a first call
        heavy_warmup = max(heavy_warmup, 1)
        args.warmup = max(args.warmup, 1)
    baseline_repeats = args.baseline_repeats if args.baseline_repeats is not None else (args.repeats if cuda else 1)

    results: dict = {"schema": SCHEMA}
    results["meta"] = environment(args, device, dtype)
    results["meta"]["weights"] = weights_info(args.preset)
    sections = wanted_sections(args)
    results["meta"]["options"] = {
        "repeats": args.repeats, "warmup": args.warmup, "heavy_repeats": heavy_repeats, "heavy_warmup": heavy_warmup,
        "baseline_repeats": baseline_repeats, "batch_sizes": args.batch_sizes, "quality_steps": args.quality_steps,
        "baseline_steps": args.baseline_steps, "baseline_guidance": args.baseline_guidance,
        "invert_refine_steps": args.invert_refine_steps, "channels_last": args.channels_last, "compile": args.compile,
        "compile_mode": args.compile_mode, "compile_backend": args.compile_backend if args.compile else None,
        "cudnn_benchmark": cuda and not args.no_cudnn_benchmark, "sections": sections, "prompt": PROMPT,
        "notes": "stages and fast mode use `repeats`/`warmup`; quality and invert modes, batches > 1 and the VAE use "
                 "`heavy_repeats`/`heavy_warmup` (on CPU 1/0 by default: those kernels are already warm from "
                 "fast mode); the baseline gets one 1-step warm-up call then `baseline_repeats` runs",
    }
    results["units"] = {"time": "milliseconds unless the key ends in _s", "memory": "bytes",
                        "statistics": "median, min and max over the timed runs; warm-up runs excluded"}
    if not args.no_cold_start:
        results["cold_start"] = measure_cold_start(args)
    memory = Memory(device)
    bench = Bench(args=args, device=device, dtype=dtype, timer=Timer(device, memory), memory=memory, results=results,
                  heavy_repeats=heavy_repeats, heavy_warmup=heavy_warmup, baseline_repeats=baseline_repeats)
    results["meta"]["memory_kind"] = memory.kind
    for name in sections:
        log(f"section: {name}")
        SECTIONS[name](bench)
    results.setdefault("ablations", {})
    results["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["targets"] = evaluate_targets(results)
    return results


# ------------------------------------------------------------------------------------------------ targets


def evaluate_targets(results: dict) -> list[dict]:
    meta = results["meta"]
    cuda = meta["device"]["type"] == "cuda"
    half = meta["dtype"] in ("float16", "bfloat16")
    full = meta["preset"] != "tiny"
    e2e, stages, throughput = results["end_to_end"], results["stages"], results["throughput"]
    targets = []

    def add(name, value, op, threshold, applies, why=""):
        met = None
        if applies and value is not None:
            met = value >= threshold if op == ">=" else value <= threshold
        targets.append({"target": name, "value": value, "op": op, "threshold": threshold,
                        "applies": applies, "met": met, "why_not_applicable": "" if applies else why})

    ratio = results.get("ratios", {}).get("baseline_over_fast")
    add("fast mode vs baseline speed-up (x, same device and dtype)", ratio, ">=", MIN_SPEEDUP,
        full and ratio is not None, "tiny preset or no baseline in this run")
    if cuda:
        why = "GPU targets are for fp16/bf16 at full size" if not (half and full) else ""
        add("fast mode, batch 1 (ms per 1024² face)", e2e["fast"]["median_ms"], "<=", GPU_FAST_MS, half and full, why)
        add("StyleGAN2 synthesis (ms)", stages["stylegan2_synthesis"]["median_ms"], "<=", GPU_SYNTH_MS, half and full, why)
        add("peak GPU memory, fast mode batch 1 (GB)", e2e["fast"]["peak_bytes"] / GB, "<=", GPU_PEAK_GB, half and full, why)
        b8 = throughput.get("batch_8", {}).get("faces_per_s")
        add("batch 8 throughput (faces/s)", b8, ">=", GPU_BATCH8_FPS, half and full and b8 is not None,
            why or "batch 8 not measured")
    else:
        add("fast mode, batch 1 on CPU (s per face)", e2e["fast"]["median_ms"] / 1e3, "<=", CPU_FAST_S, full,
            "tiny preset")
        add("peak RSS, fast mode batch 1 (GB)", e2e["fast"]["peak_bytes"] / GB, "<=", CPU_RSS_GB, full, "tiny preset")
        cold = results.get("cold_start", {}).get("peak_rss_bytes")
        add("peak RSS of a fresh process making one image (GB)", cold / GB if cold else None, "<=", CPU_RSS_GB,
            full and bool(cold), "tiny preset or no cold start")
    share = results["space_overhead"]["overhead_share"]
    add("Space overhead per request (share of model time)", share, "<=", MAX_OVERHEAD, full, "tiny preset")
    engine_ratio = results.get("ratios", {}).get("ddgi_fast_over_mm2latent")
    add("MM2Latent engine vs DDGI fast mode speed-up (x, same generator)", engine_ratio, ">=", MIN_ENGINE_SPEEDUP,
        full and engine_ratio is not None, "tiny preset or MM2Latent not measured")
    invert = results.get("ratios", {}).get("invert_refine_0_over_baseline")
    add("training-free mode (refine 0) vs baseline time (x)", invert, "<=", MAX_INVERT_OVER_BASELINE,
        full and invert is not None, "tiny preset or not measured")
    return targets


# ------------------------------------------------------------------------------------------------ Markdown


def _row(name: str, item: dict, extra: str = "") -> str:
    return f"| {name} | {item['median_ms']:.1f} | {item['min_ms']:.1f} | {item['max_ms']:.1f} | {item['repeats']} | {extra} |"


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    dev = meta["device"]
    lines = [
        f"## mm2latent speed — {meta['preset']} on {dev['type']} ({dev.get('name')}), {meta['dtype']}",
        "",
        f"{meta['date']} · torch {meta['versions']['torch']} · diffusers {meta['versions']['diffusers']} · "
        f"transformers {meta['versions']['transformers']} · Python {meta['python']} · {meta['torch_threads']} threads · "
        f"weights: {'random' if meta['weights']['random'] else 'real'} · memory: {meta['memory_kind']} · "
        f"load average start/end: {_fmt_load(meta.get('load_average_start'))} / {_fmt_load(meta.get('load_average_end'))}",
        "",
        "| stage / run | median ms | min | max | n | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {
        "text_encoding": "text encoding (CLIP, uncached)", "text_encoding_cached": "text encoding (cache hit)",
        "preprocess_mask": "mask pre-processing", "unet_controlnet_capture": "U-Net + ControlNet pass + capture",
        "mapper_M": "M", "modulator_T": "T", "stylegan2_synthesis": "StyleGAN2 synthesis",
        "postprocess_to_pil": "post-processing (to PIL)",
    }
    for key, label in names.items():
        if key in results["stages"]:
            lines.append(_row(label, results["stages"][key]))
    for key, item in results["end_to_end"].items():
        lines.append(_row(f"**{key.replace('_', ' ')}**", item, f"peak {item['peak_bytes'] / GIB:.2f} GiB"))
    for key, item in results["throughput"].items():
        lines.append(_row(f"throughput {key.replace('_', ' ')}", item,
                          f"{item['faces_per_s']:.2f} faces/s, {item['ms_per_face']:.1f} ms/face, "
                          f"peak {item['peak_bytes'] / GIB:.2f} GiB"))
    for key, item in results.get("invert_mode", {}).items():
        if isinstance(item, dict):
            ratio = results.get("ratios", {}).get(f"invert_{key}_over_baseline")
            extra = f"{ratio:.2f}× the baseline; " if ratio else ""
            lines.append(_row(f"**invert mode** ({key.replace('_', ' ')} steps)", item,
                              f"{extra}peak {item['peak_bytes'] / GIB:.2f} GiB"))
    if "baseline" in results:
        base = results["baseline"]
        lines.append(_row(f"**baseline** SD+ControlNet {base['steps']} steps, cfg {base['guidance_scale']}, "
                          f"{base['resolution']}², VAE", base, f"peak {base['peak_bytes'] / GIB:.2f} GiB"))
    if "mm2latent" in results:
        engine = results["mm2latent"]
        item = engine["end_to_end"]
        lines.append(_row(f"**MM2Latent engine** ({engine['networks']}), same generator", item,
                          f"peak {item['peak_bytes'] / GIB:.2f} GiB"))
        for key, stage in engine["stages"].items():
            lines.append(_row(f"MM2Latent {key.replace('_', ' ')}", stage))
    lines.append("")
    if "ratios" in results and "ddgi_fast_over_mm2latent" in results["ratios"]:
        r = results["ratios"]
        baseline = f", baseline / MM2Latent {r['baseline_over_mm2latent']:.1f}×" if "baseline_over_mm2latent" in r else ""
        lines.append(f"**Speed-up DDGI fast / MM2Latent: {r['ddgi_fast_over_mm2latent']:.1f}×** (both encode the "
                     f"prompt every call{baseline})")
    if "ratios" in results and "baseline_over_fast" in results["ratios"]:
        r = results["ratios"]
        lines.append(f"**Speed-up baseline / fast: {r['baseline_over_fast']:.1f}×** (prompt not cached; "
                     f"{r['baseline_over_fast_cached_prompt']:.1f}× cached, "
                     f"{r['baseline_over_fast_model_only']:.1f}× model only)")
    cold = results.get("cold_start")
    if cold and "seconds_to_first_image" in cold:
        lines.append(f"Cold start (fresh process → first image): {cold['seconds_to_first_image']:.1f} s "
                     f"(import {cold['import_s']:.1f} s, build/load {cold['build_or_load_s']:.1f} s, "
                     f"first image {cold['first_image_s']:.1f} s), peak RSS {cold['peak_rss_bytes'] / GIB:.2f} GiB")
    if "compile" in results:
        c = results["compile"]
        lines.append(f"torch.compile: first call {c['first_call_s']:.1f} s, {c['regions']} regions, {c['unique_graphs']} graphs")
    so = results["space_overhead"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v['median_ms']:.1f}" for k, v in so["parts"].items())
    lines.append(f"Space overhead per request: {so['overhead_ms']:.1f} ms = {100 * so['overhead_share']:.1f}% of model "
                 f"time ({so['model_ms']:.1f} ms) [{parts} ms]; with PNG level 1: {so['overhead_ms_png_level1']:.1f} ms "
                 f"= {100 * so['overhead_share_png_level1']:.1f}%")
    if results.get("ablations"):
        lines += ["", "| optimisation (on = as in the library / this run) | on ms | off ms | off/on |",
                  "|---|---:|---:|---:|"]
        for key, ab in results["ablations"].items():
            if key == "feature_capture":
                on, off = ab["on"]["median_ms"], ab["off"]["median_ms"]
                lines.append(f"| feature capture (needed; its cost) | {on:.1f} | {off:.1f} | {off / on:.2f}× |")
            elif "on" in ab and "off" in ab:
                on, off = ab["on"]["median_ms"], ab["off"]["median_ms"]
                lines.append(f"| {key.replace('_', ' ')} | {on:.1f} | {off:.1f} | {off / on:.2f}× |")
            elif key == "no_vae_in_fast_mode":
                lines.append(f"| no VAE in fast mode | 0 | {ab['vae_decode']['median_ms']:.1f} | (VAE decode saved) |")
            elif key == "capture_install_per_call":
                lines.append(f"| capture hooks installed per call (cost) | {ab['cost']['median_ms']:.1f} | 0 | — |")
            elif key == "stylegan2_noise":
                lines.append(f"| SG2 noise prepared once | {ab['const']['median_ms']:.1f} | {ab['random']['median_ms']:.1f} | "
                             f"{ab['random']['median_ms'] / ab['const']['median_ms']:.2f}× |")
            elif key == "precision":
                for name, entry in ab.items():
                    if isinstance(entry, dict):
                        lines.append(f"| fast mode in {name} (vs {ab['main_dtype']}) | {entry['fast']['median_ms']:.1f} | "
                                     f"{results['end_to_end']['fast']['median_ms']:.1f} | "
                                     f"{results['end_to_end']['fast']['median_ms'] / entry['fast']['median_ms']:.2f}× |")
    lines += ["", "| target | value | threshold | met |", "|---|---:|---:|---|"]
    for t in results["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t['op']} {t['threshold']} | {met} |")
    return "\n".join(lines) + "\n"


def _fmt_load(load) -> str:
    return "—" if not load else f"{load[0]:.2f}"


# ------------------------------------------------------------------------------------------------ CLI


def default_out(args) -> Path:
    stem = args.device
    if args.preset != "full-random":
        stem += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", args.preset).strip("_")
    if args.dtype != ("float16" if args.device == "cuda" else "float32"):
        stem += "-" + args.dtype
    return REPO_ROOT / "benchmarks" / "results" / f"{stem}.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="full-random",
                        help="'full-random' (real sizes, random weights), 'tiny', or a saved pipeline folder / Hub repo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of stages and fast mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each stage / the fast mode")
    parser.add_argument("--heavy-repeats", type=int, default=None,
                        help="timed runs of quality mode, batches > 1 and the VAE (default: 1 on CPU, --repeats on CUDA)")
    parser.add_argument("--heavy-warmup", type=int, default=None,
                        help="warm-up runs of those (default: 0 on CPU, --warmup on CUDA)")
    parser.add_argument("--baseline-repeats", type=int, default=None, help="default: 1 on CPU, --repeats on CUDA")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--quality-steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument("--baseline-guidance", type=float, default=7.5)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-mm2latent", action="store_true", help="skip the MM2Latent engine's section")
    parser.add_argument("--invert-refine-steps", type=int, nargs="*", default=[0],
                        help="time the training-free mode (mode='invert') with these refinement steps; none: skip it")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--no-ablations", action="store_true", help="skip the on/off measurements of each optimisation")
    parser.add_argument("--ablation-dtypes", nargs="*", default=None,
                        help="precisions to re-measure at the end (default: bfloat16 on CPUs with bf16 support, "
                             "the other two on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the capture-free regions (see mm2latent.pipelines.speedups)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend ('eager' / 'aot_eager' only check tracing)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights for the whole run")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="CUDA: keep torch.backends.cudnn.benchmark off (on by default; applies to both sides)")
    parser.add_argument("--cold-start-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written next to it)")
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover
            args.device = "cpu"
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.compile_mode in ("default", "none", "None"):
        args.compile_mode = None
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args)
        return 0
    started = time.perf_counter()
    results = run(args)
    results["meta"]["benchmark_wall_s"] = time.perf_counter() - started
    out = args.out or default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=False, default=str)
    out.write_text(text + "\n")
    table = render_markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    log(f"wrote {out} and {out.with_suffix('.md')} in {results['meta']['benchmark_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
