"""The generator interface: what the pipeline, M, T, editing and training need of a GAN.

Any frozen GAN with a W+ latent space can sit at the end of the method (METHOD.md: StyleGAN2 for 2D,
EG3D for 3D-aware faces). M and T size themselves from ``num_ws`` and ``style_dim``; the pipeline
renders with ``synthesis(ws, noise_mode, **render_kwargs)`` (a 3D generator takes its camera there);
truncation pulls toward ``latent_avg`` (w̄, pSp's ``latent_avg``). Generators are
``PyTorchModelHubMixin`` modules (``config.json`` + ``model.safetensors``); the manifest names the
class with ``{"class": <name>}`` from :data:`GENERATOR_CLASSES` (default ``"stylegan2"``).
"""

from __future__ import annotations

import importlib
import math
from typing import Protocol, runtime_checkable

import torch

from ..errors import InvalidSettingError

__all__ = [
    "GENERATOR_CLASSES",
    "CameraGenerator",
    "Generator",
    "broadcast_ws",
    "generator_class",
    "generator_class_name",
    "is_3d",
    "truncate_latents",
    "w_norm",
]

#: Manifest class name -> "module:Class" of every generator the library knows (imported on demand).
GENERATOR_CLASSES: dict[str, str] = {
    "stylegan2": "mm2latent.models.stylegan2:StyleGAN2Generator",
    "eg3d": "mm2latent.models.eg3d.generator:TriPlaneGenerator",
}


@runtime_checkable
class Generator(Protocol):
    """A frozen GAN driven by W+ latents.

    Attributes:
        num_ws: W+ layers (18 for StyleGAN2 at 1024², 14 for EG3D at 512²).
        style_dim: size of one w (512).
        resolution: side of the rendered image.
        camera_dim: size of the camera label ``synthesis`` takes (0 for a 2D generator, 25 for EG3D).
        latent_avg: the mean latent w̄, ``[style_dim]`` (a buffer saved with the weights).
    """

    num_ws: int
    style_dim: int
    resolution: int
    camera_dim: int
    latent_avg: torch.Tensor

    def synthesis(self, ws: torch.Tensor, noise_mode: str = "const", **render_kwargs) -> torch.Tensor:
        """Render ``ws`` ``[B, num_ws, style_dim]`` to images ``[B, 3, resolution, resolution]`` in [-1, 1]."""
        ...

    def truncate(self, ws: torch.Tensor, psi: float | torch.Tensor) -> torch.Tensor:
        """Pull ``ws`` toward ``latent_avg``: ``w̄ + ψ (w − w̄)``; ψ a float or one value per image ``[B]``."""
        ...

    def save_pretrained(self, save_directory, **kwargs): ...

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs): ...


@runtime_checkable
class CameraGenerator(Generator, Protocol):
    """A 3D-aware generator (EG3D): one latent, rendered from any camera (``camera_dim`` numbers per label).

    ``synthesis(ws, noise_mode, camera=labels)`` renders from ``camera`` (default: frontal); ``render``
    returns the image with its by-products (raw neural rendering, depth, the camera-independent
    ``planes``), and takes ``planes=`` back to render another camera without running the backbone.
    """

    def camera_labels(self, camera) -> torch.Tensor:
        """A camera spec — (yaw°, pitch°), ``[N, 2]`` angles, a label ``[camera_dim]`` or ``[N, camera_dim]`` — as
        labels ``[N, camera_dim]`` on this model's orbit."""
        ...

    def default_camera(self) -> torch.Tensor:
        """The frontal camera label ``[camera_dim]``."""
        ...

    def mean_latent(self, num_samples: int = 4096, generator: torch.Generator | None = None,
                    camera: torch.Tensor | None = None) -> torch.Tensor:
        """Mean w ``[style_dim]`` of the mapping network conditioned on ``camera``."""
        ...

    def synthesize_planes(self, ws: torch.Tensor, noise_mode: str = "const",
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """The camera-independent scene representation of ``ws``."""
        ...

    def render(self, ws: torch.Tensor, camera: torch.Tensor | None = None, noise_mode: str = "const",
               generator: torch.Generator | None = None, neural_rendering_resolution: int | None = None,
               planes: torch.Tensor | None = None):
        """Everything one render produces (``image``, ``image_raw``, ``depth``, ``alpha``, ``planes``)."""
        ...


def is_3d(generator: Generator) -> bool:
    """Whether ``generator`` takes a camera (a :class:`CameraGenerator` such as EG3D)."""
    return getattr(generator, "camera_dim", 0) > 0


def broadcast_ws(ws: torch.Tensor, num_ws: int, style_dim: int, like: torch.Tensor) -> torch.Tensor:
    """W+ latents ``[B, num_ws, style_dim]`` from W+ or single-w (``[B, style_dim]``) latents.

    Args:
        ws: ``[B, num_ws, style_dim]``, or ``[B, style_dim]`` (the same w for every layer, a view).
        num_ws: W+ layers of the generator.
        style_dim: size of one w.
        like: a parameter of the generator: the result is on its device, in its dtype.
    """
    if ws.ndim == 2 and ws.shape[1] == style_dim:
        ws = ws.unsqueeze(1).expand(-1, num_ws, -1)
    elif ws.ndim != 3 or tuple(ws.shape[1:]) != (num_ws, style_dim):
        raise ValueError(f"ws must be [B, {num_ws}, {style_dim}] or [B, {style_dim}], got {tuple(ws.shape)}")
    return ws.to(device=like.device, dtype=like.dtype)


def truncate_latents(ws: torch.Tensor, latent_avg: torch.Tensor, psi: float | torch.Tensor) -> torch.Tensor:
    """``latent_avg + psi * (ws - latent_avg)`` for ``ws`` ``[B, L, D]``.

    Args:
        ws: the latents.
        latent_avg: w̄, ``[D]``, or one mean per image ``[B, D]`` (e.g. EG3D's mean at each image's
            conditioning camera).
        psi: one ψ for the batch (1.0 returns ``ws`` itself, bit for bit) or one per image, ``[B]``.
    """
    if latent_avg.ndim == 2:
        if latent_avg.shape != (ws.shape[0], ws.shape[-1]):
            raise ValueError(f"per-image mean latents must be [{ws.shape[0]}, {ws.shape[-1]}], "
                             f"got {tuple(latent_avg.shape)}")
        latent_avg = latent_avg[:, None, :]
    if isinstance(psi, torch.Tensor):
        if psi.ndim != 1 or psi.shape[0] != ws.shape[0]:
            raise InvalidSettingError(f"a truncation tensor needs one ψ per image ([{ws.shape[0]}]), "
                                      f"got {tuple(psi.shape)}")
        if not torch.isfinite(psi).all():
            raise InvalidSettingError("truncation values must be finite")
        psi = psi.to(device=ws.device, dtype=ws.dtype)[:, None, None]
    else:
        psi = float(psi)
        if not math.isfinite(psi):
            raise InvalidSettingError(f"truncation must be a finite number, got {psi}")
        if psi == 1.0:
            return ws
    avg = latent_avg.to(device=ws.device, dtype=ws.dtype)
    return avg + psi * (ws - avg)


def w_norm(w: torch.Tensor, latent_avg: torch.Tensor) -> torch.Tensor:
    """pSp's WNormLoss, the latent regulariser of training and refinement: mean over the batch of ‖w − w̄‖₂."""
    return (w - latent_avg).flatten(1).norm(dim=1).mean()


def generator_class(name: str) -> type:
    """The class registered as ``name`` in :data:`GENERATOR_CLASSES`."""
    if name not in GENERATOR_CLASSES:
        raise InvalidSettingError(f"unknown generator class {name!r}; known: {', '.join(sorted(GENERATOR_CLASSES))}")
    module, _, attribute = GENERATOR_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def generator_class_name(generator: Generator) -> str:
    """The registry name of a generator instance (for manifests)."""
    for name, path in GENERATOR_CLASSES.items():
        module, _, attribute = path.partition(":")
        if type(generator).__module__ == module and type(generator).__name__ == attribute:
            return name
    raise InvalidSettingError(f"{type(generator).__name__} is not registered in GENERATOR_CLASSES")
