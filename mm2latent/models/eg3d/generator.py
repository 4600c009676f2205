"""EG3D's ``TriPlaneGenerator``: a 3D-aware :class:`~mm2latent.models.generator.Generator`.

W+ (``num_ws`` = 14 at 512²) drives a StyleGAN2 backbone that paints three axis-aligned feature
planes (3 x 32 channels at 256²); an MLP decodes density and colour features of any 3D point from
them; volume rendering along the rays of a camera gives a low-resolution feature image (128² or
64²) whose first three channels are the raw RGB; a super-resolution network driven by the last w
turns it into the final 512² image. Port of NVlabs/eg3d ``training/triplane.py``; parameter names
are the official ``G_ema`` ones so converted pickles load strictly
(:func:`~.checkpoints.triplane_generator_from_nvidia`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ...errors import CheckpointFormatError, InvalidSettingError
from ..camera import CAMERA_LABEL_DIM, DEFAULT_FOV_DEGREES, camera_label, parse_camera, split_camera_label
from ..generator import broadcast_ws, truncate_latents
from ..stylegan2 import LATENT_AVG_SAMPLES, NOISE_MODES
from .layers import StyleGAN2Backbone
from .options import RenderingOptions
from .renderer import OSGDecoder, render_rays, sample_rays
from .superresolution import SUPERRESOLUTION_LAYOUTS, SuperResolution

__all__ = ["RAY_SAMPLING_SEED", "EG3DOutput", "TriPlaneGenerator"]

NUM_PLANES = 3
RGB_CHANNELS = 3
# Seed of the ray-sample draws when the noise mode is "const" or "none" and no generator is given.
RAY_SAMPLING_SEED = 0


@dataclass
class EG3DOutput:
    """Everything one EG3D render produces.

    Attributes:
        image: final image ``[B, 3, R, R]`` in [-1, 1] (not clamped).
        image_raw: neural-rendering RGB ``[B, 3, n, n]`` in [-1, 1] (the first 3 rendered channels).
        depth: expected depth along each ray ``[B, 1, n, n]`` (world units from the camera centre).
        alpha: accumulated opacity ``[B, 1, n, n]`` in [0, 1].
        planes: the tri-planes ``[B, 3, C, P, P]`` (camera-independent).
    """

    image: torch.Tensor
    image_raw: torch.Tensor
    depth: torch.Tensor
    alpha: torch.Tensor
    planes: torch.Tensor


class TriPlaneGenerator(nn.Module, PyTorchModelHubMixin):
    """EG3D tri-plane generator driven by W+ codes and a 25-number camera label.

    ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``; ``from_pretrained``
    loads them strictly (safetensors only). NVIDIA pickles convert with
    ``python -m mm2latent convert --input ffhq512-128.pkl --output dir --allow-pickle``.

    The mean latent ``latent_avg`` is the checkpoint's ``backbone.mapping.w_avg``: NVIDIA's running
    mean of w over the training pairs (z, camera label) — exactly what official truncation pulls
    toward. It is not the mean at one camera; :meth:`mean_latent` computes that.

    Random draws: the backbone noise (mode "random"), the ray jitter and importance samples, and
    the super-resolution noise (``superresolution_noise_mode`` "random") come from ``generator``
    in that order (NVIDIA's order). Without a generator, mode "random" uses the global RNG (as
    NVIDIA does) and modes "const" and "none" seed the ray samples with :data:`RAY_SAMPLING_SEED`,
    so they render the same image on every call (NVIDIA's after ``torch.manual_seed(0)``).

    Args:
        z_dim: size of z.
        w_dim: size of w (the W+ layers' style_dim).
        img_resolution: final image side.
        plane_resolution: tri-plane side (the backbone's output resolution; 256 in EG3D).
        plane_channels: feature channels of each plane, also the decoder's output features and
            the super-resolution input (32 in EG3D).
        mapping_layers: mapping network depth (``mapping_kwargs.num_layers``; 2 in EG3D).
        mapping_lr_multiplier: mapping learning-rate multiplier (run-time weight scale).
        channel_base: backbone channels at resolution r are min(channel_base // r, channel_max).
        channel_max: most channels of any backbone block.
        conv_clamp: backbone activation clamp (None in the public models).
        decoder_hidden_features: width of the OSG decoder's hidden layer (64).
        neural_rendering_resolution: default side of the volume-rendered image (128 or 64).
        sr_input_resolution: side the rendered image is resized to before super-resolution
            (None: from ``rendering_kwargs['superresolution_module']``).
        sr_channels: output channels of the two super-resolution blocks (None: from the module).
        sr_first_block_upsamples: the first super-resolution block upsamples (None: from the module).
        sr_conv_clamp: super-resolution activation clamp (256 in the public models).
        rendering_kwargs: NVIDIA's rendering options (see :class:`~.options.RenderingOptions`;
            missing keys take the FFHQ values).
    """

    def __init__(
        self,
        z_dim: int = 512,
        w_dim: int = 512,
        img_resolution: int = 512,
        plane_resolution: int = 256,
        plane_channels: int = 32,
        mapping_layers: int = 2,
        mapping_lr_multiplier: float = 0.01,
        channel_base: int = 32768,
        channel_max: int = 512,
        conv_clamp: float | None = None,
        decoder_hidden_features: int = 64,
        neural_rendering_resolution: int = 128,
        sr_input_resolution: int | None = None,
        sr_channels: list[int] | None = None,
        sr_first_block_upsamples: bool | None = None,
        sr_conv_clamp: float | None = 256,
        rendering_kwargs: dict | None = None,
    ):
        super().__init__()
        self.rendering = RenderingOptions.from_dict(rendering_kwargs)
        layout = SUPERRESOLUTION_LAYOUTS.get(self.rendering.superresolution_module)
        if self.rendering.superresolution_module is not None and layout is None:
            raise InvalidSettingError(
                f"unknown superresolution_module {self.rendering.superresolution_module!r}; known: "
                f"{', '.join(SUPERRESOLUTION_LAYOUTS)} (or None with explicit sr_* settings)"
            )
        sr_layout = (sr_input_resolution, None if sr_channels is None else tuple(sr_channels), sr_first_block_upsamples)
        if layout is not None:
            implied = (layout.input_resolution, layout.channels, layout.first_block_upsamples)
            if layout.img_resolution != img_resolution or any(
                given is not None and given != value for given, value in zip(sr_layout, implied)
            ):
                raise InvalidSettingError(
                    f"{self.rendering.superresolution_module} is {layout}: the sr_* settings or img_resolution disagree"
                )
            sr_layout = implied
        elif None in sr_layout:
            raise InvalidSettingError("a custom super-resolution (superresolution_module None) needs all sr_* settings")
        if self.rendering.image_resolution != img_resolution:
            raise InvalidSettingError(
                f"rendering image_resolution {self.rendering.image_resolution} != img_resolution {img_resolution}"
            )
        if neural_rendering_resolution < 1:
            raise InvalidSettingError(f"neural_rendering_resolution must be >= 1, got {neural_rendering_resolution}")

        self.z_dim = z_dim
        self.style_dim = w_dim
        self.resolution = img_resolution
        self.camera_dim = CAMERA_LABEL_DIM
        self.plane_channels = plane_channels
        self.neural_rendering_resolution = neural_rendering_resolution
        self.backbone = StyleGAN2Backbone(
            z_dim, CAMERA_LABEL_DIM, w_dim, plane_resolution, NUM_PLANES * plane_channels,
            mapping_layers, mapping_lr_multiplier, channel_base, channel_max, conv_clamp,
        )
        self.num_ws = self.backbone.num_ws
        self.superresolution = SuperResolution(
            plane_channels, w_dim, img_resolution, *sr_layout, self.rendering.sr_antialias, sr_conv_clamp
        )
        self.decoder = OSGDecoder(
            plane_channels, decoder_hidden_features, plane_channels, self.rendering.decoder_lr_mul
        )

    # -- hub loading ---------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        """Hub loader hook: strict by default; key or shape mismatches raise CheckpointFormatError."""
        try:
            return super()._from_pretrained(strict=strict, **kwargs)
        except RuntimeError as exc:
            raise CheckpointFormatError(f"weights do not match the EG3D config: {exc}") from exc

    # -- cameras and latents -------------------------------------------------------------------

    @property
    def latent_avg(self) -> torch.Tensor:
        """w̄ ``[w_dim]``: the checkpoint's ``backbone.mapping.w_avg`` (the buffer itself)."""
        return self.backbone.mapping.w_avg

    def _param_like(self) -> torch.Tensor:
        return self.decoder.net[0].weight

    def default_camera(self, fov_degrees: float = DEFAULT_FOV_DEGREES) -> torch.Tensor:
        """The frontal camera label ``[25]`` on the model's orbit (``avg_camera_radius`` / ``_pivot``)."""
        options = self.rendering
        return camera_label(0.0, 0.0, options.avg_camera_radius, options.avg_camera_pivot, fov_degrees)

    def camera_labels(self, camera, fov_degrees: float = DEFAULT_FOV_DEGREES, name: str = "camera") -> torch.Tensor:
        """Labels ``[N, 25]`` from a camera spec: (yaw°, pitch°) pairs go on the model's orbit.

        Args:
            camera: (yaw°, pitch°), ``[N, 2]`` angles, a label ``[25]`` or labels ``[N, 25]``
                (see :func:`~mm2latent.models.camera.parse_camera`).
            fov_degrees: the field of view of cameras given by angles.
            name: the setting's name in error messages.

        Raises:
            InvalidSettingError: see :func:`~mm2latent.models.camera.parse_camera`.
        """
        options = self.rendering
        return parse_camera(camera, options.avg_camera_radius, options.avg_camera_pivot, fov_degrees, name)

    def _camera(self, camera: torch.Tensor | None, batch: int) -> torch.Tensor:
        ref = self._param_like()
        if camera is None:
            camera = self.default_camera()
        camera = torch.as_tensor(camera)
        if camera.ndim == 1:
            camera = camera.unsqueeze(0)
        if camera.ndim != 2 or camera.shape[1] != CAMERA_LABEL_DIM or camera.shape[0] not in (1, batch):
            raise InvalidSettingError(
                f"camera must be a label [{CAMERA_LABEL_DIM}], [1, {CAMERA_LABEL_DIM}] or "
                f"[{batch}, {CAMERA_LABEL_DIM}], got {tuple(camera.shape)}"
            )
        if not torch.isfinite(camera).all():
            raise InvalidSettingError("camera labels must be finite")
        return camera.to(device=ref.device, dtype=torch.float32).expand(batch, -1)

    def mapping(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Map z ``[B, z_dim]`` and conditioning cameras c (``[25]`` / ``[B, 25]``, default frontal) to w ``[B, w_dim]``.

        As NVIDIA: the label is multiplied by ``c_scale``, or zeroed with ``c_gen_conditioning_zero``.
        """
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [B, {self.z_dim}], got {tuple(z.shape)}")
        ref = self._param_like()
        c = self._camera(c, z.shape[0])
        if self.rendering.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z.to(ref.device), c * self.rendering.c_scale).to(ref.dtype)

    @torch.no_grad()
    def mean_latent(
        self,
        num_samples: int = LATENT_AVG_SAMPLES,
        generator: torch.Generator | None = None,
        camera: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean of ``mapping(z, camera)`` over ``num_samples`` standard-normal z (default: frontal camera)."""
        ref = self._param_like()
        device = generator.device if generator is not None else ref.device
        z = torch.randn(num_samples, self.z_dim, generator=generator, device=device).to(ref.device)
        return self.mapping(z, camera).float().mean(0).to(ref.dtype)

    def truncate(self, ws: torch.Tensor, psi: float | torch.Tensor) -> torch.Tensor:
        """``latent_avg + psi (ws - latent_avg)``; ``psi`` a float (1.0 returns ``ws`` itself) or ``[B]``."""
        return truncate_latents(ws, self.latent_avg, psi)

    # -- synthesis -----------------------------------------------------------------------------

    def _broadcast_ws(self, ws: torch.Tensor) -> torch.Tensor:
        return broadcast_ws(ws, self.num_ws, self.style_dim, self._param_like())

    def synthesize_planes(
        self, ws: torch.Tensor, noise_mode: str = "const", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The tri-planes ``[B, 3, C, P, P]`` of ``ws`` (they do not depend on the camera)."""
        if noise_mode not in NOISE_MODES:
            raise InvalidSettingError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        ws = self._broadcast_ws(ws)
        planes = self.backbone.synthesis(ws, noise_mode, generator)
        return planes.view(len(planes), NUM_PLANES, self.plane_channels, planes.shape[-2], planes.shape[-1])

    def render(
        self,
        ws: torch.Tensor,
        camera: torch.Tensor | None = None,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
        neural_rendering_resolution: int | None = None,
        planes: torch.Tensor | None = None,
    ) -> EG3DOutput:
        """Render ``ws`` from ``camera``; returns the image, the raw image, depth, opacity and tri-planes.

        Args:
            ws: ``[B, num_ws, w_dim]`` or ``[B, w_dim]``.
            camera: label(s) ``[25]``, ``[1, 25]`` or ``[B, 25]``; None = the frontal camera.
            noise_mode: backbone noise, "const", "random" or "none" (see the class docstring).
            generator: source of every random draw (noise, ray samples).
            neural_rendering_resolution: side of the volume-rendered image (default: the config's);
                unlike NVIDIA's code, passing it does not change the default.
            planes: tri-planes of these ``ws`` from :meth:`synthesize_planes` or an earlier render,
                reused to render another camera without running the backbone again.
        """
        if noise_mode not in NOISE_MODES:
            raise InvalidSettingError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        resolution = int(neural_rendering_resolution or self.neural_rendering_resolution)
        if resolution < 1:
            raise InvalidSettingError(f"neural_rendering_resolution must be >= 1, got {resolution}")
        ws = self._broadcast_ws(ws)
        batch = ws.shape[0]
        if generator is None and noise_mode != "random":
            generator = torch.Generator(device=ws.device).manual_seed(RAY_SAMPLING_SEED)
        cam2world, intrinsics = split_camera_label(self._camera(camera, batch))
        origins, directions = sample_rays(cam2world, intrinsics, resolution)
        if planes is None:
            planes = self.synthesize_planes(ws, noise_mode, generator)
        elif planes.shape[0] != batch or planes.shape[1:3] != (NUM_PLANES, self.plane_channels):
            expected = f"[{batch}, {NUM_PLANES}, {self.plane_channels}, P, P]"
            raise ValueError(f"planes must be {expected}, got {tuple(planes.shape)}")
        origins, directions = origins.to(planes.dtype), directions.to(planes.dtype)
        features, depth, alpha = render_rays(planes, self.decoder, origins, directions, self.rendering, generator)

        def to_image(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 1).reshape(batch, x.shape[-1], resolution, resolution)

        feature_image = to_image(features).contiguous()
        rgb = feature_image[:, :RGB_CHANNELS]
        sr_noise = self.rendering.superresolution_noise_mode
        image = self.superresolution(rgb, feature_image, ws, sr_noise, generator)
        assert image.shape == (batch, RGB_CHANNELS, self.resolution, self.resolution), image.shape
        return EG3DOutput(image, image_raw=rgb, depth=to_image(depth), alpha=to_image(alpha), planes=planes)

    def synthesis(
        self,
        ws: torch.Tensor,
        noise_mode: str = "const",
        camera: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        neural_rendering_resolution: int | None = None,
        planes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Render ``ws`` from ``camera`` (default: frontal) to ``[B, 3, R, R]`` in [-1, 1]; see :meth:`render`."""
        return self.render(ws, camera, noise_mode, generator, neural_rendering_resolution, planes).image

    def forward(
        self,
        ws: torch.Tensor,
        camera: torch.Tensor | None = None,
        truncation: float | torch.Tensor = 1.0,
        noise_mode: str = "const",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Truncate ``ws`` toward ``latent_avg`` by ``truncation`` then render it from ``camera``."""
        return self.synthesis(self.truncate(self._broadcast_ws(ws), truncation), noise_mode, camera, generator)
