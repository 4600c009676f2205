"""The data reader: `prepare` on a fake CelebAMask-HQ tree, the dataset, the deterministic sampler."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent.inputs.conditions import CELEBAMASK_CLASSES, mask_to_color, parse_mask
from mm2latent.training.cli import main
from mm2latent.training.data import (
    FaceDataset,
    StepBatchSampler,
    collate,
    combine_part_masks,
    part_mask_path,
    prepare,
)


def fake_celebamask(root, ids=(0, 1, 2001)):
    """A tiny CelebAMask-HQ tree: photos, per-part masks in folder id // 2000, MM-CelebA-HQ captions."""
    rng = np.random.default_rng(0)
    (root / "CelebA-HQ-img").mkdir(parents=True)
    (root / "text").mkdir()
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "CelebA-HQ-img" / f"{i}.jpg")
        parts = {"skin": (8, 8, 56, 56), "nose": (28, 28, 36, 40), "hair": (0, 0, 64, 16), "l_eye": (16, 20, 24, 26)}
        for part, (x0, y0, x1, y1) in parts.items():
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[y0:y1, x0:x1] = 255
            path = part_mask_path(root / "CelebAMask-HQ-mask-anno", i, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).convert("RGB").save(path)  # the dataset ships 3-channel PNGs
        (root / "text" / f"{i}.txt").write_text(f"caption a of {i}\ncaption b of {i}\n\ncaption c of {i}\n")
    return root


def test_part_masks_follow_the_official_order(tmp_path):
    root = fake_celebamask(tmp_path / "raw")
    ids = combine_part_masks(root / "CelebAMask-HQ-mask-anno", 2001, size=64)
    assert part_mask_path("a", 2001, "skin").as_posix() == "a/1/02001_skin.png"
    skin, nose, hair, eye = (CELEBAMASK_CLASSES.index(n) for n in ("skin", "nose", "hair", "l_eye"))
    assert ids[30, 30] == nose  # nose (later) overwrites skin
    assert ids[10, 10] == hair  # hair (id 13) overwrites skin
    assert ids[22, 18] == eye and ids[50, 50] == skin and ids[60, 2] == 0


def test_prepare_and_read(tmp_path):
    root = fake_celebamask(tmp_path / "raw")
    main(["prepare", "--root", str(root), "--output", str(tmp_path / "prepared"), "--mask-size", "64",
          "--scribble-size", "64", "--test-fraction", "0.34"])
    out = tmp_path / "prepared"
    train = (out / "train.txt").read_text().split()
    test = (out / "test.txt").read_text().split()
    assert sorted(train + test) == ["0", "1", "2001"] and len(test) == 1
    assert Image.open(out / "masks" / "2001.png").mode == "L"
    assert np.asarray(Image.open(out / "scribbles" / "0.png")).max() == 255
    data = FaceDataset(out, "train", image_size=32, target_size=16, condition_size=32, seed=0)
    item = data[(0, 0)]
    assert item["pixel_values"].shape == (3, 32, 32) and item["target"].shape == (3, 16, 16)
    assert -1 <= item["target"].min() and item["target"].max() <= 1
    assert item["controls"]["mask"].shape == (3, 32, 32) and item["controls"]["scribble"].shape == (3, 32, 32)
    assert item["caption"] in {f"caption {x} of {item['image_id']}" for x in "abc"}
    ids = parse_mask(Image.fromarray((item["controls"]["mask"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)))
    assert CELEBAMASK_CLASSES.index("nose") in ids
    captions = {data[(0, epoch)]["caption"] for epoch in range(12)}
    assert len(captions) > 1  # a random caption per draw...
    assert data[(0, 3)]["caption"] == data[(0, 3)]["caption"]  # ...but deterministic
    fixed = FaceDataset(out, "train", 32, 16, 32, caption_index=0)
    assert fixed[(0, 5)]["caption"].startswith("caption a")
    batch = collate([data[(0, 0)], data[(1, 0)]])
    assert batch["controls"]["mask"].shape == (2, 3, 32, 32) and len(batch["caption"]) == 2


def test_captions_per_image_fixes_a_pool_and_samples_from_it(tmp_path):
    """Stage 2's captions: n drawn once per image (the I^d_0 cache holds them), one of them sampled per epoch;
    0 keeps every caption."""
    root = fake_celebamask(tmp_path / "raw")
    main(["prepare", "--root", str(root), "--output", str(tmp_path / "prepared"), "--mask-size", "16",
          "--scribble-size", "16", "--test-fraction", "0"])
    data = FaceDataset(tmp_path / "prepared", "train", 16, 16, 16, seed=3, captions_per_image=2)
    for position in range(len(data)):
        pool = data.candidate_captions(position)
        assert len(pool) == 2 and pool == data.candidate_captions(position)  # fixed per image
        assert set(pool) <= set(data.captions(data.ids[position]))
        drawn = {data[(position, epoch)]["caption"] for epoch in range(16)}
        assert drawn == set(pool)  # every cached caption is used, no other
    pools = {tuple(data.candidate_captions(p)) for p in range(len(data))}
    assert len({tuple(c.split(" of ")[0] for c in pool) for pool in pools}) > 1  # drawn per image, not one subset
    every = FaceDataset(tmp_path / "prepared", "train", 16, 16, 16, captions_per_image=0)
    assert every.candidate_captions(0) == every.captions(every.ids[0])


def test_prepare_from_combined_masks(tmp_path, testdata):
    """Combined index / palette masks (../shared/testdata/masks) instead of part files."""
    root = tmp_path / "raw"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, name in enumerate(["celebamaskhq_0_index.png", "celebahq_27007_palette.png"]):
        shutil.copy(testdata / "masks" / name, masks / f"{i}.png")
        Image.new("RGB", (64, 64), (128, 100, 90)).save(root / "CelebA-HQ-img" / f"{i}.jpg")
    out = prepare(root, tmp_path / "prepared", mask_dir=masks, mask_size=128, scribble_size=64, test_fraction=0)
    for i, name in enumerate(["celebamaskhq_0_index.png", "celebahq_27007_palette.png"]):
        expected = parse_mask(testdata / "masks" / name, size=128)
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{i}.png")), expected)
    data = FaceDataset(out, "train", 64, 64, 128, modalities=("mask",))
    item = data[(0, 0)]
    colour = np.asarray(mask_to_color(parse_mask(testdata / "masks" / "celebamaskhq_0_index.png", size=128)))
    assert np.array_equal((item["controls"]["mask"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), colour)
    assert item["caption"] == ""  # no caption file


def test_sampler_is_deterministic_and_shards():
    a = StepBatchSampler(10, 3, seed=5)
    b = StepBatchSampler(10, 3, seed=5, start_step=4)
    assert next(iter(b)) == a.batch(4)
    assert [x for s in range(10) for x in a.batch(s)][:10] != [(i, 0) for i in range(10)]  # shuffled
    epoch0 = sorted(p for s in range(10) for p, e in a.batch(s) if e == 0)
    assert epoch0 == list(range(10))  # every sample once per epoch
    assert StepBatchSampler(10, 3, seed=6).batch(0) != a.batch(0)
    r0, r1 = StepBatchSampler(10, 2, seed=1, rank=0, world_size=2), StepBatchSampler(10, 2, seed=1, rank=1, world_size=2)
    assert not set(r0.batch(0)) & set(r1.batch(0))
    with pytest.raises(ValueError):
        StepBatchSampler(0, 1)
    assert torch.equal(collate([{"pixel_values": torch.zeros(3, 2, 2), "target": torch.zeros(3, 2, 2), "controls": {},
                                 "caption": "", "index": 0, "image_id": 0}])["index"], torch.tensor([0]))
