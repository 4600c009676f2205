"""Where every component's weights come from, and how they are fetched from the Hugging Face Hub.

A model is described by a manifest, ``mm2latent.json``, that names each component as one of:

* a folder next to the manifest: ``{"path": "mapper"}``;
* a Hub repository of our safetensors folders: ``{"repo_id": ..., "revision": ..., "subfolder": ...,
  "allow_patterns": [...]}``;
* a public checkpoint in its original format (a *native* component): ``{"repo": "org/name", "path":
  "file/in/repo.pt", "format": "rosinality" | "e4e" | "psp" | "encoder" | "bisenet" | "ir_se50",
  "revision": optional}``, or a local file ``{"path": "/abs/file.pt", "format": ...}``. It is read with
  ``torch.load(weights_only=True)`` (nothing is unpickled), converted once by
  :mod:`mm2latent.models.native_checkpoints`, and the converted ``config.json`` + ``model.safetensors``
  are cached next to the download (keyed by repository, commit, path and format), so the loading code
  sees a folder as for every other component.

An ``env`` entry names the variable that overrides the component: a local folder, a local checkpoint
file, ``org/name[@revision]`` (a repository of our folders) or ``org/name[@revision]:path/in/repo``
(a native file). Downloads go through ``huggingface_hub`` with its normal cache, so ``HF_HUB_OFFLINE``
and ``HF_HOME`` behave as everywhere else. Before the first download the Hub is probed once (one
request, ``MM2LATENT_HUB_TIMEOUT`` seconds): when it is unreachable, or ``HF_HUB_OFFLINE`` is set, only
the local cache is used and a missing file fails at once, with the fix, instead of after a minute of
retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from ..errors import CheckpointFormatError, WeightsNotFoundError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mm2latent.json"
MANIFEST_FORMAT = "mm2latent"
MANIFEST_VERSION = 1

DEFAULT_MODEL_REPO = "mm2latent/mm2latent-celebahq"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_DIFFUSERS_FILES = ["*.json", "diffusion_pytorch_model.safetensors"]
_FOLDER_FILES = ["*.json", "*.safetensors"]

# Public uploads of the original checkpoints, confirmed by the public code that downloads them:
# AIRI-Institute/HairFastGAN's hair_swap.py (--ckpt pretrained_models/StyleGAN/ffhq.pt, a rosinality
# g_ema + latent_avg file) and models/Embedding.py (pretrained_models/encoder4editing/e4e_ffhq_encode.pt,
# read with e4e's setup_model); AIRI-Institute/StyleFeatureEditor's configs/paths.py
# (pretrained_models/model_ir_se50.pth, pSp's IR-SE50; its HF repo is cloned into pretrained_models/);
# vivym/face-parsing-bisenet (79999_iter.pth of zllrunning/face-parsing.PyTorch, as MuseTalk fetches it);
# timm/vgg16.tv_in1k (torchvision's ImageNet VGG16 weights in timm's names; LPIPS' trunk, whose linear
# layers come from the lpips package's wheel).
HAIRFAST_REPO = "AIRI-Institute/HairFastGAN"
STYLE_FEATURE_EDITOR_REPO = "AIRI-Institute/StyleFeatureEditor"
BISENET_REPO = "vivym/face-parsing-bisenet"
TIMM_VGG16_REPO = "timm/vgg16.tv_in1k"
SCRIBBLE_CONTROLNET_REPO = "lllyasviel/sd-controlnet-scribble"
CLIP_REPO = "openai/clip-vit-base-patch32"
# ControlNet's annotator weights; table5_pidinet.pth is hellozhuo/pidinet's trained_models file.
ANNOTATORS_REPO = "lllyasviel/Annotators"

#: Where this project's own trained models will be published. Until a repository is listed in
#: :data:`PUBLISHED_REPOS` nothing tries it by default: see :func:`published` and :func:`model_plan`.
PROJECT_ORG = "mm2latent"
#: Every Hub repository a default of this library names: each one exists (checked by hand on the Hub).
PUBLISHED_REPOS: frozenset[str] = frozenset({
    SD15_REPO, SCRIBBLE_CONTROLNET_REPO, CLIP_REPO, HAIRFAST_REPO, STYLE_FEATURE_EDITOR_REPO, BISENET_REPO,
    TIMM_VGG16_REPO, ANNOTATORS_REPO,
})

# Public networks in their original formats (converted on first use).
PUBLIC_NETWORKS: dict[str, dict] = {
    "generator": {"repo": HAIRFAST_REPO, "path": "pretrained_models/StyleGAN/ffhq.pt", "format": "rosinality",
                  "revision": "main", "env": "MM2LATENT_GENERATOR_REPO"},
    "inverter": {"repo": HAIRFAST_REPO, "path": "pretrained_models/encoder4editing/e4e_ffhq_encode.pt",
                 "format": "e4e", "revision": "main", "env": "MM2LATENT_INVERTER_REPO"},
    "face_parser": {"repo": BISENET_REPO, "path": "79999_iter.pth", "format": "bisenet", "revision": "main",
                    "env": "MM2LATENT_FACE_PARSER_REPO"},
    "identity": {"repo": STYLE_FEATURE_EDITOR_REPO, "path": "pretrained_models/model_ir_se50.pth",
                 "format": "ir_se50", "revision": "main", "env": "MM2LATENT_ARCFACE_REPO"},
    "lpips": {"repo": TIMM_VGG16_REPO, "path": "model.safetensors", "format": "lpips_vgg", "revision": "main",
              "env": "MM2LATENT_LPIPS_REPO"},
}

# PiDiNet, the scribble detector of training data and "sketch from a photo" (mm2latent.inputs.scribbles).
PIDINET_SPEC = {"repo": ANNOTATORS_REPO, "path": "table5_pidinet.pth", "format": "pidinet", "revision": "main",
                "env": "MM2LATENT_PIDINET_REPO"}

# The default components: public SD-1.5, scribble ControlNet, CLIP and the public networks above; M, T and the
# photo encoder are folders next to a manifest (what training writes). The face-mask ControlNet is trained by
# stage 0 (no public one exists): name it with MM2LATENT_CONTROLNET_MASK_REPO or a config's components.
DEFAULT_COMPONENTS: dict[str, dict] = {
    "mapper": {"path": "mapper"},
    "modulator": {"path": "modulator"},
    "generator": dict(PUBLIC_NETWORKS["generator"]),
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
    "controlnet_scribble": {"repo_id": SCRIBBLE_CONTROLNET_REPO, "revision": "main", "subfolder": "",
                            "allow_patterns": _DIFFUSERS_FILES, "env": "MM2LATENT_CONTROLNET_SCRIBBLE_REPO"},
    "inverter": {"path": "inverter", "env": "MM2LATENT_INVERTER_REPO"},
    **{name: dict(PUBLIC_NETWORKS[name]) for name in ("face_parser", "identity", "lpips")},
    "clip": {"repo_id": CLIP_REPO, "revision": "main", "subfolder": "",
             "allow_patterns": ["*.json", "*.txt", "model.safetensors"], "env": "MM2LATENT_CLIP_REPO"},
}

REQUIRED_COMPONENTS = ("mapper", "modulator", "generator", "unet", "text_encoder", "tokenizer", "scheduler")
#: What a manifest of each engine (its ``"engine"``, default "ddgi") must name.
ENGINE_REQUIRED_COMPONENTS = {"ddgi": REQUIRED_COMPONENTS, "mm2latent": ("generator", "mm2latent_engine")}
OPTIONAL_COMPONENTS = ("vae", "controlnet_mask", "controlnet_scribble", "inverter", "face_parser", "identity",
                       "lpips", "clip")

# The public preset: every network from a public file (LPIPS included: refinement uses L2 + LPIPS); M and T
# are not published yet (untrained).
PUBLIC_COMPONENTS: dict[str, dict] = {
    **{name: dict(spec) for name, spec in PUBLIC_NETWORKS.items()},
    **{name: dict(DEFAULT_COMPONENTS[name]) for name in ("clip", "unet", "text_encoder", "tokenizer", "vae",
                                                         "scheduler", "controlnet_scribble")},
}

# The format an override ``org/name:path`` (or a local file) of a component is read in. The inverter's
# is read from the file itself (pSp and e4e checkpoints record their encoder type).
NATIVE_FORMAT_OF_COMPONENT = {"generator": "rosinality", "inverter": "encoder", "face_parser": "bisenet",
                              "identity": "ir_se50", "arcface": "ir_se50", "lpips": "lpips_vgg",
                              "pidinet": "pidinet"}

# Converted native checkpoints live in ``<repo cache>/mm2latent-converted/<version>/<commit>/<format>/<path>/``;
# bump the version when a converter's output changes.
CONVERTED_DIR = "mm2latent-converted"
CONVERTER_VERSION = "v1"

DEFAULT_HUB_TIMEOUT = 3.0  # seconds for the one reachability probe (MM2LATENT_HUB_TIMEOUT)
HUB_STATUS_TTL = 60.0  # seconds a probe result is reused

_HUB_ERRORS = (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError, OSError, ValueError,
)
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_hub_status_cache: dict[str, tuple[float, bool, str]] = {}


# ---------------------------------------------------------------------------------------------- published


def published(repo_id: str) -> bool:
    """Whether a default may try ``repo_id``: False for this project's own repositories (``mm2latent/...``) until
    they are listed in :data:`PUBLISHED_REPOS`; True for every other repository (a user's choice). No request."""
    repo_id = parse_repo_reference(repo_id.partition(":")[0])[0]
    return repo_id in PUBLISHED_REPOS or not repo_id.startswith(f"{PROJECT_ORG}/")


@dataclass(frozen=True)
class ModelPlan:
    """What to load for a requested model: the model itself, or a stand-in when it is not published yet.

    Attributes:
        requested: what was asked for (a Hub repository, a folder or a preset name).
        load: what to load instead (``requested`` itself when it is published).
        skipped: True when ``requested`` is an unpublished repository of this project (nothing was tried).
        sentence: one sentence for users, empty when nothing was skipped.
    """

    requested: str
    load: str
    skipped: bool
    sentence: str = ""


def model_plan(requested: str, fallback: str = "public") -> ModelPlan:
    """The model to load for ``requested`` (e.g. the Space's ``MM2LATENT_MODEL_REPO``), without a network request.

    An unpublished repository of this project is skipped quietly (no download attempt, no error): the plan
    loads ``fallback`` instead and says so in :attr:`ModelPlan.sentence`.
    """
    if Path(requested).expanduser().exists() or published(requested):
        return ModelPlan(requested, requested, False)
    return ModelPlan(requested, fallback, True,
                     f"The trained model {requested} is not published yet, so this runs the {fallback} preset "
                     "instead (public networks, untrained M and T).")


# ---------------------------------------------------------------------------------------------- reachability


def hub_status(refresh: bool = False) -> tuple[bool, str]:
    """(reachable, reason if not): can files be downloaded from the Hub right now?

    ``HF_HUB_OFFLINE`` answers at once. Otherwise one HEAD request to the Hub endpoint with a short
    timeout (``MM2LATENT_HUB_TIMEOUT``, default 3 s) decides, and the answer is reused for a minute:
    huggingface_hub itself would retry every unreachable download five times (about 23 s each).
    """
    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    cached = _hub_status_cache.get(endpoint)
    now = time.monotonic()
    if cached is not None and not refresh and now - cached[0] < HUB_STATUS_TTL:
        return cached[1], cached[2]
    timeout = float(os.environ.get("MM2LATENT_HUB_TIMEOUT", "") or DEFAULT_HUB_TIMEOUT)
    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
        reachable, reason = True, ""
    except Exception as error:  # any failure of the single probe (DNS, refused, timeout, TLS) means "not now"
        reachable, reason = False, f"{endpoint} cannot be reached: {type(error).__name__}: {error}"
        logger.info("%s; using only the local Hugging Face cache", reason)
    _hub_status_cache[endpoint] = (now, reachable, reason)
    return reachable, reason


def _download_command(repo_id: str, files: list[str] | None = None, patterns: list[str] | None = None,
                      revision: str | None = None) -> str:
    command = f"hf download {repo_id}"
    if files:
        command += " " + " ".join(files)
    elif patterns:
        command += " --include " + " ".join(f"'{p}'" for p in patterns)
    if revision and revision != "main":
        command += f" --revision {revision}"
    return f"`{command}`"


def _how_to_fix(repo_id: str, what: str, *, files: list[str] | None = None, patterns: list[str] | None = None,
                revision: str | None = None, env: str | None = None) -> str:
    download = _download_command(repo_id, files, patterns, revision)
    reachable, reason = hub_status()
    if constants.HF_HUB_OFFLINE:
        hints = ["HF_HUB_OFFLINE is set, so nothing can be downloaded and it is not in the local cache: unset it, "
                 f"or download it beforehand with {download}"]
    elif not reachable:
        hints = [f"the Hub is unreachable ({reason}) and it is not in the local cache "
                 f"({constants.HF_HUB_CACHE}): download it where there is network with {download} "
                 "into the same HF_HOME, or restore the connection"]
    else:
        hints = ["check the repository and file names; for a gated or private repository log in (`hf auth login` "
                 f"or HF_TOKEN) and accept its license on the Hub; or download it with {download}"]
    variable = env or "the matching MM2LATENT_*_REPO variable"
    hints.append(f"point {variable} at another repository ('org/name[@revision]' or 'org/name:path/to/file.pt'), "
                 "a local folder or a checkpoint file, or run `--preset tiny` for the untrained offline demo")
    return f"Could not get {what} from the Hub repository '{repo_id}'. To fix: " + "; ".join(hints) + "."


# ---------------------------------------------------------------------------------------------- specs


def parse_repo_reference(value: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    if "@" in value:
        repo_id, revision = value.rsplit("@", 1)
        return repo_id, revision or None
    return value, None


def is_native_spec(spec: dict) -> bool:
    """Does the component name a checkpoint in its original format (``"format"``) rather than a folder?"""
    return "format" in spec


def spec_from_reference(value: str, spec: dict, name: str | None = None, origin: str = "the override") -> dict:
    """The component ``spec`` redirected to ``value``: a local folder, a local checkpoint file,
    ``org/name[@revision]`` (a repository of our folders) or ``org/name[@revision]:path/in/repo`` (a native file).

    Args:
        value: the reference.
        spec: the component's current spec (its subfolder, file patterns and format are reused).
        name: the component's name (picks the native format of a file when ``spec`` has none).
        origin: where ``value`` came from, for messages (e.g. ``MM2LATENT_GENERATOR_REPO``).
    """
    keep = {"env": spec["env"]} if "env" in spec else {}
    native_format = NATIVE_FORMAT_OF_COMPONENT.get(name or "") or spec.get("format")
    path = Path(value).expanduser()
    if path.is_dir():
        return {**keep, "path": str(path.resolve() / spec.get("subfolder", ""))}
    if path.is_file():
        if not native_format:
            raise WeightsNotFoundError(f"{origin}={value!r} is a file, but the {name} component loads from a folder "
                                       "(config.json + weights) or a Hub repository.")
        return {**keep, "path": str(path.resolve()), "format": native_format}
    reference, has_file, file_path = value.partition(":")
    repo_id, revision = parse_repo_reference(reference)
    if not _REPO_ID.fullmatch(repo_id) or (has_file and not file_path):
        raise WeightsNotFoundError(f"{origin}={value!r} is neither an existing folder or file nor a Hub reference "
                                   "'org/name[@revision]' or 'org/name[@revision]:path/in/repo'.")
    if has_file:
        if not native_format:
            raise WeightsNotFoundError(f"{origin}={value!r} names a single file, but the {name} component has no "
                                       "native checkpoint format; name a repository of its folder instead.")
        return {**keep, "repo": repo_id, "path": file_path, "format": native_format, "revision": revision or "main"}
    folder_spec = {k: v for k, v in spec.items() if k not in ("repo", "path", "format")}
    folder_spec.setdefault("allow_patterns", _FOLDER_FILES)
    folder_spec["repo_id"] = repo_id
    if revision:
        folder_spec["revision"] = revision
    return folder_spec


def apply_env_overrides(spec: dict, name: str | None = None) -> dict:
    """Return the component spec with its ``env`` variable (if set) replacing where it comes from."""
    variable = spec.get("env")
    value = os.environ.get(variable, "").strip() if variable else ""
    if not value:
        return spec
    return spec_from_reference(value, spec, name, origin=variable)


# ---------------------------------------------------------------------------------------------- resolving


def resolve_component(name: str, spec: dict, base: Path | None, base_repo: tuple[str, str | None] | None) -> Path:
    """Local folder holding one component, downloading (and for native checkpoints converting) it when needed.

    Args:
        name: component name (for messages and the default native format).
        spec: its manifest entry.
        base: local folder of the manifest, when it is local.
        base_repo: (repo_id, revision) of the manifest, when it came from the Hub.
    """
    spec = apply_env_overrides(spec, name)
    if is_native_spec(spec):
        return _resolve_native(name, spec, base, base_repo)
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
    reachable, _ = hub_status()
    what = f"the {name} weights ({', '.join(patterns or ['all files'])})"
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=not reachable)
    except _HUB_ERRORS as error:
        raise WeightsNotFoundError(_how_to_fix(repo_id, what, patterns=patterns, revision=revision, env=spec.get("env"))
                                   + f" [{type(error).__name__}]") from error
    folder = Path(root) / subfolder
    if not folder.is_dir() or not any(folder.iterdir()):
        raise WeightsNotFoundError(
            _how_to_fix(repo_id, what, patterns=patterns, revision=revision, env=spec.get("env"))
            + f" The snapshot has no '{subfolder}' folder."
        )
    return folder


def _resolve_native(name: str, spec: dict, base: Path | None, base_repo: tuple[str, str | None] | None) -> Path:
    """Folder of the converted weights of a native checkpoint (converting it on the first use)."""
    from ..models.native_checkpoints import NATIVE_FORMATS

    checkpoint_format = spec["format"]
    if checkpoint_format not in NATIVE_FORMATS:
        raise CheckpointFormatError(f"the {name} component has the unknown format {checkpoint_format!r}; expected one "
                                    f"of {sorted(NATIVE_FORMATS)}")
    if "path" not in spec:
        raise WeightsNotFoundError(f"the {name} component names a {checkpoint_format} checkpoint but no \"path\" to it")
    file_path = PurePosixPath(spec["path"])
    if "repo" in spec or (base is None and base_repo is not None and not Path(spec["path"]).is_absolute()):
        repo_id, revision = (spec["repo"], spec.get("revision")) if "repo" in spec else base_repo
        return _resolve_hub_checkpoint(name, repo_id, revision, str(file_path), checkpoint_format, spec.get("env"))
    local = Path(spec["path"]).expanduser()
    local = local if local.is_absolute() or base is None else base / local
    if not local.is_file():
        raise WeightsNotFoundError(f"The {name} checkpoint should be the file '{local}', which does not exist.")
    stat = local.resolve().stat()
    key = hashlib.sha256(f"{local.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    relative = Path(CONVERTER_VERSION) / "local" / key / checkpoint_format / local.name
    return _converted_folder(name, local, checkpoint_format, [user_cache_dir() / relative],
                             {"file": str(local.resolve())})


def _resolve_hub_checkpoint(name: str, repo_id: str, revision: str | None, file_path: str, checkpoint_format: str,
                            env: str | None) -> Path:
    downloaded, candidates, source = locate_hub_checkpoint(name, repo_id, revision, file_path, checkpoint_format, env)
    return _converted_folder(name, downloaded, checkpoint_format, candidates, source)


def locate_hub_checkpoint(name: str, repo_id: str, revision: str | None, file_path: str, checkpoint_format: str,
                          env: str | None = None) -> tuple[Path, list[Path], dict]:
    """(the downloaded file, the folders its conversion is cached in — first existing wins —, its provenance).

    Downloads the file (or finds it in the Hub cache when offline); converts nothing.
    """
    reachable, _ = hub_status()
    what = f"the {name} checkpoint '{file_path}'"
    try:
        downloaded = Path(hf_hub_download(repo_id, file_path, revision=revision, local_files_only=not reachable))
    except _HUB_ERRORS as error:
        raise WeightsNotFoundError(_how_to_fix(repo_id, what, files=[file_path], revision=revision, env=env)
                                   + f" [{type(error).__name__}]") from error
    # huggingface_hub returns <repo cache>/snapshots/<commit>/<file_path>.
    snapshot = downloaded.parents[len(PurePosixPath(file_path).parts) - 1]
    commit, repo_cache = snapshot.name, snapshot.parent.parent
    relative = Path(CONVERTER_VERSION) / commit / checkpoint_format / file_path
    candidates = [repo_cache / CONVERTED_DIR / relative, user_cache_dir() / repo_cache.name / relative]
    source = {"repo": repo_id, "revision": revision or "main", "commit": commit, "path": file_path}
    return downloaded, candidates, source


def is_converted(folder: Path) -> bool:
    """Does ``folder`` hold a finished conversion (``config.json`` + ``model.safetensors``)?"""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def user_cache_dir() -> Path:
    """Where converted checkpoints go when the Hub cache is read-only (``MM2LATENT_CACHE``, else ~/.cache/mm2latent)."""
    if os.environ.get("MM2LATENT_CACHE"):
        return Path(os.environ["MM2LATENT_CACHE"]).expanduser() / "converted"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mm2latent" / "converted"


def _converted_folder(name: str, checkpoint: Path, checkpoint_format: str, candidates: list[Path],
                      source: dict) -> Path:
    """The first candidate folder that already holds the conversion, else convert into the first writable one.

    The conversion is written to a temporary sibling and renamed into place, so a folder that exists is
    complete, and two processes converting at once both end with the same result.
    """
    from ..models import native_checkpoints

    for folder in candidates:
        if is_converted(folder):
            return folder
    failures = []
    for folder in candidates:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        except OSError as error:  # a read-only cache: try the next place
            failures.append(f"{folder.parent}: {error}")
            continue
        try:
            logger.info("Converting the %s checkpoint %s (%s) once; cached in %s", name, checkpoint,
                        checkpoint_format, folder)
            native_checkpoints.convert_native_file(checkpoint, checkpoint_format, staging, source=source)
            try:
                staging.rename(folder)
            except OSError:
                if not is_converted(folder):  # not another process that finished first
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return folder
    raise WeightsNotFoundError(f"No writable place to cache the converted {name} weights ({'; '.join(failures)}); "
                               "set MM2LATENT_CACHE to a writable folder.")


# ---------------------------------------------------------------------------------------------- manifests


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
    reachable, _ = hub_status()
    try:
        manifest_file = hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, local_files_only=not reachable)
    except _HUB_ERRORS as error:
        raise WeightsNotFoundError(_how_to_fix(repo_id, f"the file {MANIFEST_NAME}", files=[MANIFEST_NAME],
                                               revision=revision) + f" [{type(error).__name__}]") from error
    return _read_manifest(Path(manifest_file)), None, (repo_id, revision)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsNotFoundError(f"{path} is not a readable JSON manifest: {error}") from error
    if manifest.get("_format") != MANIFEST_FORMAT:
        raise WeightsNotFoundError(f"{path} is not an mm2latent manifest (no \"_format\": \"{MANIFEST_FORMAT}\").")
    engine = manifest.get("engine", "ddgi")
    if engine not in ENGINE_REQUIRED_COMPONENTS:
        raise CheckpointFormatError(f"{path} names the engine {engine!r}; this version of mm2latent knows "
                                    f"{', '.join(ENGINE_REQUIRED_COMPONENTS)}.")
    missing = [c for c in ENGINE_REQUIRED_COMPONENTS[engine] if c not in manifest.get("components", {})]
    if missing:
        raise WeightsNotFoundError(f"{path} names no {', '.join(missing)} component.")
    return manifest
