"""Space settings, read from environment variables in this one place.

| variable | default | meaning |
|---|---|---|
| ``MM2LATENT_MODEL_REPO`` | the library's default model | Hub repo or local folder, ``public`` or ``tiny``; falls back to ``public``, then ``tiny``; an unpublished repository is skipped (ui/loading.py) |
| ``MM2LATENT_MODEL_REVISION`` | (none) | Hub revision of that repo |
| ``MM2LATENT_DEVICE`` | (auto: CUDA if available) | ``cpu``, ``cuda``, ``cuda:1`` ... |
| ``MM2LATENT_DTYPE`` | ``auto`` (fp16 on CUDA, fp32 on CPU) | ``float32``, ``bfloat16``, ``float16`` |
| ``MM2LATENT_MAX_IMAGES`` | 4 | most images per run (1..16) |
| ``MM2LATENT_QUEUE_SIZE`` | 20 | most requests waiting in the queue |
| ``MM2LATENT_CONCURRENCY`` | 1 | generations running at once |
| ``MM2LATENT_CACHE_EXAMPLES`` | ``lazy`` | ``lazy``, ``eager`` or ``off`` |
| ``MM2LATENT_MAX_PROMPT_CHARS`` | 1000 | longer prompts are refused with an error |
| ``MM2LATENT_MAX_FILE_SIZE`` | ``20mb`` | largest upload |
| ``MM2LATENT_CACHE_MAX_FILES`` | 2000 | most files kept in Gradio's cache; the oldest are deleted first |
| ``MM2LATENT_CACHE_MAX_MB`` | 2048 | most megabytes kept in Gradio's cache; the least recently used are deleted first |
| ``MM2LATENT_CACHE_MAX_AGE`` | 3600 | seconds before a cached file or output folder is deleted |
| ``MM2LATENT_MAX_SESSIONS`` | 200 | visitor sessions kept in memory (least recently used dropped first) |
| ``MM2LATENT_SESSION_TTL`` | 1800 | seconds a visitor's inverted photo is kept between Invert and Edit |
| ``MM2LATENT_GPU_DURATION`` | 60 | seconds asked of ZeroGPU per generation |
| ``MM2LATENT_LOAD_VAE`` | 1 | load the VAE (needed for the diffusion preview) |
| ``MM2LATENT_FAST_ENGINE_REPO`` | ``auto`` | an MM2Latent-engine model offered beside the main one (engine selector); ``auto``: ``tiny-mm2latent`` when the main model is a tiny preset, none otherwise; ``off``: none |
| ``MM2LATENT_3D_MODEL_REPO`` | ``auto`` | 3D (EG3D) model for the 3D tab; ``auto``: ``tiny-eg3d`` when the main model is a tiny preset, no tab otherwise; ``off``: no tab; a named model that cannot be used falls back to ``tiny-eg3d`` beside a tiny main model only |
| ``MM2LATENT_3D_MODEL_REVISION`` | (none) | Hub revision of that repo |
| ``MM2LATENT_TURNTABLE_MAX_FRAMES`` | 48 | most frames of a turntable video (4..240) |
| ``MM2LATENT_SERVER_NAME`` / ``MM2LATENT_SERVER_PORT`` | Gradio's defaults | where to listen |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..pipelines.hub import DEFAULT_MODEL_REPO

PREFIX = "MM2LATENT_"
CACHE_MODES = ("lazy", "eager", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_IMAGES_LIMIT = 16  # the pipeline's own limit
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
THREE_D_OFF = {"off", "none", "0", "false", "no"}
DEFAULT_3D_MODEL_REPO = "tiny-eg3d"
#: ``MM2LATENT_3D_MODEL_REPO=auto``: the rule of the engine selector's second engine (below).
AUTO_3D_MODEL = "auto"
#: ``MM2LATENT_FAST_ENGINE_REPO=auto``: the offline demo shows both engines; a real model gets a second engine only
#: when one is named (a toy engine beside trained weights would only mislead).
AUTO_FAST_ENGINE = "auto"
TINY_FAST_ENGINE = "tiny-mm2latent"


class SettingsError(ValueError):
    """An environment variable holds a value the Space cannot use."""


@dataclass(frozen=True)
class Settings:
    model_repo: str = DEFAULT_MODEL_REPO
    model_revision: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_images: int = 4
    queue_size: int = 20
    concurrency: int = 1
    cache_examples: str = "lazy"
    max_prompt_chars: int = 1000
    max_file_size: str = "20mb"
    cache_max_files: int = 2000
    cache_max_mb: int = 2048
    cache_max_age_s: int = 3600
    max_sessions: int = 200
    session_ttl_s: int = 1800
    gpu_duration: int = 60
    load_vae: bool = True
    fast_engine_repo: str | None = AUTO_FAST_ENGINE  # None: no engine selector
    model_3d_repo: str | None = AUTO_3D_MODEL  # None: no 3D tab
    model_3d_revision: str | None = None
    turntable_max_frames: int = 48
    server_name: str | None = None
    server_port: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); unset or empty variables keep defaults."""
        env = _Reader(os.environ if environ is None else environ)
        defaults = cls()
        return cls(
            model_repo=env.text("MODEL_REPO") or defaults.model_repo,
            model_revision=env.text("MODEL_REVISION"),
            device=env.text("DEVICE"),
            dtype=env.choice("DTYPE", defaults.dtype, DTYPES),
            max_images=env.integer("MAX_IMAGES", defaults.max_images, 1, MAX_IMAGES_LIMIT),
            queue_size=env.integer("QUEUE_SIZE", defaults.queue_size, 1, 10_000),
            concurrency=env.integer("CONCURRENCY", defaults.concurrency, 1, 64),
            cache_examples=env.choice("CACHE_EXAMPLES", defaults.cache_examples, CACHE_MODES),
            max_prompt_chars=env.integer("MAX_PROMPT_CHARS", defaults.max_prompt_chars, 1, 100_000),
            max_file_size=env.text("MAX_FILE_SIZE") or defaults.max_file_size,
            cache_max_files=env.integer("CACHE_MAX_FILES", defaults.cache_max_files, 10, 10_000_000),
            cache_max_mb=env.integer("CACHE_MAX_MB", defaults.cache_max_mb, 1, 10_000_000),
            cache_max_age_s=env.integer("CACHE_MAX_AGE", defaults.cache_max_age_s, 60, 30 * 86400),
            max_sessions=env.integer("MAX_SESSIONS", defaults.max_sessions, 1, 100_000),
            session_ttl_s=env.integer("SESSION_TTL", defaults.session_ttl_s, 60, 30 * 86400),
            gpu_duration=env.integer("GPU_DURATION", defaults.gpu_duration, 1, 3600),
            load_vae=env.flag("LOAD_VAE", defaults.load_vae),
            fast_engine_repo=env.optional_text("FAST_ENGINE_REPO", defaults.fast_engine_repo, THREE_D_OFF),
            model_3d_repo=env.optional_text("3D_MODEL_REPO", defaults.model_3d_repo, THREE_D_OFF),
            model_3d_revision=env.text("3D_MODEL_REVISION"),
            turntable_max_frames=env.integer("TURNTABLE_MAX_FRAMES", defaults.turntable_max_frames, 4, 240),
            server_name=env.text("SERVER_NAME"),
            server_port=env.integer("SERVER_PORT", None, 1, 65535),
        )


class _Reader:
    """Typed access to ``MM2LATENT_*`` variables with plain-worded errors."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def text(self, name: str) -> str | None:
        value = self.environ.get(PREFIX + name, "").strip()
        return value or None

    def optional_text(self, name: str, default: str | None, off: set[str]) -> str | None:
        """Text, ``default`` when unset or empty, None when it says off (``off``, ``none``, ``0``...)."""
        value = self.text(name)
        if value is None:
            return default
        return None if value.lower() in off else value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise SettingsError(f"{PREFIX}{name} must be a whole number from {low} to {high}, got {value!r}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.text(name) or default).lower()
        if value not in choices:
            raise SettingsError(f"{PREFIX}{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.environ.get(PREFIX + name)
        if value is None:
            return default
        value = value.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise SettingsError(f"{PREFIX}{name} must be 1/0, true/false, yes/no or on/off, got {value!r}")
