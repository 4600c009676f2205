"""The I^d_0 cache: what the diffusion model itself draws for each training sample, made once before training.

I^d_0 of a sample is drawn by :meth:`FacePipeline.draw` (DDIM with classifier-free guidance, the unconditional
pass batched) from the sample's VAE latent noised to t ≈ ``idd_strength``·T, under exactly the text and visual
input T sees for it: one entry per (image id, modality combination, caption). With ``modality_sampling: one``
and modalities [mask, scribble] an image has a mask entry and a scribble entry; with ``all`` one entry of both.

Layout of the cache folder::

    settings.json    everything that changes an image (steps, strength, guidance, scheduler, model, seed, size)
    entries.jsonl    one line per image: key, image_id, modalities, caption, file
    {key}.png        I^d_0 at the generator's resolution

A cache whose ``settings.json`` differs from the run's settings is refused with a message naming the
differences (``diffusion.idd_stale_cache: refuse``, the default: a rebuild can take hours) or deleted and rebuilt
(``rebuild``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..inputs.images import image_to_tensor, tensor_to_pil
from ..models.few_step import LCM_LORA_REPO, FewStepLoRA, make_scheduler
from ..pipelines.generation import FacePipeline
from .config import ConfigError, TrainingConfig, loss_targets

__all__ = ["CachedDiffusionImages", "DiffusionImageCache", "StaleCacheError", "build_idd_cache", "cache_key",
           "cache_settings", "item_captions", "modality_combinations", "needs_idd_cache", "plan_idd_cache"]

CACHE_FORMAT = "mm2latent-idd-cache"
SETTINGS_FILE = "settings.json"
ENTRIES_FILE = "entries.jsonl"
# An RGB face PNG: ~0.8 bytes per pixel (the 1024² test photos as PNG: 0.6-1.1 MB).
PNG_BYTES_PER_PIXEL = 0.8


class StaleCacheError(ConfigError):
    """The I^d_0 cache on disk was made with other settings than the run's."""


def needs_idd_cache(config: TrainingConfig) -> bool:
    """Whether a stage-1 / stage-2 run compares anything with I^d_0."""
    return config.stage in (1, 2) and "idd" in loss_targets(config)


def modality_combinations(modalities: list[str], available: list[str], sampling: str) -> list[tuple[str, ...]]:
    """The visual inputs a micro-batch can get: each modality alone ("one") or all together ("all")."""
    names = sorted(m for m in modalities if m in available)
    if sampling == "all" or len(names) <= 1:
        return [tuple(names)]
    return [(name,) for name in names]


def combination_name(modalities: tuple[str, ...] | list[str]) -> str:
    """``("mask", "scribble")`` -> ``"mask+scribble"`` (``"text"`` for none)."""
    return "+".join(sorted(modalities)) or "text"


def cache_key(image_id: int, modalities: tuple[str, ...] | list[str], caption: str) -> str:
    """The entry of one (image, visual inputs, caption): also its file name."""
    digest = hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]
    return f"{int(image_id)}_{combination_name(modalities)}_{digest}"


def _weights_digest(modules: dict[str, torch.nn.Module]) -> str:
    """A cheap fingerprint of the diffusion weights: the first 4096 values of the first, middle and last tensor.

    Hashing every SD-1.5 weight would take longer than it is worth; a retrained or other checkpoint differs in
    these tensors too.
    """
    digest = hashlib.sha1()
    for name in sorted(name for name, module in modules.items() if module is not None):
        tensors = list(modules[name].state_dict().values())
        for tensor in (tensors[0], tensors[len(tensors) // 2], tensors[-1]):
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_settings(config: TrainingConfig, pipe: FacePipeline, combinations: list[tuple[str, ...]]) -> dict:
    """Every setting that changes a cached image (compared with the cache's ``settings.json``)."""
    diffusion, encoder = config.diffusion, pipe.encoder
    modules = {"unet": encoder.unet, "text_encoder": encoder.text_encoder, "vae": encoder.vae}
    modules.update({f"controlnet_{m}": encoder.controlnet(m) for combo in combinations for m in combo})
    return {
        "_format": CACHE_FORMAT,
        "steps": diffusion.idd_steps,
        "strength": diffusion.idd_strength,
        "guidance_scale": diffusion.idd_guidance_scale,
        "caption_index": diffusion.idd_caption_index,
        **({} if diffusion.idd_captions_per_image is None else {"captions_per_image": diffusion.idd_captions_per_image}),
        "scheduler": {k: v for k, v in dict(encoder.scheduler_config).items() if not k.startswith("_")},
        "model": {"pipeline": config.pipeline, "components": config.components, "weights": _weights_digest(modules)},
        "seed": config.seed,
        "resolution": pipe.generator.resolution,
        # Only an LCM cache names its sampler, so that DDIM caches made before the option stay valid.
        **({"sampler": {"name": "lcm", "steps": diffusion.idd_lcm_steps, "lora": LCM_LORA_REPO}}
           if diffusion.idd_sampler == "lcm" else {}),
    }


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: cache {old.get(k)!r}, run {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_cache_folder(cache_dir: Path, settings: dict, policy: str) -> None:
    """Check a cache's settings against the run's (refuse or wipe a stale one); write them to a new cache."""
    path = cache_dir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON
        if old == settings:
            return
        changed = "; ".join(_differences(old, settings))
        if policy != "rebuild":
            raise StaleCacheError(
                f"the I^d_0 cache {cache_dir} was made with other settings ({changed}). Delete it, point "
                "output_dir elsewhere, or pass --set diffusion.idd_stale_cache=rebuild to rebuild it")
        shutil.rmtree(cache_dir)
    elif cache_dir.is_dir() and any(cache_dir.iterdir()):
        if policy != "rebuild":
            raise StaleCacheError(f"{cache_dir} holds files but no {SETTINGS_FILE}: not an I^d_0 cache of this "
                                  "version. Delete it or pass --set diffusion.idd_stale_cache=rebuild")
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


class DiffusionImageCache:
    """A cache folder's entries: ``key -> {"image_id", "modalities", "caption", "file"}``."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.settings = json.loads((self.root / SETTINGS_FILE).read_text())
        self.entries: dict[str, dict] = {}
        path = self.root / ENTRIES_FILE
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    if (self.root / entry["file"]).is_file():  # a line whose image write was interrupted is skipped
                        self.entries[entry["key"]] = entry

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def image(self, key: str, size: int) -> torch.Tensor:
        """The cached I^d_0 of an entry, [3, size, size] in [-1, 1]."""
        if key not in self.entries:
            raise KeyError(f"no I^d_0 for {key} in {self.root}: the cache was built for other samples (rebuild it)")
        with Image.open(self.root / self.entries[key]["file"]) as image:
            return image_to_tensor(image, size)[0]


@torch.no_grad()
def build_idd_cache(config: TrainingConfig, pipe: FacePipeline, dataset: Dataset, cache_dir: str | Path,
                    rank: int = 0, world_size: int = 1, few_step: FewStepLoRA | None = None) -> list[tuple[str, ...]]:
    """Draw I^d_0 for this rank's share of the dataset (entries already there are kept); returns the combinations.

    Call :func:`prepare_cache_folder` first (once, on the main process). Every sample's noise and VAE sample are
    seeded by (seed, image id), so a resumed or multi-process build makes the same images. With
    ``diffusion.idd_sampler: lcm`` the LCM-LoRA (``few_step``, default the published one) is fused into the U-Net
    for the build and unfused after it (training reads the plain U-Net's features).
    """
    if config.diffusion.idd_sampler == "lcm":
        few_step = few_step or FewStepLoRA.from_pretrained()
        few_step.fuse(pipe.encoder.unet)
        try:
            return _build_idd_cache(config, pipe, dataset, cache_dir, rank, world_size)
        finally:
            few_step.unfuse(pipe.encoder.unet)
    return _build_idd_cache(config, pipe, dataset, cache_dir, rank, world_size)


def _build_idd_cache(config: TrainingConfig, pipe: FacePipeline, dataset: Dataset, cache_dir: str | Path,
                     rank: int, world_size: int) -> list[tuple[str, ...]]:
    cache_dir = Path(cache_dir)
    diffusion, encoder = config.diffusion, pipe.encoder
    combinations = modality_combinations(config.data.modalities, encoder.modalities, config.data.modality_sampling)
    done = DiffusionImageCache(cache_dir)
    size = pipe.generator.resolution
    todo = []
    for position in range(rank, len(dataset), world_size):
        item = None
        for caption in item_captions(dataset, position):
            for combo in combinations:
                if item is None:
                    item = dataset[(position, 0)]
                if cache_key(item["image_id"], combo, caption) not in done:
                    todo.append(({**item, "caption": caption}, combo))
    with open(cache_dir / ENTRIES_FILE, "a", encoding="utf-8") as log:
        for combo in combinations:
            jobs = [item for item, c in todo if c == combo]
            for start in range(0, len(jobs), diffusion.idd_batch_size):
                items = jobs[start:start + diffusion.idd_batch_size]
                images = draw_targets(config, pipe, items, combo)
                for item, image in zip(items, tensor_to_pil(resize_images(images, size))):
                    key = cache_key(item["image_id"], combo, item["caption"])
                    image.save(cache_dir / f"{key}.png")
                    entry = {"key": key, "image_id": int(item["image_id"]), "modalities": list(combo),
                             "caption": item["caption"], "file": f"{key}.png"}
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
    return combinations


def item_captions(dataset: Dataset, position: int) -> list[str]:
    """Every caption an item of ``position`` can carry (one entry each), or its one caption."""
    if hasattr(dataset, "candidate_captions"):
        return dataset.candidate_captions(position)
    return [dataset[(position, 0)]["caption"]]


def plan_idd_cache(num_images: int, captions_per_image: float, num_combinations: int, resolution: int,
                   seconds_per_entry: float | None = None) -> dict:
    """The size and cost of an I^d_0 cache: entries, disk (PNG at ~0.8 bytes per pixel) and drawing time
    (``seconds_per_entry`` each, e.g. measured by the dry run)."""
    entries = int(round(num_images * captions_per_image * num_combinations))
    plan = {"entries": entries, "bytes": int(entries * resolution * resolution * PNG_BYTES_PER_PIXEL)}
    if seconds_per_entry is not None:
        plan["hours"] = entries * seconds_per_entry / 3600
    return plan


def draw_targets(config: TrainingConfig, pipe: FacePipeline, items: list[dict], combo: tuple[str, ...]) -> torch.Tensor:
    """I^d_0 of a batch of dataset items under the visual inputs ``combo``: [B, 3, H, W] at the encoder's size."""
    encoder, diffusion = pipe.encoder, config.diffusion
    seeds = [torch.Generator().manual_seed(config.seed * 1_000_003 + int(it["image_id"])) for it in items]
    pixels = torch.stack([it["pixel_values"] for it in items]).to(encoder.device, encoder.dtype)
    z0 = torch.cat([encoder.encode_images(p[None], generator=g) for p, g in zip(pixels, seeds)])
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in seeds]).to(z0.device, z0.dtype)
    controls = {m: torch.stack([it["controls"][m] for it in items]).to(encoder.device, encoder.dtype) for m in combo}
    sampler = {"num_steps": diffusion.idd_steps, "guidance_scale": diffusion.idd_guidance_scale}
    if diffusion.idd_sampler == "lcm":  # each item's generator goes on to give its LCM step noise
        sampler = {"num_steps": diffusion.idd_lcm_steps, "guidance_scale": 1.0, "generator": seeds,
                   "scheduler": make_scheduler("lcm", encoder.scheduler_config)}
    drawing = pipe.draw(pipe.encode_prompts([it["caption"] for it in items]), controls, noise,
                        init_latents=z0, strength=diffusion.idd_strength, **sampler)
    return drawing.images


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, size, size], bilinear with antialiasing (a no-op at that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.float()
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class CachedDiffusionImages(Dataset):
    """Adds the cached I^d_0 of every visual-input combination to each item of a dataset.

    ``item["idd"]`` maps a combination name ("mask", "scribble", "mask+scribble") to I^d_0 [3, R, R];
    ``item["idd_key"]`` maps it to the cache key (the image id, the modalities and the item's caption).
    """

    def __init__(self, base: Dataset, cache: DiffusionImageCache, size: int, combinations: list[tuple[str, ...]]):
        self.base, self.cache, self.size, self.combinations = base, cache, size, combinations

    def __len__(self) -> int:
        return len(self.base)

    @property
    def ids(self) -> list[int]:
        return self.base.ids

    def __getitem__(self, key):
        item = self.base[key]
        keys = {combination_name(c): cache_key(item["image_id"], c, item["caption"]) for c in self.combinations}
        item["idd"] = {name: self.cache.image(k, self.size) for name, k in keys.items()}
        item["idd_key"] = keys
        return item
