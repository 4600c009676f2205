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

Writes ``--out`` (a JSON path or a folder; default ``benchmarks/results/<device>[-<preset>][-<dtype>].json``) and
the same stem with ``.md`` (a compact table, also printed), rewritten after every section so an interrupted run
keeps what it measured. The arguments (``--out`` included) are checked before anything is measured. See
benchmarks/README.md for what each number means.

This file is the command line; the work is in ``benchmarks/speedbench``: ``harness`` (timing, memory, environment,
cold start, the shared ``Bench`` context), ``sections`` (what is measured) and ``report`` (output paths, targets,
JSON and Markdown). Only the standard library is imported at module level, so that the cold-start child process
times ``import torch`` itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from speedbench.harness import (  # noqa: E402  (after the path set-up: mm2latent is imported from this checkout)
    PROMPT,
    Bench,
    Memory,
    Timer,
    cold_start_child,
    environment,
    log,
    measure_cold_start,
    parse_dtype,
    weights_info,
)
from speedbench.report import SCHEMA, OutputPathError, evaluate_targets, output_paths, write_report  # noqa: E402
from speedbench.sections import SECTIONS, wanted_sections  # noqa: E402


def run(args, report: tuple[Path, Path] | None = None) -> dict:
    """Measure the wanted sections; with ``report`` = (JSON path, Markdown path), rewrite both after every section.

    A section that raises is recorded in ``section_status`` (``failed``, with its error) and the next ones still
    run; an interrupt (Ctrl-C) marks the running section ``interrupted``, writes what was measured and re-raises.
    """
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
    results["complete"] = False
    results["section_status"] = {name: {"status": "pending"} for name in sections}

    def save() -> None:
        results["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        results["targets"] = evaluate_targets(results)
        if report is not None:
            write_report(results, *report)

    if not args.no_cold_start:
        results["cold_start"] = measure_cold_start(args)
    memory = Memory(device)
    bench = Bench(args=args, device=device, dtype=dtype, timer=Timer(device, memory), memory=memory, results=results,
                  heavy_repeats=heavy_repeats, heavy_warmup=heavy_warmup, baseline_repeats=baseline_repeats)
    results["meta"]["memory_kind"] = memory.kind
    save()
    for name in sections:
        log(f"section: {name}")
        status = results["section_status"][name]
        status["status"] = "running"
        started = time.perf_counter()
        try:
            SECTIONS[name](bench)
        except KeyboardInterrupt:
            status.update(status="interrupted", seconds=time.perf_counter() - started)
            save()
            raise
        except Exception as error:  # recorded; the sections after it still run (those needing it fail in turn)
            status.update(status="failed", seconds=time.perf_counter() - started,
                          error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
            log(f"section {name} failed: {type(error).__name__}: {error}")
        else:
            status.update(status="done", seconds=time.perf_counter() - started)
        save()
    results.setdefault("ablations", {})
    results["complete"] = True
    save()
    return results



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
    parser.add_argument("--out", default=None,
                        help="a .json path (the .md table goes next to it) or a folder (<device>[-<preset>]-<dtype>"
                             ".json and .md inside); default: benchmarks/results/<device>[-<preset>][-<dtype>].json")
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
    if not args.cold_start_child:  # the child gets checked arguments; its import time must not include torch's
        check_arguments(parser, args)
    return args


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything is measured, what would fail minutes into a run: counts out of range, a local
    preset folder that does not exist, CUDA without a GPU, an ``--out`` that cannot be written."""
    counts = {"--repeats": [args.repeats], "--batch-sizes": args.batch_sizes, "--quality-steps": args.quality_steps,
              "--baseline-steps": [args.baseline_steps], "--threads": [args.threads],
              "--heavy-repeats": [args.heavy_repeats], "--baseline-repeats": [args.baseline_repeats]}
    for flag, values in counts.items():
        if any(v is not None and v < 1 for v in values):
            parser.error(f"{flag} must be >= 1, got {' '.join(str(v) for v in values)}")
    for flag, values in {"--warmup": [args.warmup], "--heavy-warmup": [args.heavy_warmup],
                         "--invert-refine-steps": args.invert_refine_steps}.items():
        if any(v is not None and v < 0 for v in values):
            parser.error(f"{flag} must be >= 0, got {' '.join(str(v) for v in values)}")
    if not args.baseline_guidance > 0:
        parser.error(f"--baseline-guidance must be > 0, got {args.baseline_guidance}")
    preset = args.preset
    if preset not in ("tiny", "full-random") and (preset.startswith((".", "/", "~")) or preset.count("/") > 1) \
            and not Path(preset).expanduser().is_dir():
        parser.error(f"--preset {preset}: no such pipeline folder")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available in this torch build / machine")
    try:
        args.report = output_paths(args.out, args)
    except OutputPathError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args)
        return 0
    json_path, markdown_path = args.report
    log(f"results go to {json_path} (rewritten after every section) and {markdown_path}")
    started = time.perf_counter()
    try:
        results = run(args, args.report)
    except KeyboardInterrupt:
        log(f"interrupted: what was measured is in {json_path} and {markdown_path}")
        return 130
    results["meta"]["benchmark_wall_s"] = time.perf_counter() - started
    print(write_report(results, json_path, markdown_path))
    failed = [name for name, status in results["section_status"].items() if status["status"] != "done"]
    log(f"wrote {json_path} and {markdown_path} in {results['meta']['benchmark_wall_s']:.0f} s"
        + (f"; failed sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
