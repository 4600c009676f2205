"""Start-up: load the pipeline once, in a fixed order of preference, and say which one runs and why.

The order (:func:`load_order`): the model named by ``MM2LATENT_MODEL_REPO`` (trained weights, a Hub repository
or a folder), then the ``public`` training-free preset (public networks from the Hub, untrained M and T), then
the untrained ``tiny`` preset, which needs nothing and always loads. ``MM2LATENT_MODEL_REPO=public`` starts
the chain at the public preset, ``tiny`` loads only the demo preset. A repository of the project that has not
been published (:func:`is_published`) is skipped without a network round trip and without an error.

What only one tab needs (the 3D model, the second engine) is loaded on first use when it is a tiny preset
(:class:`OnFirstUse`), so the page is up before it is built.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..pipelines.hub import published
from .settings import AUTO_FAST_ENGINE, TINY_FAST_ENGINE, Settings
from .text import model_status

log = logging.getLogger("mm2latent.space")

#: What the Space falls back to, in order, when the requested model cannot be loaded.
FALLBACK_MODELS = ("public", "tiny")


def is_published(name: str) -> bool:
    """Whether ``name`` may be tried: anything outside the project's namespace (a user's repository, a folder,
    a preset), and the project's own repositories only once the library lists them as published."""
    return published(name)


@dataclass
class LoadFailure:
    """One model of the load order that could not be loaded: why in plain words (shown) and in full (logged)."""

    model: str
    reason: str  # the library's message, for the log only: it may name server paths
    plain_reason: str = "it could not be loaded (the server log says why)"


@dataclass
class LoadedModel:
    editor: object  # FaceEditPipeline: generation + photo editing (imported lazily: torch is slow to import)
    status: str | None  # one sentence for the top of the page, or None for the trained model as requested
    details: str | None  # Markdown for the collapsed section under it: why, and how to get real faces
    requested: str
    failures: list[LoadFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unpublished repositories, not tried

    @property
    def pipe(self):
        """The generation pipeline (a FacePipeline)."""
        return self.editor.generation

    @property
    def is_tiny(self) -> bool:
        """Whether the main model is a tiny (toy, random-weight) preset: the offline demo."""
        return self.pipe.name.startswith("tiny")


def load_order(requested: str) -> list[str]:
    """The models to try, best first: ``requested`` then the fallbacks that come after it.

    >>> load_order("org/trained"), load_order("public"), load_order("tiny")
    (['org/trained', 'public', 'tiny'], ['public', 'tiny'], ['tiny'])
    """
    if requested in FALLBACK_MODELS:
        return list(FALLBACK_MODELS[FALLBACK_MODELS.index(requested):])
    return [requested, *FALLBACK_MODELS]


def plain_reason(error: Exception) -> str:
    """Why a model did not load, for visitors: no exception names, no server paths (the log has those)."""
    from ..errors import CheckpointFormatError, WeightsNotFoundError

    if isinstance(error, WeightsNotFoundError):
        return "its files are not on this machine and could not be downloaded"
    if isinstance(error, CheckpointFormatError):
        return "its files are not in a format the library reads"
    return "it could not be loaded (the server log says why)"


def load_pipeline(settings: Settings, load: Callable[..., object] | None = None) -> LoadedModel:
    """The first model of :func:`load_order` that loads, with a status naming it and every failure before it.

    ``python app.py`` on a machine without network or token must still reach a working page, so a failure
    to load is logged and the next model is tried; ``tiny`` is built locally and cannot fail for want of files.
    Unpublished repositories of the project are not tried at all.

    Args:
        settings: the Space settings (``model_repo``, ``model_revision``, device, dtype, ``load_vae``).
        load: ``load(name, **options) -> FaceEditPipeline`` (default ``FaceEditPipeline.from_pretrained``).
    """
    if load is None:
        from ..pipelines.editing import FaceEditPipeline

        load = FaceEditPipeline.from_pretrained
    order = load_order(settings.model_repo)
    skipped = [name for name in order if not is_published(name)]
    if skipped:
        log.info("Not trying %s: not published yet.", ", ".join(map(repr, skipped)))
    order = [name for name in order if name not in skipped]
    failures: list[LoadFailure] = []
    for name in order:
        revision = settings.model_revision if name == settings.model_repo else None
        try:
            editor = load(name, revision=revision, device=settings.device, dtype=settings.dtype,
                          load_vae=settings.load_vae)
            break
        except Exception as error:  # offline, no token, gated repo, damaged files: keep the Space up
            if name == order[-1]:  # `tiny` is built locally: its failure is a bug, not a missing file
                raise
            failures.append(LoadFailure(name, f"{type(error).__name__}: {error}", plain_reason(error)))
            log.warning("Could not load %r (%s); trying %r next.", name, failures[-1].reason,
                        order[order.index(name) + 1])
    pipe = editor.generation
    pipe.show_progress = True  # tqdm bars feed gr.Progress(track_tqdm=True)
    log.info("Loaded %s (trained=%s) on %s after %d failed attempt(s)", pipe.name, pipe.trained, pipe.device,
             len(failures))
    status, details = model_status(settings.model_repo, pipe.name, pipe.trained,
                                   [(f.model, f.plain_reason) for f in failures], skipped)
    return LoadedModel(editor=editor, status=status, details=details, requested=settings.model_repo,
                       failures=failures, skipped=skipped)


class OnFirstUse:
    """A model built on the first call of :meth:`get` (once, thread-safe), so the page starts without it.

    Args:
        name: what is loaded (for the log and :attr:`name`).
        load: ``load() -> pipeline``.
    """

    def __init__(self, name: str, load: Callable[[], Any]):
        self.name = name
        self._load = load
        self._model = None
        self._lock = threading.Lock()

    @classmethod
    def loaded(cls, model: Any) -> OnFirstUse:
        """An already loaded model behind the same interface."""
        holder = cls(model.name, lambda: model)
        holder._model = model
        return holder

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def get(self):
        """The model, loaded now when this is its first use."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    log.info("Loading %s on first use", self.name)
                    self._model = self._load()
        return self._model


def load_fast_engine(settings: Settings, main: LoadedModel,
                     load: Callable[..., object] | None = None) -> OnFirstUse | None:
    """The MM2Latent-engine pipeline offered beside the main model (the Space's engine selector), or None.

    ``settings.fast_engine_repo``: None (off) → None; ``"auto"`` → ``tiny-mm2latent`` when the main model is a tiny
    preset (the offline demo shows both engines; built on first use), else None; a repo or folder → that model,
    loaded now. Nothing is offered when the main model already runs the MM2Latent engine, or when the named model
    cannot be loaded or is not an MM2Latent model (logged: the Space keeps running on its main model).

    Args:
        settings: the Space settings.
        main: the main model, as :func:`load_pipeline` returned it.
        load: ``load(name, **options) -> pipeline`` (default ``FacePipeline.from_pretrained``).
    """
    requested = settings.fast_engine_repo
    automatic = requested == AUTO_FAST_ENGINE
    if automatic:
        requested = TINY_FAST_ENGINE if main.is_tiny else None
    if requested is None or main.pipe.engine == "mm2latent":
        return None
    if load is None:
        from ..pipelines.generation import FacePipeline

        load = FacePipeline.from_pretrained

    def load_engine():
        pipe = load(requested, device=settings.device, dtype=settings.dtype)
        pipe.show_progress = True
        return pipe

    if automatic:  # a tiny preset: built locally, always an MM2Latent model
        return OnFirstUse(requested, load_engine)
    try:
        pipe = load_engine()
    except Exception as error:  # keep the Space up on its main model
        log.warning("Could not load the MM2Latent engine %r (%s: %s); no engine selector.", requested,
                    type(error).__name__, error)
        return None
    if pipe.engine != "mm2latent":
        log.warning("%r runs the %s engine, not MM2Latent; no engine selector.", requested, pipe.engine)
        return None
    log.info("Engine selector: %s (MM2Latent, trained=%s) beside %s", pipe.name, pipe.trained, main.pipe.name)
    return OnFirstUse.loaded(pipe)
