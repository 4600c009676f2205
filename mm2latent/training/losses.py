"""Stage 1 / stage 2 / inverter losses: the one pSp objective of :mod:`mm2latent.losses` (re-exported here, where
the training stages import it)."""

from __future__ import annotations

from ..losses import LOSS_RESOLUTION, LatentLoss, w_norm

__all__ = ["LOSS_RESOLUTION", "LatentLoss", "w_norm"]
