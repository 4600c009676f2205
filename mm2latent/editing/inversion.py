"""Inversion of a real photo to W+: the pSp / e4e photo encoder, then optional optimisation refinement.

The encoder network and the conversion of pSp / e4e checkpoints are :mod:`mm2latent.models.photo_encoder` (its
public names are re-exported here). This module is the optimisation side: :func:`encode_images` runs the encoder,
:func:`refine_latent` optimises W+ against a target with the one pSp objective of :mod:`mm2latent.losses` (L2 +
LPIPS [+ the face parser's cross-entropy] [+ ‖w − w̄‖], at pSp's 256² at most) for visitors who want a closer
reconstruction, and :func:`invert` aligns a photo and does both. The encoder is trained by the ``"inverter"``
training stage (``mm2latent.training.stages.InverterStage``) with the same objective as M and T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidSettingError, InvalidStepsError
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..losses import LOSS_RESOLUTION, LatentLoss, resize_faces
from ..models.photo_encoder import (
    ARCHITECTURES,
    PSPEncoder,
    convert_psp_state_dict,
    detect_encoder_architecture,
    encoder_from_checkpoint,
    psp_checkpoint_levels,
    psp_encoder_config,
    psp_level_sizes,
    tiny_psp_config,
)
from .align import AlignedFace, align_face

__all__ = [
    "ARCHITECTURES",
    "MAX_REFINE_STEPS",
    "InversionResult",
    "PSPEncoder",
    "RefineResult",
    "convert_psp_state_dict",
    "encode_images",
    "detect_encoder_architecture",
    "encoder_from_checkpoint",
    "image_to_tensor",
    "invert",
    "photo_mask",
    "psp_checkpoint_levels",
    "psp_encoder_config",
    "psp_level_sizes",
    "refine_latent",
    "tiny_psp_config",
]

MAX_REFINE_STEPS = 1000
MASK_SIZE = 512  # the mask editor's canvas


# ---------------------------------------------------------------------------------------------- inversion


@dataclass
class RefineResult:
    """Output of :func:`refine_latent`: the refined latent and the loss before each step (and after the last)."""

    latent: torch.Tensor
    losses: list[float]
    stopped_early: bool = False


@dataclass
class InversionResult:
    """A photo inverted to W+.

    Attributes:
        latent: w_real, [1, num_ws, style_dim] float32 on the CPU.
        reconstruction: G(w_real) as an RGB image.
        aligned: the aligned photo that was inverted.
        mask: the photo's 19-class CelebAMask-HQ id map (512², uint8) when a face parser was given.
        faces_found: faces in the uploaded photo (the largest was used).
        messages: notes for the user (several faces, eyes estimated, refinement stopped early, ...).
        refine_losses: the refinement loss per step (empty without refinement).
    """

    latent: torch.Tensor
    reconstruction: Image.Image
    aligned: Image.Image
    mask: np.ndarray | None = None
    faces_found: int = 1
    messages: list[str] = field(default_factory=list)
    refine_losses: list[float] = field(default_factory=list)


def refine_latent(
    generator: nn.Module,
    latent: torch.Tensor,
    target: torch.Tensor,
    steps: int = 100,
    lr: float = 0.01,
    lpips: nn.Module | None = None,
    lpips_weight: float = 0.8,
    loss_size: int = LOSS_RESOLUTION,
    patience: int = 20,
    min_delta: float = 1e-4,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    face_parser: nn.Module | None = None,
    mask_ids: torch.Tensor | None = None,
    mask_weight: float = 0.1,
    w_reg_weight: float = 0.0,
    latent_avg: torch.Tensor | None = None,
) -> RefineResult:
    """Optimise W+ so that G(w) matches ``target`` (L2 + LPIPS), with early stopping.

    METHOD.md's Eq. 1 at inference time, the loss module's :class:`~mm2latent.losses.LatentLoss`: loss =
    MSE(G(w), target) + lpips_weight·LPIPS(G(w), target) [+ mask_weight·CE(parser(G(w)), mask)]
    [+ w_reg_weight·‖w − w̄‖₂], each term averaged over the batch; G(w) and the target are compared at
    min(``loss_size``, their sizes) (pooled as pSp's face_pool, never upsampled).

    Args:
        generator: the GAN G (frozen; only the latent is optimised).
        latent: the starting W+, [B, num_ws, style_dim].
        target: what G(w) should look like, [B, 3, H, W] in [-1, 1] (an aligned photo, or I^d_0).
        steps: at most this many Adam steps (0..1000).
        lr: Adam learning rate.
        lpips: an LPIPS network (None: L2 only).
        lpips_weight: weight of LPIPS against L2.
        loss_size: images are compared at min(this, G's size, the target's size) pixels (pSp: 256).
        patience: stop when the best loss has not improved by ``min_delta`` for this many steps.
        min_delta: the improvement that counts (relative to the best loss).
        progress: show a tqdm bar.
        callback: called with (step, loss) after every step (the UI's progress bar).
        face_parser: a BiSeNet; with ``mask_ids``, G(w)'s parse is pulled toward the mask (cross-entropy).
        mask_ids: [B, h, w] CelebAMask-HQ class ids the face should follow, or None.
        mask_weight: weight of the mask term.
        w_reg_weight: weight of the latent regulariser ‖w − w̄‖₂ (pSp's WNorm), needs ``latent_avg``.
        latent_avg: w̄, [style_dim].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_REFINE_STEPS:
        raise InvalidStepsError(f"refinement steps must be an integer from 0 to {MAX_REFINE_STEPS}, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidSettingError(f"the learning rate must be a positive number, got {lr!r}")
    param = next(generator.parameters())
    use_mask = face_parser is not None and mask_ids is not None and mask_weight > 0
    use_w_reg = bool(w_reg_weight) and latent_avg is not None
    objective = LatentLoss({"l2": 1.0, "lpips": lpips_weight if lpips is not None else 0.0, "id": 0.0,
                            "w_reg": w_reg_weight if use_w_reg else 0.0, "mask": mask_weight if use_mask else 0.0},
                           lpips=lpips, face_parser=face_parser if use_mask else None, resolution=loss_size)
    # Pooled once to at most loss_size² (the objective pools it again only if G's images are smaller).
    target = resize_faces(target.to(param.device, torch.float32), min(loss_size, target.shape[-1]))
    mask_ids = mask_ids.to(param.device, torch.long) if use_mask else None
    avg = latent_avg.to(param.device, torch.float32) if use_w_reg else None
    w = latent.detach().to(param.device, torch.float32).clone().requires_grad_(True)
    best_w, best, since_best, losses, stopped = w.detach().clone(), math.inf, 0, [], False
    optimizer = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for step in tqdm(range(steps + 1), desc="refining W+", disable=not progress, leave=False):
            image = generator.synthesis(w.to(param.dtype)).float()
            loss, _ = objective(image, target, w=w, latent_avg=avg, mask_ids=mask_ids)
            value = float(loss.detach())
            losses.append(value)
            if value < best * (1 - min_delta):
                best, best_w, since_best = value, w.detach().clone(), 0
            else:
                since_best += 1
            if callback is not None:
                callback(step, value)
            if step == steps:
                break
            if since_best >= patience:
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return RefineResult(best_w.cpu(), losses, stopped)


def photo_mask(face_parser: nn.Module, photo: Image.Image | torch.Tensor, size: int = MASK_SIZE) -> np.ndarray:
    """The photo's own 19-class CelebAMask-HQ mask from a BiSeNet face parser: uint8 [size, size].

    :meth:`BiSeNet.parse` already remaps the parser's label order with ``FACE_PARSER_TO_CELEBAMASK``.
    """
    images = photo if isinstance(photo, torch.Tensor) else image_to_tensor(photo)
    param = next(face_parser.parameters())
    with torch.no_grad():
        ids = face_parser.parse(images.to(param.device, param.dtype), size=size)
    return ids[0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def encode_images(encoder: PSPEncoder, images: torch.Tensor, generator: nn.Module) -> torch.Tensor:
    """W+ latents [B, L, D] (float32) of aligned faces [B, 3, H, W] in [-1, 1] (resized to the encoder's input).

    pSp / e4e checkpoints carry the mean latent they were trained with; our own encoders use G's.
    """
    param = next(encoder.parameters())
    latent_avg = None if getattr(encoder, "stores_latent_avg", False) else generator.latent_avg.to(param.device)
    images = images.to(param.device, torch.float32)
    if images.shape[-1] != encoder.input_size:
        images = F.interpolate(images, size=(encoder.input_size,) * 2, mode="bilinear", align_corners=False,
                               antialias=True)
    return encoder(images.to(param.dtype), latent_avg).float()


@torch.no_grad()
def invert(
    generator: nn.Module,
    encoder: PSPEncoder,
    photo: Any,
    *,
    face_parser: nn.Module | None = None,
    lpips: nn.Module | None = None,
    refine_steps: int = 0,
    refine_lr: float = 0.01,
    align: bool = True,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> InversionResult:
    """Align ``photo``, encode it to w_real, optionally refine, and render the reconstruction.

    Args:
        generator: the StyleGAN2 G.
        encoder: the pSp / e4e encoder (its outputs are offsets from its stored mean latent, else from
            ``generator.latent_avg``).
        photo: path, PIL image or array of a photo with one clearly visible face.
        face_parser: a BiSeNet; when given, the result carries the photo's mask.
        lpips: LPIPS for the refinement (L2 only without it).
        refine_steps: optimisation steps after the encoder (0 = encoder only).
        refine_lr: the refinement's learning rate.
        align: run face alignment (False: the photo is already an FFHQ crop).
        progress: tqdm bar for the refinement.
        callback: (step, loss) after each refinement step.
    """
    if align:
        aligned: AlignedFace | None = align_face(photo, size=min(1024, max(256, generator.resolution)))
        image, faces, messages = aligned.image, aligned.faces_found, list(aligned.messages)
    else:
        from .align import _to_rgb

        image, faces, messages = _to_rgb(photo), 1, []
    latent = encode_images(encoder, image_to_tensor(image, encoder.input_size), generator)
    losses: list[float] = []
    if refine_steps:
        target = image_to_tensor(image, generator.resolution)
        result = refine_latent(generator, latent, target, steps=refine_steps, lr=refine_lr, lpips=lpips,
                               progress=progress, callback=callback)
        latent, losses = result.latent, result.losses
        if result.stopped_early:
            messages.append(f"the refinement stopped early after {len(losses) - 1} steps (no further improvement)")
    gen_param = next(generator.parameters())
    reconstruction = generator.synthesis(latent.to(gen_param.device, gen_param.dtype))
    mask = photo_mask(face_parser, image) if face_parser is not None else None
    return InversionResult(
        latent=latent.detach().float().cpu(),
        reconstruction=tensor_to_pil(reconstruction[:1])[0],
        aligned=image,
        mask=mask,
        faces_found=faces,
        messages=messages,
        refine_losses=losses,
    )
