"""The functions behind every Space event, with plain-worded errors.

Each public method of :class:`SpaceHandlers` is one Gradio endpoint. Library errors
(:class:`~mm2latent.errors.MM2LatentError`) become ``gr.Error`` with the library's message; any other
exception is logged and becomes a generic ``gr.Error``, so the server keeps serving. Handlers never
write to the prompt box or the canvases they read, so an error leaves the visitor's work in place.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import ImageOps

from ..errors import MM2LatentError
from ..inputs.conditions import (
    has_face,
    load_image,
    parse_mask,
    parse_scribble,
    scribble_to_image,
)
from ..inputs.scribbles import scribble_from_photo
from ..inputs.templates import dilate
from ..pipelines.generation import COMBINE, MAX_SEED, MODES
from ..pipelines.request import GenerationRequest, check_choice, check_flag, check_prompt
from .canvases import (
    CANVAS_SIZE,
    DEFAULT_STROKE,
    STROKE_WIDTHS,
    TEMPLATE_CHOICES,
    canvas_picture,
    describe_mask,
    mask_canvas,
    mask_from_canvas,
    matching_template,
    sketch_canvas,
    strokes_from_canvas,
    template_canvas,
)
from .drawing import STEP_CALLBACK
from .outputs import OutputStore, attention_gallery, describe_run, file_stem, save_run
from .settings import Settings

log = logging.getLogger("mm2latent.space")

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_WARNINGS_LOCK = threading.Lock()
_QUOTED_PATH = re.compile(r"'(?:/|[A-Za-z]:\\)[^']*[/\\]([^'/\\]+)'")

EXAMPLE_SEED = 42
COMBINE_CHOICES = COMBINE


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def plain(message: str) -> str:
    """A library message made fit for a visitor: capitalised, no server paths, ending with a period."""
    message = _QUOTED_PATH.sub(r"'\1'", str(message).strip())
    if message:
        message = message[0].upper() + message[1:]
    if message and message[-1] not in ".!?)":
        message += "."
    return message


def user_error(message: str) -> gr.Error:
    return gr.Error(plain(message), print_exception=False)


def friendly_errors(action: str) -> Callable:
    """Decorator: turn every failure of an event handler into a ``gr.Error`` in plain words."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def handler(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except gr.Error:
                raise
            except MM2LatentError as error:
                raise user_error(str(error)) from None
            except Exception as error:
                if "OutOfMemory" in type(error).__name__:
                    log.warning("Out of memory while %s", action)
                    raise user_error("The server ran out of memory: try fewer images or fewer steps.") from None
                log.exception("Unexpected error while %s", action)
                raise user_error(f"Something went wrong on the server while {action}. Please try again; "
                                 "if it keeps happening, tell the Space's authors") from None

        return handler

    return decorate


def call_reporting_warnings(function: Callable, *args, **kwargs) -> Any:
    """Call ``function``; show the library's warnings (e.g. 'only the first frame of a GIF') to the visitor.

    ``warnings.catch_warnings`` is process-global, hence the lock; it is only used around quick image
    loading, never around generation.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    for warning in caught:
        if str(warning.filename).startswith(_PACKAGE_DIR) and issubclass(warning.category, UserWarning):
            gr.Warning(plain(str(warning.message)))
    return result


# --------------------------------------------------------------------------------------------
# Checking settings
# --------------------------------------------------------------------------------------------


def chosen_seed(seed: Any, randomize: Any) -> Any:
    """The seed to ask the library for: None (a fresh random one) when “Random seed” is ticked, else the visitor's
    value as sent, which :meth:`GenerationRequest.create` checks; an empty seed box is refused with a hint."""
    if check_flag(randomize, "“Random seed”"):
        return None
    if seed is None:
        raise user_error(f"Enter a seed (a whole number from 0 to {MAX_SEED}), or tick “Random seed”")
    return seed


def parse_feature_steps(text: Any) -> list[int] | None:
    """'all' (or empty) -> None (every step); '0-4, 10' -> [0, 1, 2, 3, 4, 10]. The library checks the range."""
    if text is not None and not isinstance(text, str):
        raise user_error("Feature steps must be text: `all`, a range such as `0-4`, or a list such as `0, 5, 10`")
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    steps: set[int] = set()
    for part in filter(None, re.split(r"[,;\s]+", text)):
        match = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", part)
        if not match:
            raise user_error(f"Feature steps: “{part}” is not a step number or range; write `all`, `0-4` or "
                             "`0, 5, 10`")
        low, high = int(match[1]), int(match[2] or match[1])
        steps.update(range(min(low, high), max(low, high) + 1))
    return sorted(steps)


def visual_input(kind: str, canvas: Any, prompt: str) -> tuple[np.ndarray | None, Any]:
    """(mask ids, scribble image) from a ``"mask"`` or ``"sketch"`` canvas; refuses when there is nothing to go on."""
    if kind == "mask":
        mask, scribble = mask_from_canvas(canvas), None
        empty = mask is None
    else:
        strokes = strokes_from_canvas(canvas)
        mask, scribble = None, (scribble_to_image(strokes) if strokes is not None else None)
        empty = strokes is None
    if empty and not prompt:
        what = "pick a template or paint a mask" if kind == "mask" else "draw a sketch"
        raise user_error(f"Nothing to generate from: the canvas is empty and so is the prompt. Describe the "
                         f"face, {what}, or both")
    if empty:
        gr.Info("The canvas is empty, so the face follows the text alone.")
    return mask, scribble


def kept_words_note(warning: str, kept_words: list[str], shown_words: int = 8) -> str:
    """The library's truncation warning with what the text encoder kept: its word count and last words."""
    tail = " ".join(kept_words[-shown_words:])
    ellipsis = "…" if len(kept_words) > shown_words else ""
    return plain(f"{warning.rstrip('.')}: the first {len(kept_words)} words, up to “{ellipsis}{tail}”")


def stroke_radius(width: str) -> int:
    """Pixels added around photo edges for a stroke width choice (thin 0, medium 1, thick 3)."""
    return STROKE_WIDTHS.get(width, STROKE_WIDTHS[DEFAULT_STROKE]) // 4


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


class SpaceHandlers:
    """Event handlers bound to one loaded pipeline.

    Args:
        pipe: the loaded :class:`~mm2latent.pipelines.generation.FacePipeline` (read for its properties).
        run: what actually generates: ``run(**request) -> FacePipelineOutput`` (the ZeroGPU-wrapped call
            in ``app.py``); default ``pipe`` itself.
        settings: the Space settings.
        store: where output files are written.
        engines: further engines a visitor may choose: engine name ("mm2latent") -> its ``run`` callable (the
            engine selector); ``pipe``'s own engine always runs through ``run``.
        default_mode: the mode examples run in and the settings start at ("fast" with trained M and T; "invert",
            the training-free mode, on public weights whose M and T are untrained).
    """

    def __init__(self, pipe, run: Callable | None = None, settings: Settings | None = None,
                 store: OutputStore | None = None, engines: dict[str, Callable] | None = None,
                 default_mode: str = "fast"):
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {default_mode!r}")
        self.default_mode = default_mode
        self.pipe = pipe
        self.run = run or pipe
        self.settings = settings or Settings()
        self.store = store or OutputStore()
        self.engines = {**(engines or {}), pipe.engine: self.run}

    @property
    def engine_choices(self) -> list[str]:
        """The engines a visitor can choose, the main model's first."""
        return [self.pipe.engine, *sorted(set(self.engines) - {self.pipe.engine})]

    # ---------------------------------------------------------------- canvases
    @friendly_errors("loading the template")
    def load_template(self, template: str) -> dict:
        """A face-layout template (or a blank canvas) as the mask editor's new picture."""
        if template not in TEMPLATE_CHOICES:
            raise user_error(f"Unknown template “{template}”; choose one of: {', '.join(TEMPLATE_CHOICES)}")
        return template_canvas(template)

    @friendly_errors("reading the uploaded mask")
    def upload_mask(self, file: str | None, progress=gr.Progress(track_tqdm=True)) -> tuple[dict, str]:
        """An uploaded mask (index map, palette PNG or colour rendering) shown as the colour map the model reads."""
        path = self._uploaded_path(file, "a mask image")
        progress(0, desc="Reading the mask")
        ids = call_reporting_warnings(parse_mask, path, require_face=False)
        if not has_face(ids):
            gr.Warning("This mask contains no face (no skin, eyes, nose or mouth). Paint at least skin "
                       "before generating.")
        height, width = ids.shape
        status = (f"Loaded **{Path(path).name}** ({width}×{height}): shown as the colour map the model reads. "
                  f"Classes: {describe_mask(ids)}.")
        return mask_canvas(ids), status

    @friendly_errors("reading the uploaded sketch")
    def upload_sketch(self, file: str | None, progress=gr.Progress(track_tqdm=True)) -> dict:
        """An uploaded sketch (black-on-white or white-on-black) as black strokes on the sketchpad."""
        path = self._uploaded_path(file, "a sketch image")
        progress(0, desc="Reading the sketch")
        strokes = call_reporting_warnings(parse_scribble, path, size=CANVAS_SIZE)
        if not strokes.any():
            gr.Warning("No strokes were found in this sketch: it looks like a blank page.")
        return sketch_canvas(strokes)

    @friendly_errors("turning the photo into a sketch")
    def sketch_from_photo(self, file: str | None, stroke_width: str = DEFAULT_STROKE,
                          progress=gr.Progress(track_tqdm=True)) -> dict:
        """An edge map of an uploaded photo, drawn as black strokes on the sketchpad."""
        path = self._uploaded_path(file, "a photo")
        progress(0, desc="Finding the photo's edges")
        edges = call_reporting_warnings(scribble_from_photo, path, size=CANVAS_SIZE)
        return sketch_canvas(dilate(edges, stroke_radius(stroke_width)))

    @friendly_errors("reading the uploaded mask")
    def check_mask_upload(self, file: str | None) -> None:
        """Refuse a mask upload that cannot be read, before anything replaces the visitor's canvas."""
        call_reporting_warnings(parse_mask, self._uploaded_path(file, "a mask image"), require_face=False)

    @friendly_errors("reading the uploaded sketch")
    def check_sketch_upload(self, file: str | None) -> None:
        """Refuse a sketch upload that cannot be read, before anything replaces the visitor's canvas."""
        parse_scribble(self._uploaded_path(file, "a sketch image"), size=CANVAS_SIZE)

    @friendly_errors("reading the uploaded photo")
    def check_photo_upload(self, file: str | None) -> None:
        """Refuse a photo that cannot be read, before anything replaces the visitor's sketch."""
        load_image(self._uploaded_path(file, "a photo"))

    @friendly_errors("matching the canvas to a template")
    def template_on_canvas(self, canvas: Any) -> str | None:
        """The template the mask canvas shows, for the template choice (None: it shows none of them)."""
        picture = canvas_picture(canvas)
        if picture is None:
            return None
        try:
            return matching_template(parse_mask(picture, require_face=False))
        except MM2LatentError:  # not a readable mask: no template
            return None

    @staticmethod
    def _uploaded_path(file: Any, what: str) -> str:
        if file is None:
            raise user_error(f"Choose {what} to upload")
        return str(getattr(file, "name", file))

    # ---------------------------------------------------------------- generation
    @friendly_errors("generating from the mask")
    def generate_from_mask(self, prompt: str, mask: Any, mode: str = "fast", steps: int = 20,
                           feature_steps: str = "all", combine: str = "mean", seed: Any = 0,
                           randomize_seed: bool = True, truncation: float = 1.0, num_images: int = 1,
                           show_diffusion: bool = False, engine: str | None = None,
                           progress=gr.Progress(track_tqdm=True)) -> tuple:
        """Faces from a prompt and the mask editor's picture."""
        return self._generate("mask", prompt, mask, mode, steps, feature_steps, combine, seed, randomize_seed,
                              truncation, num_images, show_diffusion, progress, engine)

    @friendly_errors("generating from the sketch")
    def generate_from_sketch(self, prompt: str, sketch: Any, mode: str = "fast", steps: int = 20,
                             feature_steps: str = "all", combine: str = "mean", seed: Any = 0,
                             randomize_seed: bool = True, truncation: float = 1.0, num_images: int = 1,
                             show_diffusion: bool = False, engine: str | None = None,
                             progress=gr.Progress(track_tqdm=True)) -> tuple:
        """Faces from a prompt and the sketchpad's strokes."""
        return self._generate("sketch", prompt, sketch, mode, steps, feature_steps, combine, seed,
                              randomize_seed, truncation, num_images, show_diffusion, progress, engine)

    @friendly_errors("generating")
    def generate_from_active_tab(self, tab: str, prompt: str, mask: Any, sketch: Any, mode: str = "fast",
                                 steps: int = 20, feature_steps: str = "all", combine: str = "mean",
                                 seed: Any = 0, randomize_seed: bool = True, truncation: float = 1.0,
                                 num_images: int = 1, show_diffusion: bool = False, engine: str | None = None,
                                 progress=gr.Progress(track_tqdm=True)) -> tuple:
        """Enter in the prompt box: generate from whichever tab is open."""
        kind, canvas = ("sketch", sketch) if tab == "sketch" else ("mask", mask)
        return self._generate(kind, prompt, canvas, mode, steps, feature_steps, combine, seed, randomize_seed,
                              truncation, num_images, show_diffusion, progress, engine)

    @friendly_errors("running the example")
    def example_from_mask(self, prompt: str, mask: Any, progress=gr.Progress(track_tqdm=True)) -> tuple:
        """Examples use the default mode, one image and a fixed seed, so their cached results are reproducible."""
        return self._generate("mask", prompt, mask, self.default_mode, 20, "all", "mean", EXAMPLE_SEED, False, 1.0, 1, False,
                              progress)

    @friendly_errors("running the example")
    def example_from_sketch(self, prompt: str, sketch: Any, progress=gr.Progress(track_tqdm=True)) -> tuple:
        return self._generate("sketch", prompt, sketch, self.default_mode, 20, "all", "mean", EXAMPLE_SEED, False, 1.0, 1,
                              False, progress)

    def _generate(self, kind: str, prompt: Any, canvas: Any, mode: str, steps: Any, feature_steps: str,
                  combine: str, seed: Any, randomize_seed: bool, truncation: Any, num_images: Any,
                  show_diffusion: bool, progress: Callable | None = None, engine: str | None = None) -> tuple:
        engine = engine or self.pipe.engine
        run = self.engines.get(engine) if isinstance(engine, str) else None
        if run is None:
            raise user_error(f"Engine must be one of: {', '.join(self.engine_choices)}")
        # Every setting is checked by the library (GenerationRequest.create); the UI only reads the canvas.
        prompt = check_prompt(prompt, self.settings.max_prompt_chars)
        show_diffusion = check_flag(show_diffusion, "“Also show the diffusion image”")
        seed = chosen_seed(seed, randomize_seed)
        mode = check_choice(mode, "the mode", MODES)
        feature = parse_feature_steps(feature_steps) if mode == "quality" else None
        mask, scribble = visual_input(kind, canvas, prompt)
        if engine == "mm2latent":  # no diffusion model: one mode, no diffusion image (the library refuses both)
            chosen_mode = mode not in ("fast", self.default_mode)
            ignored = ([f"the {'training-free' if mode == 'invert' else mode} mode"] if chosen_mode else []) + (
                ["the diffusion image"] if show_diffusion else [])
            if ignored:  # only choices the visitor made (the default mode is no choice)
                gr.Info(f"The MM2Latent engine has no diffusion model: {' and '.join(ignored)} do not apply to it.")
            mode, feature, show_diffusion = "fast", None, False
        few_step = mode == "invert" and getattr(run, "default_drawing", "quality") == "fast"
        if few_step:  # the few-step drawing's own schedule (4 LCM steps); the Steps slider is DDIM's
            steps = None
        request = GenerationRequest.create(
            prompt, mask, scribble, seed=seed, mode=mode, num_steps=steps, feature_steps=feature,
            truncation=truncation, num_images=num_images, combine=combine, max_images=self.settings.max_images,
            max_prompt_chars=self.settings.max_prompt_chars)
        if show_diffusion and getattr(self.pipe.encoder, "vae", None) is None:
            gr.Warning("The diffusion preview needs the VAE, which this Space did not load "
                       "(MM2LATENT_LOAD_VAE=0); showing the faces only.")
            show_diffusion = False

        started = time.perf_counter()
        if progress is not None:
            progress(0, desc="Generating")
        drawing = STEP_CALLBACK.get() if request.mode == "invert" else None  # the drawing forming (ui/drawing.py)
        output = run(prompt=request.prompt, mask=mask, scribble=scribble, seed=request.seed, mode=request.mode,
                     num_steps=None if few_step else request.num_steps, feature_steps=feature, combine=request.combine,
                     truncation=request.truncation, num_images=request.num_images, return_intermediates=True,
                     return_diffusion_image=show_diffusion,
                     **({"callback_on_step_end": drawing} if drawing else {}))
        return self._present(kind, output, time.perf_counter() - started)

    def _present(self, kind: str, output, elapsed_s: float) -> tuple:
        """Gallery, seed, summary, attention overlays, files and the diffusion preview of one run."""
        settings = output.settings
        for warning in output.warnings:  # e.g. the prompt was cut to the 77 tokens CLIP reads
            truncation_note = "tokens" in warning and output.attention_words
            gr.Warning(kept_words_note(warning, output.attention_words) if truncation_note else plain(warning))
        saved = save_run(self.store.new_folder(), output.images, output.latents.numpy(), output.seeds, settings,
                         file_stem(settings.get("prompt", ""), kind))
        gallery = [(str(path), f"seed {seed}") for path, seed in zip(saved.pngs, output.seeds)]
        attention = attention_gallery(self._attention_base(kind, output), output.attention_words,
                                      None if output.attention_maps is None else output.attention_maps[0].numpy())
        files = [str(path) for path in saved.pngs] + [str(saved.latents)]
        summary = describe_run(settings, output.seeds, elapsed_s, str(self.pipe.device), output.closeness)
        diffusion = [(image, f"seed {seed}") for image, seed in zip(output.diffusion_images or [], output.seeds)]
        return gallery, output.seeds[0], summary, attention, files, diffusion

    @staticmethod
    def _attention_base(kind: str, output):
        """The input the attention maps are laid over: the mask colour map, the sketch, or the face."""
        if kind == "mask" and "mask" in output.condition_images:
            return output.condition_images["mask"]
        if kind == "sketch" and "scribble" in output.condition_images:
            return ImageOps.invert(output.condition_images["scribble"].convert("RGB"))
        return output.images[0]
