"""The benchmark's report: where it is written (checked before measuring), the targets, the JSON and the Markdown
table built from it. The JSON is rewritten after every section, atomically, so an interrupted run keeps what it
measured.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .harness import GIB, REPO_ROOT

SCHEMA = "mm2latent-speed/2"
GB = 10**9  # targets are in GB (10^9 bytes): stricter than GiB

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
#: Where results go without ``--out``.
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class OutputPathError(ValueError):
    """``--out`` cannot be written: raised before anything is measured."""


# ------------------------------------------------------------------------------------------------ targets


def evaluate_targets(results: dict) -> list[dict]:
    """Each target of the issue with its value, threshold and ``met`` (None where it does not apply or its section
    did not run)."""
    meta = results["meta"]
    cuda = meta["device"]["type"] == "cuda"
    half = meta["dtype"] in ("float16", "bfloat16")
    full = meta["preset"] != "tiny"
    e2e, stages, throughput = (results.get(k, {}) for k in ("end_to_end", "stages", "throughput"))
    targets = []

    def figure(section: dict, key: str, field: str = "median_ms", scale: float = 1.0):
        """A measured figure / scale, or None when its section did not run (failed, skipped, interrupted)."""
        value = section.get(key, {}).get(field)
        return None if value is None else value / scale

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
        add("fast mode, batch 1 (ms per 1024² face)", figure(e2e, "fast"), "<=", GPU_FAST_MS, half and full, why)
        add("StyleGAN2 synthesis (ms)", figure(stages, "stylegan2_synthesis"), "<=", GPU_SYNTH_MS, half and full, why)
        add("peak GPU memory, fast mode batch 1 (GB)", figure(e2e, "fast", "peak_bytes", GB), "<=", GPU_PEAK_GB,
            half and full, why)
        b8 = throughput.get("batch_8", {}).get("faces_per_s")
        add("batch 8 throughput (faces/s)", b8, ">=", GPU_BATCH8_FPS, half and full and b8 is not None,
            why or "batch 8 not measured")
    else:
        add("fast mode, batch 1 on CPU (s per face)", figure(e2e, "fast", scale=1e3), "<=", CPU_FAST_S, full,
            "tiny preset")
        add("peak RSS, fast mode batch 1 (GB)", figure(e2e, "fast", "peak_bytes", GB), "<=", CPU_RSS_GB, full,
            "tiny preset")
        cold = results.get("cold_start", {}).get("peak_rss_bytes")
        add("peak RSS of a fresh process making one image (GB)", cold / GB if cold else None, "<=", CPU_RSS_GB,
            full and bool(cold), "tiny preset or no cold start")
    share = results.get("space_overhead", {}).get("overhead_share")
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
    """The Markdown table of a results JSON: every figure shown is read from ``results`` (sections that did not run
    are left out; failed or interrupted ones are listed with their error)."""
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
        if key in results.get("stages", {}):
            lines.append(_row(label, results["stages"][key]))
    for key, item in results.get("end_to_end", {}).items():
        lines.append(_row(f"**{key.replace('_', ' ')}**", item, f"peak {item['peak_bytes'] / GIB:.2f} GiB"))
    for key, item in results.get("throughput", {}).items():
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
    so = results.get("space_overhead")
    if so:
        parts = ", ".join(f"{k.replace('_', ' ')} {v['median_ms']:.1f}" for k, v in so["parts"].items())
        lines.append(f"Space overhead per request: {so['overhead_ms']:.1f} ms = {100 * so['overhead_share']:.1f}% of "
                     f"model time ({so['model_ms']:.1f} ms) [{parts} ms]; with PNG level 1: "
                     f"{so['overhead_ms_png_level1']:.1f} ms = {100 * so['overhead_share_png_level1']:.1f}%")
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
            elif key == "precision" and "fast" in results.get("end_to_end", {}):
                main = results["end_to_end"]["fast"]["median_ms"]
                for name, entry in ab.items():
                    if isinstance(entry, dict):
                        other = entry["fast"]["median_ms"]
                        lines.append(f"| fast mode in {name} (vs {ab['main_dtype']}) | {other:.1f} | {main:.1f} | "
                                     f"{main / other:.2f}× |")
    unfinished = {name: s for name, s in results.get("section_status", {}).items() if s["status"] != "done"}
    if unfinished:
        lines += ["", "| section | status | error |", "|---|---|---|"]
        for name, status in unfinished.items():
            error = status.get("error", "").splitlines()[-1:] or [""]
            lines.append(f"| {name} | **{status['status']}** | {error[0]} |")
    lines += ["", "| target | value | threshold | met |", "|---|---:|---:|---|"]
    for t in results.get("targets", []):
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t['op']} {t['threshold']} | {met} |")
    return "\n".join(lines) + "\n"


def _fmt_load(load) -> str:
    return "—" if not load else f"{load[0]:.2f}"



def default_stem(args) -> str:
    """``<device>[-<preset>][-<dtype>]``: the preset when not full-random, the dtype when not the device's default."""
    stem = args.device
    if args.preset != "full-random":
        stem += "-" + _slug(args.preset)
    if args.dtype != ("float16" if args.device == "cuda" else "float32"):
        stem += "-" + args.dtype
    return stem


def output_paths(out: Path | None, args) -> tuple[Path, Path]:
    """(JSON path, Markdown path) for ``--out``, checked before anything is measured.

    ``out`` may be None (``benchmarks/results/<default stem>.json``), an existing folder or a path ending in a
    separator (``<folder>/<device>[-<preset>]-<dtype>.json``: the dtype always named, so runs in several
    precisions can share a folder), or a ``.json`` file path (the ``.md`` goes next to it). The folder is created
    and a probe file written and deleted in it, so a bad path or an unwritable folder fails now, not after the
    measurements.

    Raises:
        OutputPathError: a path that is neither a folder nor a .json file, or that cannot be written.
    """
    if out is None:
        json_path = RESULTS_DIR / f"{default_stem(args)}.json"
    else:
        text = str(out)
        out = Path(text).expanduser()
        if out.is_dir() or text.endswith((os.sep, "/")):
            stem = args.device + (f"-{_slug(args.preset)}" if args.preset != "full-random" else "") + f"-{args.dtype}"
            json_path = out / f"{stem}.json"
        elif out.suffix == ".json":
            json_path = out
        else:
            raise OutputPathError(f"--out {text}: give an existing folder (or a path ending in '/') or a .json file")
    json_path = json_path.resolve()
    if json_path.is_dir():
        raise OutputPathError(f"--out: {json_path} is a folder; name a .json file or pass the folder itself")
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=json_path.parent, prefix=".speed-probe-"):
            pass
    except OSError as error:
        blocking = next((p for p in json_path.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise OutputPathError(f"--out: {blocking} is a file, so {json_path.parent} cannot be a folder") from error
        raise OutputPathError(f"--out: cannot write to {json_path.parent}: {error.strerror or error}") from error
    return json_path, json_path.with_suffix(".md")


def _slug(preset: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", preset).strip("_")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)  # as a plain open() would create it (temporary files are private)
    os.replace(handle.name, path)


def write_report(results: dict, json_path: Path, markdown_path: Path) -> str:
    """Write the JSON and its Markdown table (both atomically); returns the table."""
    write_atomically(json_path, json.dumps(results, indent=2, allow_nan=False, default=str) + "\n")
    table = render_markdown(results)
    write_atomically(markdown_path, table)
    return table
