"""Start-up: load the pipeline once, in a fixed order of preference, and say which one runs and why.

The order (:func:`load_order`): the model named by ``MM2LATENT_MODEL_REPO`` (trained weights, a Hub repository
or a folder), then the ``public`` training-free preset (public networks from the Hub, untrained M and T), then
the untrained ``tiny`` preset, which needs nothing and always loads. ``MM2LATENT_MODEL_REPO=public`` starts
the chain at the public preset, ``tiny`` loads only the demo preset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .settings import AUTO_FAST_ENGINE, TINY_FAST_ENGINE, Settings
from .text import model_banner

log = logging.getLogger("mm2latent.space")

#: What the Space falls back to, in order, when the requested model cannot be loaded.
FALLBACK_MODELS = ("public", "tiny")


@dataclass
class LoadFailure:
    """One model of the load order that could not be loaded, and why (the library's message)."""

    model: str
    reason: str


@dataclass
class LoadedModel:
    editor: object  # FaceEditPipeline: generation + photo editing (imported lazily: torch is slow to import)
    banner: str | None  # Markdown shown at the top of the page, or None for the trained model as requested
    requested: str
    failures: list[LoadFailure] = field(default_factory=list)

    @property
    def pipe(self):
        """The generation pipeline (a FacePipeline)."""
        return self.editor.generation

    @property
    def problem(self) -> str | None:
        """Why the requested model is not the one running (None when it is)."""
        return self.failures[0].reason if self.failures else None


def load_order(requested: str) -> list[str]:
    """The models to try, best first: ``requested`` then the fallbacks that come after it.

    >>> load_order("org/trained"), load_order("public"), load_order("tiny")
    (['org/trained', 'public', 'tiny'], ['public', 'tiny'], ['tiny'])
    """
    if requested in FALLBACK_MODELS:
        return list(FALLBACK_MODELS[FALLBACK_MODELS.index(requested):])
    return [requested, *FALLBACK_MODELS]


def load_pipeline(settings: Settings, load: Callable[..., object] | None = None) -> LoadedModel:
    """The first model of :func:`load_order` that loads, with a banner naming it and every failure before it.

    ``python app.py`` on a machine without network or token must still reach a working page, so a failure
    to load is logged and the next model is tried; ``tiny`` is built locally and cannot fail for want of files.

    Args:
        settings: the Space settings (``model_repo``, ``model_revision``, device, dtype, ``load_vae``).
        load: ``load(name, **options) -> FaceEditPipeline`` (default ``FaceEditPipeline.from_pretrained``).
    """
    if load is None:
        from ..pipelines.editing import FaceEditPipeline

        load = FaceEditPipeline.from_pretrained
    order = load_order(settings.model_repo)
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
            failures.append(LoadFailure(name, f"{type(error).__name__}: {error}"))
            log.warning("Could not load %r (%s); trying %r next.", name, failures[-1].reason,
                        order[order.index(name) + 1])
    pipe = editor.generation
    pipe.show_progress = True  # tqdm bars feed gr.Progress(track_tqdm=True)
    log.info("Loaded %s (trained=%s) on %s after %d failed attempt(s)", pipe.name, pipe.trained, pipe.device,
             len(failures))
    banner = model_banner(settings.model_repo, pipe.name, pipe.trained, [(f.model, f.reason) for f in failures])
    return LoadedModel(editor=editor, banner=banner, requested=settings.model_repo, failures=failures)


def load_fast_engine(settings: Settings, main: LoadedModel, load: Callable[..., object] | None = None):
    """The MM2Latent-engine pipeline offered beside the main model (the Space's engine selector), or None.

    ``settings.fast_engine_repo``: None (off) → None; ``"auto"`` → ``tiny-mm2latent`` when the main model is a tiny
    preset (the offline demo shows both engines), else None; a repo or folder → that model. Nothing is offered when
    the main model already runs the MM2Latent engine, or when the named model cannot be loaded or is not an
    MM2Latent model (logged: the Space keeps running on its main model).

    Args:
        settings: the Space settings.
        main: the main model, as :func:`load_pipeline` returned it.
        load: ``load(name, **options) -> pipeline`` (default ``FacePipeline.from_pretrained``).
    """
    requested = settings.fast_engine_repo
    if requested == AUTO_FAST_ENGINE:
        requested = TINY_FAST_ENGINE if main.pipe.name.startswith("tiny") else None
    if requested is None or main.pipe.engine == "mm2latent":
        return None
    if load is None:
        from ..pipelines.generation import FacePipeline

        load = FacePipeline.from_pretrained
    try:
        pipe = load(requested, device=settings.device, dtype=settings.dtype)
    except Exception as error:  # keep the Space up on its main model
        log.warning("Could not load the MM2Latent engine %r (%s: %s); no engine selector.", requested,
                    type(error).__name__, error)
        return None
    if pipe.engine != "mm2latent":
        log.warning("%r runs the %s engine, not MM2Latent; no engine selector.", requested, pipe.engine)
        return None
    pipe.show_progress = True
    log.info("Engine selector: %s (MM2Latent, trained=%s) beside %s", pipe.name, pipe.trained, main.pipe.name)
    return pipe
