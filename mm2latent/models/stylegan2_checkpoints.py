"""Offline converters from public StyleGAN2 and EG3D checkpoints into our safetensors layout.

The output directory is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``);
load it with ``StyleGAN2Generator.from_pretrained`` or, for EG3D, ``TriPlaneGenerator.from_pretrained``.

Sources:

* ``rosinality``: ``.pt`` / ``.pth`` files of rosinality's stylegan2-pytorch (``train.py``
  checkpoints or ``convert_weight.py`` output). Read with ``torch.load(weights_only=True)``
  only: no arbitrary unpickling.
* ``nvidia``: ``.pkl`` network snapshots of NVIDIA's stylegan2-ada-pytorch (StyleGAN2
  architecture) or of NVlabs/eg3d (``TriPlaneGenerator``: ``ffhq512-128.pkl``,
  ``ffhqrebalanced512-128.pkl``, ``ffhqrebalanced512-64.pkl``, ...). These are Python pickles;
  they are read only with ``allow_pickle=True`` (CLI ``--allow-pickle``), through a restricted
  unpickler that never imports NVIDIA's code. EG3D's constructor arguments and its live
  ``rendering_kwargs`` / ``neural_rendering_resolution`` attributes are read from the pickled
  object state.
"""

from __future__ import annotations

import argparse
import codecs
import io
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, MM2LatentError
from .eg3d.checkpoints import triplane_generator_from_nvidia
from .generator import Generator
from .stylegan2 import StyleGAN2Generator, make_kernel

__all__ = [
    "SOURCES",
    "add_convert_arguments",
    "convert_checkpoint",
    "convert_nvidia_pickle",
    "convert_rosinality",
    "detect_source",
    "load_nvidia_pickle",
    "load_rosinality_checkpoint",
    "nvidia_to_rosinality_state_dict",
    "read_nvidia_network",
    "run_convert",
]

SOURCES = ("auto", "rosinality", "nvidia")
ROSINALITY_SUFFIXES = (".pt", ".pth")
NVIDIA_SUFFIXES = (".pkl",)
NVIDIA_RESAMPLE_TAPS = (1, 3, 3, 1)
NVIDIA_DEFAULT_LR_MULTIPLIER = 0.01
PICKLE_WARNING = (
    "Reading an NVIDIA .pkl: pickle files can run arbitrary code when loaded. mm2latent's "
    "loader only rebuilds tensors and replaces every other class with an inert stand-in, but "
    "the pickle format cannot be made safe: only convert files from sources you trust."
)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint file not found: {path}")


# ----------------------------------------------------------------------------------------------
# rosinality


def load_rosinality_checkpoint(path: str | Path) -> dict:
    """Load a rosinality checkpoint with ``torch.load(weights_only=True)`` on the CPU.

    ``argparse.Namespace`` (the ``args`` entry of rosinality ``train.py`` checkpoints) is
    the only class allowed beyond torch's weights-only set.
    """
    path = Path(path)
    _require_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointFormatError(
            f"{path} is not a plain-tensor checkpoint: torch.load(weights_only=True) refused it "
            f"({reason}). Rosinality checkpoints hold only tensors; an NVIDIA .pkl needs "
            f"source='nvidia' and allow_pickle=True (--source nvidia --allow-pickle)."
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointFormatError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def convert_rosinality(path: str | Path, output_dir: str | Path, use_ema: bool = True) -> StyleGAN2Generator:
    """Convert a rosinality ``.pt`` checkpoint into ``output_dir``; return the generator."""
    generator = StyleGAN2Generator.from_rosinality(load_rosinality_checkpoint(path), use_ema=use_ema)
    generator.save_pretrained(output_dir)
    return generator


# ----------------------------------------------------------------------------------------------
# NVIDIA pickles: restricted unpickling


class _PersistentStub:
    """Stand-in for an object pickled by ``torch_utils.persistence``: keeps its class name and state.

    The pickled module source (``meta["module_src"]``) is dropped, never executed.
    """

    def __init__(self, meta: object):
        meta = meta if isinstance(meta, Mapping) else {}
        self.class_name = meta.get("class_name")
        self.state = meta.get("state")


def _reconstruct_persistent_stub(meta: object) -> _PersistentStub:
    return _PersistentStub(meta)


class _Opaque(dict):
    """Stand-in for a class we refuse to import: records args, items and state, runs nothing."""

    pickle_name = "?"
    args: tuple = ()
    state: object = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state

    def append(self, item: object) -> None:
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: object) -> None:
        self.__dict__.setdefault("items", []).extend(items)


def _load_storage_from_bytes(data: bytes) -> object:
    """``torch.storage._load_from_bytes`` without full unpickling."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_PICKLE_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_stub,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,
}


class _NvidiaUnpickler(pickle.Unpickler):
    """Unpickler that lets torch's tensor rebuilders through and stubs every other global."""

    def __init__(self, file):
        super().__init__(file)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_ALLOWED:
            return _PICKLE_ALLOWED[(module, name)]
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or value is torch.Size or value is torch.device:
                return value
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Opaque,), {"pickle_name": f"{module}.{name}"})
        return self._stubs[key]


def _flatten_module(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat ``state_dict``-style names -> tensors from a stubbed, pickled ``nn.Module``."""
    state = getattr(obj, "state", None)
    if not isinstance(state, Mapping) or "_parameters" not in state:
        raise CheckpointFormatError(f"{prefix.rstrip('.') or 'network'} is not a pickled torch module")
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointFormatError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_flatten_module(child, f"{prefix}{name}."))
    return out


def _plain(value: object, where: str) -> object:
    """JSON-like copy (dict / list / str / number / bool / None) of pickled constructor arguments."""
    if isinstance(value, Mapping):  # dicts and stubs of dict subclasses (dnnlib.EasyDict)
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise CheckpointFormatError(f"{where} is a pickled {getattr(value, 'pickle_name', type(value).__name__)}, "
                                f"not a plain value")


def _init_kwargs(obj: object) -> dict:
    state = getattr(obj, "state", None)
    kwargs = state.get("_init_kwargs") if isinstance(state, Mapping) else None
    return dict(kwargs) if isinstance(kwargs, Mapping) else {}


def read_nvidia_network(path: str | Path, allow_pickle: bool = False, use_ema: bool = True) -> object:
    """Unpickle an NVIDIA snapshot with the restricted unpickler; return the inert stand-in of G_ema (or G).

    NVIDIA's ``dnnlib`` / ``torch_utils`` need not be installed: persistent classes and any
    other non-torch class become inert stand-ins that only record their pickled state.
    """
    path = Path(path)
    _require_file(path)
    if not allow_pickle:
        raise CheckpointFormatError(
            f"{path} is a Python pickle, which can run arbitrary code when loaded. If you trust "
            f"the file, pass allow_pickle=True (CLI: --allow-pickle)."
        )
    warnings.warn(PICKLE_WARNING, UserWarning, stacklevel=2)
    try:
        with open(path, "rb") as f:
            data = _NvidiaUnpickler(f).load()
    except Exception as exc:  # a malformed pickle can fail in many ways
        raise CheckpointFormatError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from exc
    if (
        isinstance(data, tuple)
        and data
        and all(getattr(x, "pickle_name", "").startswith("dnnlib.tflib") for x in data)
    ):
        raise CheckpointFormatError(
            f"{path} is a TensorFlow StyleGAN2 pickle: convert it first with rosinality's "
            f"convert_weight.py (gives a .pt) or NVIDIA's stylegan2-ada-pytorch legacy.py"
        )
    key = "G_ema" if use_ema else "G"
    if not isinstance(data, Mapping) or key not in data:
        found = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointFormatError(f"{path} has no {key!r} network (found: {found})")
    return data[key]


def load_nvidia_pickle(
    path: str | Path, allow_pickle: bool = False, use_ema: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an NVIDIA network pickle; return (flat generator state dict, generator init kwargs)."""
    network = read_nvidia_network(path, allow_pickle=allow_pickle, use_ema=use_ema)
    return _flatten_module(network), _init_kwargs(network)


def _is_eg3d(network: object, state_dict: Mapping[str, torch.Tensor]) -> bool:
    return getattr(network, "class_name", None) == "TriPlaneGenerator" or any(
        k.startswith("backbone.synthesis.") for k in state_dict
    )


def _convert_eg3d(network: object, state_dict: dict[str, torch.Tensor], output_dir: str | Path) -> Generator:
    state = network.state if isinstance(getattr(network, "state", None), Mapping) else {}
    rendering_kwargs = state.get("rendering_kwargs")
    resolution = state.get("neural_rendering_resolution")
    generator = triplane_generator_from_nvidia(
        state_dict,
        _plain(_init_kwargs(network), "init_kwargs"),
        rendering_kwargs=None if rendering_kwargs is None else _plain(rendering_kwargs, "rendering_kwargs"),
        neural_rendering_resolution=None if resolution is None else int(_plain(resolution, "resolution")),
        init_args=tuple(_plain(list(state.get("_init_args") or ()), "init_args")),
    )
    generator.save_pretrained(output_dir)
    return generator


# ----------------------------------------------------------------------------------------------
# NVIDIA -> rosinality names


_STYLEGAN3_KEY = re.compile(r"synthesis\.(input\.|L\d+_)")
_BLOCK_KEY = re.compile(r"synthesis\.b(\d+)\.")


def nvidia_to_rosinality_state_dict(nvidia_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an NVIDIA stylegan2-ada-pytorch ``G`` / ``G_ema`` state dict to rosinality's layout.

    Returns a bare rosinality ``g_ema`` state dict plus ``latent_avg`` (from
    ``mapping.w_avg``), which :meth:`StyleGAN2Generator.from_rosinality` loads strictly.

    Transforms (read from both code bases, checked in the tests against a re-implementation
    of NVIDIA's forward equations):

    * ``mapping.fc{i}.*`` -> ``style.{i+1}.*`` unchanged: both store weights divided by the
      lr multiplier and apply ``lr / sqrt(fan_in)`` and ``bias * lr`` at run time.
    * ``*.affine.*`` -> ``*.conv.modulation.*`` unchanged: both keep the +1 bias init in the
      stored bias.
    * conv ``weight [O, I, k, k]`` -> ``conv.weight [1, O, I, k, k]``, no flip: NVIDIA's
      up-conv runs the transposed convolution unflipped, as rosinality (both flipped the
      TF weights on import). NVIDIA does not scale synthesis conv weights by
      ``1 / sqrt(fan_in)``; rosinality does, and demodulation cancels the scale (up to
      the 1e-8 epsilon).
    * ``torgb.weight [3, C, 1, 1]`` -> ``[1, 3, C, 1, 1]``; NVIDIA scales the styles by
      ``1 / sqrt(C)``, rosinality the weight: same product. ``torgb.bias [3]`` -> ``[1, 3, 1, 1]``.
    * ``conv{0,1}.bias`` -> ``activate.bias``; ``noise_strength []`` -> ``noise.weight [1]``;
      ``noise_const [r, r]`` -> ``noises.noise_{n} [1, 1, r, r]`` (n in synthesis order).
    * ``synthesis.b4.const [C, 4, 4]`` -> ``input.input [1, C, 4, 4]``.
    * ``resample_filter`` buffers are checked to be the [1, 3, 3, 1] filter and dropped.

    Not reproduced (assumptions): ``conv_clamp`` (NVIDIA clamps activations to +-256 in
    fp16-trained configs; rarely reached) and fp16 execution of the top resolutions.
    Conditional generators (``mapping.embed``), z_dim != w_dim, the 'orig' / 'resnet'
    architectures and StyleGAN3 synthesis networks raise :class:`CheckpointFormatError`.
    """
    sd = dict(nvidia_sd)
    if any(_STYLEGAN3_KEY.match(k) for k in sd):
        raise CheckpointFormatError(
            "this is a StyleGAN3 synthesis network: only StyleGAN2-architecture pickles "
            "(stylegan2-ada-pytorch) convert"
        )
    if any(k.startswith("mapping.embed.") for k in sd):
        raise CheckpointFormatError("conditional generators (mapping.embed, c_dim > 0) are not supported")
    used: set[str] = set()

    def take(name: str, ndim: int) -> torch.Tensor:
        if name not in sd:
            raise CheckpointFormatError(f"NVIDIA state dict is missing key {name!r}")
        value = sd[name]
        if not isinstance(value, torch.Tensor) or value.ndim != ndim:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointFormatError(f"{name} has shape {shape}, expected {ndim} dimensions")
        used.add(name)
        return value

    out: dict[str, torch.Tensor] = {}
    n_mlp = 0
    while f"mapping.fc{n_mlp}.weight" in sd:
        weight = take(f"mapping.fc{n_mlp}.weight", 2)
        if weight.shape[0] != weight.shape[1]:
            raise CheckpointFormatError(
                f"mapping.fc{n_mlp}.weight has shape {tuple(weight.shape)}: rosinality's layout needs "
                f"z_dim == layer_features == w_dim"
            )
        out[f"style.{n_mlp + 1}.weight"] = weight
        out[f"style.{n_mlp + 1}.bias"] = take(f"mapping.fc{n_mlp}.bias", 1)
        n_mlp += 1
    if n_mlp == 0:
        raise CheckpointFormatError("NVIDIA state dict is missing key 'mapping.fc0.weight'")
    if "mapping.w_avg" in sd:
        out["latent_avg"] = take("mapping.w_avg", 1)

    resolutions = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))})
    if not resolutions or resolutions != [4 * 2**i for i in range(len(resolutions))]:
        raise CheckpointFormatError(
            f"synthesis blocks {resolutions} are not 4, 8, 16, ... (StyleGAN2 layout)"
        )

    def layer(src: str, dst: str, noise_index: int) -> None:
        out[f"{dst}.conv.weight"] = take(f"{src}.weight", 4).unsqueeze(0)
        out[f"{dst}.conv.modulation.weight"] = take(f"{src}.affine.weight", 2)
        out[f"{dst}.conv.modulation.bias"] = take(f"{src}.affine.bias", 1)
        out[f"{dst}.noise.weight"] = take(f"{src}.noise_strength", 0).reshape(1)
        out[f"{dst}.activate.bias"] = take(f"{src}.bias", 1)
        noise = take(f"{src}.noise_const", 2)
        out[f"noises.noise_{noise_index}"] = noise.reshape(1, 1, *noise.shape)

    def torgb(src: str, dst: str) -> None:
        out[f"{dst}.conv.weight"] = take(f"{src}.weight", 4).unsqueeze(0)
        out[f"{dst}.conv.modulation.weight"] = take(f"{src}.affine.weight", 2)
        out[f"{dst}.conv.modulation.bias"] = take(f"{src}.affine.bias", 1)
        out[f"{dst}.bias"] = take(f"{src}.bias", 1).reshape(1, -1, 1, 1)

    out["input.input"] = take("synthesis.b4.const", 3).unsqueeze(0)
    layer("synthesis.b4.conv1", "conv1", 0)
    torgb("synthesis.b4.torgb", "to_rgb1")
    for j, res in enumerate(resolutions[1:]):
        layer(f"synthesis.b{res}.conv0", f"convs.{2 * j}", 2 * j + 1)
        layer(f"synthesis.b{res}.conv1", f"convs.{2 * j + 1}", 2 * j + 2)
        torgb(f"synthesis.b{res}.torgb", f"to_rgbs.{j}")

    reference = make_kernel(NVIDIA_RESAMPLE_TAPS)
    for name in [k for k in sd if k.endswith(".resample_filter")]:
        value = take(name, 2)
        if value.shape != reference.shape or not torch.allclose(value.float(), reference, atol=1e-6):
            raise CheckpointFormatError(f"{name} is not the [1, 3, 3, 1] resample filter")
    leftover = sorted(set(sd) - used)
    if leftover:
        raise CheckpointFormatError(
            "NVIDIA state dict has keys a StyleGAN2 'skip' generator does not have "
            f"(another architecture?): {', '.join(leftover[:20])}"
        )
    return out


def convert_nvidia_pickle(
    path: str | Path, output_dir: str | Path, allow_pickle: bool = False, use_ema: bool = True
) -> Generator:
    """Convert an NVIDIA stylegan2-ada-pytorch or EG3D ``.pkl`` into ``output_dir``; return the generator.

    EG3D ``TriPlaneGenerator`` snapshots become a :class:`~.eg3d.TriPlaneGenerator`, others a
    :class:`StyleGAN2Generator`. Refuses (CheckpointFormatError) unless ``allow_pickle`` is True;
    warns when unpickling.
    """
    network = read_nvidia_network(path, allow_pickle=allow_pickle, use_ema=use_ema)
    nvidia_sd, init_kwargs = _flatten_module(network), _init_kwargs(network)
    if _is_eg3d(network, nvidia_sd):
        return _convert_eg3d(network, nvidia_sd, output_dir)
    mapping_kwargs = init_kwargs.get("mapping_kwargs") or {}
    synthesis_kwargs = init_kwargs.get("synthesis_kwargs") or {}
    if init_kwargs.get("img_channels", 3) != 3:
        raise CheckpointFormatError(
            f"only RGB generators convert, got img_channels={init_kwargs['img_channels']}"
        )
    if synthesis_kwargs.get("architecture", "skip") != "skip":
        raise CheckpointFormatError(
            f"only the 'skip' architecture converts, got {synthesis_kwargs['architecture']!r}"
        )
    if synthesis_kwargs.get("conv_clamp") is not None:
        warnings.warn(
            f"the NVIDIA generator clamps activations to +-{synthesis_kwargs['conv_clamp']}; the converted "
            f"generator does not (outputs differ only where activations exceed the clamp)",
            UserWarning,
            stacklevel=2,
        )
    lr_mlp = float(mapping_kwargs.get("lr_multiplier", NVIDIA_DEFAULT_LR_MULTIPLIER))
    rosinality_sd = nvidia_to_rosinality_state_dict(nvidia_sd)
    generator = StyleGAN2Generator.from_rosinality(rosinality_sd, lr_mlp=lr_mlp)
    generator.save_pretrained(output_dir)
    return generator


# ----------------------------------------------------------------------------------------------
# Dispatch and CLI


def detect_source(path: str | Path) -> str:
    """'rosinality' for .pt/.pth, 'nvidia' for .pkl; CheckpointFormatError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in ROSINALITY_SUFFIXES:
        return "rosinality"
    if suffix in NVIDIA_SUFFIXES:
        return "nvidia"
    raise CheckpointFormatError(
        f"cannot tell the checkpoint format of {path} from its suffix {suffix!r}: expected "
        f"{'/'.join(ROSINALITY_SUFFIXES)} (rosinality) or {'/'.join(NVIDIA_SUFFIXES)} (NVIDIA), "
        f"or pass source='rosinality' / 'nvidia'"
    )


def convert_checkpoint(
    input_path: str | Path,
    output_dir: str | Path,
    source: str = "auto",
    allow_pickle: bool = False,
    use_ema: bool = True,
) -> Generator:
    """Convert ``input_path`` into ``output_dir``, picking the reader by ``source`` or by suffix."""
    input_path = Path(input_path)
    if source not in SOURCES:
        raise CheckpointFormatError(f"source must be one of {SOURCES}, got {source!r}")
    _require_file(input_path)
    if source == "auto":
        source = detect_source(input_path)
    if source == "rosinality":
        return convert_rosinality(input_path, output_dir, use_ema=use_ema)
    return convert_nvidia_pickle(input_path, output_dir, allow_pickle=allow_pickle, use_ema=use_ema)


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``convert`` sub-command options to ``parser``."""
    parser.add_argument(
        "--input", required=True, type=Path, help="rosinality .pt/.pth or NVIDIA .pkl checkpoint"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="directory for config.json + model.safetensors"
    )
    parser.add_argument(
        "--source", choices=SOURCES, default="auto", help="checkpoint format (default: from the file suffix)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow reading NVIDIA .pkl files (Python pickles: only for files you trust)",
    )
    parser.add_argument(
        "--no-ema",
        dest="use_ema",
        action="store_false",
        help="convert the training generator instead of the EMA one",
    )
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the ``convert`` sub-command; return the process exit code."""
    try:
        generator = convert_checkpoint(
            args.input, args.output, source=args.source, allow_pickle=args.allow_pickle, use_ema=args.use_ema
        )
    except MM2LatentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output} (resolution {generator.resolution}, style_dim {generator.style_dim}, "
        f"{generator.num_ws} W+ layers)"
    )
    return 0
