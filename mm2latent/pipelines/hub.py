"""Where every component's weights come from, and how they are fetched from the Hugging Face Hub.

A model is described by a manifest, ``mm2latent.json``, that names each component: either a folder
next to the manifest (``{"path": "mapper"}``) or a Hub repository (``{"repo_id": ..., "revision": ...,
"subfolder": ..., "allow_patterns": [...]}``). Downloads go through ``huggingface_hub`` with its normal
cache, so ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` behave as everywhere else. Only safetensors weights are
ever loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import WeightsNotFoundError

MANIFEST_NAME = "mm2latent.json"
MANIFEST_FORMAT = "mm2latent"
MANIFEST_VERSION = 1

DEFAULT_MODEL_REPO = "mm2latent/mm2latent-celebahq"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_DIFFUSERS_FILES = ["*.json", "diffusion_pytorch_model.safetensors"]

# The released model: our M and T, our StyleGAN2 conversion and mask ControlNet, the public SD-1.5
# and scribble ControlNet. ``env`` names the variable that overrides the repository
# ("org/name" or "org/name@revision").
DEFAULT_COMPONENTS: dict[str, dict] = {
    "mapper": {"path": "mapper"},
    "modulator": {"path": "modulator"},
    "generator": {"repo_id": "mm2latent/stylegan2-ffhq-1024", "revision": "main", "subfolder": "",
                  "allow_patterns": ["config.json", "model.safetensors"], "env": "MM2LATENT_GENERATOR_REPO"},
    "unet": {"repo_id": SD15_REPO, "revision": "main", "subfolder": "unet",
             "allow_patterns": _DIFFUSERS_FILES, "env": "MM2LATENT_SD_REPO"},
    "text_encoder": {"repo_id": SD15_REPO, "revision": "main", "subfolder": "text_encoder",
                     "allow_patterns": ["config.json", "model.safetensors"], "env": "MM2LATENT_SD_REPO"},
    "tokenizer": {"repo_id": SD15_REPO, "revision": "main", "subfolder": "tokenizer",
                  "allow_patterns": ["*.json", "*.txt"], "env": "MM2LATENT_SD_REPO"},
    "vae": {"repo_id": SD15_REPO, "revision": "main", "subfolder": "vae",
            "allow_patterns": _DIFFUSERS_FILES, "env": "MM2LATENT_SD_REPO"},
    "scheduler": {"repo_id": SD15_REPO, "revision": "main", "subfolder": "scheduler",
                  "allow_patterns": ["*.json"], "env": "MM2LATENT_SD_REPO"},
    "controlnet_mask": {"repo_id": "mm2latent/controlnet-celebamask-hq", "revision": "main", "subfolder": "",
                        "allow_patterns": _DIFFUSERS_FILES, "env": "MM2LATENT_CONTROLNET_MASK_REPO"},
    "controlnet_scribble": {"repo_id": "lllyasviel/sd-controlnet-scribble", "revision": "main", "subfolder": "",
                            "allow_patterns": _DIFFUSERS_FILES, "env": "MM2LATENT_CONTROLNET_SCRIBBLE_REPO"},
}

_NETWORK_FILES = ["*.json", "*.safetensors"]
# Real-photo editing: our pSp encoder, converted loss networks (see mm2latent.models.networks), and CLIP.
DEFAULT_COMPONENTS.update({
    "inverter": {"path": "inverter"},
    "face_parser": {"repo_id": "mm2latent/loss-networks", "subfolder": "face-parser-bisenet",
                    "allow_patterns": _NETWORK_FILES, "env": "MM2LATENT_FACE_PARSER_REPO"},
    "identity": {"repo_id": "mm2latent/loss-networks", "subfolder": "arcface-ir-se50",
                 "allow_patterns": _NETWORK_FILES, "env": "MM2LATENT_ARCFACE_REPO"},
    "lpips": {"repo_id": "mm2latent/loss-networks", "subfolder": "lpips-vgg",
              "allow_patterns": _NETWORK_FILES, "env": "MM2LATENT_LPIPS_REPO"},
    "clip": {"repo_id": "openai/clip-vit-base-patch32", "revision": "main", "subfolder": "",
             "allow_patterns": ["*.json", "*.txt", "model.safetensors"], "env": "MM2LATENT_CLIP_REPO"},
})

REQUIRED_COMPONENTS = ("mapper", "modulator", "generator", "unet", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("vae", "controlnet_mask", "controlnet_scribble", "inverter", "face_parser", "identity",
                       "lpips", "clip")

_HUB_ERRORS = (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError, OSError, ValueError,
)


def _how_to_fix(repo_id: str, what: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    hints = []
    if offline:
        hints.append("HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it, or download beforehand with "
                     f"`huggingface-cli download {repo_id}`")
    else:
        hints.append(f"check the repository name and your network; for a gated or private repository log in "
                     f"(`huggingface-cli login` or HF_TOKEN) and accept its license on the Hub; or download it "
                     f"with `huggingface-cli download {repo_id}`")
    hints.append("point the matching MM2LATENT_*_REPO variable at another repository or a local folder, "
                 "or run `--preset tiny` for the untrained offline demo")
    return f"Could not get {what} from the Hub repository '{repo_id}'. To fix: " + "; ".join(hints) + "."


def parse_repo_reference(value: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    if "@" in value:
        repo_id, revision = value.rsplit("@", 1)
        return repo_id, revision or None
    return value, None


def apply_env_overrides(spec: dict) -> dict:
    """Return the component spec with its ``env`` variable (if set) replacing the repository."""
    variable = spec.get("env")
    value = os.environ.get(variable, "").strip() if variable else ""
    if not value:
        return spec
    spec = dict(spec)
    if Path(value).expanduser().is_dir():
        spec.pop("repo_id", None)
        spec["path"] = str(Path(value).expanduser().resolve() / spec.get("subfolder", ""))
        return spec
    spec["repo_id"], revision = parse_repo_reference(value)
    if revision:
        spec["revision"] = revision
    return spec


def resolve_component(name: str, spec: dict, base: Path | None, base_repo: tuple[str, str | None] | None) -> Path:
    """Local folder holding one component, downloading it into the Hugging Face cache when needed.

    Args:
        name: component name (for messages).
        spec: its manifest entry.
        base: local folder of the manifest, when it is local.
        base_repo: (repo_id, revision) of the manifest, when it came from the Hub.
    """
    spec = apply_env_overrides(spec)
    if "path" in spec:
        path = Path(spec["path"])
        if path.is_absolute() or base is not None:
            folder = path if path.is_absolute() else base / path
            if not folder.is_dir():
                raise WeightsNotFoundError(f"The {name} component should be in the folder '{folder}', which does not exist.")
            return folder
        assert base_repo is not None
        repo_id, revision = base_repo
        subfolder, patterns = spec["path"], [f"{spec['path']}/*"]
    else:
        repo_id, revision = spec["repo_id"], spec.get("revision")
        subfolder = spec.get("subfolder", "")
        patterns = spec.get("allow_patterns")
        if patterns and subfolder:
            patterns = [f"{subfolder}/{p}" for p in patterns]
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except _HUB_ERRORS as error:
        what = f"the {name} weights ({', '.join(patterns or ['all files'])})"
        raise WeightsNotFoundError(_how_to_fix(repo_id, what) + f" [{type(error).__name__}: {error}]") from error
    folder = Path(root) / subfolder
    if not folder.is_dir() or not any(folder.iterdir()):
        raise WeightsNotFoundError(
            _how_to_fix(repo_id, f"the {name} weights") + f" The snapshot has no '{subfolder}' folder."
        )
    return folder


def load_manifest(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[dict, Path | None, tuple | None]:
    """Read ``mm2latent.json`` from a local folder or a Hub repository.

    Returns the manifest, the local folder (or None) and the (repo_id, revision) it came from (or None).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        manifest_file = path / MANIFEST_NAME
        if not manifest_file.is_file():
            raise WeightsNotFoundError(f"'{path}' is a folder but has no {MANIFEST_NAME}; save a pipeline there with "
                                       "`FacePipeline.save_pretrained` first.")
        return _read_manifest(manifest_file), path, None
    repo_id = str(name_or_path)
    try:
        manifest_file = hf_hub_download(repo_id, MANIFEST_NAME, revision=revision)
    except _HUB_ERRORS as error:
        raise WeightsNotFoundError(_how_to_fix(repo_id, f"the file {MANIFEST_NAME}") + f" [{type(error).__name__}]") from error
    return _read_manifest(Path(manifest_file)), None, (repo_id, revision)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsNotFoundError(f"{path} is not a readable JSON manifest: {error}") from error
    if manifest.get("_format") != MANIFEST_FORMAT:
        raise WeightsNotFoundError(f"{path} is not an mm2latent manifest (no \"_format\": \"{MANIFEST_FORMAT}\").")
    missing = [c for c in REQUIRED_COMPONENTS if c not in manifest.get("components", {})]
    if missing:
        raise WeightsNotFoundError(f"{path} names no {', '.join(missing)} component.")
    return manifest
