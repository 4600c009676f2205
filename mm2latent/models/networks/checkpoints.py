"""Convert the public PyTorch checkpoints of the loss/metric networks to safetensors folders.

    python -m mm2latent.models.networks.checkpoints arcface model_ir_se50.pth out/arcface-ir-se50
    python -m mm2latent.models.networks.checkpoints lpips vgg.pth out/lpips-vgg --vgg vgg16-397923af.pth
    python -m mm2latent.models.networks.checkpoints face_parser 79999_iter.pth out/face-parser-bisenet

Sources: ``model_ir_se50.pth`` (pSp / TreB1eN InsightFace_Pytorch), ``vgg.pth`` (lpips package,
``lpips/weights/v0.1``) with torchvision's ImageNet VGG16 (``vgg16-397923af.pth``), ``79999_iter.pth``
(zllrunning/face-parsing.PyTorch). Loading is strict: a mismatch is an error, never silent. Upload the
output folders to a Hub repository (default ``mm2latent/loss-networks``, one subfolder each).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from . import NETWORKS

_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def _load(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def lpips_state(lin_path: str, vgg_path: str) -> dict[str, torch.Tensor]:
    """lpips ``vgg.pth`` (lin0..4) + torchvision VGG16 (``features.N``) -> our LPIPS state dict."""
    state = {k: v for k, v in _load(lin_path).items() if k.startswith("lin")}
    for key, value in _load(vgg_path).items():
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match:
            index = int(match.group(1))
            slice_no = next(n for n, (a, b) in enumerate(_VGG_SLICES, 1) if a <= index < b)
            state[f"net.slice{slice_no}.{index}.{match.group(2)}"] = value
    return state


def convert(kind: str, source: str, output: str, vgg: str | None = None) -> Path:
    net = NETWORKS[kind][0]()
    state = lpips_state(source, vgg) if kind == "lpips" else _load(source)
    reference = net.state_dict()
    state.update({k: v for k, v in reference.items() if k in ("scaling_layer.shift", "scaling_layer.scale")})
    net.load_state_dict(state, strict=True)
    net.save_pretrained(output)
    return Path(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(NETWORKS))
    parser.add_argument("source", help="the public .pth checkpoint")
    parser.add_argument("output", help="output folder (config.json + model.safetensors)")
    parser.add_argument("--vgg", help="torchvision VGG16 ImageNet weights (lpips only)")
    args = parser.parse_args(argv)
    if args.kind == "lpips" and not args.vgg:
        parser.error("lpips needs --vgg (torchvision's vgg16 ImageNet weights)")
    print(convert(args.kind, args.source, args.output, args.vgg))


if __name__ == "__main__":
    main()
