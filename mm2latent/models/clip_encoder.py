"""The MM2Latent engine's text (and image) encoder: a CLIP-format checkpoint through ``open_clip``.

FaRL (a CLIP ViT-B/16 trained on face image–text pairs) ships its weights as an OpenAI-CLIP state dict
(``{"state_dict": {...}}``, plus pretraining heads the towers do not use); OpenAI's own ViT-B/16 is a
stand-in with the same keys. Both were trained with QuickGELU, hence ``quick_gelu=True`` by default.

Nothing here downloads: the architecture comes from open_clip's config registry (or a saved
``open_clip_config.json``), the model is built with random weights and the state dict is read by us —
safetensors preferred, ``torch.load(weights_only=True)`` for ``.pt``/``.pth``/``.bin``. OpenAI's ``.pt`` is a
TorchScript archive, which is never opened at run time: convert it once with

    python -m mm2latent.models.clip_encoder --model ViT-B-16 --weights ViT-B-16.pt --output clip-vit-b-16

``save_pretrained`` writes open_clip's own Hub layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), so ``open_clip.create_model("local-dir:<folder>")`` reads our folders too.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointFormatError, InvalidImageError, WeightsNotFoundError

__all__ = ["CLIPEncoder", "read_clip_state_dict", "TINY_CLIP_CONFIG"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# OpenAI's TorchScript archives carry these scalars beside the weights (open_clip drops them too).
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

#: A toy CLIP in open_clip's config schema (tests and the ``tiny-mm2latent`` preset): same code paths as
#: ViT-B/16, 32² images, two layers per tower, the real 49408-token vocabulary (open_clip's tokenizer).
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP-format weights file, unwrapped to the towers' key names.

    Accepts ``.safetensors`` and ``torch.save`` files of plain tensors (``.pt``/``.pth``/``.bin``, read with
    ``weights_only=True``), a ``{"state_dict": ...}`` wrapper (FaRL), a ``module.`` prefix (DDP) and
    OpenAI's metadata scalars (dropped).

    Raises:
        WeightsNotFoundError: the file does not exist.
        CheckpointFormatError: the file is not a state dict of tensors (e.g. a TorchScript archive).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"no CLIP weights file at '{path}'")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a file it will not unpickle safely
            raise CheckpointFormatError(
                f"'{path}' is not a plain state dict of tensors ({type(error).__name__}). OpenAI's CLIP .pt files "
                "are TorchScript archives: convert one once with `python -m mm2latent.models.clip_encoder "
                "--model ViT-B-16 --weights <file> --output <folder>`."
            ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointFormatError(f"'{path}' holds no state dict")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    state = {k: v for k, v in state.items() if k not in _OPENAI_METADATA_KEYS}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointFormatError(f"'{path}' has entries that are not tensors: {not_tensors[:5]}")
    return state


def _read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """OpenAI's release format. Offline conversion only: a TorchScript archive carries code."""
    warnings.warn(f"opening the TorchScript archive '{path}': only do this with a file you trust", stacklevel=2)
    archive = torch.jit.load(str(path), map_location="cpu")
    state = {k: v.detach().clone() for k, v in archive.state_dict().items() if k not in _OPENAI_METADATA_KEYS}
    return state


def _resolve_model_config(model_name: str, model_cfg: dict | None, quick_gelu: bool | None) -> dict:
    import open_clip

    if model_cfg is None:
        model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        if model_cfg is None:
            raise WeightsNotFoundError(f"open_clip knows no model config '{model_name}'; known: "
                                       f"{', '.join(open_clip.list_models()[:20])}, ...")
    model_cfg = copy.deepcopy(model_cfg)
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = bool(quick_gelu)
    if model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {}) \
            or "timm_model_name" in model_cfg.get("vision_cfg", {}):
        raise WeightsNotFoundError(f"'{model_name}' is not an OpenAI-layout CLIP (custom text tower, Hugging Face "
                                   "or timm backbone); the engine reads FaRL / OpenAI CLIP checkpoints")
    return model_cfg


class CLIPEncoder(nn.Module):
    """Both towers of a CLIP-format model, returning unit-norm joint embeddings.

    Args:
        model_name: an open_clip architecture name ("ViT-B-16"), recorded in the saved config.
        model_cfg: the open_clip model config (default: the registered config of ``model_name``).
        quick_gelu: force QuickGELU (FaRL and OpenAI CLIP) or GELU; None keeps the config's choice.
        image_mean: per-channel mean of the image tower's input normalisation (OpenAI's).
        image_std: per-channel std of the image tower's input normalisation (OpenAI's).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        model_cfg: dict | None = None,
        quick_gelu: bool | None = True,
        image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711),
    ):
        super().__init__()
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        self.model_name = model_name
        self.model_cfg = _resolve_model_config(model_name, model_cfg, quick_gelu)
        self.model = open_clip.CLIP(**self.model_cfg)
        self.tokenizer = SimpleTokenizer(context_length=self.model.context_length)
        self.embed_dim = int(self.model_cfg["embed_dim"])
        image_size = self.model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self.register_buffer("image_mean", torch.tensor(image_mean)[None, :, None, None], persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std)[None, :, None, None], persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    # ------------------------------------------------------------------ loading
    def load_clip_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tower weights; keys the towers do not use (FaRL's pretraining heads) are ignored and logged.

        Raises:
            CheckpointFormatError: a tower key is missing or has another shape.
        """
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointFormatError(f"the CLIP weights lack {len(missing)} keys of {self.model_name}, "
                                        f"e.g. {missing[:5]}")
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if state[k].shape != v.shape]
        if wrong:
            raise CheckpointFormatError(f"CLIP weights do not fit {self.model_name}: {wrong[:5]}")
        unused = sorted(set(state) - set(expected))
        if unused:
            logger.info("ignoring %d checkpoint keys the CLIP towers do not use (e.g. %s)", len(unused), unused[:3])
        self.model.load_state_dict({k: state[k] for k in expected})

    @classmethod
    def from_checkpoint(cls, model_name: str, weights: str | os.PathLike, *, model_cfg: dict | None = None,
                        quick_gelu: bool | None = True) -> CLIPEncoder:
        """Build ``model_name`` and load a CLIP-format weights file (FaRL's ``.pth``, a ``.safetensors``).

        Args:
            model_name: an open_clip architecture name registered in open_clip ("ViT-B-16").
            weights: the weights file (see :func:`read_clip_state_dict`).
            model_cfg: an explicit open_clip config instead of the registered one.
            quick_gelu: see the class.
        """
        encoder = cls(model_name, model_cfg=model_cfg, quick_gelu=quick_gelu)
        encoder.load_clip_state_dict(read_clip_state_dict(weights))
        return encoder.eval().requires_grad_(False)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """open_clip's Hub layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "model_name": self.model_name,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": {"size": self.image_size, "mean": self.image_mean.flatten().tolist(),
                               "std": self.image_std.flatten().tolist(), "interpolation": "bicubic"},
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None) -> CLIPEncoder:
        """Load a folder written by :meth:`save_pretrained` (or an open_clip Hub repository with safetensors).

        Args:
            name_or_path: a local folder or a Hub repository id ("org/name").
            revision: the Hub revision.
        """
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            from ..pipelines.hub import resolve_component

            spec = {"repo_id": str(name_or_path), "revision": revision,
                    "allow_patterns": [CONFIG_NAME, "*.safetensors"]}
            folder = resolve_component("CLIP encoder", spec, None, None)
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise WeightsNotFoundError(f"'{folder}' needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = json.loads(config_file.read_text())
        preprocess = config.get("preprocess_cfg", {})
        kwargs = {k: tuple(preprocess[k]) for k in ("mean", "std") if k in preprocess}
        encoder = cls(config.get("model_name", folder.name), model_cfg=config["model_cfg"], quick_gelu=None,
                      **{f"image_{k}": v for k, v in kwargs.items()})
        encoder.load_clip_state_dict(load_file(str(weights_file)))
        return encoder.eval().requires_grad_(False)

    # ------------------------------------------------------------------ embeddings
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[B, context_length]`` (open_clip's CLIP BPE, truncated to the context)."""
        return self.tokenizer(list(prompts)).to(self.device)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, embed_dim]``."""
        return self.model.encode_text(self.tokenize(prompts), normalize=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, H]`` in [-1, 1] -> the image tower's normalised input at its size (bicubic)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise InvalidImageError(f"expected square RGB images [B, 3, H, H], got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        x = ((x + 1) / 2 - self.image_mean.float()) / self.image_std.float()
        return x.to(self.model.visual.conv1.weight.dtype)  # the tower's dtype (half-precision runs)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, embed_dim]`` of images in [-1, 1]."""
        return self.model.encode_image(self.preprocess(images), normalize=True)


def main(argv: list[str] | None = None) -> None:
    """Convert a CLIP-format checkpoint (FaRL ``.pth``, OpenAI TorchScript ``.pt``) to a safetensors folder."""
    parser = argparse.ArgumentParser(prog="python -m mm2latent.models.clip_encoder", description=main.__doc__)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture name")
    parser.add_argument("--weights", required=True, help="FaRL .pth, OpenAI .pt or .safetensors")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--gelu", action="store_true", help="plain GELU instead of QuickGELU (not FaRL/OpenAI)")
    args = parser.parse_args(argv)
    encoder = CLIPEncoder(args.model, quick_gelu=not args.gelu)
    path = Path(args.weights)
    try:
        state = read_clip_state_dict(path)
    except CheckpointFormatError:
        state = _read_torchscript_state_dict(path)
    encoder.load_clip_state_dict(state)
    print(encoder.save_pretrained(args.output))


if __name__ == "__main__":
    main()
