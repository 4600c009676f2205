"""Start-up: load the pipeline once, falling back to the untrained ``tiny`` preset when needed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .settings import Settings
from .text import untrained_banner

log = logging.getLogger("mm2latent.space")


@dataclass
class LoadedModel:
    pipe: object  # FacePipeline (imported lazily: torch is slow to import)
    banner: str | None  # Markdown warning shown at the top of the page, or None
    requested: str
    problem: str | None = None


def load_pipeline(settings: Settings) -> LoadedModel:
    """The pipeline named by ``settings.model_repo``; ``tiny`` (with a banner) when it cannot be had.

    ``python app.py`` on a machine without network or token must still reach a working page, so any
    failure to load the real weights is logged and replaced by the demo preset.
    """
    from ..pipelines.generation import FacePipeline

    problem = None
    pipe = None
    if not settings.uses_tiny_preset:
        try:
            pipe = FacePipeline.from_pretrained(
                settings.model_repo, revision=settings.model_revision, device=settings.device,
                dtype=settings.dtype, load_vae=settings.load_vae,
            )
        except Exception as error:  # offline, no token, gated repo, damaged files: keep the Space up
            problem = f"{type(error).__name__}: {error}"
            log.warning("Could not load %r (%s); starting on the untrained 'tiny' preset.", settings.model_repo,
                        problem)
    if pipe is None:
        pipe = FacePipeline.from_pretrained("tiny", device=settings.device, dtype=settings.dtype)
    pipe.show_progress = True  # tqdm bars feed gr.Progress(track_tqdm=True)
    banner = None if pipe.trained else untrained_banner(settings.model_repo, pipe.name, problem)
    log.info("Loaded %s (trained=%s) on %s", pipe.name, pipe.trained, pipe.device)
    return LoadedModel(pipe=pipe, banner=banner, requested=settings.model_repo, problem=problem)
