"""Public checkpoints in their original formats -> our ``config.json`` + ``model.safetensors`` folders.

The public networks the method needs are published as PyTorch training checkpoints, each in the layout
of the code that trained it. :func:`convert_native_file` reads one with ``torch.load(weights_only=True)``
(tensors and plain containers only: nothing is unpickled), rebuilds our module with the converter of its
format, and writes the folder that ``from_pretrained`` loads. The Hub loader
(:func:`mm2latent.pipelines.hub.resolve_component`) calls it once per file and caches the result.

Formats (``format`` of a manifest component):

* ``rosinality``: StyleGAN2 generator of rosinality's stylegan2-pytorch (``{"g_ema", "latent_avg"}``).
* ``e4e``: e4e's ``Encoder4Editing`` (``{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg", "opts"}``).
* ``psp``: pSp's ``GradualStyleEncoder`` (same layout as e4e).
* ``encoder``: either of the two, told apart by the checkpoint's ``opts["encoder_type"]``.
* ``bisenet``: zllrunning/face-parsing.PyTorch BiSeNet (``79999_iter.pth``, a bare state dict).
* ``ir_se50``: the pSp / TreB1eN ArcFace IR-SE50 backbone (``model_ir_se50.pth``, a bare state dict).
* ``pidinet``: hellozhuo/pidinet's ``table5_pidinet.pth`` (``{"epoch", "state_dict"}``, ``module.`` keys).
* ``lpips_vgg``: LPIPS (VGG, v0.1): torchvision's ImageNet VGG16 as timm publishes it (``timm/vgg16.tv_in1k``,
  ``model.safetensors``) plus the linear layers the ``lpips`` package ships in its wheel
  (``lpips/weights/v0.1/vgg.pth``, read from the installed package).

Offline command (e.g. to upload a converted folder)::

    python -m mm2latent.models.native_checkpoints e4e e4e_ffhq_encode.pt out/e4e-ffhq
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..editing.inversion import encoder_from_checkpoint
from ..errors import CheckpointFormatError, MM2LatentError
from .networks.checkpoints import (
    lpips_package_weights,
    lpips_state_dict,
    network_from_state,
    plain_state_dict,
    read_plain_checkpoint,
    read_tensor_file,
)
from .stylegan2 import StyleGAN2Generator

__all__ = ["NATIVE_FORMATS", "SOURCE_FILE", "build_native_model", "convert_native_file", "read_native_checkpoint"]

# format -> what the file holds (for messages and the CLI).
NATIVE_FORMATS: dict[str, str] = {
    "rosinality": "a StyleGAN2 generator of rosinality's stylegan2-pytorch (.pt with g_ema and latent_avg)",
    "e4e": "an e4e Encoder4Editing encoder (e4e_ffhq_encode.pt)",
    "psp": "a pSp GradualStyleEncoder encoder (psp_ffhq_encode.pt)",
    "encoder": "a pSp or e4e encoder, told apart by its opts['encoder_type']",
    "bisenet": "a BiSeNet face parser of zllrunning/face-parsing.PyTorch (79999_iter.pth)",
    "ir_se50": "an ArcFace IR-SE50 backbone of pSp / InsightFace_Pytorch (model_ir_se50.pth)",
    "pidinet": "a PiDiNet edge detector of hellozhuo/pidinet (table5_pidinet.pth)",
    "lpips_vgg": "an ImageNet VGG16 (timm/vgg16.tv_in1k model.safetensors) + the lpips package's v0.1 linear layers",
}
# Written next to the converted weights: where they came from.
SOURCE_FILE = "mm2latent-source.json"


def _check_format(format: str) -> None:
    if format not in NATIVE_FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {format!r}; expected one of {sorted(NATIVE_FORMATS)}")


def read_native_checkpoint(path: str | Path, format: str) -> dict:
    """Read a public checkpoint of ``format`` with ``torch.load(weights_only=True)`` (or safetensors); typed errors."""
    _check_format(format)
    if format == "lpips_vgg":
        return read_tensor_file(path)
    return read_plain_checkpoint(path)  # the argparse options of rosinality's train.py are allowed data


def build_native_model(format: str, checkpoint: dict) -> nn.Module:
    """Our module (with ``save_pretrained``) holding the weights of a checkpoint of ``format``."""
    _check_format(format)
    if format == "rosinality":
        return StyleGAN2Generator.from_rosinality(checkpoint)
    if format in ("e4e", "psp", "encoder"):
        return encoder_from_checkpoint(checkpoint, None if format == "encoder" else format)
    if format == "pidinet":
        from .networks.pidinet import pidinet_from_checkpoint

        return pidinet_from_checkpoint(checkpoint)
    if format == "lpips_vgg":
        lin = plain_state_dict(read_plain_checkpoint(lpips_package_weights()))
        return network_from_state("lpips", lpips_state_dict(lin, checkpoint))
    kind = {"bisenet": "face_parser", "ir_se50": "arcface"}[format]
    return network_from_state(kind, plain_state_dict(checkpoint))


def convert_native_file(
    path: str | Path,
    format: str,
    output_dir: str | Path,
    source: dict | None = None,
    progress: bool = True,
) -> Path:
    """Convert the public checkpoint ``path`` of ``format`` into ``output_dir`` (config.json + model.safetensors).

    Args:
        path: the checkpoint file.
        format: one of :data:`NATIVE_FORMATS`.
        output_dir: the folder to write (created).
        source: provenance (repository, commit, path, ...) recorded in ``mm2latent-source.json``.
        progress: show a tqdm bar over the read / convert / write steps.
    """
    _check_format(format)
    output_dir = Path(output_dir)
    with tqdm(total=3, desc=f"converting {Path(path).name} ({format})", disable=not progress, leave=False) as bar:
        checkpoint = read_native_checkpoint(path, format)
        bar.update()
        model = build_native_model(format, checkpoint)
        del checkpoint
        bar.update()
        model.save_pretrained(output_dir)
        (output_dir / SOURCE_FILE).write_text(json.dumps({"format": format, **(source or {"file": str(path)})}, indent=2))
        bar.update()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(NATIVE_FORMATS), help="the checkpoint's format")
    parser.add_argument("source", type=Path, help="the public checkpoint file")
    parser.add_argument("output", type=Path, help="output folder (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    try:
        print(convert_native_file(args.source, args.format, args.output))
    except MM2LatentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
