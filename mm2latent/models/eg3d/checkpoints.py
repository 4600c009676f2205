"""NVIDIA EG3D checkpoints (``G_ema`` of ``ffhq512-128.pkl`` & co.) <-> :class:`TriPlaneGenerator`.

The pickle itself is read by :func:`mm2latent.models.stylegan2_checkpoints.load_nvidia_pickle`'s
restricted unpickler (NVIDIA's code is never imported or run); this module turns what it yields —
the flat ``G_ema`` state dict, the stored constructor arguments, the live ``rendering_kwargs`` and
``neural_rendering_resolution`` attributes — into a generator config and loads the weights strictly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ...errors import CheckpointFormatError, InvalidSettingError
from ..camera import CAMERA_LABEL_DIM
from ..stylegan2 import _names, make_kernel
from .generator import TriPlaneGenerator
from .layers import RESAMPLE_TAPS, SynthesisBlock, SynthesisLayer
from .options import RenderingOptions
from .superresolution import SUPERRESOLUTION_LAYOUTS

__all__ = ["TRAINING_ONLY_BUFFERS", "eg3d_config_from_nvidia", "nvidia_state_dict", "triplane_generator_from_nvidia"]

FILTER_KEY = "resample_filter"
# Superresolution classes that register their own (unused) resample filter next to block0/block1.
SR_MODULES_WITH_FILTER = {
    "training.superresolution.SuperresolutionHybrid8X",
    "training.superresolution.SuperresolutionHybrid4X",
    "training.superresolution.SuperresolutionHybrid2X",
}
# TriPlaneGenerator.__init__'s positional parameters, for pickles that stored positional init args.
INIT_ARG_NAMES = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "sr_num_fp16_res",
                  "mapping_kwargs", "rendering_kwargs", "sr_kwargs")
# Constructor arguments that change nothing in fp32 evaluation: fp16 layer counts (we run fp32),
# the training-time choice of fused modulated convolution (evaluation always fuses).
IGNORED_KWARGS = {"num_fp16_res", "sr_num_fp16_res", "fused_modconv_default", "sr_kwargs"}
MAPPING_KWARGS = {"num_layers", "lr_multiplier", "embed_features", "layer_features", "activation", "w_avg_beta"}
# Keys NVIDIA's code reads with .get(key, default): a pickle may lack them.
RENDERING_DEFAULTS = {"c_scale": 0.0, "decoder_lr_mul": 1.0, "white_back": False, "density_noise": 0.0,
                      "avg_camera_radius": 2.7, "avg_camera_pivot": [0.0, 0.0, 0.0],
                      "gpc_reg_prob": None, "density_reg": 0.0, "density_reg_p_dist": 0.0, "reg_type": "l1"}
# Buffers of a published G_ema that inference never reads, with the shape they must have (c_dim numbers).
# NVlabs/eg3d training/training_loop.py:159 registers the std of the dataset's camera labels on G before
# G_ema = copy.deepcopy(G) (:161), so every ffhq512-128.pkl / ffhqrebalanced512-*.pkl / afhq / shapenet
# snapshot carries it; only training's generator-pose-conditioning swap could use it.
TRAINING_ONLY_BUFFERS = {"dataset_label_std": (CAMERA_LABEL_DIM,)}
# NVIDIA's TriPlaneGenerator.__init__ value of neural_rendering_resolution (training then raises it).
NVIDIA_INITIAL_NEURAL_RESOLUTION = 64


def _init_kwargs(init_kwargs: Mapping, init_args: tuple = ()) -> dict:
    kwargs = dict(zip(INIT_ARG_NAMES, init_args))
    kwargs.update(init_kwargs)
    return kwargs


def eg3d_config_from_nvidia(
    init_kwargs: Mapping,
    rendering_kwargs: Mapping | None = None,
    neural_rendering_resolution: int | None = None,
    init_args: tuple = (),
) -> dict:
    """:class:`TriPlaneGenerator` arguments from the constructor arguments NVIDIA stored in the pickle.

    Args:
        init_kwargs: ``G_ema.init_kwargs`` (``z_dim``, ``w_dim``, ``mapping_kwargs``, ``channel_base``, ...).
        rendering_kwargs: the network's live ``rendering_kwargs`` attribute (what NVIDIA renders
            with; training may update it after construction); default: the one in ``init_kwargs``.
        neural_rendering_resolution: the network's live attribute (128 for ``*512-128.pkl``);
            default: NVIDIA's initial 64, with a warning.
        init_args: positional constructor arguments, if the pickle stored any.
    """
    kwargs = _init_kwargs(init_kwargs, init_args)
    required = ("z_dim", "c_dim", "w_dim", "img_resolution")
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise CheckpointFormatError(f"EG3D init arguments lack {', '.join(missing)}")
    if kwargs["c_dim"] != CAMERA_LABEL_DIM or kwargs.get("img_channels", 3) != 3:
        raise CheckpointFormatError(
            f"only RGB EG3D generators with a {CAMERA_LABEL_DIM}-number camera label convert, got "
            f"c_dim={kwargs['c_dim']}, img_channels={kwargs.get('img_channels')}"
        )
    mapping = dict(kwargs.get("mapping_kwargs") or {})
    unknown = sorted(set(mapping) - MAPPING_KWARGS)
    if unknown:
        raise CheckpointFormatError(f"unsupported mapping_kwargs: {', '.join(unknown)}")
    for name in ("embed_features", "layer_features"):
        if mapping.get(name) not in (None, kwargs["w_dim"]):
            raise CheckpointFormatError(f"mapping_kwargs.{name}={mapping[name]} != w_dim is not supported")
    if mapping.get("activation", "lrelu") != "lrelu":
        raise CheckpointFormatError(f"mapping activation {mapping['activation']!r} is not supported")
    synthesis = {k: v for k, v in kwargs.items()
                 if k not in INIT_ARG_NAMES and k not in IGNORED_KWARGS}
    if synthesis.pop("architecture", "skip") != "skip":
        raise CheckpointFormatError("only the 'skip' synthesis architecture converts")
    if list(synthesis.pop("resample_filter", RESAMPLE_TAPS)) != list(RESAMPLE_TAPS):
        raise CheckpointFormatError(f"only the {list(RESAMPLE_TAPS)} resample filter converts")
    unknown = sorted(set(synthesis) - {"channel_base", "channel_max", "conv_clamp"})
    if unknown:
        raise CheckpointFormatError(f"unsupported EG3D synthesis arguments: {', '.join(unknown)}")

    options = dict(rendering_kwargs if rendering_kwargs is not None else kwargs.get("rendering_kwargs") or {})
    options.setdefault("image_resolution", kwargs["img_resolution"])
    for key, value in RENDERING_DEFAULTS.items():
        options.setdefault(key, value)
    known = set(RenderingOptions.__dataclass_fields__)
    dropped = sorted(set(options) - known)
    if dropped:
        warnings.warn(f"rendering options NVIDIA's renderer never reads were dropped: {', '.join(dropped)}",
                      UserWarning, stacklevel=2)
    options = {k: v for k, v in options.items() if k in known}
    lacking = sorted(known - set(options))
    if lacking:
        raise CheckpointFormatError(f"EG3D rendering_kwargs lack {', '.join(lacking)}")
    if options["superresolution_module"] not in SUPERRESOLUTION_LAYOUTS:
        raise CheckpointFormatError(
            f"unsupported superresolution_module {options['superresolution_module']!r}; "
            f"known: {', '.join(SUPERRESOLUTION_LAYOUTS)}"
        )
    if neural_rendering_resolution is None:
        warnings.warn(f"the pickle does not store neural_rendering_resolution: using NVIDIA's initial "
                      f"{NVIDIA_INITIAL_NEURAL_RESOLUTION}", UserWarning, stacklevel=2)
        neural_rendering_resolution = NVIDIA_INITIAL_NEURAL_RESOLUTION
    return {
        "z_dim": int(kwargs["z_dim"]),
        "w_dim": int(kwargs["w_dim"]),
        "img_resolution": int(kwargs["img_resolution"]),
        "mapping_layers": int(mapping.get("num_layers", 8)),
        "mapping_lr_multiplier": float(mapping.get("lr_multiplier", 0.01)),
        "channel_base": int(synthesis.get("channel_base", 32768)),
        "channel_max": int(synthesis.get("channel_max", 512)),
        "conv_clamp": synthesis.get("conv_clamp"),
        "neural_rendering_resolution": int(neural_rendering_resolution),
        # NVIDIA builds the super-resolution blocks with conv_clamp=256 whenever they may run in fp16.
        "sr_conv_clamp": 256 if int(kwargs.get("sr_num_fp16_res", 0)) > 0 else None,
        "rendering_kwargs": options,
    }


def nvidia_state_dict(generator: TriPlaneGenerator) -> dict[str, torch.Tensor]:
    """The generator's weights in NVIDIA's ``G_ema`` layout, resample-filter buffers included."""
    state = {name: value.detach() for name, value in generator.state_dict().items()}
    kernel = make_kernel(RESAMPLE_TAPS)
    for name, module in generator.named_modules():
        if isinstance(module, (SynthesisBlock, SynthesisLayer)):
            state[f"{name}.{FILTER_KEY}"] = kernel.clone()
    if generator.rendering.superresolution_module in SR_MODULES_WITH_FILTER:
        state[f"superresolution.{FILTER_KEY}"] = kernel.clone()
    return state


def triplane_generator_from_nvidia(
    state_dict: Mapping[str, torch.Tensor],
    init_kwargs: Mapping,
    rendering_kwargs: Mapping | None = None,
    neural_rendering_resolution: int | None = None,
    init_args: tuple = (),
) -> TriPlaneGenerator:
    """Build a :class:`TriPlaneGenerator` from a flat NVIDIA ``G_ema`` state dict and its stored arguments.

    Loading is strict: every parameter and buffer must be present with its shape, nothing else may
    be (``resample_filter`` buffers are checked to be the [1, 3, 3, 1] filter and dropped: ours are
    constants), except :data:`TRAINING_ONLY_BUFFERS` (``dataset_label_std``), checked for shape and
    dropped. Problems raise :class:`CheckpointFormatError` naming the keys.
    """
    config = eg3d_config_from_nvidia(init_kwargs, rendering_kwargs, neural_rendering_resolution, init_args)
    try:
        generator = TriPlaneGenerator(**config)
    except (InvalidSettingError, ValueError) as exc:
        raise CheckpointFormatError(f"the EG3D init arguments describe no supported generator: {exc}") from exc
    expected = generator.state_dict()
    modules = dict(generator.named_modules())
    kernel = make_kernel(RESAMPLE_TAPS)
    loaded, unexpected, problems = {}, [], []
    for name, value in state_dict.items():
        owner, _, leaf = name.rpartition(".")
        if leaf == FILTER_KEY and owner in modules:
            if value.shape != kernel.shape or not torch.allclose(value.float(), kernel, atol=1e-6):
                problems.append(f"{name} is not the {list(RESAMPLE_TAPS)} filter")
        elif name in TRAINING_ONLY_BUFFERS:
            if tuple(value.shape) != TRAINING_ONLY_BUFFERS[name]:
                problems.append(f"{name} has shape {tuple(value.shape)}, expected {TRAINING_ONLY_BUFFERS[name]}")
        elif name not in expected:
            unexpected.append(name)
        elif value.shape != expected[name].shape:
            problems.append(f"{name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
        else:
            loaded[name] = value
    missing = [name for name in expected if name not in state_dict]
    if missing or unexpected or problems:
        parts = [f"{label}: {_names(names)}" for label, names in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mismatches", problems)) if names]
        raise CheckpointFormatError("NVIDIA EG3D state dict does not match the generator: " + "; ".join(parts))
    generator.load_state_dict(loaded, strict=True)
    return generator.eval().requires_grad_(False)
