#!/usr/bin/env python
"""Soak benchmark: the Space's memory and disk over many fast generations.

    python benchmarks/soak.py                                  # tiny preset, 2 x 400 calls after 30 warm-up calls
    python benchmarks/soak.py --calls 1000 --every 100 --preset mm2latent/mm2latent-celebahq
    python benchmarks/soak.py --app /path/to/other/checkout/app.py --out benchmarks/results/soak-before

Starts ``python app.py`` in a subprocess on 127.0.0.1 (its temporary folders inside a scratch folder),
generates ``--calls`` faces per phase in fast mode, each with its own prompt and seed, and after every
``--every`` calls records the server's resident memory (RSS), the files in Gradio's cache and in the
Space's output store, and the stray temporary files. Two phases by default:

* ``client``: one gradio_client ``Client``, i.e. one visitor session (what the issue measured);
* ``fresh``: raw ``/gradio_api/call`` requests, a new session each time (a crowd of one-off API
  callers: what fills Gradio's per-session state).

Writes ``--out`` + ``.json`` and ``.md`` (default ``benchmarks/results/soak-<preset>``). Settings the
server reads (``MM2LATENT_MAX_SESSIONS``, ``MM2LATENT_CACHE_MAX_FILES``, ...) pass through from the
environment.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "mm2latent-soak/1"
MIB = 2**20
WORDS = ("smiling", "young", "bearded", "wavy", "blonde", "bald", "freckled", "tired", "grey", "calm")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(app: Path, workdir: Path, preset: str, timeout_s: float = 600.0):
    """``python app.py`` on a free local port; yields (url, process)."""
    port = free_port()
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MM2LATENT_MODEL_REPO": preset, "MM2LATENT_SERVER_NAME": "127.0.0.1",
           "MM2LATENT_SERVER_PORT": str(port), "MM2LATENT_CACHE_EXAMPLES": "off",
           "GRADIO_TEMP_DIR": str(workdir / "gradio"), "GRADIO_EXAMPLES_CACHE": str(workdir / "examples-cache"),
           "TMPDIR": str(workdir / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    url = f"http://127.0.0.1:{port}/"
    with open(workdir / "app.log", "w") as app_log:
        process = subprocess.Popen([sys.executable, str(app)], cwd=workdir, env=env, stdout=app_log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited:\n{(workdir / 'app.log').read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"app.py did not start in {timeout_s:.0f} s") from None
                    time.sleep(0.5)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def prompt_for(index: int) -> str:
    """A different prompt per call (so the text-encoder cache sees new prompts, as on a real Space)."""
    words = [WORDS[(index // 10**k) % len(WORDS)] for k in range(3)]
    return f"A {words[0]} {words[1]} person, {words[2]}, number {index}."


def request_for(index: int) -> list:
    blank = {"background": None, "layers": [], "composite": None, "id": None}
    return [prompt_for(index), blank, "fast", 20, "all", "mean", index, False, 1.0, 1, False, "ddgi"]


def fresh_session_call(url: str, data: list) -> None:
    """One /gradio_api/call request: Gradio gives it a session of its own."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{url}gradio_api/call/generate_from_mask", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate_from_mask/{event_id}", timeout=300) as response:
        stream = response.read().decode()
    if "event: complete" not in stream:
        raise RuntimeError(f"generation failed: {stream[-500:]}")


def count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for path in folder.rglob(pattern) if path.is_file()) if folder.exists() else 0


def snapshot(process, workdir: Path, calls: int, started: float) -> dict:
    import psutil

    temp = workdir / "tmp"
    stores = list(temp.glob("mm2latent-space-*"))
    return {
        "calls": calls,
        "rss_mib": round(psutil.Process(process.pid).memory_info().rss / MIB, 1),
        "gradio_cache_files": count_files(workdir / "gradio"),
        "output_store_files": sum(count_files(store) for store in stores),
        "stray_temp_files": sum(1 for path in temp.rglob("*") if path.is_file()
                                and not any(store in path.parents for store in stores)),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def run_phase(name: str, url: str, process, workdir: Path, calls: int, every: int, first_index: int) -> list[dict]:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False) if name == "client" else None
    started = time.perf_counter()
    rows = [snapshot(process, workdir, 0, started)]
    for done in range(1, calls + 1):
        data = request_for(first_index + done)
        if client is not None:
            client.predict(*data, api_name="/generate_from_mask")
        else:
            fresh_session_call(url, data)
        if done % every == 0:
            rows.append(snapshot(process, workdir, done, started))
            log(f"{name}: {rows[-1]}")
    return rows


def summarise(rows: list[dict]) -> dict:
    """RSS growth over the phase and over its second half (a bounded process levels off)."""
    middle = rows[len(rows) // 2]
    return {"rss_growth_mib": round(rows[-1]["rss_mib"] - rows[0]["rss_mib"], 1),
            "rss_growth_second_half_mib": round(rows[-1]["rss_mib"] - middle["rss_mib"], 1),
            "rss_growth_percent": round(100 * (rows[-1]["rss_mib"] / rows[0]["rss_mib"] - 1), 2),
            "max_gradio_cache_files": max(row["gradio_cache_files"] for row in rows),
            "max_stray_temp_files": max(row["stray_temp_files"] for row in rows)}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Soak: {meta['preset']} preset, {meta['app']}", "",
             f"{meta['date']} · {meta['machine']} · warm-up {meta['warmup']} calls · "
             f"limits: {json.dumps(meta['limits'])}", ""]
    for name, phase in results["phases"].items():
        summary = phase["summary"]
        lines += [f"## {name}", "",
                  f"RSS {summary['rss_growth_mib']:+.1f} MiB over the phase ({summary['rss_growth_percent']:+.2f} %), "
                  f"{summary['rss_growth_second_half_mib']:+.1f} MiB over its second half; at most "
                  f"{summary['max_gradio_cache_files']} files in Gradio's cache, "
                  f"{summary['max_stray_temp_files']} stray temporary files.", "",
                  "| calls | RSS MiB | Gradio cache files | output store files | stray temp files | elapsed s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['calls']} | {r['rss_mib']} | {r['gradio_cache_files']} | {r['output_store_files']} | "
                  f"{r['stray_temp_files']} | {r['elapsed_s']} |" for r in phase["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=REPO_ROOT / "app.py", help="the app.py to run")
    parser.add_argument("--preset", default="tiny", help="MM2LATENT_MODEL_REPO for the server (default tiny)")
    parser.add_argument("--calls", type=int, default=400, help="generations per phase")
    parser.add_argument("--every", type=int, default=100, help="calls between two readings")
    parser.add_argument("--warmup", type=int, default=30, help="generations before the first reading")
    parser.add_argument("--phases", nargs="+", choices=("client", "fresh"), default=["client", "fresh"])
    parser.add_argument("--out", type=Path, default=None, help="output stem (.json and .md are added)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.every < 1 or args.calls % args.every:
        parser.error("--calls must be a positive multiple of --every")
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"soak-{Path(args.preset).name}"

    with tempfile.TemporaryDirectory(prefix="mm2latent-soak-") as scratch:
        workdir = Path(scratch)
        log(f"starting {args.app} ({args.preset}) in {workdir}")
        with running_app(args.app.resolve(), workdir, args.preset) as (url, process):
            warm = run_phase("client", url, process, workdir, args.warmup, max(1, args.warmup), 10**6) \
                if args.warmup else []
            phases = {}
            for number, name in enumerate(args.phases):
                rows = run_phase(name, url, process, workdir, args.calls, args.every, number * 10**5)
                phases[name] = {"rows": rows, "summary": summarise(rows)}
    limits = {key: value for key, value in os.environ.items() if key.startswith("MM2LATENT_")}
    results = {
        "schema": SCHEMA,
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                 "app": str(args.app), "preset": args.preset, "warmup": args.warmup,
                 "warmup_rows": warm, "limits": limits, "python": platform.python_version(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg()},
        "phases": phases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
