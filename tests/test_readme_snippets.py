"""README.md's API section, run as written against a live `python app.py` on the tiny preset.

The code blocks of the section ``### API (`gradio_client`)`` are run in order, in one namespace, from a
folder holding the files they name (``mask.png``, ``sketch.png``, ``photo.jpg``, copied from the shared test
data). The only substitution: the README's local URL :data:`README_URL` becomes the test app's URL (a free
port). What the snippets leave in their variables is then checked.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import edit_identity, image_size, running_space
from PIL import Image

from mm2latent.inputs.metadata import read_png_settings
from mm2latent.ui.photo_tab import DISPLAY_SIZE

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### API (`gradio_client`)"
README_URL = "http://127.0.0.1:7860/"


def api_snippets(markdown: str) -> list[str]:
    """The ```python blocks of the API section, in order."""
    start = markdown.index(SECTION)
    end = markdown.find("\n## ", start)
    section = markdown[start:end if end != -1 else None]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    with running_space(tmp_path_factory.mktemp("readme-space"), MM2LATENT_MODEL_REPO="tiny") as url:
        yield url


@pytest.fixture
def snippet_folder(tmp_path, testdata, monkeypatch) -> Path:
    """A folder with the README's input files; the working directory while the snippets run."""
    shutil.copy(testdata / "masks" / "celebamaskhq_0_index.png", tmp_path / "mask.png")
    Image.open(testdata / "sketches" / "edges_0.jpg").save(tmp_path / "sketch.png")
    shutil.copy(testdata / "photos" / "ffhq_0.jpg", tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_api_section_uses_one_local_url_and_every_endpoint():
    snippets = api_snippets(README.read_text())
    code = "\n".join(snippets)
    assert len(snippets) >= 2
    assert code.count("Client(") == 1 and f'Client("{README_URL}")' in code
    for endpoint in ("/load_template", "/upload_mask", "/generate_from_mask", "/generate_from_sketch",
                     "/upload_sketch", "/sketch_from_photo", "/invert_photo", "/edit_photo", "/generate_3d",
                     "/render_view", "/turntable"):
        assert f'api_name="{endpoint}"' in code, endpoint


def test_readme_snippets_run_verbatim_against_a_live_app(space_url, snippet_folder, tiny_pipe):
    namespace: dict = {}
    for index, snippet in enumerate(api_snippets(README.read_text())):
        code = compile(snippet.replace(README_URL, space_url), f"README.md API block {index + 1}", "exec")
        exec(code, namespace)  # noqa: S102 - the README's own code, the point of this test

    # Generation: /load_template's editor value went straight into /generate_from_mask (2 faces, one .npy).
    latents = [path for path in namespace["files"] if path.endswith(".npy")]
    assert len(latents) == 1 and np.load(latents[0], allow_pickle=False).shape == (
        2, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    # The sketch run's single face, drawn with the (random) seed it returned.
    assert len(namespace["gallery"]) == 1
    assert read_png_settings(namespace["gallery"][0]["image"])["seed"] == namespace["seed"]
    assert "Loaded" in namespace["status"]

    # Editing: /invert_photo's mask went straight into /edit_photo, which edited the last inverted photo.
    mask = namespace["mask"]
    assert Path(mask["background"]).name.startswith("mask-")
    assert all(image_size(path) == (DISPLAY_SIZE, DISPLAY_SIZE) for path in (namespace["before"], namespace["after"]))
    png = next(path for path in namespace["edited_files"] if path.endswith(".png"))
    settings = read_png_settings(png)
    assert settings["method"] == "guided" and settings["inputs"] == ["mask"]  # auto on untrained T
    assert settings["prompt"] == "She has blonde hair and is smiling."
    assert image_size(png) == (tiny_pipe.resolution,) * 2  # the download keeps the model's resolution
    npy = next(path for path in namespace["edited_files"] if path.endswith(".npy"))
    assert np.load(npy, allow_pickle=False).shape == (1, tiny_pipe.generator.num_ws, tiny_pipe.generator.style_dim)
    assert "Method: guided" in namespace["info"] and "T is untrained" in namespace["info"]
    # The identity score is the aligned photo's against the edit's (WebP makes the photo a little off).
    assert float(namespace["identity"].split()[0]) == pytest.approx(
        edit_identity(tiny_pipe, namespace["aligned"], npy), abs=0.02)
    assert "meaningless" in namespace["identity"]
    # The engine selector and the 3D tab: the fast engine made the face; the 3D face turned and made a video.
    assert read_png_settings(namespace["fast_gallery"][0]["image"])["engine"] == "mm2latent"
    assert namespace["fast_seed"] == 7
    assert read_png_settings(namespace["view_3d"])["camera"] == [30, 0]
    assert read_png_settings(namespace["side_view"])["camera"] == [-30, 5]
    video = namespace["video"]
    assert str(video["video"] if isinstance(video, dict) else video).endswith(".mp4")
