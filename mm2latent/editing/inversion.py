"""Inversion of a real photo to W+: pSp / e4e learned encoders, optional optimisation refinement.

:class:`PSPEncoder` is the encoder of pSp (Richardson et al. 2021, ``GradualStyleEncoder``) and of e4e
(Tov et al. 2021, ``Encoder4Editing``): an IR-SE50 body (the ArcFace building blocks of
:mod:`mm2latent.models.networks.arcface`), a three-level feature pyramid (coarse / middle / fine) and one
map2style head per W+ layer. The two share every weight and differ only in how the heads' outputs become
W+ (``architecture``): pSp uses head l as layer l; e4e predicts one w0 from the first head, copies it to
every layer and adds the other heads as per-layer offsets. Either way the encoder's mean latent is added.
:func:`encoder_from_checkpoint` builds it from a pSp / e4e training checkpoint (``psp_ffhq_encode.pt``,
``e4e_ffhq_encode.pt``). :func:`refine_latent` then optimises W+ against the photo (L2 + LPIPS) for
visitors who want a closer reconstruction. The encoder is trained by the ``"inverter"``
training stage (``mm2latent.training.stages.InverterStage``) with the same pSp objective as M and T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointFormatError, InvalidSettingError, InvalidStepsError
from ..inputs.images import image_to_tensor, tensor_to_pil
from ..models.generator import w_norm
from ..models.mapping import Map2StyleHeads
from ..models.networks.arcface import IR50_STAGES, BottleneckIRSE
from ..models.networks.checkpoints import infer_ir_se_stages, infer_se_reduction, plain_state_dict
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


def psp_level_sizes(num_ws: int) -> tuple[int, int, int]:
    """How many W+ layers the coarse, middle and fine heads produce (pSp: 3, 4, 11 of 18)."""
    coarse = max(1, round(3 * num_ws / 18))
    middle = max(1, round(7 * num_ws / 18)) - coarse
    fine = num_ws - coarse - middle
    if fine < 1:
        raise ValueError(f"a pSp encoder needs at least 3 W+ layers, got {num_ws}")
    return coarse, middle, fine


ARCHITECTURES = ("psp", "e4e")
# pSp / e4e ``opts["encoder_type"]`` -> our architecture name.
ENCODER_TYPES = {"GradualStyleEncoder": "psp", "Encoder4Editing": "e4e"}


class PSPEncoder(nn.Module, PyTorchModelHubMixin):
    """pSp's GradualStyleEncoder or e4e's Encoder4Editing: an aligned face -> W+.

    Args:
        num_ws: W+ layers of the generator (18 at 1024²).
        style_dim: latent size of the generator (512).
        input_size: faces are resized to this before encoding (256, a multiple of 16).
        stages: (in_channels, depth, num_units) of the four IR-SE stages (IR-50 by default).
        fpn_channels: channels of the feature pyramid (the last stage's depth, 512).
        head_channels: channels inside each map2style head (512).
        se_reduction: reduction of the squeeze-and-excitation gates.
        architecture: "psp" (head l gives layer l) or "e4e" (w0 from head 0 on every layer, plus the
            offsets of heads 1..L-1: e4e's forward at its final progressive stage, all deltas on).
        level_sizes: heads on the coarse (1/16), middle (1/8) and fine (1/4) features; default
            :func:`psp_level_sizes`. pSp / e4e checkpoints always use 3, 4 and the rest.
        stores_latent_avg: keep the mean latent the encoder was trained with (pSp / e4e checkpoints
            carry theirs) in the ``latent_avg`` buffer, added when ``forward`` gets no other.
    """

    def __init__(
        self,
        num_ws: int = 18,
        style_dim: int = 512,
        input_size: int = 256,
        stages: tuple | list = IR50_STAGES,
        fpn_channels: int = 512,
        head_channels: int = 512,
        se_reduction: int = 16,
        architecture: str = "psp",
        level_sizes: tuple | list | None = None,
        stores_latent_avg: bool = False,
    ):
        super().__init__()
        stages = [tuple(s) for s in stages]
        if len(stages) != 4 or stages[3][1] != fpn_channels:
            raise ValueError(f"need 4 IR-SE stages ending with {fpn_channels} channels, got {stages}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        level_sizes = tuple(level_sizes) if level_sizes is not None else psp_level_sizes(num_ws)
        if len(level_sizes) != 3 or sum(level_sizes) != num_ws or min(level_sizes) < 1:
            raise ValueError(f"level_sizes must be 3 positive counts adding up to {num_ws}, got {level_sizes}")
        self.num_ws, self.style_dim, self.input_size = num_ws, style_dim, input_size
        self.architecture, self.stores_latent_avg = architecture, stores_latent_avg
        first = stages[0][0]
        self.input_layer = nn.Sequential(nn.Conv2d(3, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.PReLU(first))
        units, taps = [], []
        for in_channels, depth, num_units in stages:
            units.append(BottleneckIRSE(in_channels, depth, 2, se_reduction))
            units += [BottleneckIRSE(depth, depth, 1, se_reduction) for _ in range(num_units - 1)]
            taps.append(len(units) - 1)
        self.body = nn.Sequential(*units)  # pSp's body.N names, so its checkpoints convert key by key
        self.taps = taps[1:]  # c1 (1/4 size), c2 (1/8), c3 (1/16)
        self.latlayer1 = nn.Conv2d(stages[2][1], fpn_channels, 1)
        self.latlayer2 = nn.Conv2d(stages[1][1], fpn_channels, 1)
        coarse, middle, fine = level_sizes
        self.coarse = Map2StyleHeads(fpn_channels, head_channels, coarse, style_dim, input_size // 16)
        self.middle = Map2StyleHeads(fpn_channels, head_channels, middle, style_dim, input_size // 8)
        self.fine = Map2StyleHeads(fpn_channels, head_channels, fine, style_dim, input_size // 4)
        if stores_latent_avg:
            self.register_buffer("latent_avg", torch.zeros(num_ws, style_dim))

    def forward(self, images: torch.Tensor, latent_avg: torch.Tensor | None = None) -> torch.Tensor:
        """Encode faces to W+.

        Args:
            images: [B, 3, S, S] in [-1, 1] (any S; resized to ``input_size``).
            latent_avg: the mean latent the codes are offsets from, [style_dim] or [num_ws, style_dim];
                None uses the stored one (``stores_latent_avg``).

        Returns:
            W+ codes [B, num_ws, style_dim].
        """
        if latent_avg is None:
            if not self.stores_latent_avg:
                raise ValueError("this encoder stores no mean latent: pass the generator's latent_avg")
            latent_avg = self.latent_avg
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        x = self.input_layer(images)
        levels = []
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index in self.taps:
                levels.append(x)
        c1, c2, c3 = levels
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        heads = torch.cat([self.coarse(c3), self.middle(p2), self.fine(p1)], dim=1)
        assert heads.shape[1:] == (self.num_ws, self.style_dim), heads.shape
        if self.architecture == "e4e":
            # e4e: w_0 = head_0, w_l = head_0 + head_l (the delta of layer l) for l >= 1.
            w0 = heads[:, :1]
            heads = torch.cat([w0, heads[:, 1:] + w0], dim=1)
        return heads + latent_avg.to(heads.dtype)


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


def tiny_psp_config(num_ws: int, style_dim: int) -> dict:
    """A toy encoder (same code path) for tests and the tiny preset."""
    return dict(num_ws=num_ws, style_dim=style_dim, input_size=64,
                stages=((8, 8, 1), (8, 16, 1), (16, 16, 1), (16, 32, 1)), fpn_channels=32, head_channels=16,
                se_reduction=4)


# ---------------------------------------------------------------------------------------------- checkpoints


def _psp_head_convs(source: dict[str, torch.Tensor]) -> list[list[int]]:
    """For each pSp ``styles.i`` head, the Sequential indices of its convs (0, 2, 4, ...: LeakyReLUs between)."""
    heads: dict[int, set[int]] = {}
    for key in source:
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "styles" and parts[2] == "convs" and parts[4] == "weight":
            heads.setdefault(int(parts[1]), set()).add(int(parts[3]))
    if not heads or sorted(heads) != list(range(len(heads))):
        raise CheckpointFormatError("no map2style heads styles.0, styles.1, ... in the encoder checkpoint")
    return [sorted(heads[i]) for i in range(len(heads))]


def psp_checkpoint_levels(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """Heads per pyramid level of a pSp / e4e encoder state dict, read from each head's number of convs.

    A head on the 1/16 features has log2(S/16) convs, on 1/8 one more, on 1/4 two more; pSp and e4e
    place heads 0-2, 3-6 and 7.. there whatever the number of W+ layers.
    """
    prefix = "encoder." if any(k.startswith("encoder.") for k in state_dict) else ""
    counts = [len(c) for c in _psp_head_convs({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})]
    levels = [counts.count(n) for n in sorted(set(counts))]
    if len(levels) != 3 or counts != sorted(counts):
        raise CheckpointFormatError(f"map2style heads with {counts} convs do not form pSp's coarse/middle/fine levels")
    return tuple(levels)


def convert_psp_state_dict(state_dict: dict[str, torch.Tensor], num_ws: int | None = None) -> dict[str, torch.Tensor]:
    """pSp / e4e encoder weights (``encoder.*`` keys of ``psp_ffhq_encode.pt`` / ``e4e_ffhq_encode.pt``) -> ours.

    pSp keeps one ``GradualStyleBlock`` per layer (``styles.i.convs.{0,2,4..}`` + ``styles.i.linear``);
    :class:`Map2StyleHeads` runs a level's heads as one grouped conv, so their weights are concatenated
    along the output channels and their linear layers stacked. Body, input layer and lateral layers keep
    their names. The levels are read from the heads (:func:`psp_checkpoint_levels`); ``num_ws``, when
    given, is checked against the number of heads.
    """
    prefix = "encoder." if any(k.startswith("encoder.") for k in state_dict) else ""
    source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    convs = _psp_head_convs(source)
    if num_ws is not None and len(convs) != num_ws:
        raise CheckpointFormatError(f"the encoder checkpoint has {len(convs)} map2style heads, expected {num_ws}")
    out = {k: v for k, v in source.items() if not k.startswith("styles.")}
    start = 0
    for level, count in zip(("coarse", "middle", "fine"), psp_checkpoint_levels(source)):
        heads = range(start, start + count)
        for n, conv in enumerate(convs[start]):
            for kind in ("weight", "bias"):
                out[f"{level}.convs.{n}.{kind}"] = torch.cat([source[f"styles.{h}.convs.{conv}.{kind}"] for h in heads])
        out[f"{level}.weight"] = torch.stack([source[f"styles.{h}.linear.weight"] for h in heads])
        out[f"{level}.bias"] = torch.stack([source[f"styles.{h}.linear.bias"] for h in heads])
        start += count
    return out


def detect_encoder_architecture(checkpoint: dict) -> str | None:
    """"psp" or "e4e" from a pSp / e4e checkpoint's saved training options (``opts["encoder_type"]``); None if absent."""
    opts = checkpoint.get("opts")
    encoder_type = (opts.get("encoder_type") if isinstance(opts, dict) else getattr(opts, "encoder_type", None))
    if encoder_type is None:
        return None
    if encoder_type not in ENCODER_TYPES:
        raise CheckpointFormatError(f"encoder_type {encoder_type!r} is neither pSp's GradualStyleEncoder nor "
                                    "e4e's Encoder4Editing")
    return ENCODER_TYPES[encoder_type]


def psp_encoder_config(state_dict: dict[str, torch.Tensor], architecture: str = "psp") -> dict:
    """:class:`PSPEncoder` arguments for encoder weights in our layout (:func:`convert_psp_state_dict`'s output),
    read off their shapes."""
    try:
        levels = tuple(state_dict[f"{level}.weight"].shape[0] for level in ("coarse", "middle", "fine"))
        head = state_dict["coarse.weight"]  # [heads, style_dim, head_channels]
        coarse_convs = sum(1 for k in state_dict if k.startswith("coarse.convs.") and k.endswith(".weight"))
        return dict(
            num_ws=sum(levels), style_dim=head.shape[1], input_size=16 * 2**coarse_convs,
            stages=infer_ir_se_stages(state_dict), fpn_channels=state_dict["latlayer1.weight"].shape[0],
            head_channels=head.shape[2], se_reduction=infer_se_reduction(state_dict), architecture=architecture,
            level_sizes=levels, stores_latent_avg=True,
        )
    except KeyError as error:
        raise CheckpointFormatError(f"not a pSp / e4e encoder checkpoint: it has no {error.args[0]!r}") from error


def encoder_from_checkpoint(checkpoint: dict, architecture: str | None = None) -> PSPEncoder:
    """Build the encoder of a pSp / e4e training checkpoint (already read with ``weights_only=True``).

    Args:
        checkpoint: ``{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg": ..., "opts": {...}}`` as
            pSp's and e4e's coaches save it (a bare encoder state dict is accepted too).
        architecture: "psp" or "e4e"; None reads ``opts["encoder_type"]``. A name that contradicts the
            saved options is an error: the two forwards differ on every layer but the first.

    The architecture sizes (IR-SE stages, heads per level, input size) are read from the tensor shapes.
    The checkpoint's ``latent_avg`` ([style_dim] or [num_ws, style_dim]) is stored in the encoder when
    pSp's ``start_from_latent_avg`` option was on (pSp / e4e add it in ``pSp.forward``); when off, or
    without options or ``latent_avg``, nothing is added (a zero mean latent), as there.
    """
    saved = detect_encoder_architecture(checkpoint)
    if architecture is None and saved is None:
        raise CheckpointFormatError("cannot tell pSp from e4e: the checkpoint has no opts['encoder_type']; name the "
                                    "format ('psp' or 'e4e') explicitly")
    if architecture is not None and saved is not None and architecture != saved:
        raise CheckpointFormatError(f"the checkpoint was trained as {saved} (opts['encoder_type']), not {architecture}")
    architecture = architecture or saved
    converted = convert_psp_state_dict(plain_state_dict(checkpoint))
    encoder = PSPEncoder(**psp_encoder_config(converted, architecture))
    opts = checkpoint.get("opts")
    opts = opts if isinstance(opts, dict) else vars(opts) if opts is not None else {}
    latent_avg = checkpoint.get("latent_avg")
    if opts.get("start_from_latent_avg", latent_avg is not None):
        if not isinstance(latent_avg, torch.Tensor):
            raise CheckpointFormatError("the checkpoint was trained from the mean latent (start_from_latent_avg) "
                                        "but stores no latent_avg tensor")
        if latent_avg.shape not in ((encoder.style_dim,), (encoder.num_ws, encoder.style_dim)):
            raise CheckpointFormatError(f"latent_avg has shape {tuple(latent_avg.shape)}, expected "
                                        f"[{encoder.style_dim}] or [{encoder.num_ws}, {encoder.style_dim}]")
        converted["latent_avg"] = latent_avg.float().expand(encoder.num_ws, encoder.style_dim).clone()
    else:
        converted["latent_avg"] = torch.zeros(encoder.num_ws, encoder.style_dim)
    try:
        encoder.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise CheckpointFormatError(f"the checkpoint does not have the {architecture} encoder layout: {error}") from error
    return encoder.eval()


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


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def reconstruction_loss(generated: torch.Tensor, target: torch.Tensor, lpips: nn.Module | None = None,
                        lpips_weight: float = 0.8) -> torch.Tensor:
    """Per-image L2 (+ LPIPS) between images in [-1, 1]: [B]."""
    generated = _resize(generated, target.shape[-1])
    loss = (generated - target).pow(2).mean(dim=(1, 2, 3))
    if lpips is not None and lpips_weight:
        loss = loss + lpips_weight * lpips(generated, target).reshape(-1)
    return loss


def refine_latent(
    generator: nn.Module,
    latent: torch.Tensor,
    target: torch.Tensor,
    steps: int = 100,
    lr: float = 0.01,
    lpips: nn.Module | None = None,
    lpips_weight: float = 0.8,
    loss_size: int = 256,
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

    METHOD.md's Eq. 1 at inference time: loss = MSE(G(w), target) + lpips_weight·LPIPS(G(w), target)
    [+ mask_weight·CE(parser(G(w)), mask)] [+ w_reg_weight·‖w − w̄‖₂], each term averaged over the batch.

    Args:
        generator: the GAN G (frozen; only the latent is optimised).
        latent: the starting W+, [B, num_ws, style_dim].
        target: what G(w) should look like, [B, 3, H, W] in [-1, 1] (an aligned photo, or I^d_0).
        steps: at most this many Adam steps (0..1000).
        lr: Adam learning rate.
        lpips: an LPIPS network (None: L2 only).
        lpips_weight: weight of LPIPS against L2.
        loss_size: images are compared at min(this, H) pixels.
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
    target = _resize(target.to(param.device, torch.float32), min(loss_size, target.shape[-1]))
    use_mask = face_parser is not None and mask_ids is not None and mask_weight > 0
    if use_mask:
        mask_ids = mask_ids.to(param.device, torch.long)
    avg = latent_avg.to(param.device, torch.float32) if latent_avg is not None else None
    w = latent.detach().to(param.device, torch.float32).clone().requires_grad_(True)
    best_w, best, since_best, losses, stopped = w.detach().clone(), math.inf, 0, [], False
    optimizer = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for step in tqdm(range(steps + 1), desc="refining W+", disable=not progress, leave=False):
            image = generator.synthesis(w.to(param.dtype)).float()
            loss = reconstruction_loss(image, target, lpips, lpips_weight).mean()
            if use_mask:
                logits = face_parser.celebamask_logits(image, size=mask_ids.shape[-1])
                loss = loss + mask_weight * F.cross_entropy(logits.float(), mask_ids)
            if w_reg_weight and avg is not None:
                loss = loss + w_reg_weight * w_norm(w, avg)
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
    images = _resize(images.to(param.device, torch.float32), encoder.input_size)
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
