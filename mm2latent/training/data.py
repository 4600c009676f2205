"""CelebAMask-HQ + Multi-Modal CelebA-HQ data: the ``prepare`` conversion, the dataset and its sampler.

Raw layout (as the datasets ship)::

    CelebAMask-HQ/CelebA-HQ-img/{i}.jpg                          1024² photos, i = 0..29999
    CelebAMask-HQ/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png   512² binary part masks
    MM-CelebA-HQ/text/{i}.txt                                     ~10 captions, one per line

``prepare`` writes, once, one 19-class index map per image (parts painted in the order of the official
``g_mask.py``, later parts overwrite earlier ones), one scribble per image
(:func:`mm2latent.inputs.conditions.edges_from_photo`: Gaussian blur, Sobel gradient, non-maximum suppression,
top-12% magnitude threshold — a Canny-like thin edge map, white on black) and the split files.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..inputs.conditions import CELEBAMASK_CLASSES, mask_to_color, parse_mask
from ..inputs.images import image_to_tensor
from ..inputs.scribbles import scribble_from_photo
from ..models.generator import is_3d

PART_NAMES = CELEBAMASK_CLASSES[1:]  # g_mask.py's label_list: class id = position + 1
IMAGES_PER_FOLDER = 2000
EDGE_DETECTOR = ("mm2latent.inputs.scribbles.scribble_from_photo: PiDiNet (lllyasviel/Annotators table5_pidinet.pth) "
                 "with ControlNet's scribble post-processing; without its weights the offline fallback "
                 "edges_from_photo (Gaussian blur, Sobel gradient, non-maximum suppression, 88th-percentile threshold)")
PREPARED_FORMAT = "mm2latent-celebamask-hq"
SYNTHETIC_WORDS = ("smiling", "blonde hair", "black hair", "young", "old", "eyeglasses", "beard", "bangs")


# ------------------------------------------------------------------------------------------- prepare
def part_mask_path(anno_dir: str | Path, index: int, part: str) -> Path:
    """Where CelebAMask-HQ keeps the ``part`` mask of image ``index``."""
    return Path(anno_dir) / str(index // IMAGES_PER_FOLDER) / f"{index:05d}_{part}.png"


def combine_part_masks(anno_dir: str | Path, index: int, size: int = 512) -> np.ndarray:
    """The per-part binary masks of one image -> one uint8 index map (later parts overwrite earlier)."""
    ids = np.zeros((size, size), dtype=np.uint8)
    for class_id, part in enumerate(PART_NAMES, start=1):
        path = part_mask_path(anno_dir, index, part)
        if path.is_file():
            with Image.open(path) as image:
                part_image = image.convert("L")
                if part_image.size != (size, size):
                    part_image = part_image.resize((size, size), Image.Resampling.NEAREST)
                ids[np.asarray(part_image) > 0] = class_id
    return ids


def image_ids(image_dir: Path) -> list[int]:
    """The numeric ids of the ``{i}.jpg`` / ``{i}.png`` photos of a folder, sorted."""
    return sorted(int(p.stem) for p in image_dir.iterdir() if p.stem.isdigit() and p.suffix.lower() in (".jpg", ".png"))


def image_file(image_dir: Path, index: int) -> Path:
    """The photo ``{index}`` of a folder, whatever its suffix."""
    for suffix in (".jpg", ".png", ".jpeg"):
        path = image_dir / f"{index}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no image {index} in {image_dir}")


def _prepare_one(job: tuple) -> int:
    index, image_dir, anno_dir, mask_dir, out, mask_size, scribble_size = job
    if mask_dir is not None:
        ids = parse_mask(Path(mask_dir) / f"{index}.png", size=mask_size, require_face=False)
    else:
        ids = combine_part_masks(anno_dir, index, mask_size)
    Image.fromarray(ids).save(Path(out) / "masks" / f"{index}.png")
    edges = scribble_from_photo(image_file(Path(image_dir), index), size=scribble_size)
    Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).save(Path(out) / "scribbles" / f"{index}.png")
    return index


def split_ids(ids: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/test split: a seeded permutation, the first ``test_fraction`` is the test set."""
    order = np.random.default_rng(seed).permutation(len(ids))
    num_test = int(round(len(ids) * test_fraction))
    test = sorted(ids[i] for i in order[:num_test])
    train = sorted(ids[i] for i in order[num_test:])
    return train, test


def celebamask_folders(root: Path, image_dir: str | Path | None, text_dir: str | Path | None,
                       mask_dir: str | Path | None) -> tuple[Path, Path, Path]:
    """The photo, mask-annotation and caption folders of a CelebAMask-HQ tree (defaults under ``root``).

    Raises:
        FileNotFoundError: no photo folder, or neither the part masks nor ``mask_dir``.
    """
    image_dir = Path(image_dir) if image_dir is not None else root / "CelebA-HQ-img"
    anno_dir = root / "CelebAMask-HQ-mask-anno"
    text_dir = Path(text_dir) if text_dir is not None else root / "text"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} does not exist: point --root at the CelebAMask-HQ folder")
    if mask_dir is None and not anno_dir.is_dir():
        raise FileNotFoundError(f"{anno_dir} does not exist (or pass --mask-dir with combined masks)")
    return image_dir, anno_dir, text_dir


def write_splits(output: Path, ids: list[int], test_ids: list[int] | None, test_fraction: float,
                 seed: int) -> tuple[list[int], list[int]]:
    """Write ``train.txt`` / ``test.txt`` of a prepared folder: ``test_ids`` when given, else :func:`split_ids`."""
    if test_ids is not None:
        wanted = set(test_ids)
        train, test = [i for i in ids if i not in wanted], [i for i in ids if i in wanted]
    else:
        train, test = split_ids(ids, test_fraction, seed)
    (output / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (output / "test.txt").write_text("".join(f"{i}\n" for i in test))
    return train, test


def prepare(
    root: str | Path,
    output: str | Path,
    text_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    mask_size: int = 512,
    scribble_size: int = 512,
    test_fraction: float = 0.1,
    test_ids: list[int] | None = None,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 0,
) -> Path:
    """Convert a CelebAMask-HQ tree into the layout the trainer reads.

    Args:
        root: the CelebAMask-HQ folder (``CelebA-HQ-img``, ``CelebAMask-HQ-mask-anno``).
        output: where to write ``masks/``, ``scribbles/``, ``train.txt``, ``test.txt``, ``dataset.json``.
        text_dir: Multi-Modal CelebA-HQ ``text/`` folder (default ``root/text``).
        mask_dir: already combined masks ``{i}.png`` (index, palette or colour maps) instead of the part files.
        mask_size: size of the written index maps.
        scribble_size: size of the written edge maps.
        test_fraction: share of images in the test split (ignored with ``test_ids``).
        test_ids: explicit test image ids (e.g. the paper's split).
        seed: seed of the split.
        limit: only the first ``limit`` images (smoke runs).
        workers: processes for the conversion (0 = in this process).
    """
    root, output = Path(root), Path(output)
    image_dir, anno_dir, text_dir = celebamask_folders(root, None, text_dir, mask_dir)
    ids = image_ids(image_dir)[:limit]
    (output / "masks").mkdir(parents=True, exist_ok=True)
    (output / "scribbles").mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(image_dir), str(anno_dir), None if mask_dir is None else str(mask_dir), str(output),
             mask_size, scribble_size) for i in ids]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_prepare_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _prepare_one(job)
    train, test = write_splits(output, ids, test_ids, test_fraction, seed)
    info = {"_format": PREPARED_FORMAT, "image_dir": str(image_dir.resolve()),
            "text_dir": str(text_dir.resolve()), "num_images": len(ids), "mask_size": mask_size,
            "scribble_size": scribble_size, "edge_detector": EDGE_DETECTOR, "split_seed": seed,
            "test_fraction": test_fraction if test_ids is None else None}
    (output / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return output


# ------------------------------------------------------------------------------------------- reading
def control_to_tensor(image: Image.Image) -> torch.Tensor:
    """A condition image -> [3, H, W] in [0, 1], what the ControlNets read."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def mask_control(ids: np.ndarray, size: int) -> torch.Tensor:
    ids = np.asarray(Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST))
    return control_to_tensor(mask_to_color(ids))


def scribble_control(edges: np.ndarray | Image.Image, size: int) -> torch.Tensor:
    image = edges if isinstance(edges, Image.Image) else Image.fromarray(np.where(edges, 255, 0).astype(np.uint8))
    image = image.convert("L").resize((size, size), Image.Resampling.BOX)
    binary = (np.asarray(image) > 0).astype(np.uint8) * 255  # any stroke coverage stays a stroke
    return control_to_tensor(Image.fromarray(binary))


def _rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, epoch])


class FaceDataset(Dataset):
    """Samples of a prepared CelebAMask-HQ folder. Items are addressed by ``(position, epoch)``.

    Args:
        root: the folder written by :func:`prepare`.
        split: "train" or "test".
        image_size: size of ``pixel_values`` (the VAE input: the encoder's image size).
        target_size: size of ``target`` (the generator's resolution).
        condition_size: size of the condition images (the encoder's image size).
        modalities: which conditions to return ("mask", "scribble").
        seed: seeds the caption choice.
        caption_index: always use this caption line instead of a random one (stage 2, evaluation).
        captions_per_image: with ``caption_index`` None, draw each item's caption from this many of the image's
            captions, chosen once per image (seeded; 0 or None: all of them): the captions an I^d_0 cache holds.
        camera_labels: {photo file name: EG3D label [25]} (``cameras.read_dataset_json``): items then carry
            ``camera``, the label G renders at (training with EG3D).
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 512, target_size: int = 1024,
                 condition_size: int = 512, modalities: tuple[str, ...] = ("mask", "scribble"), seed: int = 0,
                 caption_index: int | None = None, camera_labels: dict[str, torch.Tensor] | None = None,
                 captions_per_image: int | None = None):
        self.root = Path(root)
        info = json.loads((self.root / "dataset.json").read_text())
        if info.get("_format") != PREPARED_FORMAT:
            raise ValueError(f"{self.root} was not written by `python -m mm2latent.training prepare`")
        self.image_dir, self.text_dir = Path(info["image_dir"]), Path(info["text_dir"])
        self.ids = [int(line) for line in (self.root / f"{split}.txt").read_text().split()]
        self.image_size, self.target_size, self.condition_size = image_size, target_size, condition_size
        self.modalities, self.seed, self.caption_index = tuple(modalities), seed, caption_index
        self.camera_labels, self.captions_per_image = camera_labels, captions_per_image
        if camera_labels is not None:
            missing = [i for i in self.ids if image_file(self.image_dir, i).name not in camera_labels]
            if missing:
                raise ValueError(f"the camera labels have no entry for {len(missing)} photos of the {split} split "
                                 f"(e.g. {image_file(self.image_dir, missing[0]).name})")

    def __len__(self) -> int:
        return len(self.ids)

    def captions(self, image_id: int) -> list[str]:
        path = self.text_dir / f"{image_id}.txt"
        if not path.is_file():
            return [""]
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        return [line for line in lines if line] or [""]

    def candidate_captions(self, position: int) -> list[str]:
        """The captions an item of this position can carry (what an I^d_0 cache must hold for it)."""
        image_id = self.ids[position]
        captions = self.captions(image_id)
        if self.caption_index is not None:
            return [captions[min(self.caption_index, len(captions) - 1)]]
        if self.captions_per_image and self.captions_per_image < len(captions):
            chosen = np.random.default_rng([self.seed, image_id]).permutation(len(captions))[:self.captions_per_image]
            return [captions[i] for i in sorted(chosen)]
        return captions

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        image_id = self.ids[position]
        captions = self.candidate_captions(position)
        if len(captions) == 1:
            caption = captions[0]
        else:
            caption = captions[_rng(self.seed, image_id, epoch).integers(len(captions))]
        with Image.open(image_file(self.image_dir, image_id)) as photo:
            photo = photo.convert("RGB")
            item = {"pixel_values": image_to_tensor(photo, self.image_size)[0],
                    "target": image_to_tensor(photo, self.target_size)[0]}
        controls = {}
        if "mask" in self.modalities:
            ids = parse_mask(self.root / "masks" / f"{image_id}.png", require_face=False)
            controls["mask"] = mask_control(ids, self.condition_size)
        if "scribble" in self.modalities:
            with Image.open(self.root / "scribbles" / f"{image_id}.png") as scribble:
                controls["scribble"] = scribble_control(scribble, self.condition_size)
        item.update(controls=controls, caption=caption, index=position, image_id=image_id)
        if self.camera_labels is not None:
            item["camera"] = self.camera_labels[image_file(self.image_dir, image_id).name]
        return item


class SyntheticFaceDataset(Dataset):
    """Faces rendered by a (frozen) StyleGAN2 from seeded random latents, with conditions derived from them.

    The learning checks use it: targets are reachable by the generator, so M can fit them exactly.
    The scribble is the render's edge map; the mask quantises the render's luminance into skin / hair /
    nose / neck regions (a stand-in for a face parser on toy faces).

    Args:
        generator: the StyleGAN2 generator.
        num_samples: number of faces.
        image_size: size of ``pixel_values`` (VAE input).
        condition_size: size of the condition images.
        modalities: which conditions to return.
        seed: seeds the latents and the captions.
        truncation: ψ of the latents.
    """

    def __init__(self, generator, num_samples: int = 8, image_size: int = 128, condition_size: int = 128,
                 modalities: tuple[str, ...] = ("mask", "scribble"), seed: int = 0, truncation: float = 0.7,
                 cameras: torch.Tensor | None = None):
        self.modalities, self.seed = tuple(modalities), seed
        # A 3D generator renders sample i at camera i (cycling through ``cameras``, default the frontal one); the
        # camera is also the mapping's conditioning label, as EG3D's own samples are made.
        self.cameras = None
        if is_3d(generator):
            cameras = generator.default_camera()[None] if cameras is None else torch.as_tensor(cameras).float()
            self.cameras = cameras[torch.arange(num_samples) % cameras.shape[0]]
        with torch.no_grad():
            z_dim = getattr(generator, "z_dim", generator.style_dim)
            z = torch.randn(num_samples, z_dim, generator=torch.Generator().manual_seed(seed))
            ref = next(generator.parameters())
            if self.cameras is None:
                w = generator.truncate(generator.mapping(z.to(ref.device, ref.dtype)), truncation)
                self.targets = generator.synthesis(w).float().clamp(-1, 1).cpu()
            else:
                cameras = self.cameras.to(ref.device)
                w = generator.truncate(generator.mapping(z.to(ref.device, ref.dtype), cameras), truncation)
                self.targets = generator.synthesis(w, camera=cameras).float().clamp(-1, 1).cpu()
            self.latents = w.float().cpu()
        self.pixel_values = torch.nn.functional.interpolate(self.targets, size=(image_size, image_size),
                                                            mode="bilinear", align_corners=False)
        self.controls = []
        for target in self.targets:
            array = ((target.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            controls = {}
            if "scribble" in self.modalities:
                controls["scribble"] = scribble_control(scribble_from_photo(Image.fromarray(array), size=condition_size),
                                                        condition_size)
            if "mask" in self.modalities:
                luminance = array.mean(axis=2)
                bins = np.quantile(luminance, [0.25, 0.5, 0.75])
                ids = np.array([13, 1, 2, 17], dtype=np.uint8)[np.digitize(luminance, bins)]
                controls["mask"] = mask_control(ids, condition_size)
            self.controls.append(controls)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def ids(self) -> list[int]:
        """Image id of each position (the position itself), as ``FaceDataset.ids``."""
        return list(range(len(self.targets)))

    def candidate_captions(self, position: int) -> list[str]:
        """The one caption of a position (as ``FaceDataset.candidate_captions``)."""
        return [self[(position, 0)]["caption"]]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        words = _rng(self.seed, position, 0).choice(len(SYNTHETIC_WORDS), size=2, replace=False)
        caption = "a face with " + " and ".join(SYNTHETIC_WORDS[i] for i in sorted(words))
        item = {"pixel_values": self.pixel_values[position], "target": self.targets[position],
                "controls": dict(self.controls[position]), "caption": caption, "index": position,
                "image_id": position}
        if self.cameras is not None:
            item["camera"] = self.cameras[position]
        return item


class PhotoFolderDataset(Dataset):
    """FFHQ-aligned face photos of a folder (``*.png``, ``*.jpg``), for training the photo inverter.

    Each item's ``pixel_values`` and ``target`` are the photo at ``size``² in [-1, 1]; there is no caption
    and no visual condition.

    Args:
        root: the folder.
        size: side the photos are resized to.
    """

    def __init__(self, root: str | Path, size: int = 256):
        self.root, self.size = Path(root), size
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"}) \
            if self.root.is_dir() else []
        if not self.files:
            raise ValueError(f"no .png/.jpg photos in {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.files)))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        position = key[0] if isinstance(key, tuple) else key
        with Image.open(self.files[position]) as photo:
            pixels = image_to_tensor(photo.convert("RGB"), self.size)[0]
        return {"pixel_values": pixels, "target": pixels, "controls": {}, "caption": "", "index": position,
                "image_id": position}


class TemplatedCaptions(Dataset):
    """A dataset whose captions are rewritten by a template, e.g. ``"a Greek statue, {caption}"`` (style transfer:
    T sees the styled caption and I^d_0 is drawn with it).

    Args:
        base: the dataset.
        template: a ``str.format`` template with a ``{caption}`` field.
    """

    def __init__(self, base: Dataset, template: str):
        if "{caption}" not in template:
            raise ValueError(f"data.caption_template must contain {{caption}}, got {template!r}")
        self.base, self.template = base, template

    def __len__(self) -> int:
        return len(self.base)

    @property
    def ids(self) -> list[int]:
        return self.base.ids

    def candidate_captions(self, position: int) -> list[str]:
        """The base dataset's candidate captions, rewritten by the template."""
        return [self.template.format(caption=c).strip(" ,") for c in self.base.candidate_captions(position)]

    def __getitem__(self, key) -> dict:
        item = self.base[key]
        item["caption"] = self.template.format(caption=item["caption"]).strip(" ,")
        return item


class StepBatchSampler(Sampler):
    """Batches as a pure function of the micro-step: resuming at step s yields exactly what step s would have.

    The stream is the concatenation of seeded permutations (one per epoch); micro-step s of rank r reads
    positions [s·B·W + r·B, s·B·W + (r+1)·B). Items are ``(position, epoch)``. Infinite.

    Args:
        num_samples: dataset length.
        batch_size: per-process batch size.
        seed: shuffling seed.
        rank: this process.
        world_size: number of processes.
        start_step: first micro-step to yield.
        shuffle: False keeps the dataset order (evaluation, tests).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_step, self.shuffle = rank, world_size, start_step, shuffle

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def batch(self, step: int) -> list[tuple[int, int]]:
        start = (step * self.world_size + self.rank) * self.batch_size
        items, orders = [], {}
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.num_samples)
            if epoch not in orders:  # one shuffle per epoch, not one per item
                orders[epoch] = self.order(epoch)
            items.append((int(orders[epoch][offset]), epoch))
        return items

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep captions as a list; controls become a dict of batched tensors."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "target")}
    names = set(items[0]["controls"])
    batch["controls"] = {name: torch.stack([item["controls"][name] for item in items]) for name in sorted(names)}
    batch["caption"] = [item["caption"] for item in items]
    batch["index"] = torch.tensor([item["index"] for item in items])
    batch["image_id"] = torch.tensor([item["image_id"] for item in items])
    if "camera" in items[0]:  # EG3D labels [B, 25]: G renders each sample at its photo's camera
        batch["camera"] = torch.stack([item["camera"] for item in items])
    if "idd" in items[0]:  # I^d_0 per visual-input combination, and the cache keys they came from
        batch["idd"] = {name: torch.stack([item["idd"][name] for item in items]) for name in items[0]["idd"]}
        batch["idd_key"] = {name: [item["idd_key"][name] for item in items] for name in items[0]["idd_key"]}
    return batch

