"""How close a training-free face G(w) is to the drawing I^d_0 it inverts, and the refinement budgets.

Each output of the training-free mode reports (METHOD.md, training-free mode; issue "fast and faithful"):

* ``lpips``: LPIPS(G(w), I^d_0) (None when the model has no LPIPS network),
* ``l2``: the mean squared difference of the two images in [-1, 1],
* ``miou``: with a mask, the mIoU of the face parser's parse of G(w) against the (aligned) input mask,

all at :data:`CLOSENESS_SIZE` (pSp's 256², where the paper's Table 1 is measured).

:data:`FAITHFULNESS` names the refinement budgets a user picks from (the Space's "faithfulness"): Adam steps on
L2 + LPIPS (+ the parser term) after the encoder, with early stopping; the budgets were chosen from a measured
trade-off of time against L2 / LPIPS to I^d_0 (``benchmarks/refine_budget.py``, docs/training_free.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InvalidSettingError
from ..training.metrics import confusion_matrix, mask_scores, to_resolution

__all__ = ["CLOSENESS_SIZE", "DEFAULT_FAITHFULNESS", "FAITHFULNESS", "Closeness", "RefineBudget", "measure_closeness",
           "refine_budget"]

#: Side at which G(w) and I^d_0 are compared.
CLOSENESS_SIZE = 256


@dataclass(frozen=True)
class Closeness:
    """The closeness of one face to its drawing (see the module docstring)."""

    l2: float
    lpips: float | None = None
    miou: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@torch.no_grad()
def measure_closeness(
    images: torch.Tensor,
    drawings: torch.Tensor,
    lpips: nn.Module | None = None,
    face_parser: nn.Module | None = None,
    mask_ids: torch.Tensor | np.ndarray | None = None,
    size: int = CLOSENESS_SIZE,
) -> list[Closeness]:
    """Closeness of faces G(w) to the drawings they invert, one per image.

    Args:
        images: G(w), [B, 3, H, W] in [-1, 1] (values beyond are clamped, as the image shows them).
        drawings: I^d_0 (aligned as inverted), [B, 3, H', W'] in [-1, 1].
        lpips: an LPIPS network (``lpips(a, b)`` -> [B]), or None.
        face_parser: a BiSeNet with ``parse(images, size)``; with ``mask_ids`` gives the mIoU.
        mask_ids: the input mask's class ids, [h, w] (one for all) or [B, h, w].
        size: the side both images are compared at.
    """
    assert images.ndim == 4 and drawings.ndim == 4 and images.shape[0] == drawings.shape[0], "one drawing per image"
    # As shown: G's output clamped to the image range it is displayed in.
    a = to_resolution(images.float().clamp(-1, 1), size)
    b = to_resolution(drawings.to(images.device).float().clamp(-1, 1), size)
    l2 = (a - b).pow(2).mean(dim=(1, 2, 3)).tolist()
    perceptual = [None] * len(l2)
    if lpips is not None:
        param = next(lpips.parameters())
        perceptual = lpips(a.to(param.dtype), b.to(param.dtype)).float().reshape(-1).tolist()
    mious = [None] * len(l2)
    if face_parser is not None and mask_ids is not None:
        ids = torch.as_tensor(np.asarray(mask_ids)).long()
        ids = ids.expand(len(l2), -1, -1) if ids.ndim == 2 else ids
        param = next(face_parser.parameters())
        parsed = face_parser.parse(images.to(param.device, param.dtype), size=ids.shape[-1]).cpu()
        mious = [mask_scores(confusion_matrix(p, t))["miou"] for p, t in zip(parsed, ids)]
    return [Closeness(float(e), None if p is None else float(p), m) for e, p, m in zip(l2, perceptual, mious)]


@dataclass(frozen=True)
class RefineBudget:
    """One named refinement budget.

    Attributes:
        steps: at most this many Adam steps (0 = the encoder's latent as is).
        patience: stop when the loss has not improved for this many steps.
    """

    steps: int
    patience: int


#: Named budgets, from fastest to most faithful. A step is one G forward + backward and one LPIPS and parser pass:
#: ~11 s at full size on the 2-core CPU (3.5x the measured 3.2 s G forward), ~30 ms on a GPU. "balanced" keeps a CPU
#: Space's face near 3 minutes; on the tiny preset the loss still fell at 100 steps (no early stop), so "close"
#: takes 50 with early stop (docs/training_free.md: provisional until benchmarks/refine_budget.py's curve on
#: real weights is run).
FAITHFULNESS = {
    "encoder": RefineBudget(0, 0),
    "balanced": RefineBudget(10, 4),
    "close": RefineBudget(50, 10),
}
DEFAULT_FAITHFULNESS = "balanced"


def refine_budget(faithfulness: str) -> RefineBudget:
    """The budget of a faithfulness name (a clear error for any other)."""
    if faithfulness not in FAITHFULNESS:
        raise InvalidSettingError(f"faithfulness must be one of {', '.join(FAITHFULNESS)}, got {faithfulness!r}")
    return FAITHFULNESS[faithfulness]
