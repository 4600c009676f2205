"""The benchmark's harness: timing, peak memory, the environment description, the cold-start child process and
the :class:`Bench` context every section shares.

Only the standard library is imported at module level (torch and mm2latent inside functions), so that the
cold-start child process times ``import torch`` itself.
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

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The command-line script (the cold-start child is a fresh run of it).
SCRIPT = REPO_ROOT / "benchmarks" / "speed.py"
PROMPT = "She has long wavy blonde hair and is smiling."
NEGATIVE_PROMPT = ""
SEED = 0
GIB = 2**30
COLD_START_MARK = "COLD_START_JSON "


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
    """Spawn ``speed.py --cold-start-child`` with the run's options and time it from the outside."""
    command = [sys.executable, str(SCRIPT), "--cold-start-child", "--preset", args.preset,
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
