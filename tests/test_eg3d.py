"""EG3D generator: camera conventions, rendering, determinism, and conversion of NVIDIA pickles.

Equality with NVlabs/eg3d's own code (same weights, latents, camera, noise: bit-identical images,
raw images and depths on the CPU) was checked outside the test suite, against their repository;
see README (3D-aware faces). These tests pin the conventions and the behaviour that check relies on.
"""

from __future__ import annotations

import builtins
import json
import math
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm2latent.errors import CheckpointFormatError, InvalidSettingError
from mm2latent.models.camera import camera_label, fov_to_intrinsics, split_camera_label
from mm2latent.models.eg3d import RenderingOptions, TriPlaneGenerator, build_tiny_eg3d, tiny_eg3d_config
from mm2latent.models.eg3d.checkpoints import nvidia_state_dict, triplane_generator_from_nvidia
from mm2latent.models.eg3d.renderer import ray_march, render_rays, sample_pdf, sample_rays
from mm2latent.models.generator import Generator, generator_class, generator_class_name
from mm2latent.models.stylegan2_checkpoints import add_convert_arguments, convert_checkpoint, run_convert

RADIUS = 2.7
PIVOT_Z = 0.2


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny convolutions run slower with two threads on a shared two-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(generator: TriPlaneGenerator, seed: int) -> TriPlaneGenerator:
    """Give the zero-initialised noise strengths and biases random values, so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if name.endswith("noise_strength"):
                p.copy_(torch.randn([], generator=g) * 0.5)
            elif name.endswith(".bias") and ".affine." not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        generator.latent_avg.copy_(torch.randn(generator.style_dim, generator=g))
    return generator.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny() -> TriPlaneGenerator:
    return _randomise(build_tiny_eg3d(), seed=1)


def _ws(generator: TriPlaneGenerator, batch: int = 1, seed: int = 0) -> torch.Tensor:
    z = torch.randn(batch, generator.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return generator.mapping(z).unsqueeze(1).repeat(1, generator.num_ws, 1)


# ----------------------------------------------------------------------------------------------
# 1. cameras


def test_frontal_camera_matches_the_official_orbit_convention():
    # LookAtPoseSampler(pi/2, pi/2, pivot=[0, 0, 0.2], r=2.7): theta = phi = pi/2, so the camera is at
    # (r sin(phi) cos(pi - theta), r cos(phi), r sin(phi) sin(pi - theta)) = (0, 0, 2.7); it looks
    # at the pivot: forward = (0, 0, 0.2 - 2.7) / 2.5 = (0, 0, -1); right = -(up x forward) = (1, 0, 0);
    # camera y = forward x right = (0, -1, 0) (OpenCV: image rows go down, world y goes up).
    cam2world, intrinsics = split_camera_label(camera_label(0.0, 0.0)[None])
    expected = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, RADIUS], [0, 0, 0, 1]])
    torch.testing.assert_close(cam2world[0], expected, atol=1e-6, rtol=0)
    # FOV_to_intrinsics: focal = 1 / (tan(fov * 3.14159 / 360) * 1.414), principal point at the centre.
    focal = 1 / (math.tan(18.837 * 3.14159 / 360) * 1.414)
    torch.testing.assert_close(intrinsics[0], torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]]))
    # That is the diagonal field of view: half the image diagonal (sqrt(2) / 2) seen at tan(fov / 2)
    # (the rounded 1.414 moves it by 0.015%).
    assert focal == pytest.approx(math.sqrt(2) / 2 / math.tan(math.radians(18.837) / 2), rel=2e-4)


def test_yaw_and_pitch_move_the_camera_as_the_official_sampler_does():
    labels = camera_label([90.0, 0.0], [0.0, 45.0])
    cam2world, _ = split_camera_label(labels)
    # yaw 90°: theta = pi, so the camera is at (r cos(0), 0, r sin(0)) = (2.7, 0, 0), on +x.
    torch.testing.assert_close(cam2world[0, :3, 3], torch.tensor([RADIUS, 0.0, 0.0]), atol=1e-6, rtol=0)
    # It looks at the pivot: forward = (-2.7, 0, 0.2) / |.|; right = -(up x forward) = (-f_z, 0, f_x);
    # camera y = forward x right = (0, -(f_x² + f_z²), 0) = (0, -1, 0).
    norm = math.hypot(RADIUS, PIVOT_Z)
    fx, fz = -RADIUS / norm, PIVOT_Z / norm
    expected = torch.tensor([[-fz, 0.0, fx], [0.0, -1.0, 0.0], [fx, 0.0, fz]])
    torch.testing.assert_close(cam2world[0, :3, :3], expected, atol=1e-6, rtol=0)
    # pitch 45°: v = pi/2 + pi/4, phi = arccos(1 - 2v / pi) = arccos(-1/2): y = r cos(phi) = -r/2
    # (below the face), and the rest of the radius lies along +z: sqrt(r² - r²/4) = r sqrt(3) / 2.
    torch.testing.assert_close(
        cam2world[1, :3, 3], torch.tensor([0.0, -RADIUS / 2, RADIUS * math.sqrt(3) / 2]), atol=1e-6, rtol=0
    )
    # Every rotation is orthonormal and the label ends with the intrinsics.
    rotations = cam2world[:, :3, :3]
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    assert torch.equal(labels[:, 16:], fov_to_intrinsics().reshape(1, 9).expand(2, 9))


def test_camera_label_shapes_and_bad_angles():
    assert camera_label(10.0, -5.0).shape == (25,)
    assert camera_label([0.0, 10.0, 20.0], 5.0).shape == (3, 25)
    assert torch.equal(camera_label([10.0], [-5.0])[0], camera_label(10.0, -5.0))
    with pytest.raises(InvalidSettingError, match="pitch"):
        camera_label(0.0, 90.0)
    with pytest.raises(InvalidSettingError, match="differ in length"):
        camera_label([0.0, 1.0], [0.0, 1.0, 2.0])
    with pytest.raises(InvalidSettingError, match="finite"):
        camera_label(float("nan"))
    with pytest.raises(InvalidSettingError, match="field of view"):
        fov_to_intrinsics(0.0)


def test_rays_leave_the_camera_through_pixel_centres():
    cam2world, intrinsics = split_camera_label(camera_label(0.0, 0.0)[None])
    origins, directions = sample_rays(cam2world, intrinsics, resolution=3)
    assert origins.shape == directions.shape == (1, 9, 3)
    torch.testing.assert_close(origins[0], torch.tensor([[0.0, 0.0, RADIUS]]).expand(9, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(1, 9))
    # Pixel (row 1, column 1) is the principal point: its ray is the viewing direction (0, 0, -1).
    torch.testing.assert_close(directions[0, 4], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)
    # Rays are row-major; one column right (camera x = world +x) and one row down (world -y), each by
    # a third of the image: tan = (1/3) / focal.
    focal = float(intrinsics[0, 0, 0])
    assert directions[0, 5, 0] / -directions[0, 5, 2] == pytest.approx(1 / 3 / focal, rel=1e-5)
    assert directions[0, 7, 1] / -directions[0, 7, 2] == pytest.approx(-1 / 3 / focal, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# 2. rendering


def test_generator_interface_and_registry(tiny):
    assert isinstance(tiny, Generator)
    assert generator_class("eg3d") is TriPlaneGenerator
    assert generator_class_name(tiny) == "eg3d"
    # 32² planes: blocks 4..32, 1 + 2 * 3 convolutions and the last torgb.
    assert (tiny.num_ws, tiny.style_dim, tiny.resolution, tiny.camera_dim) == (8, 64, 64, 25)
    assert tiny.latent_avg is tiny.backbone.mapping.w_avg


def test_render_outputs_and_two_cameras_share_the_planes(tiny):
    ws = _ws(tiny, batch=2)
    with torch.no_grad():
        front = tiny.render(ws, camera_label(0.0, 0.0))
        side = tiny.render(ws, camera_label([30.0, -20.0], [0.0, 10.0]))
        reused = tiny.render(ws, camera_label([30.0, -20.0], [0.0, 10.0]), planes=front.planes)
    assert front.image.shape == (2, 3, 64, 64)
    assert front.image_raw.shape == (2, 3, 16, 16)
    assert front.depth.shape == front.alpha.shape == (2, 1, 16, 16)
    assert front.planes.shape == (2, 3, 8, 32, 32)
    assert torch.equal(front.planes, side.planes)
    assert (front.image - side.image).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    assert (front.depth - side.depth).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # Given the planes, the backbone is skipped and the render is the same, bit for bit.
    assert torch.equal(reused.image, side.image)
    assert torch.equal(tiny.synthesis(ws, camera=camera_label(0.0, 0.0)), front.image)


class _SolidDecoder(torch.nn.Module):
    """Opaque wherever the tri-planes' single channel is set, empty elsewhere (softplus(-21) ≈ 1e-9)."""

    def forward(self, sampled_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        occupancy = sampled_features.sum(1)
        return torch.zeros(*occupancy.shape[:2], 3), 1e3 * occupancy - 20


def _solid_behind(z_front: float, box_warp: float, size: int = 64) -> torch.Tensor:
    """Tri-planes ``[1, 3, 1, size, size]`` filling the box where z < ``z_front`` (the far side from a frontal camera)."""
    planes = torch.zeros(1, 3, 1, size, size)
    rows = (torch.arange(size) + 0.5) / size * 2 - 1  # the pixel centres, in the box's [-1, 1] plane coordinates
    planes[0, 1, 0, rows < 2 * z_front / box_warp] = 1  # the second plane reads (x, z): its rows are z
    return planes


def test_depth_is_the_distance_to_the_nearest_surface():
    # A frontal camera (on +z, looking at the origin) sees the front face of a solid: each ray's depth is its
    # distance to the plane z = z_front, nearer when the solid comes forward; the ray is opaque; without a
    # solid nothing is hit. The importance samples, drawn where the coarse pass found the surface, sharpen it.
    cam2world, intrinsics = split_camera_label(camera_label(0.0, 0.0)[None])
    origins, directions = sample_rays(cam2world, intrinsics, resolution=4)
    coarse, fine = (RenderingOptions(depth_resolution=48, depth_resolution_importance=n) for n in (0, 48))
    step = (coarse.ray_end - coarse.ray_start) / (coarse.depth_resolution - 1)
    depths, errors = {}, {}
    for options in (coarse, fine):
        for z_front in (0.2, 0.0, -0.2):
            planes = _solid_behind(z_front, options.box_warp)
            _, depth, alpha = render_rays(planes, _SolidDecoder(), origins, directions, options,
                                          torch.Generator().manual_seed(0))
            expected = (z_front - origins[..., 2:]) / directions[..., 2:]
            errors[options, z_front] = float((depth - expected).abs().max())
            depths[options, z_front] = depth
            assert errors[options, z_front] < step, (z_front, errors[options, z_front])
            torch.testing.assert_close(alpha, torch.ones_like(alpha))
        assert (depths[options, 0.2] < depths[options, 0.0]).all() and (depths[options, 0.0] < depths[options, -0.2]).all()
        _, _, alpha = render_rays(torch.zeros(1, 3, 1, 64, 64), _SolidDecoder(), origins, directions, options)
        assert float(alpha.max()) < 1e-6
    assert all(errors[fine, z] < errors[coarse, z] / 2 for z in (0.2, 0.0, -0.2)), errors


def test_noise_modes_and_generators_make_renders_reproducible(tiny):
    ws = _ws(tiny)
    with torch.no_grad():
        const = [tiny.synthesis(ws, "const") for _ in range(2)]
        none = [tiny.synthesis(ws, "none") for _ in range(2)]
        free = [tiny.synthesis(ws, "random") for _ in range(2)]
        seeded = [tiny.synthesis(ws, "random", generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*const) and torch.equal(*none) and torch.equal(*seeded)
    assert not torch.equal(*free)
    assert not torch.equal(const[0], none[0])  # the noise strengths are not zero
    with pytest.raises(InvalidSettingError, match="noise_mode"):
        tiny.synthesis(ws, "fixed")


def test_latents_truncation_and_conditioning(tiny):
    ws = _ws(tiny, batch=2)
    torch.testing.assert_close(tiny.truncate(ws, 0.0), tiny.latent_avg.expand_as(ws))
    per_image = tiny.truncate(ws, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_image[0], ws[0])
    torch.testing.assert_close(per_image[1], tiny.latent_avg.expand_as(ws[1]))
    z = torch.randn(2, tiny.z_dim, generator=torch.Generator().manual_seed(4))
    front, side = tiny.mapping(z, camera_label(0.0, 0.0)), tiny.mapping(z, camera_label(40.0, 0.0))
    assert torch.equal(tiny.mapping(z), front)  # the default conditioning camera is frontal
    assert (front - side).abs().max() > 1e-3
    with pytest.raises(InvalidSettingError, match="camera"):
        tiny.synthesis(ws, camera=torch.zeros(3, 25))
    with pytest.raises(ValueError, match="ws must be"):
        tiny.synthesis(ws[:, :3])


def test_zeroed_conditioning_ignores_the_camera():
    config = tiny_eg3d_config()
    config["rendering_kwargs"]["c_gen_conditioning_zero"] = True
    generator = TriPlaneGenerator(**config)
    z = torch.randn(1, generator.z_dim)
    assert torch.equal(generator.mapping(z, camera_label(0.0, 0.0)), generator.mapping(z, camera_label(50.0, 20.0)))


def test_gradients_reach_the_latents(tiny):
    # Training M and T backpropagates through the frozen generator into w.
    ws = _ws(tiny).requires_grad_(True)
    out = tiny.render(ws, camera_label(15.0, 5.0))
    (out.image.square().mean() + out.depth.mean()).backward()
    assert torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0


def test_raw_image_is_the_rendered_rgb_when_super_resolution_reads_it_unresized():
    # A first super-resolution block without upsampling at the rendering resolution takes the
    # rendered RGB as its image skip as is; adding to it must not alter the returned raw image.
    config = {**tiny_eg3d_config(), "neural_rendering_resolution": 32, "sr_input_resolution": 32,
              "sr_first_block_upsamples": False}
    generator = _randomise(TriPlaneGenerator(**config), seed=2)
    ws, camera = _ws(generator), camera_label(10.0, 0.0)
    with torch.no_grad():
        out = generator.render(ws, camera)
        cam2world, intrinsics = split_camera_label(camera[None])
        origins, directions = sample_rays(cam2world, intrinsics, 32)
        seeded = torch.Generator().manual_seed(0)  # what "const" uses without a generator
        features, _, _ = render_rays(out.planes, generator.decoder, origins, directions, generator.rendering, seeded)
    assert torch.equal(out.image_raw, features[..., :3].permute(0, 2, 1).reshape(1, 3, 32, 32))


def test_density_activation_transparent_and_opaque_rays():
    options = RenderingOptions()
    depths = torch.linspace(2.0, 3.0, 5).reshape(1, 1, 5, 1)
    colors = torch.rand(1, 1, 5, 4, generator=torch.Generator().manual_seed(0))
    # softplus(sigma - 1) of a very negative raw density is 0: nothing is hit, the colour is the
    # black background (0, scaled to -1) and the depth, 0 / 0, becomes the farthest sample.
    rgb, depth, weights = ray_march(colors, torch.full((1, 1, 5, 1), -1e3), depths, options)
    assert torch.equal(weights, torch.zeros_like(weights))
    assert torch.equal(rgb, torch.full((1, 1, 4), -1.0)) and float(depth) == 3.0
    rgb, _, _ = ray_march(colors, torch.full((1, 1, 5, 1), -1e3), depths, RenderingOptions(white_back=True))
    assert torch.equal(rgb, torch.full((1, 1, 4), 1.0))
    # A huge density makes the first interval opaque: its midpoint colour and depth win (what lies
    # behind keeps the 1e-10 transmittance floor of the ray marcher).
    rgb, depth, weights = ray_march(colors, torch.full((1, 1, 5, 1), 1e3), depths, options)
    assert float(weights[0, 0, 0]) == 1.0 and float(weights[0, 0, 1:].sum()) == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(rgb[0, 0], (colors[0, 0, 0] + colors[0, 0, 1]) - 1)
    assert float(depth) == pytest.approx(2.125)


def test_importance_samples_follow_the_coarse_weights():
    # Bins [2, 2.25, 2.5, 2.75, 3] with all the weight on the third bin [2.5, 2.75].
    bins = torch.linspace(2.0, 3.0, 5).expand(3, 5)
    weights = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3)
    samples = sample_pdf(bins, weights, 64, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 64)
    assert samples.min() >= 2.5 - 1e-3 and samples.max() <= 2.75 + 1e-3


def test_render_rays_shapes_with_and_without_importance_samples(tiny):
    cam2world, intrinsics = split_camera_label(camera_label(0.0, 0.0)[None].expand(2, 25))
    origins, directions = sample_rays(cam2world, intrinsics, resolution=4)
    with torch.no_grad():
        planes = tiny.synthesize_planes(_ws(tiny, batch=2))
        for importance in (0, 5):
            options = RenderingOptions(depth_resolution=6, depth_resolution_importance=importance)
            features, depth, alpha = render_rays(planes, tiny.decoder, origins, directions, options)
            assert features.shape == (2, 16, 8) and depth.shape == alpha.shape == (2, 16, 1)


def test_tiny_generator_round_trips_through_safetensors(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = TriPlaneGenerator.from_pretrained(tmp_path)
    assert reloaded.rendering == tiny.rendering
    for name, value in tiny.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    ws = _ws(tiny)
    with torch.no_grad():
        assert torch.equal(reloaded.synthesis(ws), tiny.synthesis(ws))

    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("decoder.net.0.bias")
    weights["decoder.extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"decoder\.net\.0\.bias"):
        TriPlaneGenerator.from_pretrained(tmp_path)


def test_bad_configs_are_typed_errors():
    with pytest.raises(InvalidSettingError, match="unknown rendering options: ray_stat"):
        TriPlaneGenerator(**{**tiny_eg3d_config(), "rendering_kwargs": {"ray_stat": 2.0}})
    with pytest.raises(InvalidSettingError, match="ray_start"):
        RenderingOptions(ray_start=3.0, ray_end=2.0)
    with pytest.raises(InvalidSettingError, match="both"):
        RenderingOptions(ray_start="auto", ray_end=3.0)


# ----------------------------------------------------------------------------------------------
# 3. NVIDIA pickles


def _small_official_config() -> dict:
    """NVIDIA's layout at small sizes: 256² planes (EG3D fixes them), SuperresolutionHybrid2X (128²)."""
    rendering = RenderingOptions(
        depth_resolution=4, depth_resolution_importance=4, image_resolution=128,
        superresolution_module="training.superresolution.SuperresolutionHybrid2X",
    ).to_dict()
    return {"z_dim": 512, "w_dim": 512, "img_resolution": 128, "channel_base": 256, "channel_max": 8,
            "neural_rendering_resolution": 8, "rendering_kwargs": rendering}


def _nvidia_init_kwargs(config: dict, easydict: type) -> dict:
    """``G_ema.init_kwargs`` as NVIDIA's train.py builds them (``--cfg=ffhq --gen_pose_cond=True``)."""
    return easydict(
        z_dim=config["z_dim"], w_dim=config["w_dim"], mapping_kwargs=easydict(num_layers=2),
        channel_base=config["channel_base"], channel_max=config["channel_max"], fused_modconv_default="inference_only",
        rendering_kwargs=easydict(config["rendering_kwargs"]), num_fp16_res=0, sr_num_fp16_res=4,
        sr_kwargs=easydict(channel_base=config["channel_base"], channel_max=config["channel_max"],
                           fused_modconv_default="inference_only"),
        conv_clamp=None, c_dim=25, img_resolution=config["img_resolution"], img_channels=3,
    )


def write_eg3d_pickle(path, generator: TriPlaneGenerator, config: dict, monkeypatch, live_rendering: dict | None = None,
                      neural_rendering_resolution: int | None = None):
    """Pickle ``generator`` the way NVlabs/eg3d's training loop does, with stand-ins for its classes.

    Persistent classes (TriPlaneGenerator, the StyleGAN2 layers) pickle as
    ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with their module source and state;
    the renderer, ray sampler and decoder are plain modules of ``training.*``; ``rendering_kwargs``
    are ``dnnlib.util.EasyDict``. The stand-ins exist only while pickling.
    """
    fakes = {name: types.ModuleType(name) for name in (
        "torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.triplane",
        "training.volumetric_rendering", "training.volumetric_rendering.renderer",
        "training.volumetric_rendering.ray_sampler", "training.volumetric_rendering.ray_marcher")}

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("NVIDIA's reconstructor must not be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    fakes["dnnlib.util"].EasyDict = easydict

    def plain_class(module: str, name: str) -> type:
        cls = type(name, (), {"__module__": module})
        setattr(fakes[module], name, cls)
        return cls

    def plain(module: str, name: str, state: dict) -> object:
        obj = plain_class(module, name)()
        obj.__dict__.update(state)
        return obj

    class Persistent:
        def __init__(self, class_name: str, state: dict):
            self.class_name, self.state = class_name, state

        def __reduce__(self):
            meta = dict(type="class", version=6, class_name=self.class_name, state=self.state,
                        module_src="raise SystemExit('pickled module source was executed')")
            return _reconstruct_persistent_obj, (meta,)

    def module_state(tree: dict, **extra) -> dict:
        params, buffers, modules = OrderedDict(), OrderedDict(), OrderedDict()
        for key, value in tree.items():
            if isinstance(value, dict):
                modules[key] = Persistent(key, module_state(value))
            elif key in ("w_avg", "noise_const", "resample_filter"):
                buffers[key] = value
            else:
                params[key] = torch.nn.Parameter(value, requires_grad=False)
        return dict(training=False, _parameters=params, _buffers=buffers, _non_persistent_buffers_set=set(),
                    _modules=modules, **extra)

    tree: dict = {}
    for name, value in nvidia_state_dict(generator).items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    decoder_tree = tree.pop("decoder")
    net = torch.nn.Sequential.__new__(torch.nn.Sequential)  # NVIDIA's decoder holds a torch Sequential
    net.__dict__.update(module_state({}))
    net._modules = OrderedDict([("0", Persistent("FullyConnectedLayer", module_state(decoder_tree["net"]["0"]))),
                                ("1", torch.nn.Softplus()),
                                ("2", Persistent("FullyConnectedLayer", module_state(decoder_tree["net"]["2"])))])
    marcher = plain("training.volumetric_rendering.ray_marcher", "MipRayMarcher2", module_state({}))
    renderer = plain("training.volumetric_rendering.renderer", "ImportanceRenderer",
                     {**module_state({}), "plane_axes": torch.eye(3).expand(3, 3, 3)})
    renderer._modules["ray_marcher"] = marcher
    state = module_state(
        tree,
        _init_args=(),
        _init_kwargs=_nvidia_init_kwargs(config, easydict),
        rendering_kwargs=easydict(live_rendering or config["rendering_kwargs"]),
        z_dim=config["z_dim"], c_dim=25, w_dim=config["w_dim"], img_resolution=config["img_resolution"],
        img_channels=3, _last_planes=None,
    )
    if neural_rendering_resolution is not None:
        state["neural_rendering_resolution"] = neural_rendering_resolution
    state["_modules"]["decoder"] = plain("training.triplane", "OSGDecoder", {**module_state({}), "hidden_dim": 64})
    state["_modules"]["decoder"]._modules["net"] = net
    state["_modules"]["renderer"] = renderer
    state["_modules"]["ray_sampler"] = plain("training.volumetric_rendering.ray_sampler", "RaySampler",
                                             {**module_state({}), "ray_origins_h": None})
    snapshot = {
        "G_ema": Persistent("TriPlaneGenerator", state),
        "augment_pipe": types.SimpleNamespace(),
        "evil": _Exec(),
        "training_set_kwargs": easydict(resolution=config["img_resolution"]),
    }
    with monkeypatch.context() as m:
        for name, module in fakes.items():
            m.setitem(sys.modules, name, module)
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)


class _Exec:
    """Unpickling this runs ``exec``: the restricted unpickler must stub it instead."""

    def __reduce__(self):
        return builtins.exec, ("raise SystemExit('a pickled call was executed')",)


@pytest.fixture(scope="module")
def small_official() -> tuple[TriPlaneGenerator, dict]:
    config = _small_official_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        generator = TriPlaneGenerator(**config)
    return _randomise(generator, seed=6), config


def test_eg3d_pickle_converts_to_safetensors_and_reloads_bit_identically(small_official, tmp_path, monkeypatch):
    generator, config = small_official
    path = tmp_path / "ffhq512-128.pkl"
    live = {**config["rendering_kwargs"], "depth_resolution_importance": 3}  # training may update the options
    write_eg3d_pickle(path, generator, config, monkeypatch, live_rendering=live, neural_rendering_resolution=8)
    assert "torch_utils" not in sys.modules and "training" not in sys.modules

    with pytest.raises(CheckpointFormatError, match="allow"):
        convert_checkpoint(path, tmp_path / "refused")
    args = add_convert_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--input", str(path), "--output", str(tmp_path / "out"), "--allow-pickle"])
    with pytest.warns(UserWarning, match="arbitrary code"):
        assert run_convert(args) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not list((tmp_path / "out").glob("*.pkl")) and not list((tmp_path / "out").glob("*.bin"))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["neural_rendering_resolution"] == 8 and saved["sr_conv_clamp"] == 256
    assert saved["rendering_kwargs"]["depth_resolution_importance"] == 3  # the live options win

    reloaded = TriPlaneGenerator.from_pretrained(tmp_path / "out")
    assert reloaded.num_ws == 14 and reloaded.resolution == 128
    expected = generator.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_converted_generator_renders_like_the_original(small_official):
    generator, config = small_official
    converted = triplane_generator_from_nvidia(nvidia_state_dict(generator), _nvidia_init_kwargs(config, dict),
                                               neural_rendering_resolution=8)
    ws = _ws(generator)
    camera = camera_label(20.0, -10.0)
    with torch.no_grad():
        assert torch.equal(converted.synthesis(ws, camera=camera), generator.synthesis(ws, camera=camera))


def test_missing_unexpected_and_misshapen_keys_are_named(small_official):
    generator, config = small_official
    init_kwargs = _nvidia_init_kwargs(config, dict)
    state = nvidia_state_dict(generator)
    broken = {k: v for k, v in state.items() if k != "backbone.synthesis.b16.conv1.noise_strength"}
    broken["backbone.synthesis.b16.skip.weight"] = torch.zeros(1)
    broken["decoder.net.2.bias"] = torch.zeros(7)
    broken["superresolution.block0.conv0.resample_filter"] = torch.ones(4, 4)
    with pytest.raises(CheckpointFormatError) as error:
        triplane_generator_from_nvidia(broken, init_kwargs, neural_rendering_resolution=8)
    message = str(error.value)
    for part in ("missing keys: backbone.synthesis.b16.conv1.noise_strength",
                 "unexpected keys: backbone.synthesis.b16.skip.weight",
                 "decoder.net.2.bias has shape (7,), expected (33,)",
                 "superresolution.block0.conv0.resample_filter is not the [1, 3, 3, 1] filter"):
        assert part in message
    with pytest.warns(UserWarning, match="neural_rendering_resolution"):
        assert triplane_generator_from_nvidia(state, init_kwargs).neural_rendering_resolution == 64
    with pytest.raises(CheckpointFormatError, match="superresolution_module"):
        rendering = {**config["rendering_kwargs"], "superresolution_module": "training.superresolution.Mine"}
        triplane_generator_from_nvidia(state, {**init_kwargs, "rendering_kwargs": rendering}, neural_rendering_resolution=8)
