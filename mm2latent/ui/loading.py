"""Start-up: load the pipeline once, falling back to the untrained ``tiny`` preset when needed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .settings import Settings
from .text import untrained_banner

log = logging.getLogger("mm2latent.space")


@dataclass
class LoadedModel:
    editor: object  # FaceEditPipeline: generation + photo editing (imported lazily: torch is slow to import)
    banner: str | None  # Markdown warning shown at the top of the page, or None
    requested: str
    problem: str | None = None

    @property
    def pipe(self):
        """The generation pipeline (a FacePipeline)."""
        return self.editor.generation


def load_pipeline(settings: Settings) -> LoadedModel:
    """The pipeline named by ``settings.model_repo``; ``tiny`` (with a banner) when it cannot be had.

    ``python app.py`` on a machine without network or token must still reach a working page, so any
    failure to load the real weights is logged and replaced by the demo preset.
    """
    from ..pipelines.editing import FaceEditPipeline

    problem = None
    editor = None
    if not settings.uses_tiny_preset:
        try:
            editor = FaceEditPipeline.from_pretrained(
                settings.model_repo, revision=settings.model_revision, device=settings.device,
                dtype=settings.dtype, load_vae=settings.load_vae,
            )
        except Exception as error:  # offline, no token, gated repo, damaged files: keep the Space up
            problem = f"{type(error).__name__}: {error}"
            log.warning("Could not load %r (%s); starting on the untrained 'tiny' preset.", settings.model_repo,
                        problem)
    if editor is None:
        editor = FaceEditPipeline.from_pretrained("tiny", device=settings.device, dtype=settings.dtype)
    pipe = editor.generation
    pipe.show_progress = True  # tqdm bars feed gr.Progress(track_tqdm=True)
    banner = None if pipe.trained else untrained_banner(settings.model_repo, pipe.name, problem)
    log.info("Loaded %s (trained=%s) on %s", pipe.name, pipe.trained, pipe.device)
    return LoadedModel(editor=editor, banner=banner, requested=settings.model_repo, problem=problem)
