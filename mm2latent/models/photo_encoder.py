"""The photo encoder of pSp / e4e and the conversion of their checkpoints.

:class:`PSPEncoder` is the encoder of pSp (Richardson et al. 2021, ``GradualStyleEncoder``) and of e4e
(Tov et al. 2021, ``Encoder4Editing``): an IR-SE50 body (the ArcFace building blocks of
:mod:`mm2latent.models.networks.arcface`), a three-level feature pyramid (coarse / middle / fine) and one
map2style head per W+ layer. The two share every weight and differ only in how the heads' outputs become
W+ (``architecture``): pSp uses head l as layer l; e4e predicts one w0 from the first head, copies it to
every layer and adds the other heads as per-layer offsets. Either way the encoder's mean latent is added.
:func:`encoder_from_checkpoint` builds it from a pSp / e4e training checkpoint (``psp_ffhq_encode.pt``,
``e4e_ffhq_encode.pt``). Inverting a photo with it (alignment, optional refinement) is
:mod:`mm2latent.editing.inversion`; training it is the ``"inverter"`` training stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import CheckpointFormatError
from .mapping import Map2StyleHeads
from .networks.arcface import IR50_STAGES, BottleneckIRSE
from .networks.checkpoints import infer_ir_se_stages, infer_se_reduction, plain_state_dict

__all__ = [
    "ARCHITECTURES",
    "ENCODER_TYPES",
    "PSPEncoder",
    "convert_psp_state_dict",
    "detect_encoder_architecture",
    "encoder_from_checkpoint",
    "psp_checkpoint_levels",
    "psp_encoder_config",
    "psp_level_sizes",
    "tiny_psp_config",
]


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
