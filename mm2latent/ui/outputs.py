"""What a run hands back to the visitor: files to download, attention overlays and a summary line."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs.metadata import save_png
from .disk import GradioCacheLimit, claim_store_folder  # noqa: F401  (GradioCacheLimit moved to .disk)

OVERLAY_SIZE = 256
# An inferno-like colour ramp for attention strength 0 -> 1.
_HEAT_STOPS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


# --------------------------------------------------------------------------------------------
# Attention overlays
# --------------------------------------------------------------------------------------------


def heat_colours(strength: np.ndarray) -> np.ndarray:
    """HxW values in [0, 1] -> HxWx3 float RGB (0..255) on the colour ramp."""
    position = np.clip(strength, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT_STOPS) - 2)
    fraction = (position - low)[..., None]
    return _HEAT_STOPS[low] * (1.0 - fraction) + _HEAT_STOPS[low + 1] * fraction


# The colour ramp looked up at 256 levels (one table lookup per pixel instead of float interpolation).
_HEAT_TABLE = heat_colours(np.linspace(0.0, 1.0, 256)).astype(np.float32)


def _picture(base: Image.Image, size: int) -> np.ndarray:
    return np.asarray(base.convert("RGB").resize((size, size), Image.Resampling.NEAREST), dtype=np.float32)


def _blend(picture: np.ndarray, attention: np.ndarray) -> Image.Image:
    size = picture.shape[0]
    heat_map = Image.fromarray(np.asarray(attention, dtype=np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    strength = np.clip(np.asarray(heat_map), 0.0, 1.0)
    alpha = (0.35 + 0.5 * strength)[..., None]
    colours = _HEAT_TABLE[np.rint(strength * 255).astype(np.uint8)]
    return Image.fromarray(np.rint(picture + (colours - picture) * alpha).astype(np.uint8))


def overlay_attention(base: Image.Image, attention: np.ndarray, size: int = OVERLAY_SIZE) -> Image.Image:
    """One word's attention map (HxW in [0, 1]) laid over ``base``, both shown at ``size``."""
    return _blend(_picture(base, size), attention)


def attention_gallery(base: Image.Image, words: list[str], maps) -> list[tuple[Image.Image, str]]:
    """(overlay, word) per word for one image; ``maps`` is [n_words, H, W]."""
    if maps is None or not words:
        return []
    maps = np.asarray(maps, dtype=np.float32)
    picture = _picture(base, OVERLAY_SIZE)  # resized once for all words
    return [(_blend(picture, maps[i]), word) for i, word in enumerate(words[: len(maps)])]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class OutputStore:
    """Per-run folders under one temporary root, kept only while they can still be needed.

    Gradio copies every file a handler returns into its own cache before the response is sent, so a
    run's folder is only needed for that moment: the newest ``max_runs`` folders are kept (room for
    the runs in flight) and older ones are deleted when a new run starts, as is any folder older than
    ``max_age_s``. A root this store created is removed when the store is garbage-collected or the
    process exits.

    Args:
        root: the folder to write into (default: a new temporary folder).
        max_runs: how many run folders to keep.
        max_age_s: the oldest a run folder may get.
    """

    def __init__(self, root: str | Path | None = None, max_runs: int = 16, max_age_s: float = 3600.0):
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mm2latent-space-"))
            # The stores of dead processes (kill -9: no finalizer ran) go now; this one is marked as alive.
            self._claim = claim_store_folder(self.root)
            weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)
        else:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, got {max_runs}")
        self.max_runs = max_runs
        self.max_age_s = max_age_s
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        with self._lock:
            self._prune(keep=self.max_runs - 1)
            folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
        return folder

    def prune(self) -> None:
        """Delete folders beyond the newest ``max_runs`` and folders older than ``max_age_s``."""
        with self._lock:
            self._prune(keep=self.max_runs)

    def _prune(self, keep: int) -> None:
        folders = []
        for folder in self.root.iterdir():
            try:
                if folder.is_dir():
                    folders.append((folder.stat().st_mtime, folder.name, folder))
            except FileNotFoundError:
                continue
        folders.sort(reverse=True)  # newest first
        oldest_kept = time.time() - self.max_age_s
        for rank, (modified, _, folder) in enumerate(folders):
            if rank >= keep or modified < oldest_kept:
                shutil.rmtree(folder, ignore_errors=True)


@dataclass
class SavedRun:
    pngs: list[Path]
    latents: Path


def image_settings(settings: dict, seeds: list[int], index: int) -> dict:
    """The settings that reproduce image ``index`` of a batch on its own."""
    return {**settings, "seed": seeds[index], "num_images": 1, "batch_seed": settings.get("seed"),
            "batch_index": index}


def save_run(folder: Path, images: list[Image.Image], latents, seeds: list[int], settings: dict, stem: str) -> SavedRun:
    """PNG files with generation metadata (marked AI-generated) and one ``.npy`` of the W+ latents."""
    pngs = []
    for index, image in enumerate(images):
        path = folder / f"{stem}-seed{seeds[index]}.png"
        save_png(image, path, image_settings(settings, seeds, index))
        pngs.append(path)
    latent_path = save_latents(folder / f"{stem}-seed{seeds[0]}-wplus.npy", latents)
    return SavedRun(pngs=pngs, latents=latent_path)


def save_latents(path: Path, latents) -> Path:
    """W+ latents ([N, L, D]) as a float32 ``.npy`` (plain data: ``np.load`` needs no pickle)."""
    np.save(path, np.asarray(latents, dtype=np.float32))
    return path


def file_stem(prompt: str, what: str) -> str:
    """'mm2latent-mask-she-has-long-wavy' : safe, short, recognisable file names."""
    words = re.findall(r"[a-z0-9]+", (prompt or "").lower())[:5]
    return "-".join(["mm2latent", what, *words])[:80]


def describe_run(settings: dict, seeds: list[int], elapsed_s: float, device: str,
                 closeness: list[dict] | None = None) -> str:
    """One Markdown line: the seed of each image and how it was made; in the training-free mode a second line
    says how close the first face is to the diffusion drawing it was inverted from (``output.closeness``)."""
    seed_text = ", ".join(f"`{seed}`" for seed in seeds)
    noun = "Seed" if len(seeds) == 1 else "Seeds"
    if settings.get("engine") == "mm2latent":
        how = "MM2Latent engine (no diffusion model)"
    elif settings.get("mode") == "fast":
        how = "fast mode (one U-Net pass)"
    elif settings.get("mode") == "invert":
        drawing = "few-step LCM drawing" if settings.get("drawing") == "fast" else "diffusion steps"
        how = (f"training-free mode ({settings.get('num_steps')} {drawing}, inverted by the photo encoder, "
               f"{settings.get('refine_steps') or 0} refinement steps)")
    else:
        how = f"quality mode ({settings.get('num_steps')} steps, features from {len(settings.get('feature_steps', []))})"
    visual = ["sketch" if name == "scribble" else name for name in settings.get("inputs", [])]
    inputs = " + ".join((["text"] if settings.get("prompt") else []) + visual) or "text"
    line = (f"**{noun}:** {seed_text} &nbsp;·&nbsp; {how} &nbsp;·&nbsp; ψ = {settings.get('truncation'):g} "
            f"&nbsp;·&nbsp; from {inputs} &nbsp;·&nbsp; {elapsed_s:.1f} s on {device}")
    if closeness:
        return line + "  \n" + describe_closeness(closeness[0])
    return line


def describe_closeness(closeness: dict) -> str:
    """How close the face is to the diffusion drawing: L2 and LPIPS (lower is closer), the mask's mIoU (higher)."""
    parts = [f"L2 {closeness['l2']:.3f}"]
    if closeness.get("lpips") is not None:
        parts.append(f"LPIPS {closeness['lpips']:.3f}")
    if closeness.get("miou") is not None:
        parts.append(f"mask mIoU {100 * closeness['miou']:.0f} %")
    return "**Closeness to the drawing:** " + " &nbsp;·&nbsp; ".join(parts)
