"""EG3D in the pipeline: the tiny-eg3d preset end to end, cameras, multi-view rendering, turntables."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mm2latent import FacePipeline
from mm2latent.__main__ import main
from mm2latent.errors import InvalidSettingError
from mm2latent.inputs.metadata import read_png_settings, save_png
from mm2latent.models.camera import camera_label
from mm2latent.models.eg3d import TriPlaneGenerator
from mm2latent.pipelines import views
from mm2latent.pipelines.generation import CONDITIONED_MEAN_SAMPLES, CONDITIONED_MEAN_SEED

PROMPT = "She has long wavy blonde hair and is smiling."


@pytest.fixture(scope="module")
def eg3d_pipe():
    # The toy networks are too small to gain from threads; on a shared 2-core machine a second thread mostly
    # waits for the other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = FacePipeline.from_pretrained("tiny-eg3d", device="cpu")
    pipe.show_progress = False
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def face(eg3d_pipe, testdata):
    """One generated face (ψ = 1, frontal camera): its output holds the untruncated latents."""
    return eg3d_pipe(PROMPT, mask=testdata / "masks" / "celebamaskhq_0_index.png", seed=7)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def record_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that each call's arguments are appended to the returned list."""
    calls, method = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def test_preset_sizes_m_and_t_from_the_eg3d(eg3d_pipe, tiny_pipe):
    generator = eg3d_pipe.generator
    assert isinstance(generator, TriPlaneGenerator) and generator.camera_dim == 25
    assert (generator.num_ws, generator.style_dim) == (8, 64)
    assert (eg3d_pipe.mapper.num_ws, eg3d_pipe.mapper.style_dim) == (8, 64)
    for heads in (eg3d_pipe.modulator.gamma_heads, eg3d_pipe.modulator.beta_heads):
        assert heads.weight.shape[:2] == (8, 64)
    # Same seed, same draws: the diffusion encoder is the tiny preset's.
    tiny_unet, eg3d_unet = tiny_pipe.encoder.unet.state_dict(), eg3d_pipe.encoder.unet.state_dict()
    assert all(torch.equal(tiny_unet[name], eg3d_unet[name]) for name in tiny_unet)


def test_end_to_end_is_deterministic_per_seed(eg3d_pipe, face, mask_path):
    again = eg3d_pipe(PROMPT, mask=mask_path, seed=7)
    assert face.images[0].size == (64, 64)
    assert np.array_equal(pixels(face.images[0]), pixels(again.images[0]))
    assert torch.equal(face.latents, again.latents)
    assert face.latents.shape == (1, 8, 64)
    assert torch.equal(face.cameras, eg3d_pipe.generator.default_camera()[None])
    assert face.settings["camera"] == [0.0, 0.0] and face.settings["conditioning_camera"] is None
    assert face.depth is None and face.raw_images is None
    other_seed = eg3d_pipe(PROMPT, mask=mask_path, seed=8)
    assert (face.latents - other_seed.latents).abs().max() > 1e-3


def test_other_camera_other_image_same_latent(eg3d_pipe, face, mask_path):
    side = eg3d_pipe(PROMPT, mask=mask_path, seed=7, camera=(30, -10))
    assert torch.equal(side.latents, face.latents)
    # The untrained toy EG3D's density is nearly uniform, so views differ by ~2 grey levels on average (the same
    # camera gives the same bits: see the determinism test).
    assert np.abs(pixels(side.images[0]) - pixels(face.images[0])).mean() > 1
    assert torch.equal(side.cameras[0], camera_label(30, -10))
    # A label renders exactly as the angles it was made from (the tiny model's orbit is EG3D's default).
    label = eg3d_pipe(PROMPT, mask=mask_path, seed=7, camera=camera_label(30, -10))
    assert np.array_equal(pixels(label.images[0]), pixels(side.images[0]))
    # The camera is recorded as given, as plain numbers: the PNG metadata reproduces the image.
    assert side.settings["camera"] == [30, -10]
    assert len(label.settings["camera"]) == 25 and all(isinstance(v, float) for v in label.settings["camera"])


def test_settings_in_png_metadata_reproduce_the_view(eg3d_pipe, face, mask_path, tmp_path):
    out = eg3d_pipe(PROMPT, mask=mask_path, seed=7, camera=(-25.5, 8), conditioning_camera=(10, 0), truncation=0.8)
    path = tmp_path / "face.png"
    save_png(out.images[0], path, out.settings)
    settings = read_png_settings(path)
    assert settings["camera"] == [-25.5, 8] and settings["conditioning_camera"] == [10, 0]
    again = eg3d_pipe(PROMPT, mask=mask_path, seed=settings["seed"], camera=settings["camera"],
                      conditioning_camera=settings["conditioning_camera"], truncation=settings["truncation"])
    assert np.array_equal(pixels(again.images[0]), pixels(out.images[0]))


def test_depth_and_raw_images_on_request(eg3d_pipe, face, mask_path):
    out = eg3d_pipe(PROMPT, mask=mask_path, seed=7, return_depth=True, return_raw_image=True)
    # The by-products change nothing about the image.
    assert np.array_equal(pixels(out.images[0]), pixels(face.images[0]))
    assert out.depth.shape == (1, 1, 16, 16) and out.raw_images[0].size == (16, 16)
    # The depth is the one rendered with this image (same latents, camera and seeded ray samples), and it moves
    # with the camera (the renderer's depth itself is checked against a known surface in test_eg3d.py).
    with torch.no_grad():
        rendered = eg3d_pipe.generator.render(face.latents, camera_label(0, 0)[None])
        side = eg3d_pipe.generator.render(face.latents, camera_label(30, 0)[None])
    assert torch.equal(out.depth, rendered.depth) and not torch.allclose(out.depth, side.depth)
    grey = np.asarray(views.depth_to_image(out.depth[0]))
    # Near is white: the nearest pixel is 255, the farthest 0.
    flat = out.depth[0, 0].flatten()
    assert grey.flatten()[flat.argmin()] == 255 and grey.flatten()[flat.argmax()] == 0


def test_per_image_cameras(eg3d_pipe, mask_path):
    out = eg3d_pipe(PROMPT, mask=mask_path, seed=3, num_images=2, camera=[[-20, 0], [20, 0]])
    assert torch.equal(out.cameras, camera_label([-20, 20], 0))
    with pytest.raises(InvalidSettingError, match="lists 2 cameras for 3 images"):
        eg3d_pipe(PROMPT, mask=mask_path, seed=3, num_images=3, camera=[[-20, 0], [20, 0]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"camera": (200, 0)}, "yaw must be in"),
        ({"camera": (0, 90)}, "pitch must be in"),
        ({"camera": [1.0, 2.0, 3.0]}, "got shape \\(3,\\)"),
        ({"camera": torch.zeros(2, 24)}, "got shape \\(2, 24\\)"),
        ({"camera": torch.arange(25.0)}, "not a camera label"),
        ({"camera": "front"}, "camera must be"),
        ({"conditioning_camera": (0, float("nan"))}, "finite"),
        ({"return_depth": "yes"}, "return_depth must be True or False"),
        ({"neural_rendering_resolution": 0}, "neural_rendering_resolution must be"),
        ({"fov": 20}, "unknown rendering option fov"),
    ],
)
def test_bad_render_options_raise_typed_errors(eg3d_pipe, face, options, message):
    with pytest.raises(InvalidSettingError, match=message):
        eg3d_pipe.render_outputs(face.latents, **options)


def test_camera_on_a_2d_model_is_a_plain_error(tiny_pipe):
    latents = tiny_pipe.generator.latent_avg.expand(1, tiny_pipe.generator.num_ws, -1)
    for options in ({"camera": (10, 0)}, {"conditioning_camera": (0, 0)}, {"return_depth": True}):
        with pytest.raises(InvalidSettingError, match="is 2D"):
            tiny_pipe("a man", seed=1, **options)
        with pytest.raises(InvalidSettingError, match="is 2D"):
            tiny_pipe.render_outputs(latents, **options)
    with pytest.raises(InvalidSettingError, match="is 2D"):
        tiny_pipe.render_views(latents, yaws=[0, 10])
    with pytest.raises(InvalidSettingError, match="is 2D"):
        views.render_turntable(tiny_pipe, latents, "unused.mp4")
    # No camera: the 2D output carries no 3D fields and its settings no camera.
    out = tiny_pipe("a man", seed=1, camera=None)
    assert out.cameras is None and "camera" not in out.settings


def test_conditioning_camera_moves_the_truncated_latent_only_below_one(eg3d_pipe, face, monkeypatch):
    generator = eg3d_pipe.generator
    mean_latent = generator.mean_latent
    calls = record_calls(monkeypatch, generator, "mean_latent")
    eg3d_pipe._conditioned_means.clear()
    w = face.latents
    # ψ = 1: the latent itself, whatever the camera (and no mean is computed).
    assert eg3d_pipe.truncate(w, 1.0, conditioning_camera=(30, 0)) is w and not calls
    plain = eg3d_pipe.truncate(w, 0.5)
    torch.testing.assert_close(plain, generator.latent_avg + 0.5 * (w - generator.latent_avg))
    side = eg3d_pipe.truncate(w, 0.5, conditioning_camera=(30, 0))
    mean = mean_latent(CONDITIONED_MEAN_SAMPLES, torch.Generator().manual_seed(CONDITIONED_MEAN_SEED),
                       camera_label(30, 0))
    torch.testing.assert_close(side, mean + 0.5 * (w - mean))
    assert (side - plain).abs().max() > 1e-4
    front = eg3d_pipe.truncate(w, 0.5, conditioning_camera=(0, 0))
    assert (side - front).abs().max() > 1e-4
    # Cached per camera: (30, 0) again computes nothing.
    assert torch.equal(eg3d_pipe.truncate(w, 0.5, conditioning_camera=camera_label(30, 0)), side)
    assert len(calls) == 2
    # Per-image conditioning cameras and per-image ψ.
    both = eg3d_pipe.truncate(w.expand(2, -1, -1), torch.tensor([0.5, 1.0]), conditioning_camera=[[30, 0], [0, 0]])
    torch.testing.assert_close(both[0], side[0])
    torch.testing.assert_close(both[1], w[0])


def test_render_views_shapes_and_planes_computed_once(eg3d_pipe, face, monkeypatch):
    generator = eg3d_pipe.generator
    calls = record_calls(monkeypatch, generator, "synthesize_planes")
    latents = torch.cat([face.latents, generator.latent_avg.expand(1, 8, -1)])
    out = eg3d_pipe.render_views(latents, yaws=[-30, 0, 30], pitches=5, truncation=0.7, return_depth=True,
                                 return_raw_image=True)
    assert len(calls) == 1
    assert out.images.shape == (2, 3, 3, 64, 64) and out.depth.shape == (2, 3, 1, 16, 16)
    assert out.raw_images.shape == (2, 3, 3, 16, 16)
    assert torch.equal(out.cameras, camera_label([-30, 0, 30], 5))
    # In mode "const" a view is exactly that camera rendered alone: the same tri-planes (the backbone draws no
    # noise) and the same ray samples (reseeded for every render).
    alone = eg3d_pipe.render(latents, 0.7, camera=(0, 5))
    assert torch.equal(out.images[:, 1], alone)
    assert (out.images[:, 0] - out.images[:, 2]).abs().mean() > 1e-2
    assert len(out.pil_images(1)) == 3 and out.depth_images(0)[0].mode == "L"


def test_turntable_writes_a_playable_mp4(eg3d_pipe, face, tmp_path):
    path = views.render_turntable(eg3d_pipe, face.latents[0], tmp_path / "turn.mp4", num_frames=5, fps=10)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 64)
        assert float(stream.average_rate) == 10
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == 5
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: browsers can play it while it loads
    # The frames are the turntable's cameras in order: each decoded frame is nearest to its own camera's render
    # (H.264 at CRF 18 leaves ~3 grey levels of error on these noise-like toy faces; other views are ~4 away).
    yaws, pitches = views.turntable_cameras(5)
    expected = eg3d_pipe.render_views(face.latents, yaws=yaws, pitches=pitches).images[0]
    expected = np.stack([np.asarray(image, dtype=np.float32) for image in views.tensor_to_pil(expected)])
    errors = np.abs(np.stack(frames)[:, None].astype(np.float32) - expected[None]).mean(axis=(2, 3, 4))
    assert errors.argmin(axis=1).tolist() == [0, 1, 2, 3, 4]


def test_turntable_gif_depth_and_video_errors(eg3d_pipe, face, tmp_path):
    path = views.render_turntable(eg3d_pipe, face.latents, tmp_path / "turn.gif", num_frames=4, fps=20,
                                  content="depth", pitch_amplitude=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16) and gif.info["duration"] == 50
    yaws, pitches = views.turntable_cameras(4, pitch_amplitude=0)
    assert torch.equal(pitches, torch.full_like(pitches, views.TURNTABLE_PITCH))
    assert yaws[0] == 0 and yaws[1] == pytest.approx(views.TURNTABLE_YAW_AMPLITUDE)
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InvalidSettingError, match=".mp4 or .gif"):
        views.write_video([frame], tmp_path / "turn.avi")
    with pytest.raises(InvalidSettingError, match="even frame sides"):
        views.write_video([np.zeros((7, 8, 3), np.uint8)], tmp_path / "odd.mp4")
    assert not (tmp_path / "odd.mp4").exists()
    with pytest.raises(InvalidSettingError, match="at least one frame"):
        views.write_video([], tmp_path / "empty.mp4")
    with pytest.raises(InvalidSettingError, match="fps"):
        views.write_video([frame], tmp_path / "slow.gif", fps=0)
    with pytest.raises(InvalidSettingError, match="number of frames"):
        views.turntable_cameras(0)


def test_save_load_round_trip_is_bit_identical(eg3d_pipe, face, mask_path, tmp_path):
    eg3d_pipe.save_pretrained(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "mm2latent.json").read_text())
    assert manifest["components"]["generator"]["class"] == "eg3d"
    loaded = FacePipeline.from_pretrained(tmp_path / "model", device="cpu")
    loaded.show_progress = False
    assert isinstance(loaded.generator, TriPlaneGenerator)
    # Same float32 weights, realigned in memory: the same kernels run, so the same bits come out.
    out = loaded(PROMPT, mask=mask_path, seed=7, camera=(20, 5), truncation=0.6)
    expected = eg3d_pipe(PROMPT, mask=mask_path, seed=7, camera=(20, 5), truncation=0.6)
    assert torch.equal(out.latents, expected.latents)
    assert np.array_equal(pixels(out.images[0]), pixels(expected.images[0]))


def test_cli_yaw_pitch_depth_and_turntable(tmp_path, capsys):
    out = tmp_path / "face.png"
    assert main(["generate", "--preset", "tiny-eg3d", "--prompt", "a man", "--seed", "4", "--yaw", "20",
                 "--save-depth", "--turntable", str(tmp_path / "turn.gif"), "--frames", "3", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert read_png_settings(out)["camera"] == [20.0, 0.0]
    assert read_png_settings(tmp_path / "face_depth.png")["camera"] == [20.0, 0.0]
    with Image.open(tmp_path / "turn.gif") as gif:
        assert gif.n_frames == 3
    assert main(["generate", "--preset", "tiny", "--prompt", "a man", "--pitch", "5", "--out", str(out),
                 "--device", "cpu"]) == 2
    assert "is 2D" in capsys.readouterr().err
