"""Read public PyTorch checkpoints safely and convert the loss/metric networks to safetensors folders.

    python -m mm2latent.models.networks.checkpoints arcface model_ir_se50.pth out/arcface-ir-se50
    python -m mm2latent.models.networks.checkpoints lpips vgg.pth out/lpips-vgg --vgg model.safetensors
    python -m mm2latent.models.networks.checkpoints face_parser 79999_iter.pth out/face-parser-bisenet

Sources: ``model_ir_se50.pth`` (pSp / TreB1eN InsightFace_Pytorch), ``vgg.pth`` (the lpips package's
wheel, ``lpips/weights/v0.1/vgg.pth``) with torchvision's ImageNet VGG16 (timm's ``timm/vgg16.tv_in1k``
``model.safetensors``, or torchvision's own ``vgg16-397923af.pth``: both name the trunk ``features.N``),
``79999_iter.pth`` (zllrunning/face-parsing.PyTorch). Files are read with ``torch.load(weights_only=True)``
(:func:`read_plain_checkpoint`) or safetensors only; the architecture (IR-SE stages, BiSeNet width, ...)
is read off the tensor shapes, and loading is strict: a mismatch is a :class:`CheckpointFormatError`,
never silent. :mod:`mm2latent.models.native_checkpoints` converts them on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointFormatError, WeightsNotFoundError
from . import NETWORKS

_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
# Data-only classes a plain checkpoint may hold besides tensors and builtin containers: rosinality's
# and pSp-era training scripts store their ``argparse`` options next to the weights.
PLAIN_CHECKPOINT_CLASSES = (argparse.Namespace,)


def read_plain_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with typed errors.

    Only tensors, builtin containers/scalars and :data:`PLAIN_CHECKPOINT_CLASSES` are accepted: torch's
    weights-only unpickler refuses anything else before constructing it, so nothing is executed.

    Raises:
        CheckpointFormatError: the file is missing, unreadable, holds another object, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(PLAIN_CHECKPOINT_CLASSES)):
            # Memory-mapped when the file is in torch's zip format: tensors a conversion skips (e4e's
            # decoder, rosinality's discriminator) are never read into memory.
            mmap = zipfile.is_zipfile(path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"{path} is not a plain-tensor checkpoint: it holds {_unsafe_globals(path, error)}, which "
            "mm2latent never unpickles at run time. Use a checkpoint that stores only tensors (a state dict)."
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointFormatError(f"cannot read {path} as a PyTorch checkpoint: {error}") from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def _unsafe_globals(path: Path, error: Exception) -> str:
    """Names of the classes/functions the pickle would import (read from its opcodes, nothing run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (pre-zip) file or a damaged one: fall back to torch's message
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    names = [n for n in names if n not in {f"{c.__module__}.{c.__qualname__}" for c in PLAIN_CHECKPOINT_CLASSES}]
    return ", ".join(f"`{n}`" for n in names) if names else "objects other than tensors"


def plain_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict: unwraps ``{"state_dict": ...}``, drops DataParallel's ``module.``."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(f"expected a state dict, got a {type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointFormatError(f"a state dict holds only tensors; these entries are not: {not_tensors[:10]}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    return plain_state_dict(read_plain_checkpoint(path))


# ---------------------------------------------------------------------------------------------- shapes


def infer_ir_se_stages(state: Mapping[str, torch.Tensor], prefix: str = "body.") -> list[tuple[int, int, int]]:
    """(in_channels, depth, num_units) of the IR-SE stages of ``state``'s ``{prefix}N`` units.

    A stage starts where the unit depth changes (the first unit of each stage has stride 2, which the
    weights do not show). Every pSp / InsightFace IR-50/100/152 has depths 64, 128, 256, 512, so this
    recovers their stages exactly; toy nets must use strictly increasing depths too.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.res_layer\.1\.weight")
    convs = sorted((int(m.group(1)), v) for k, v in state.items() if (m := pattern.fullmatch(k)))
    if not convs or [i for i, _ in convs] != list(range(len(convs))):
        raise CheckpointFormatError(f"no IR-SE units {prefix}0, {prefix}1, ... (res_layer.1.weight) in the checkpoint")
    stages: list[list[int]] = []
    for _, weight in convs:
        depth, in_channels = weight.shape[0], weight.shape[1]
        if stages and stages[-1][1] == depth:
            stages[-1][2] += 1
        else:
            stages.append([in_channels, depth, 1])
    return [tuple(s) for s in stages]


def infer_se_reduction(state: Mapping[str, torch.Tensor], prefix: str = "body.") -> int:
    """Reduction ratio of the squeeze-excitation gates of IR-SE units ``{prefix}N``."""
    gate = state.get(f"{prefix}0.res_layer.5.fc1.weight")
    if gate is None:
        raise CheckpointFormatError(f"{prefix}0 has no squeeze-excitation gate (res_layer.5.fc1): an IR net "
                                    "without SE ('ir' mode) is not supported")
    return gate.shape[1] // gate.shape[0]


def infer_network_config(kind: str, state: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments of the ``kind`` network that ``state`` was saved from."""
    try:
        if kind == "arcface":
            stages = infer_ir_se_stages(state)
            embedding = state["output_layer.3.weight"]
            spatial = math.isqrt(embedding.shape[1] // stages[-1][1])
            return dict(stages=stages, embedding_dim=embedding.shape[0], input_size=spatial * 2 ** len(stages),
                        se_reduction=infer_se_reduction(state))
        if kind == "face_parser":
            return dict(num_classes=state["conv_out.conv_out.weight"].shape[0],
                        width=state["cp.resnet.conv1.weight"].shape[0])
    except KeyError as error:
        raise CheckpointFormatError(f"not a {kind} checkpoint: it has no {error.args[0]!r}") from error
    return {}  # LPIPS: VGG16 is fixed


def network_from_state(kind: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the ``kind`` network (``arcface`` / ``face_parser`` / ``lpips``) from a public state dict, strictly."""
    net = NETWORKS[kind][0](**infer_network_config(kind, state))
    state = dict(state)
    # LPIPS' input scaling constants are not learned, and lpips' vgg.pth does not store them.
    state.update({k: v for k, v in net.state_dict().items() if k in ("scaling_layer.shift", "scaling_layer.scale")})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointFormatError(f"the checkpoint does not have the {kind} layout: {error}") from error
    return net.eval()


# The lpips wheel (PyPI ``lpips==0.1.4``) ships its learned linear layers inside the package.
LPIPS_PACKAGE_WEIGHTS = "weights/v0.1/vgg.pth"


def lpips_package_weights(relative: str = LPIPS_PACKAGE_WEIGHTS) -> Path:
    """The ``lpips`` package's own copy of LPIPS' linear layers (found without importing the package)."""
    spec = importlib.util.find_spec("lpips")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / relative if locations else None
    if path is None or not path.is_file():
        raise WeightsNotFoundError(f"LPIPS' linear layers come from the lpips package ({relative} in its wheel), "
                                   "which is not installed: `pip install lpips==0.1.4`.")
    return path


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` (safetensors) or ``.pt``/``.pth`` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return _load(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointFormatError(f"cannot read {path} as safetensors: {error}") from error


def lpips_state_dict(lin: Mapping[str, torch.Tensor], vgg: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lpips' ``lin0..4.model.1.weight`` + an ImageNet VGG16's ``features.N.{weight,bias}`` (torchvision's and
    timm's names; the classifier / ``pre_logits`` / ``head`` are unused) -> our LPIPS state dict."""
    state = {k: v for k, v in lin.items() if k.startswith("lin")}
    for key, value in vgg.items():
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match:
            index = int(match.group(1))
            slice_no = next(n for n, (a, b) in enumerate(_VGG_SLICES, 1) if a <= index < b)
            state[f"net.slice{slice_no}.{index}.{match.group(2)}"] = value
    return state


def lpips_state(lin_path: str | Path, vgg_path: str | Path) -> dict[str, torch.Tensor]:
    """lpips ``vgg.pth`` (lin0..4) + VGG16 weights (``.pth`` or ``.safetensors``) -> our LPIPS state dict."""
    return lpips_state_dict(_load(lin_path), read_tensor_file(vgg_path))


def convert(kind: str, source: str, output: str, vgg: str | None = None) -> Path:
    """Convert the public ``source`` checkpoint of ``kind`` into the folder ``output``."""
    state = lpips_state(source, vgg) if kind == "lpips" else _load(source)
    network_from_state(kind, state).save_pretrained(output)
    return Path(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(NETWORKS))
    parser.add_argument("source", help="the public .pth checkpoint")
    parser.add_argument("output", help="output folder (config.json + model.safetensors)")
    parser.add_argument("--vgg", help="ImageNet VGG16 weights (lpips only): timm/vgg16.tv_in1k model.safetensors "
                        "or torchvision's vgg16-397923af.pth")
    args = parser.parse_args(argv)
    if args.kind == "lpips" and not args.vgg:
        parser.error("lpips needs --vgg (timm/vgg16.tv_in1k's model.safetensors)")
    print(convert(args.kind, args.source, args.output, args.vgg))


if __name__ == "__main__":
    main()
