"""``python -m mm2latent doctor [--preset public|<repo or folder>]``: is every file of a model here, and right?

For each component of the preset (or of a model's ``mm2latent.json``) the doctor resolves its file(s) — the
Hugging Face cache, or a download when the Hub is reachable — and checks them against what the loader or the
converter expects, without loading a pipeline:

* a public checkpoint in its original format (``"format"``): read with ``torch.load(weights_only=True)`` (or
  safetensors) and run through its converter, which is strict about keys and shapes; its tensor dtypes are
  listed. ``converted`` when the conversion is already cached, ``present`` when it will run on first use.
* a folder (``config.json`` + safetensors): every safetensors header is read (no tensor is) and its keys and
  shapes compared with the network the config describes, built with empty weights.

Each row ends with the fix when something is wrong. Unpublished repositories are skipped without a request.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MM2LatentError

__all__ = ["FileCheck", "check_component", "check_model", "format_table", "main", "model_components"]

STATUSES = ("present", "converted", "mismatch", "missing", "skipped")
# Components whose folders hold no weights to compare (tokenizer files, a scheduler config) or that have their
# own multi-file layouts (CLIP towers, the MM2Latent engine): only their presence is checked.
PRESENCE_ONLY = {"tokenizer", "scheduler", "clip", "mm2latent_engine"}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "BOOL": "bool"}
# Our own config.json + model.safetensors networks: component -> "module:Class".
OUR_CLASSES = {
    "mapper": "mm2latent.models.mapping:MappingNetwork",
    "modulator": "mm2latent.models.mapping:StyleModulationNetwork",
    "inverter": "mm2latent.editing.inversion:PSPEncoder",
    "face_parser": "mm2latent.models.networks.face_parser:BiSeNet",
    "identity": "mm2latent.models.networks.arcface:IRSE50",
    "lpips": "mm2latent.models.networks.lpips:LPIPS",
}


@dataclass(frozen=True)
class FileCheck:
    """One row of the doctor's table.

    Attributes:
        component: the manifest component ("generator", "unet", ...).
        source: where it comes from ("org/name:path/file.pt", "org/name/subfolder" or a local path).
        status: one of :data:`STATUSES`.
        detail: what was found (tensor count and dtypes) or what is wrong.
        fix: what to do about it ("" when nothing is wrong).
    """

    component: str
    source: str
    status: str
    detail: str
    fix: str = ""


def model_components(preset: str) -> tuple[dict[str, dict], Path | None, tuple | None]:
    """The components of ``preset`` ("public", a model folder or a Hub repository), with the manifest's base."""
    from .pipelines.hub import PUBLIC_COMPONENTS, load_manifest

    if preset == "public":
        return {name: dict(spec) for name, spec in PUBLIC_COMPONENTS.items()}, None, None
    manifest, base, base_repo = load_manifest(preset)
    return dict(manifest["components"]), base, base_repo


def _source(spec: dict) -> str:
    if "repo" in spec:
        return f"{spec['repo']}:{spec['path']}"
    if "repo_id" in spec:
        return "/".join(p for p in (spec["repo_id"], spec.get("subfolder", "")) if p)
    return str(spec.get("path", "?"))


def _dtypes(tensors) -> str:
    counts: dict[str, int] = {}
    for dtype in tensors:
        name = SAFETENSORS_DTYPES.get(str(dtype), str(dtype).removeprefix("torch."))
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))


def _check_native(name: str, spec: dict, base: Path | None) -> FileCheck:
    from .models.native_checkpoints import NATIVE_FORMATS, build_native_model, read_native_checkpoint
    from .pipelines.hub import is_converted, locate_hub_checkpoint

    checkpoint_format = spec["format"]
    if checkpoint_format not in NATIVE_FORMATS:
        return FileCheck(name, _source(spec), "mismatch", f"unknown format {checkpoint_format!r}",
                         f"use one of {', '.join(sorted(NATIVE_FORMATS))}")
    converted = False
    if "repo" in spec:
        path, candidates, _ = locate_hub_checkpoint(name, spec["repo"], spec.get("revision"), spec["path"],
                                                    checkpoint_format, spec.get("env"))
        converted = any(is_converted(folder) for folder in candidates)
    else:
        path = Path(spec["path"]).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if not path.is_file():
            return FileCheck(name, _source(spec), "missing", f"no file {path}", "put the checkpoint there")
    checkpoint = read_native_checkpoint(path, checkpoint_format)
    tensors = [v.dtype for v in _walk_tensors(checkpoint)]
    try:
        model = build_native_model(checkpoint_format, checkpoint)
    except MM2LatentError as error:
        return FileCheck(name, _source(spec), "mismatch", str(error),
                         f"this is not {NATIVE_FORMATS[checkpoint_format]}: point {spec.get('env', 'the component')} "
                         "at the right file")
    size = sum(p.numel() for p in model.state_dict().values())
    detail = f"{checkpoint_format}: {len(tensors)} tensors ({_dtypes(tensors)}) -> {size / 1e6:.1f} M numbers"
    if converted:
        return FileCheck(name, _source(spec), "converted", detail)
    return FileCheck(name, _source(spec), "present", detail + "; converts on first use")


def _walk_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk_tensors(item)


def _expected_state(name: str, spec: dict, config: dict) -> dict[str, tuple] | None:
    """Key -> shape of the network ``config`` describes, built with empty weights (None: not known here)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if name in ("unet", "vae") or name.startswith("controlnet_"):
            import diffusers

            class_name = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}.get(name, "ControlNetModel")
            module = getattr(diffusers, class_name).from_config(config)
        elif name == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            module = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
        elif name == "generator":
            from .models.generator import generator_class

            module = generator_class(spec.get("class", "stylegan2"))(**config)
        elif name in OUR_CLASSES:
            module_name, class_name = OUR_CLASSES[name].split(":")
            module = getattr(importlib.import_module(module_name), class_name)(**config)
        else:
            return None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_folder(name: str, spec: dict, base: Path | None, base_repo: tuple | None) -> FileCheck:
    from safetensors import safe_open

    from .pipelines.hub import resolve_component

    folder = resolve_component(name, spec, base, base_repo)
    files = sorted(folder.glob("*.safetensors"))
    if name in PRESENCE_ONLY:
        return FileCheck(name, _source(spec), "present", f"{sum(1 for _ in folder.iterdir())} files")
    config_file = folder / "config.json"
    if not config_file.is_file() or not files:
        return FileCheck(name, _source(spec), "mismatch", f"{folder} lacks config.json or a .safetensors file",
                         "download the whole folder again (`hf download ...`) or re-save it with save_pretrained")
    found: dict[str, tuple] = {}
    dtypes = []
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                piece = weights.get_slice(key)
                found[key] = tuple(piece.get_shape())
                dtypes.append(piece.get_dtype())
    detail = f"{len(found)} tensors ({_dtypes(dtypes)})"
    expected = _expected_state(name, spec, json.loads(config_file.read_text()))
    if expected is not None:
        missing = sorted(set(expected) - set(found))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing or wrong:
            problems = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                        f"{len(wrong)} of another shape (e.g. {wrong[0]}: {found[wrong[0]]} != {expected[wrong[0]]})"
                        if wrong else ""]
            return FileCheck(name, _source(spec), "mismatch", "; ".join(p for p in problems if p),
                             "the weights do not belong to this config: download the folder again or point "
                             f"{spec.get('env', 'the component')} at the right one")
    return FileCheck(name, _source(spec), "present", detail)


def check_component(name: str, spec: dict, base: Path | None = None, base_repo: tuple | None = None) -> FileCheck:
    """Resolve one component's file(s) and check them; never raises for a missing or wrong file."""
    from .pipelines.hub import apply_env_overrides, is_native_spec, published

    spec = apply_env_overrides(spec, name)
    repo = spec.get("repo") or spec.get("repo_id")
    if repo and not published(repo):
        return FileCheck(name, _source(spec), "skipped", "not published yet (nothing was requested)",
                         "name a repository or folder of your own with its variable")
    try:
        if is_native_spec(spec):
            return _check_native(name, spec, base)
        return _check_folder(name, spec, base, base_repo)
    except MM2LatentError as error:
        status = "missing" if type(error).__name__ == "WeightsNotFoundError" else "mismatch"
        message = str(error)
        detail, _, fix = message.partition(" To fix: ")
        return FileCheck(name, _source(spec), status, detail, fix)


def check_model(preset: str = "public") -> list[FileCheck]:
    """One :class:`FileCheck` per component of ``preset`` ("public", a model folder or a Hub repository)."""
    components, base, base_repo = model_components(preset)
    return [check_component(name, spec, base, base_repo) for name, spec in components.items()]


def format_table(rows: list[FileCheck]) -> str:
    """The rows as a plain-text table (component, status, source, detail, fix)."""
    header = ("component", "status", "source", "detail / fix")
    lines = [(r.component, r.status, r.source, r.detail + (f" -> fix: {r.fix}" if r.fix else "")) for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(3)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0])).rstrip()]
    for line in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, [*widths, 0])).rstrip())
    return "\n".join(out)


def add_doctor_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", default="public",
                        help="'public' (default: the public networks) or a model's Hub repository / local folder")
    return parser


def run_doctor(args: argparse.Namespace) -> int:
    """Print the table; exit status 1 when any file is missing or wrong."""
    rows = check_model(args.preset)
    print(format_table(rows))
    return 1 if any(r.status in ("missing", "mismatch") for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    return run_doctor(add_doctor_arguments(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
