"""EG3D generator: camera conventions, rendering, determinism, and conversion of NVIDIA pickles.

Equality with NVlabs/eg3d's own code (same weights, latents, camera, noise: bit-identical images,
raw images and depths on the CPU) was checked outside the test suite, against their repository;
see README (3D-aware faces). These tests pin the conventions and the behaviour that check relies on.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import pickle
import sys
import types

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


# NVlabs/eg3d's modules (eg3d/training/*.py, eg3d/torch_utils/persistence.py), rebuilt from their
# constructors: the same attribute names, parameter and buffer shapes and pickled form, with no forward
# pass. Citations are to NVlabs/eg3d at 7cf1fd1. Nothing here calls mm2latent's own EG3D layout.
NVIDIA_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training",
                  "training.triplane", "training.networks_stylegan2", "training.superresolution",
                  "training.dual_discriminator", "training.volumetric_rendering",
                  "training.volumetric_rendering.renderer", "training.volumetric_rendering.ray_sampler",
                  "training.volumetric_rendering.ray_marcher")


def _setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """torch_utils/ops/upfirdn2d.py setup_filter: outer product normalised to sum 1."""
    f = torch.tensor(taps, dtype=torch.float32)
    f = f.ger(f)
    return f / f.sum()


def nvidia_eg3d_classes(fakes: dict[str, types.ModuleType]) -> dict[str, type]:
    """Stand-ins for NVIDIA's classes, registered in the stand-in modules ``fakes``."""
    nn = torch.nn
    registry: dict[str, type] = {}

    def _reconstruct_persistent_obj(meta):  # persistence.py:181-205 (without running module_src)
        cls = registry[meta["class_name"]]
        obj = cls.__new__(cls)
        obj.__dict__.update(meta["state"])
        return obj

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    easydict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    fakes["dnnlib.util"].EasyDict = easydict

    def persistent_class(module: str):
        """persistence.py:37-131: keeps init args, pickles as _reconstruct_persistent_obj(meta)."""
        def decorate(orig):
            class Decorator(orig):
                _orig_module_src = f"raise SystemExit('the pickled source of {module} was executed')"
                _orig_class_name = orig.__name__

                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self._init_args = copy.deepcopy(args)
                    self._init_kwargs = copy.deepcopy(kwargs)

                def __reduce__(self):
                    fields = list(super().__reduce__())
                    fields += [None] * max(3 - len(fields), 0)
                    meta = dict(type="class", version=6, module_src=self._orig_module_src,
                                class_name=self._orig_class_name, state=fields[2])
                    return (_reconstruct_persistent_obj, (meta,), None, *fields[3:])

            Decorator.__name__ = Decorator.__qualname__ = orig.__name__
            registry[orig.__name__] = Decorator
            return Decorator
        return decorate

    def plain_class(module: str):
        def decorate(cls):
            cls.__module__, cls.__qualname__ = module, cls.__name__
            setattr(fakes[module], cls.__name__, cls)
            return cls
        return decorate

    sg2 = "training.networks_stylegan2"

    @persistent_class(sg2)
    class FullyConnectedLayer(nn.Module):  # networks_stylegan2.py:96
        def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1, bias_init=0):
            super().__init__()
            self.in_features, self.out_features, self.activation = in_features, out_features, activation
            self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
            self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
            self.weight_gain = lr_multiplier / math.sqrt(in_features)
            self.bias_gain = lr_multiplier

    @persistent_class(sg2)
    class MappingNetwork(nn.Module):  # networks_stylegan2.py:193
        def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=8, embed_features=None, layer_features=None,
                     activation="lrelu", lr_multiplier=0.01, w_avg_beta=0.998):
            super().__init__()
            self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
            self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
            embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
            layer_features = w_dim if layer_features is None else layer_features
            features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
            if c_dim > 0:
                self.embed = FullyConnectedLayer(c_dim, embed_features)
            for idx in range(num_layers):
                setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                                              lr_multiplier=lr_multiplier))
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    @persistent_class(sg2)
    class SynthesisLayer(nn.Module):  # networks_stylegan2.py:276
        def __init__(self, in_channels, out_channels, w_dim, resolution, kernel_size=3, up=1, use_noise=True,
                     activation="lrelu", resample_filter=(1, 3, 3, 1), conv_clamp=None, channels_last=False):
            super().__init__()
            self.in_channels, self.out_channels, self.w_dim, self.resolution, self.up = (
                in_channels, out_channels, w_dim, resolution, up)
            self.use_noise, self.activation, self.conv_clamp = use_noise, activation, conv_clamp
            self.register_buffer("resample_filter", _setup_filter(resample_filter))
            self.padding = kernel_size // 2
            self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
            self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
            if use_noise:
                self.register_buffer("noise_const", torch.randn([resolution, resolution]))
                self.noise_strength = nn.Parameter(torch.zeros([]))
            self.bias = nn.Parameter(torch.zeros([out_channels]))

    @persistent_class(sg2)
    class ToRGBLayer(nn.Module):  # networks_stylegan2.py:340
        def __init__(self, in_channels, out_channels, w_dim, kernel_size=1, conv_clamp=None, channels_last=False):
            super().__init__()
            self.in_channels, self.out_channels, self.w_dim, self.conv_clamp = in_channels, out_channels, w_dim, conv_clamp
            self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
            self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
            self.bias = nn.Parameter(torch.zeros([out_channels]))
            self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def synthesis_block(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture,
                        resample_filter, conv_clamp, use_fp16, fused_modconv_default, layer_kwargs, up):
        self.in_channels, self.w_dim, self.resolution, self.img_channels = in_channels, w_dim, resolution, img_channels
        self.is_last, self.architecture, self.use_fp16 = is_last, architecture, use_fp16
        self.channels_last, self.fused_modconv_default = False, fused_modconv_default
        self.register_buffer("resample_filter", _setup_filter(resample_filter))
        self.num_conv = self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            up_kwargs = dict(up=2, resample_filter=resample_filter) if up else {}
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, **up_kwargs,
                                        conv_clamp=conv_clamp, channels_last=False, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=False, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1

    @persistent_class(sg2)
    class SynthesisBlock(nn.Module):  # networks_stylegan2.py:365
        def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture="skip",
                     resample_filter=(1, 3, 3, 1), conv_clamp=256, use_fp16=False, fp16_channels_last=False,
                     fused_modconv_default=True, **layer_kwargs):
            super().__init__()
            synthesis_block(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture,
                            resample_filter, conv_clamp, use_fp16, fused_modconv_default, layer_kwargs, up=True)

    @persistent_class("training.superresolution")
    class SynthesisBlockNoUp(nn.Module):  # superresolution.py:158 (conv0 without up=2)
        def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture="skip",
                     resample_filter=(1, 3, 3, 1), conv_clamp=256, use_fp16=False, fp16_channels_last=False,
                     fused_modconv_default=True, **layer_kwargs):
            super().__init__()
            synthesis_block(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture,
                            resample_filter, conv_clamp, use_fp16, fused_modconv_default, layer_kwargs, up=False)

    @persistent_class(sg2)
    class SynthesisNetwork(nn.Module):  # networks_stylegan2.py:469
        def __init__(self, w_dim, img_resolution, img_channels, channel_base=32768, channel_max=512, num_fp16_res=4,
                     **block_kwargs):
            super().__init__()
            self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
            self.img_resolution_log2 = int(math.log2(img_resolution))
            self.num_fp16_res = num_fp16_res
            self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
            channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
            fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
            self.num_ws = 0
            for res in self.block_resolutions:
                is_last = res == img_resolution
                block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                       img_channels=img_channels, is_last=is_last, use_fp16=res >= fp16_resolution,
                                       **block_kwargs)
                self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
                setattr(self, f"b{res}", block)

    @persistent_class(sg2)
    class Generator(nn.Module):  # networks_stylegan2.py:529 (EG3D's StyleGAN2Backbone)
        def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs=None, **synthesis_kwargs):
            super().__init__()
            mapping_kwargs = mapping_kwargs or {}
            self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
            self.img_resolution, self.img_channels = img_resolution, img_channels
            self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                              **synthesis_kwargs)
            self.num_ws = self.synthesis.num_ws
            self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @persistent_class("training.superresolution")
    class SuperresolutionHybrid2X(nn.Module):  # superresolution.py:94
        def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias, num_fp16_res=4, conv_clamp=None,
                     channel_base=None, channel_max=None, **block_kwargs):
            super().__init__()
            use_fp16 = sr_num_fp16_res > 0
            self.input_resolution, self.sr_antialias = 64, sr_antialias
            clamp = 256 if use_fp16 else None
            self.block0 = SynthesisBlockNoUp(channels, 128, w_dim=512, resolution=64, img_channels=3, is_last=False,
                                             use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
            self.block1 = SynthesisBlock(128, 64, w_dim=512, resolution=128, img_channels=3, is_last=True,
                                         use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
            self.register_buffer("resample_filter", _setup_filter())

    @plain_class("training.volumetric_rendering.ray_marcher")
    class MipRayMarcher2(nn.Module):  # ray_marcher.py:20
        pass

    @plain_class("training.volumetric_rendering.renderer")
    class ImportanceRenderer(nn.Module):  # renderer.py:82: plane_axes is an attribute, not a buffer
        def __init__(self):
            super().__init__()
            self.ray_marcher = MipRayMarcher2()
            self.plane_axes = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                                            [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)

    @plain_class("training.volumetric_rendering.ray_sampler")
    class RaySampler(nn.Module):  # ray_sampler.py:18
        def __init__(self):
            super().__init__()
            self.ray_origins_h = self.ray_directions = self.depths = self.image_coords = self.rendering_options = None

    @plain_class("training.triplane")
    class OSGDecoder(nn.Module):  # triplane.py:112
        def __init__(self, n_features, options):
            super().__init__()
            self.hidden_dim = 64
            self.net = nn.Sequential(
                FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=options["decoder_lr_mul"]),
                nn.Softplus(),
                FullyConnectedLayer(self.hidden_dim, 1 + options["decoder_output_dim"],
                                    lr_multiplier=options["decoder_lr_mul"]))

    superresolution = {"training.superresolution.SuperresolutionHybrid2X": SuperresolutionHybrid2X}

    @persistent_class("training.triplane")
    class TriPlaneGenerator(nn.Module):  # triplane.py:19-46
        def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, sr_num_fp16_res=0, mapping_kwargs=None,
                     rendering_kwargs=None, sr_kwargs=None, **synthesis_kwargs):
            super().__init__()
            mapping_kwargs, rendering_kwargs, sr_kwargs = mapping_kwargs or {}, rendering_kwargs or {}, sr_kwargs or {}
            self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
            self.img_resolution, self.img_channels = img_resolution, img_channels
            self.renderer = ImportanceRenderer()
            self.ray_sampler = RaySampler()
            self.backbone = Generator(z_dim, c_dim, w_dim, img_resolution=256, img_channels=32 * 3,
                                      mapping_kwargs=mapping_kwargs, **synthesis_kwargs)
            self.superresolution = superresolution[rendering_kwargs["superresolution_module"]](
                channels=32, img_resolution=img_resolution, sr_num_fp16_res=sr_num_fp16_res,
                sr_antialias=rendering_kwargs["sr_antialias"], **sr_kwargs)
            self.decoder = OSGDecoder(32, {"decoder_lr_mul": rendering_kwargs.get("decoder_lr_mul", 1),
                                           "decoder_output_dim": 32})
            self.neural_rendering_resolution = 64
            self.rendering_kwargs = rendering_kwargs
            self._last_planes = None

    @persistent_class("training.dual_discriminator")
    class DualDiscriminator(nn.Module):  # dual_discriminator.py (only present in the snapshot here)
        def __init__(self, c_dim):
            super().__init__()
            self.weight = nn.Parameter(torch.randn([1, c_dim]))

    return {"EasyDict": easydict, "TriPlaneGenerator": TriPlaneGenerator, "DualDiscriminator": DualDiscriminator}


def write_nvidia_eg3d_pickle(path, config: dict, monkeypatch, seed: int = 0, label_dim: int = 25,
                             neural_rendering_resolution: int | None = 8, live_rendering: dict | None = None):
    """A network snapshot written as NVlabs/eg3d's train.py + training_loop.py write one; returns G_ema's state.

    ``G = construct_class_by_name(**G_kwargs, **common_kwargs)`` (training_loop.py:158), the
    ``dataset_label_std`` buffer (training_loop.py:159), ``G_ema = copy.deepcopy(G).eval()`` (:161), the
    EMA update's ``neural_rendering_resolution`` / ``rendering_kwargs.copy()`` (:315-316), and the snapshot
    ``dict(training_set_kwargs, G, D, G_ema, augment_pipe)`` of deep copies (:398-409) pickled with
    ``pickle.dump``. The stand-in modules exist only while this runs.
    """
    fakes = {name: types.ModuleType(name) for name in NVIDIA_MODULES}
    with monkeypatch.context() as m:
        for name, module in fakes.items():
            m.setitem(sys.modules, name, module)
        classes = nvidia_eg3d_classes(fakes)
        easydict = classes["EasyDict"]
        # train.py:222-378 with --cfg=ffhq --gen_pose_cond=True (defaults of its options), at test sizes.
        rendering = dict(  # train.py:285-310
            image_resolution=config["img_resolution"], disparity_space_sampling=False, clamp_mode="softplus",
            superresolution_module="training.superresolution.SuperresolutionHybrid2X",
            c_gen_conditioning_zero=False, gpc_reg_prob=0.5, c_scale=1.0, superresolution_noise_mode="none",
            density_reg=0.25, density_reg_p_dist=0.004, reg_type="l1", decoder_lr_mul=1.0, sr_antialias=True,
            depth_resolution=4, depth_resolution_importance=4, ray_start=2.25, ray_end=3.3, box_warp=1,
            avg_camera_radius=2.7, avg_camera_pivot=[0, 0, 0.2])
        rendering = easydict(rendering)
        g_kwargs = easydict(z_dim=config["z_dim"], w_dim=config["w_dim"], mapping_kwargs=easydict(num_layers=2),
                            channel_base=config["channel_base"], channel_max=config["channel_max"],
                            fused_modconv_default="inference_only", rendering_kwargs=rendering, num_fp16_res=0,
                            sr_num_fp16_res=4, sr_kwargs=easydict(channel_base=config["channel_base"],
                                                                  channel_max=config["channel_max"],
                                                                  fused_modconv_default="inference_only"),
                            conv_clamp=None)
        common = dict(c_dim=label_dim, img_resolution=config["img_resolution"], img_channels=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            G = classes["TriPlaneGenerator"](**g_kwargs, **common).train().requires_grad_(False)
            with torch.no_grad():  # trained values everywhere (NVIDIA initialises biases and strengths to 0)
                for name, p in G.named_parameters():
                    if name.endswith(("noise_strength", "bias")):
                        p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if ".affine." in name else 0.0))
                G.backbone.mapping.w_avg.copy_(torch.randn(config["w_dim"]))
            G.register_buffer("dataset_label_std", torch.rand(label_dim))
            D = classes["DualDiscriminator"](c_dim=label_dim)
            G_ema = copy.deepcopy(G).eval()
        if neural_rendering_resolution is not None:
            G.neural_rendering_resolution = neural_rendering_resolution
            G_ema.neural_rendering_resolution = G.neural_rendering_resolution
        G.rendering_kwargs = easydict({**rendering, **(live_rendering or {})})
        G_ema.rendering_kwargs = G.rendering_kwargs.copy()
        snapshot = dict(training_set_kwargs=dict(easydict(resolution=config["img_resolution"], use_labels=True)))
        for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", _Exec())]:
            if isinstance(module, torch.nn.Module):
                module = copy.deepcopy(module).eval().requires_grad_(False).cpu()
            snapshot[name] = module
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
    return {name: value.detach().clone() for name, value in G_ema.state_dict().items()}


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


def test_nvidia_eg3d_pickle_converts_renders_and_reloads_bit_identically(tmp_path, monkeypatch):
    config = _small_official_config()
    path = tmp_path / "ffhq512-128.pkl"
    live = {"depth_resolution_importance": 3}  # training may update the options after construction
    g_ema = write_nvidia_eg3d_pickle(path, config, monkeypatch, seed=5, live_rendering=live)
    assert "torch_utils" not in sys.modules and "training" not in sys.modules
    assert g_ema["dataset_label_std"].shape == (25,)  # what NVIDIA's published pickles hold

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
    assert saved["rendering_kwargs"]["avg_camera_pivot"] == [0, 0, 0.2]

    reloaded = TriPlaneGenerator.from_pretrained(tmp_path / "out")
    assert reloaded.num_ws == 14 and reloaded.resolution == 128
    # Every inference weight of NVIDIA's G_ema, under NVIDIA's name, bit for bit; what is dropped is
    # the constant [1, 3, 3, 1] filters and the training-only camera-label statistics.
    dropped = {k for k in g_ema if k.endswith(".resample_filter") or k in ("resample_filter", "dataset_label_std")}
    assert set(reloaded.state_dict()) == set(g_ema) - dropped
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, g_ema[name]), name
    with torch.no_grad():
        image = reloaded.synthesis(_ws(reloaded), camera=camera_label(20.0, -10.0))
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all() and image.std() > 0


def test_label_std_of_another_shape_is_refused(small_official):
    generator, config = small_official
    state = {**nvidia_state_dict(generator), "dataset_label_std": torch.ones(3)}
    with pytest.raises(CheckpointFormatError, match="dataset_label_std"):
        triplane_generator_from_nvidia(state, _nvidia_init_kwargs(config, dict), neural_rendering_resolution=8)


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
