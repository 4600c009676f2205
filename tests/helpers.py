"""Helpers shared by several test files (fixtures live in conftest.py): a running Space, small bad files, the
huggingface_hub cache layout, and the identity score an edit should show.

Test files import these from here, never from one another.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "app.py"

# --------------------------------------------------------------------------------------------
# The Space, launched as `python app.py`
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_space(workdir: Path, **env_overrides: str):
    """`python app.py` in a subprocess (offline, analytics off); yields its URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MM2LATENT_SERVER_NAME": "127.0.0.1", "MM2LATENT_SERVER_PORT": str(port),
           "GRADIO_EXAMPLES_CACHE": str(workdir / "examples-cache"), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           "TOKENIZERS_PARALLELISM": "false", **env_overrides}
    log_path = workdir / "app.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(APP)], cwd=workdir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_until_serving(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"app.py did not start within {timeout_s:.0f} s:\n{log_path.read_text()[-4000:]}")


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def edit_identity(pipe, aligned: str | Path, latent_file: str | Path) -> float:
    """The identity score an edit should show: the ArcFace cosine of the aligned photo and the face the edit's
    downloaded W+ latent renders, with the identity network the ``tiny`` preset edits with."""
    import numpy as np
    import torch

    from mm2latent.editing.methods import identity_similarity
    from mm2latent.pipelines.presets import build_tiny_editing_components

    identity = build_tiny_editing_components(pipe.generator)["identity"]
    latent = torch.from_numpy(np.load(latent_file, allow_pickle=False))
    with Image.open(aligned) as photo:
        return identity_similarity(identity, photo.convert("RGB"), pipe.render(latent).float())


# --------------------------------------------------------------------------------------------
# Bad files, made small
# --------------------------------------------------------------------------------------------


def huge_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (100 MP by default)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length (4), type (4), data (13), crc (4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    path.write_bytes(bytes(data))
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("this is a text file wearing a .png name\n")
    return path


# --------------------------------------------------------------------------------------------
# The huggingface_hub cache
# --------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo_id: str, folder) -> None:
    """Lay a folder out the way huggingface_hub caches a downloaded model repository."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
