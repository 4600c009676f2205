"""Loss and metric networks: ArcFace IR-SE50, LPIPS (VGG), BiSeNet face parser, FID feature nets.

Every network is a ``PyTorchModelHubMixin`` module (``config.json`` + ``model.safetensors``) loaded
through the library's Hub loader (:func:`mm2latent.pipelines.hub.resolve_component`), so ``HF_HUB_OFFLINE``,
the HF cache and ``MM2LATENT_*_REPO`` overrides work as for the pipeline. Real weights are converted
once from their public PyTorch checkpoints with ``python -m mm2latent.models.networks.checkpoints ...``.
``"tiny"`` builds a toy version with deterministic random weights (tests).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...pipelines.hub import PUBLIC_NETWORKS, resolve_component, spec_from_reference
from .arcface import IRSE50, tiny_arcface_config
from .face_parser import BiSeNet, tiny_face_parser_config
from .lpips import LPIPS, tiny_lpips_config

__all__ = ["IRSE50", "LPIPS", "BiSeNet", "NETWORKS", "load_network", "build_tiny_network"]

# kind -> (class, tiny config, default spec): the public files (converted on first use, see
# mm2latent.pipelines.hub.PUBLIC_NETWORKS). ``env`` overrides the source ("org/name[@rev]", "org/name:file" or a path).
NETWORKS: dict[str, tuple[type[nn.Module], callable, dict]] = {
    "arcface": (IRSE50, tiny_arcface_config, PUBLIC_NETWORKS["identity"]),
    "lpips": (LPIPS, tiny_lpips_config, PUBLIC_NETWORKS["lpips"]),
    "face_parser": (BiSeNet, tiny_face_parser_config, PUBLIC_NETWORKS["face_parser"]),
}
TINY_SEED = 1234


def build_tiny_network(kind: str, seed: int = TINY_SEED) -> nn.Module:
    """The toy network of ``kind`` with deterministic random weights."""
    cls, tiny_config, _ = NETWORKS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(**tiny_config())
        if kind == "lpips":  # LPIPS' learned weights are non-negative, so distances are >= 0
            for n in range(net.num_slices):
                lin = getattr(net, f"lin{n}").model[1]
                lin.weight.data.abs_()
    return net


def network_spec(kind: str, source: str | dict | None = None) -> dict:
    """A component spec for ``resolve_component``: the public default, a folder, a checkpoint file,
    "org/name[@rev]" (a repository of our folder), "org/name[@rev]:path/file" (a public file) or a dict."""
    default = dict(NETWORKS[kind][2])
    if source is None:
        return default
    if isinstance(source, dict):
        return dict(source)
    spec = spec_from_reference(os.path.expanduser(str(source)), default, kind, origin=f"the {kind} source")
    spec.pop("env", None)
    return spec


def load_network(kind: str, source: str | dict | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a frozen, eval-mode network.

    Args:
        kind: "arcface", "lpips" or "face_parser".
        source: None (the default repository), "tiny", a local folder, "org/name[@revision]" or a spec dict.
        device: where to put it.
    """
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; expected one of {sorted(NETWORKS)}")
    if source == "tiny":
        net = build_tiny_network(kind)
    else:
        folder = resolve_component(kind, network_spec(kind, source), None, None)
        net = NETWORKS[kind][0].from_pretrained(folder)
    return net.to(device).eval().requires_grad_(False)
