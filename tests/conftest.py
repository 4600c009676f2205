"""Shared fixtures. Tests never touch the network: the Hub is offline and the tiny preset is used."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.skip("../shared/testdata is not beside the checkout")
    return TESTDATA


@pytest.fixture(scope="session")
def tiny_pipe():
    import torch

    from mm2latent import FacePipeline

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pipe = FacePipeline.from_pretrained("tiny", device="cpu")
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="session")
def tiny_mm2latent_pipe():
    """The MM2Latent engine's tiny preset (no diffusion model), shared by the engine and Space tests."""
    from mm2latent import FacePipeline

    pipe = FacePipeline.from_pretrained("tiny-mm2latent", device="cpu")
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="session")
def mask_path(testdata) -> Path:
    return testdata / "masks" / "celebamaskhq_0_index.png"


@pytest.fixture(scope="session")
def other_mask_path(testdata) -> Path:
    return testdata / "masks" / "celebamaskhq_1_index.png"


@pytest.fixture(scope="session")
def sketch_path(testdata) -> Path:
    return testdata / "sketches" / "edges_0.jpg"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache, offline (lay repositories into it with helpers.put_in_cache)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
