"""Editing a real photo's latent with text and a mask or sketch (METHOD.md, "Editing a real photo").

The diffusion encoder E reads (text, edited mask or sketch); T's modulation is applied to the real
latent: w_edit = w_real ⊙ w^γ + w^β, blended in with a strength s on a chosen layer range only:

    w_edit[l] = w_real[l] + s · (w_real[l] ⊙ γ[l] + β[l] − w_real[l])   for l in the range,
    w_edit[l] = w_real[l]                                               elsewhere (bit-identical).

The alternative ("mix", TediGAN-style style mixing) blends M's w^m into the chosen layers. An
optional text-only refinement then optimises the chosen layers with CLIP guidance and an identity
loss (TediGAN / StyleCLIP). These are the edit methods; :class:`~mm2latent.pipelines.editing.FaceEditPipeline`
runs them on a photo.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..errors import EmptyPromptError, InvalidSettingError, InvalidStepsError
from ..inputs.images import image_to_tensor
from ..losses import LOSS_RESOLUTION, identity_embedding, mask_loss, resize_faces
from ..losses import identity_similarity as identity_cosines
from ..models.mapping import Modulation
from .clip import ClipGuide

__all__ = [
    "LATENT_METHODS",
    "LAYER_RANGE_NAMES",
    "MAX_CLIP_STEPS",
    "METHODS",
    "ClipRefineResult",
    "EditResult",
    "LatentEdit",
    "apply_edit",
    "check_layers",
    "check_strength",
    "clip_refine",
    "identity_similarity",
    "layer_ranges",
]

LAYER_RANGE_NAMES = ("coarse", "middle", "fine", "all")
#: "modulate": T's γ, β on the photo's latent; "mix": M's w^m mixed in (both need trained M, T);
#: "guided": training-free — CLIP-guided optimisation with an identity term, plus the face parser's
#: cross-entropy against a repainted mask (TediGAN / StyleCLIP).
METHODS = ("modulate", "mix", "guided")
#: The methods that compute w_edit in closed form from E's features (:func:`apply_edit`).
LATENT_METHODS = ("modulate", "mix")
MAX_STRENGTH = 2.0
MAX_CLIP_STEPS = 300


def layer_ranges(num_ws: int) -> dict[str, list[int]]:
    """W+ layer indices of each range.

    StyleGAN's convention at 18 layers: coarse 0–3 (4²–8²: pose, face shape), middle 4–7 (16²–32²:
    features, hair style, eyes open/closed), fine 8–17 (64²–1024²: colours, texture). Layer l drives
    resolution 4·2^⌈l/2⌉, so the same resolutions define the ranges at any size; generators with
    fewer than 9 layers are split into thirds.
    """
    if num_ws >= 9:
        coarse, middle = list(range(4)), list(range(4, 8))
    else:
        third = max(1, num_ws // 3)
        coarse, middle = list(range(third)), list(range(third, min(2 * third, num_ws - 1)))
    fine = list(range(len(coarse) + len(middle), num_ws))
    return {"coarse": coarse, "middle": middle, "fine": fine, "all": list(range(num_ws))}


#: The ranges of an 18-layer (1024²) generator.
LAYER_RANGES = layer_ranges(18)


def check_layers(layers: str | list[int], num_ws: int) -> list[int]:
    """The layer indices of a range name ("coarse", "middle", "fine", "all") or of an index list."""
    if isinstance(layers, str):
        if layers not in LAYER_RANGE_NAMES:
            raise InvalidSettingError(f"the layer range must be one of {', '.join(LAYER_RANGE_NAMES)}, got {layers!r}")
        return layer_ranges(num_ws)[layers]
    picked = sorted({int(i) for i in layers})
    if not picked or picked[0] < 0 or picked[-1] >= num_ws:
        raise InvalidSettingError(f"layer indices must be from 0 to {num_ws - 1}, got {layers!r}")
    return picked


def check_strength(strength: Any) -> float:
    """An edit strength from 0 (unchanged) to MAX_STRENGTH."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0.0 <= float(strength) <= MAX_STRENGTH:
        raise InvalidSettingError(f"the strength must be a number from 0 to {MAX_STRENGTH:g}, got {strength!r}")
    return float(strength)


def apply_edit(
    w_real: torch.Tensor,
    w_m: torch.Tensor,
    modulation: Modulation | None,
    strength: float = 1.0,
    layers: str | list[int] = "all",
    method: str = "modulate",
) -> torch.Tensor:
    """w_edit from w_real [1, L, D]: T's modulation ("modulate") or M's w^m ("mix") on ``layers`` only."""
    strength = check_strength(strength)
    if method not in LATENT_METHODS:
        raise InvalidSettingError(f"the method must be one of {', '.join(LATENT_METHODS)}, got {method!r}")
    assert w_real.ndim == 3 and w_m.shape[1:] == w_real.shape[1:], (w_real.shape, w_m.shape)
    index = check_layers(layers, w_real.shape[1])
    w_edit = w_real.clone()
    if strength == 0.0:
        return w_edit
    real = w_real[:, index]
    if method == "modulate":
        target = real * modulation.gamma[:, index].to(real) + modulation.beta[:, index].to(real)
    else:
        target = w_m[:, index].to(real)
    w_edit[:, index] = real + strength * (target - real)
    return w_edit


@dataclass
class LatentEdit:
    """Output of :meth:`~mm2latent.pipelines.editing.FaceEditPipeline.edit_latent`.

    Attributes:
        latent: w_edit, [1, L, D].
        generated: E→M,T's own latent w = w^m ⊙ w^γ + w^β for (text, mask) (what text-to-face would draw).
        w_m: M's latent.
        modulation: T's γ, β and attention.
        layers: the edited layer indices.
    """

    latent: torch.Tensor
    generated: torch.Tensor
    w_m: torch.Tensor
    modulation: Modulation | None
    layers: list[int]


# ---------------------------------------------------------------------------------------------- identity


@torch.no_grad()
def identity_similarity(identity_net: nn.Module, image_a, image_b) -> float:
    """Cosine similarity of ArcFace embeddings of two aligned faces (PIL images or [1, 3, H, W] in [-1, 1]).

    The two faces of an edit may differ in size (a 256² aligned photo, a 64² or 1024² render), and the same face
    must score the same as a PIL image or a tensor: both are brought to pSp's 256² first (PIL: Lanczos, as photos
    are downscaled; tensors: :func:`mm2latent.losses.resize_faces`, pSp's face_pool when larger), then take the loss
    module's identity path (:func:`mm2latent.losses.identity_similarity`: pSp's crop, 112²).
    """
    a, b = (image_to_tensor(x, LOSS_RESOLUTION) if isinstance(x, Image.Image) else resize_faces(x.float(), LOSS_RESOLUTION)
            for x in (image_a, image_b))
    return float(identity_cosines(identity_net, a, b)[0])


@dataclass
class ClipRefineResult:
    """Output of :func:`clip_refine`: the latent and the loss terms per step."""

    latent: torch.Tensor
    losses: list[dict[str, float]]


def clip_refine(
    generator: nn.Module,
    latent: torch.Tensor,
    prompt: str,
    clip: ClipGuide | None,
    steps: int = 50,
    identity_net: nn.Module | None = None,
    id_weight: float = 0.1,
    l2_weight: float = 0.008,
    layers: str | list[int] = "all",
    lr: float = 0.05,
    reference: torch.Tensor | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    face_parser: nn.Module | None = None,
    mask_ids: torch.Tensor | None = None,
    mask_weight: float = 0.5,
) -> ClipRefineResult:
    """CLIP-guided optimisation of the chosen W+ layers (TediGAN / StyleCLIP), optionally toward a mask.

    loss = (1 − cos(CLIP(G(w)), CLIP(prompt))) + id_weight·(1 − cos(ArcFace(G(w)), ArcFace(reference)))
    + l2_weight·‖w − w_start‖² [+ mask_weight·CE(parser(G(w)), mask)]. Layers outside ``layers`` stay
    bit-identical. The text term needs a prompt, the mask term a parser and a mask; at least one is needed.

    Args:
        generator: the GAN G (frozen).
        latent: the starting W+ (usually w_edit), [1, L, D].
        prompt: the wanted description ("" for a mask-only edit).
        clip: a :class:`ClipGuide` (needed with a prompt).
        steps: Adam steps (0..300).
        identity_net: an ArcFace IR-SE50 (no identity term without it).
        id_weight: weight of the identity term.
        l2_weight: weight of the latent distance to the start.
        layers: the optimised layer range.
        lr: Adam learning rate.
        reference: the face whose identity is kept, [1, 3, H, W] in [-1, 1]; default G(latent).
        progress: tqdm bar.
        callback: (step, loss) after every step.
        face_parser: a BiSeNet, for the mask term.
        mask_ids: [1, h, w] CelebAMask-HQ class ids G(w) should follow (a repainted mask), or None.
        mask_weight: weight of the mask term.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_CLIP_STEPS:
        raise InvalidStepsError(f"CLIP steps must be an integer from 0 to {MAX_CLIP_STEPS}, got {steps!r}")
    prompt = prompt.strip() if isinstance(prompt, str) else ""
    use_mask = face_parser is not None and mask_ids is not None
    if not prompt and not use_mask:
        raise EmptyPromptError("guided refinement needs a text prompt or a repainted mask")
    if prompt and clip is None:
        raise InvalidSettingError("this model has no CLIP network; text-guided refinement is unavailable")
    param = next(generator.parameters())
    start = latent.detach().to(param.device, torch.float32)
    index = torch.tensor(check_layers(layers, start.shape[1]), device=start.device)
    chosen = start[:, index].clone().requires_grad_(True)
    text = clip.encode_text(prompt).to(param.device) if prompt else None
    if use_mask:
        mask_ids = mask_ids.to(param.device, torch.long)
    reference_id = None
    if identity_net is not None:  # the identity term's target; without it no reference is needed
        with torch.no_grad():
            reference = generator.synthesis(start.to(param.dtype)) if reference is None else reference.to(param.device)
            reference_id = identity_embedding(identity_net, reference)
    optimizer = torch.optim.Adam([chosen], lr=lr)
    losses = []
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="CLIP refinement", disable=not progress, leave=False):
            w = start.index_copy(1, index, chosen)
            image = generator.synthesis(w.to(param.dtype)).float()
            terms = {"l2": (chosen - start[:, index]).pow(2).sum()}
            total = l2_weight * terms["l2"]
            if text is not None:
                terms["clip"] = 1 - (clip.encode_image(image) * text).sum(dim=1).mean()
                total = total + terms["clip"]
            if use_mask:
                terms["mask"] = mask_loss(face_parser, image, mask_ids)
                total = total + mask_weight * terms["mask"]
            if reference_id is not None:
                terms["identity"] = 1 - (identity_embedding(identity_net, image) * reference_id).sum(dim=1).mean()
                total = total + id_weight * terms["identity"]
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append({**{k: float(v.detach()) for k, v in terms.items()}, "total": float(total.detach())})
            if callback is not None:
                callback(step, losses[-1]["total"])
    return ClipRefineResult(start.index_copy(1, index, chosen.detach()).cpu(), losses)


@dataclass
class EditResult:
    """Output of :meth:`~mm2latent.pipelines.editing.FaceEditPipeline.edit`.

    Attributes:
        image: the edited face.
        latent: w_edit, [1, L, D] float32 on the CPU.
        identity_similarity: ArcFace cosine between the aligned photo (or reconstruction) and the edit
            (None without an identity network).
        reconstruction: G(w_real), for the before/after comparison.
        settings: what was used (for metadata and the latent download); ``settings["method"]`` is the method
            that ran.
        clip_losses: per-step terms of the CLIP refinement / guided edit.
        message: which method ran and why, for the user.
    """

    image: Image.Image
    latent: torch.Tensor
    identity_similarity: float | None
    reconstruction: Image.Image | None = None
    settings: dict = field(default_factory=dict)
    clip_losses: list[dict[str, float]] = field(default_factory=list)
    message: str = ""
