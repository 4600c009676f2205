"""Start-to-page: seconds from `python app.py` to the first page served (HTTP 200 on `/`).

Starts the Space offline on the tiny presets (``MM2LATENT_MODEL_REPO=tiny``, ``HF_HUB_OFFLINE=1``) ``--runs``
times, one after the other, and prints each time and the median (docs/performance.md, "Start-up").

    python benchmarks/startup.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_to_page(model: str, timeout_s: float, app: Path = APP) -> float:
    """One start: seconds until ``/`` answers 200 (the process is stopped afterwards)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(app.parent), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "MM2LATENT_MODEL_REPO": model, "MM2LATENT_SERVER_NAME": "127.0.0.1",
               "MM2LATENT_SERVER_PORT": str(port), "GRADIO_TEMP_DIR": str(Path(workdir) / "gradio")}
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(app)], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout_s:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except OSError:
                    time.sleep(0.1)
            raise RuntimeError(f"no page within {timeout_s:.0f} s")
        finally:
            process.terminate()
            process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="starts to measure (default 3)")
    parser.add_argument("--model", default="tiny", help="MM2LATENT_MODEL_REPO (default tiny)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one start")
    parser.add_argument("--app", type=Path, default=APP, help="the app to start (default: this checkout's app.py)")
    args = parser.parse_args(argv)
    times = []
    for run in range(args.runs):
        times.append(start_to_page(args.model, args.timeout, args.app.resolve()))
        print(f"run {run + 1}: {times[-1]:.1f} s", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({"model": args.model, "seconds": [round(t, 2) for t in times],
                      "median_s": round(statistics.median(times), 2), "cpus": os.cpu_count(), "load_average_1min": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
