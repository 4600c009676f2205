"""The MM2Latent engine: open_clip loader, mask/sketch autoencoders, latent mapper and its training stage."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mm2latent.errors import CheckpointFormatError, InvalidImageError, InvalidSettingError
from mm2latent.inputs.conditions import parse_mask, parse_scribble
from mm2latent.models.autoencoders import (
    MaskAutoencoder,
    SketchAutoencoder,
    dice_loss,
    tiny_autoencoder_config,
)
from mm2latent.models.clip_encoder import TINY_CLIP_CONFIG, CLIPEncoder, read_clip_state_dict
from mm2latent.models.latent_mapper import MM2LatentEngine, build_tiny_mm2latent_components
from mm2latent.training.config import load_config
from mm2latent.training.engine_stage import build_engine_trainer, load_generator

PROMPTS = ["a smiling young woman with blonde hair", "an old man with a grey beard and glasses"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These toy networks are far too small to gain from threads; on the shared 2-core machine, threads that
    wait for each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator():
    return load_generator("tiny")


@pytest.fixture(scope="module")
def engine(generator):
    return MM2LatentEngine(**build_tiny_mm2latent_components(generator, seed=7)).eval()


@pytest.fixture(scope="module")
def test_masks(testdata) -> torch.Tensor:
    files = sorted((testdata / "masks").glob("*.png"))
    return torch.stack([torch.from_numpy(parse_mask(f, size=32, require_face=False).astype(np.int64)) for f in files])


@pytest.fixture(scope="module")
def test_sketches(testdata) -> torch.Tensor:
    files = sorted((testdata / "sketches").glob("edges_*.jpg"))[:6]
    return torch.stack([torch.from_numpy(parse_scribble(f, size=64)) for f in files])


# ------------------------------------------------------------------------------------------ open_clip loader
@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A tiny ViT registered with open_clip, and its weights written as FaRL does ({"state_dict": ...} + extras)."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "mm2latent-test-tiny-vit.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder / "mm2latent-test-tiny-vit.json")
    torch.manual_seed(11)
    source = open_clip.create_model("mm2latent-test-tiny-vit", pretrained=None)
    state = source.state_dict()
    torch.save({"state_dict": {**state, "mim_head.weight": torch.ones(4)}, "epoch": 16}, folder / "farl.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "clip.safetensors"))
    return "mm2latent-test-tiny-vit", folder


def _reference_model(name: str, weights: Path):
    """open_clip's own loading of the same file (frozen like ours: open_clip's MHA takes its fast path then)."""
    import open_clip

    torch.manual_seed(99)  # another random init: only the loaded weights can make the outputs agree
    return open_clip.create_model(name, pretrained=str(weights)).eval().requires_grad_(False)


@pytest.mark.parametrize("file_name", ["farl.pth", "clip.safetensors"])
def test_clip_loader_matches_open_clip(tiny_clip_checkpoint, file_name):
    import open_clip

    name, folder = tiny_clip_checkpoint
    torch.manual_seed(5)
    encoder = CLIPEncoder.from_checkpoint(name, folder / file_name)
    reference = _reference_model(name, folder / "clip.safetensors")  # open_clip loads strictly: no extras
    tokens = open_clip.get_tokenizer(name)(PROMPTS)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    with torch.no_grad():
        text, image = encoder.encode_text(PROMPTS), encoder.encode_images(images)
        reference_text = reference.encode_text(tokens, normalize=True)
        reference_image = reference.encode_image(((images + 1) / 2 - mean) / std, normalize=True)
    # Same open_clip modules, same weights, same tokens and pixels: the same float operations in the same order.
    assert torch.equal(text, reference_text)
    assert torch.equal(image, reference_image)
    assert text.shape == (2, TINY_CLIP_CONFIG["embed_dim"])
    assert (text[0] - text[1]).abs().max() > 1e-3  # two prompts, two embeddings
    with torch.no_grad():
        unloaded = CLIPEncoder(name).eval().encode_text(PROMPTS)
    assert not torch.allclose(unloaded, text, atol=1e-3)


def test_clip_encoder_round_trip_and_open_clip_reads_our_folder(tiny_clip_checkpoint, tmp_path):
    import open_clip

    name, folder = tiny_clip_checkpoint
    encoder = CLIPEncoder.from_checkpoint(name, folder / "farl.pth")
    encoder.save_pretrained(tmp_path / "clip")
    again = CLIPEncoder.from_pretrained(tmp_path / "clip")
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}").eval().requires_grad_(False)
    with torch.no_grad():
        ours = encoder.encode_text(PROMPTS)
        assert torch.equal(again.encode_text(PROMPTS), ours)
        assert torch.equal(theirs.encode_text(open_clip.get_tokenizer(name)(PROMPTS), normalize=True), ours)


def test_clip_loader_rejects_bad_files(tiny_clip_checkpoint, tmp_path):
    name, folder = tiny_clip_checkpoint
    state = read_clip_state_dict(folder / "farl.pth")
    assert "epoch" not in state and "mim_head.weight" in state  # unwrapped; extras are ignored at load time
    del state["visual.proj"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointFormatError, match="visual.proj"):
        CLIPEncoder.from_checkpoint(name, tmp_path / "partial.safetensors")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "openai.pt"))
    with pytest.raises(CheckpointFormatError, match="TorchScript"), pytest.warns(UserWarning):
        read_clip_state_dict(tmp_path / "openai.pt")


# ------------------------------------------------------------------------------------------ autoencoders
def fit(autoencoder, inputs: torch.Tensor, steps: int, learning_rate: float) -> None:
    """Adam on the autoencoder's own reconstruction loss, full batch."""
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=learning_rate)
    for _ in range(steps):
        loss, _ = autoencoder.loss(inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_mask_autoencoder_learns_the_test_masks(test_masks):
    torch.manual_seed(0)
    autoencoder = MaskAutoencoder(**tiny_autoencoder_config())

    def accuracy() -> float:
        with torch.no_grad():
            return float((autoencoder(test_masks).argmax(1) == test_masks).float().mean())

    before = accuracy()
    fit(autoencoder, test_masks, steps=100, learning_rate=1e-2)
    after = accuracy()
    majority = max(float((test_masks == c).float().mean()) for c in range(19))
    print(f"mask reconstruction accuracy {before:.3f} -> {after:.3f} (majority class {majority:.3f})")
    assert after >= majority + 0.25, (before, after, majority)  # more than painting the commonest class
    assert after >= before + 0.4


def test_sketch_autoencoder_learns_the_test_sketches(test_sketches):
    torch.manual_seed(0)
    autoencoder = SketchAutoencoder(**tiny_autoencoder_config())
    target = autoencoder.resize_strokes(test_sketches)

    def dice() -> float:
        with torch.no_grad():  # hard Dice of the thresholded reconstruction
            predicted = (autoencoder(test_sketches) > 0).float()
        return 1 - float(dice_loss((predicted * 2 - 1) * 50, target, eps=0.0))

    before = dice()
    fit(autoencoder, test_sketches, steps=150, learning_rate=3e-3)
    after = dice()
    everywhere = 2 * float(target.mean()) / (1 + float(target.mean()))  # Dice of "stroke everywhere"
    print(f"sketch reconstruction Dice {before:.3f} -> {after:.3f} (all-stroke {everywhere:.3f})")
    assert after >= before + 0.2 and after >= everywhere + 0.2, (before, after, everywhere)


def test_autoencoders_reject_bad_input():
    autoencoder = MaskAutoencoder(**tiny_autoencoder_config())
    with pytest.raises(InvalidImageError):
        autoencoder.encode(torch.full((1, 32, 32), 19))
    with pytest.raises(InvalidImageError):
        autoencoder.encode(torch.rand(1, 32, 32))
    with pytest.raises(InvalidImageError):
        SketchAutoencoder(**tiny_autoencoder_config()).encode(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ mapper / engine
def test_missing_modalities_are_accepted(engine, generator, test_masks, test_sketches):
    avg = generator.latent_avg
    text = engine.encode_prompts(PROMPTS)
    masks, sketches = test_masks[:2], test_sketches[:2]
    shape = (2, generator.num_ws, generator.style_dim)
    outputs = {}
    for name, kwargs in {"text": {"text_embedding": text}, "mask": {"mask_ids": masks},
                         "sketch": {"sketch": sketches},
                         "all": {"text_embedding": text, "mask_ids": masks, "sketch": sketches}}.items():
        outputs[name] = engine.latents(avg, **kwargs)
        assert outputs[name].shape == shape
    none = engine.latents(avg, batch_size=2)
    assert none.shape == shape and torch.equal(none[0], none[1])  # nothing given: one latent, the null tokens'
    for name, w in outputs.items():  # every input moves the latent away from the all-null one
        assert (w - none).abs().max() > 1e-3, name
    with pytest.raises(InvalidSettingError):
        engine.latents(avg)
    with pytest.raises(InvalidSettingError):
        engine.latents(avg, text_embedding=text, mask_ids=test_masks[:3])


def test_different_masks_give_different_latents(engine, generator, test_masks):
    w = engine.latents(generator.latent_avg, mask_ids=test_masks)
    again = engine.latents(generator.latent_avg, mask_ids=test_masks)
    assert torch.equal(w, again)  # no randomness at inference
    # The untrained mapper's offsets are small (heads start at 0.1 scale); 1e-5 is still ~100x the float32
    # rounding of latents of magnitude ~1, so these are differences the masks made.
    for i in range(len(test_masks)):
        for j in range(i + 1, len(test_masks)):
            assert (w[i] - w[j]).abs().max() > 1e-5, (i, j)


def test_same_seed_same_engine(generator, engine, test_masks):
    same = MM2LatentEngine(**build_tiny_mm2latent_components(generator, seed=7)).eval()
    other = MM2LatentEngine(**build_tiny_mm2latent_components(generator, seed=8)).eval()
    avg = generator.latent_avg
    reference = engine.latents(avg, text_embedding=engine.encode_prompts(PROMPTS[:1]), mask_ids=test_masks[:1])
    for candidate, equal in ((same, True), (other, False)):
        w = candidate.latents(avg, text_embedding=candidate.encode_prompts(PROMPTS[:1]), mask_ids=test_masks[:1])
        assert torch.equal(w, reference) == equal


def test_engine_save_load_round_trip(engine, generator, test_masks, test_sketches, tmp_path):
    engine.save_pretrained(tmp_path / "engine")
    loaded = MM2LatentEngine.from_pretrained(tmp_path / "engine")
    avg = generator.latent_avg
    inputs = {"mask_ids": test_masks[:2], "sketch": test_sketches[:2]}
    # Same weights and the same operations: identical latents.
    assert torch.equal(loaded.latents(avg, text_embedding=loaded.encode_prompts(PROMPTS), **inputs),
                       engine.latents(avg, text_embedding=engine.encode_prompts(PROMPTS), **inputs))


# ------------------------------------------------------------------------------------------ training stage
def engine_config(tmp_path: Path, **mm2latent):
    return load_config(None, {
        "stage": "mm2latent", "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"kind": "synthetic", "num_samples": 8, "num_workers": 0},
        "train": {"batch_size": 8, "max_steps": 40, "learning_rate": 1e-2, "log_with": None, "checkpoint_every": 0,
                  "sample_every": 0, "log_every": 1000, "resume": None, "progress": False},
        "loss": {"l2": 0.0, "lpips": 0.0, "id": 0.0, "w_reg": 0.0},
        "networks": {"lpips": "tiny", "arcface": "tiny"},
        "mm2latent": {"init": "tiny", "face_parser": "tiny", "generator": "tiny", **mm2latent},
    })


def test_mapper_training_halves_the_latent_loss(generator, tmp_path):
    # Little dropout and no embedding noise: the tiny random CLIP tells G's samples apart only faintly.
    config = engine_config(tmp_path, train=["mapper"], modality_dropout=0.15, embedding_noise=0.0)
    trainer = build_engine_trainer(config, generator=generator)
    before = trainer.evaluate()["loss/latent"]
    trainer.train()
    after = trainer.evaluate()["loss/latent"]
    print(f"latent loss {before:.4f} -> {after:.4f}")
    assert after <= 0.5 * before, (before, after)


def test_engine_stage_runs_through_the_cli_and_exports(tmp_path):
    """All three networks with the image terms, through `run` (model card, export)."""
    from mm2latent.training.cli import run

    config = engine_config(tmp_path)
    config.train.max_steps, config.train.batch_size, config.train.sample_every = 2, 2, 2
    config.loss.l2, config.loss.lpips, config.loss.id, config.loss.w_reg, config.loss.resolution = 1.0, 0.5, 0.1, 0.005, 64
    trainer = run(config)
    logs = trainer.history[-1]
    for key in ("loss/latent", "loss/l2", "loss/lpips", "loss/id", "loss/mask_ce", "loss/sketch_bce_dice"):
        assert np.isfinite(logs[key]), key
    final = tmp_path / "run" / "final"
    engine = MM2LatentEngine.from_pretrained(final / "engine")
    trained = trainer.unwrapped_model()
    assert torch.equal(engine.mapper.head_weight, trained.mapper.head_weight.cpu())
    assert (final / "generator" / "config.json").is_file()
    assert "MM2Latent engine" in (final / "README.md").read_text()
    grid = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert len(grid) == 1


def test_autoencoders_train_on_prepared_celebamask_data(generator, testdata, tmp_path):
    """``data.kind: celebamask``: the autoencoders read the prepared masks and scribbles, and G renders nothing."""
    import shutil

    from PIL import Image

    from mm2latent.training.data import FaceDataset, collate, prepare
    from mm2latent.training.engine_stage import colors_to_ids
    from mm2latent.training.stages import step_generator

    root, masks = tmp_path / "raw", tmp_path / "masks"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    masks.mkdir()
    names = sorted(p.name for p in (testdata / "masks").glob("*.png"))
    for i, name in enumerate(names):
        shutil.copy(testdata / "masks" / name, masks / f"{i}.png")
        with Image.open(testdata / "photos" / f"ffhq_{i}.jpg") as photo:  # small copies: decoding stays cheap
            photo.resize((128, 128), Image.Resampling.BILINEAR).save(root / "CelebA-HQ-img" / f"{i}.jpg")
    prepared = prepare(root, tmp_path / "prepared", mask_dir=masks, mask_size=64, scribble_size=64, test_fraction=0)
    item = FaceDataset(prepared, "train", 16, 16, 32, modalities=("mask",))[(0, 0)]
    with Image.open(prepared / "masks" / "0.png") as ids:  # the dataset's colour rendering maps back to these ids
        expected = np.asarray(ids.resize((32, 32), Image.Resampling.NEAREST))
    assert len(np.unique(expected)) > 5
    assert np.array_equal(colors_to_ids(item["controls"]["mask"][None])[0].numpy(), expected)

    config = engine_config(tmp_path, train=["mask_autoencoder", "sketch_autoencoder"])
    config.data.kind, config.data.root, config.data.modalities = "celebamask", str(prepared), ["mask", "scribble"]
    config.train.max_steps, config.train.batch_size = 25, 4
    trainer = build_engine_trainer(config, generator=generator)

    def no_rendering(*args, **kwargs):
        raise AssertionError("the autoencoders must not need G's samples when the data has masks and scribbles")

    trainer.stage.draw = no_rendering
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"prepared data: mask accuracy {before['metric/mask_accuracy']:.3f} -> {after['metric/mask_accuracy']:.3f}, "
          f"sketch loss {before['loss/sketch_bce_dice']:.3f} -> {after['loss/sketch_bce_dice']:.3f}")
    assert after["metric/mask_accuracy"] > before["metric/mask_accuracy"] + 0.2
    assert after["loss/sketch_bce_dice"] < before["loss/sketch_bce_dice"]
    batch = collate([trainer.dataset[(i, 0)] for i in range(4)])
    _, _, shown = trainer.stage.loss(batch, trainer.model, step_generator(0, 0, 0))
    assert sorted(shown) == ["mask", "mask_reconstruction", "sketch", "sketch_reconstruction"]
    assert trainer.stage.sample_grid(batch, shown).size == (4 * 32, 4 * 32)  # 4 rows of 4 tiles, 32² each


def test_engine_stage_rejects_unknown_networks(generator, tmp_path):
    with pytest.raises(InvalidSettingError):
        build_engine_trainer(engine_config(tmp_path, train=["unet"]), generator=generator)
