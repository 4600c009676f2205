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

import torch
from PIL import Image
from torch import nn

from mm2latent.models.networks import IRSE50, BiSeNet
from mm2latent.models.stylegan2 import StyleGAN2Generator

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


# ---------------------------------------------------------------------------------------------- public checkpoint files
# Small checkpoints in the layouts of the published files (see docs/checkpoints.md), shared by the converter and
# doctor tests.

# Toy IR-SE stages: depths must increase, as in every real IR-50/100/152 (stages are read off the depths).
TINY_STAGES = ((8, 8, 1), (8, 16, 2), (16, 24, 1), (24, 32, 1))
WIDTH = 32  # the toy generators' and encoders' W width


def randomize_batchnorms(module: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, so a wrong key cannot hide behind an identity BN."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return module.eval()


def tiny_generator(seed: int = 0) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    g = StyleGAN2Generator(resolution=32, style_dim=WIDTH, n_mlp=2, channel_base=256, channel_max=32).eval()
    g.latent_avg.normal_()
    return g


def rosinality_file() -> tuple[dict, StyleGAN2Generator]:
    """rosinality's convert_weight.py output (the public ffhq.pt): ``{"g_ema", "latent_avg"}`` (convert_weight.py:254)."""
    g = tiny_generator(2)
    return {"g_ema": g.rosinality_state_dict(), "latent_avg": g.latent_avg.clone()}, g


def bisenet_file() -> tuple[dict, BiSeNet]:
    torch.manual_seed(3)
    net = randomize_batchnorms(BiSeNet(num_classes=19, width=8))
    return {k: v.clone() for k, v in net.state_dict().items()}, net


def ir_se50_file() -> tuple[dict, IRSE50]:
    torch.manual_seed(4)
    net = randomize_batchnorms(IRSE50(stages=TINY_STAGES, embedding_dim=16, input_size=112, se_reduction=4))
    return {k: v.clone() for k, v in net.state_dict().items()}, net


def put_file_in_cache(cache, tmp_path, repo_id: str, path: str, checkpoint, legacy: bool = False) -> None:
    folder = tmp_path / "upload" / repo_id.replace("/", "--")
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, folder / path, _use_new_zipfile_serialization=not legacy)
    put_in_cache(cache, repo_id, folder)
