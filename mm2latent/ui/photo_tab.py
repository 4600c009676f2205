"""The "Edit a photo" tab: upload, align and invert, then edit with text and the photo's own mask.

:class:`EditHandlers` holds the event handlers as plain functions (testable without a browser);
:func:`build_edit_tab` lays the tab out inside an open ``gr.Blocks`` and wires the two endpoints
``/invert_photo`` and ``/edit_photo``. It runs a :class:`~mm2latent.pipelines.editing.FaceEditPipeline`, which
must carry an ``inverter`` (and optionally ``face_parser``, ``identity``, ``lpips``, ``clip``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from ..editing.inversion import MAX_REFINE_STEPS, InversionResult
from ..editing.methods import LAYER_RANGE_NAMES, MAX_CLIP_STEPS, MAX_STRENGTH, METHODS
from ..errors import InvalidStepsError
from ..inputs.metadata import save_png
from ..pipelines.editing import DEFAULT_GUIDED_STEPS
from ..pipelines.generation import MAX_SEED
from ..pipelines.request import (
    check_choice,
    check_flag,
    check_integer,
    check_number,
    check_prompt,
    check_seed,
)
from . import canvases
from .handlers import call_reporting_warnings, friendly_errors, user_error
from .outputs import OutputStore, file_stem, save_latents
from .returned_files import ReturnableCanvas
from .security import UploadedImage, WholeNumber
from .settings import Settings

TAB_ID = "edit-photo"
DEFAULT_STRENGTH = 1.0
DEFAULT_REFINE_STEPS = 0
DEFAULT_CLIP_STEPS = 0
UI_MAX_REFINE_STEPS = 300
UI_MAX_CLIP_STEPS = 100
assert UI_MAX_REFINE_STEPS <= MAX_REFINE_STEPS and UI_MAX_CLIP_STEPS <= MAX_CLIP_STEPS
#: "auto" lets the pipeline choose: T's modulation when T is trained, the training-free guided edit otherwise.
AUTO_METHOD = "auto"
METHOD_CHOICES = (AUTO_METHOD, *METHODS)
#: Pictures smaller than this (the tiny preset draws 64²) are enlarged for display; downloads keep their size.
DISPLAY_SIZE = 512
#: Presets whose networks hold random weights: their identity score compares random features.
RANDOM_WEIGHT_PRESETS = ("tiny", "tiny-eg3d", "full-random")
#: Mean absolute pixel change (0..255) under which an edit is reported as leaving the picture as it was.
UNCHANGED_BELOW = 1.0
DEFAULT_MAX_PROMPT_CHARS = Settings().max_prompt_chars
IDENTITY_INFO = ("ArcFace cosine similarity between the aligned photo and the edit: 1 is the same face, values "
                 "near 0 a different person. It says how much of the identity the edit kept.")


@dataclass
class PhotoState:
    """What the tab remembers between Invert and Edit (per visitor session)."""

    inversion: InversionResult
    photo_key: tuple  # identifies the uploaded photo, so a new upload is inverted again


def display_size(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """``image`` enlarged to ``size`` pixels on its longer side when smaller (never shrunk)."""
    if max(image.size) >= size:
        return image
    scale = size / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


def identity_text(similarity: float | None, model_name: str) -> str:
    """The identity score in words: the number first (``float(text.split()[0])`` reads it back)."""
    if similarity is None:
        return "n/a (no identity network loaded)"
    if model_name in RANDOM_WEIGHT_PRESETS:
        return f"{similarity:.3f} (meaningless here: the `{model_name}` preset's identity network has random weights)"
    return f"{similarity:.3f}"


def _photo_key(photo: Any) -> tuple:
    if photo is None:
        return ()
    if isinstance(photo, Image.Image):
        return (photo.size, photo.mode, hash(photo.resize((16, 16)).tobytes()))
    return (str(photo),)


def _edit_info(result, reconstruction: Image.Image, layers: str, strength: float, trained: bool) -> str:
    """Which method ran and why, what it changed, and why not when it changed nothing visible."""
    method = result.settings.get("method")
    lines = [f"**Method: {method}**: {result.message}. Edited layers: {layers}, strength {strength:g}."]
    edited = np.asarray(result.image.convert("RGB"), dtype=np.float32)
    reference = np.asarray(reconstruction.convert("RGB").resize(result.image.size), dtype=np.float32)
    change = float(np.abs(edited - reference).mean())
    if change < UNCHANGED_BELOW:
        why = ("T is untrained here, so its modulation is the identity: choose **auto** or **guided**"
               if method == "modulate" and not trained else
               "try a higher strength, more layers or a more specific description")
        lines.append(f"The edit left the picture practically unchanged (mean change {change:.2f}/255): {why}.")
    else:
        lines.append(f"Mean change from the reconstruction: {change:.1f}/255.")
    return " ".join(lines)


def _info(inversion: InversionResult) -> str:
    notes = [f"Inverted to W+ ({inversion.latent.shape[1]} layers)."]
    if inversion.refine_losses:
        notes.append(f"Refinement: loss {inversion.refine_losses[0]:.4f} → {min(inversion.refine_losses):.4f} "
                     f"in {len(inversion.refine_losses) - 1} steps.")
    notes += inversion.messages
    return " ".join(notes)


class EditHandlers:
    """Event handlers of the tab.

    Args:
        edit_pipeline: a FaceEditPipeline, or a function returning one (lazy loading).
        store: where the downloads (PNG with settings, W+ latent ``.npy``) are written.
        max_prompt_chars: the longest description of the change accepted.
    """

    def __init__(self, edit_pipeline: Any | Callable[[], Any], store: OutputStore | None = None,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS):
        self._edit_pipeline = edit_pipeline
        self.store = store or OutputStore()
        self.max_prompt_chars = max_prompt_chars

    @property
    def edit_pipeline(self):
        found = self._edit_pipeline
        if callable(found) and not hasattr(found, "generation"):
            found = found()
        if getattr(found, "inverter", None) is None:
            raise user_error("This model has no photo encoder, so photo editing is unavailable")
        return found

    def _invert(self, photo, refine_steps, progress) -> PhotoState:
        if photo is None:
            raise user_error("Upload a photo with a face first")
        steps = check_integer(refine_steps, "the refinement steps", 0, UI_MAX_REFINE_STEPS, InvalidStepsError)
        callback = None
        if progress is not None and steps:
            def callback(step, loss):
                progress((step, steps), desc=f"Refining (loss {loss:.4f})")
        inversion = call_reporting_warnings(self.edit_pipeline.invert, photo, refine_steps=steps, progress=False,
                                            callback=callback)
        return PhotoState(inversion, _photo_key(photo))

    @friendly_errors("aligning and inverting the photo")
    def invert(self, photo=None, refine_steps=DEFAULT_REFINE_STEPS, progress=gr.Progress()):
        """photo -> (aligned, reconstruction, mask editor value, downloads, info, state)."""
        state = self._invert(photo, refine_steps, progress)
        inversion = state.inversion
        canvas = canvases.mask_canvas(inversion.mask) if inversion.mask is not None else gr.skip()
        files = self._save("mm2latent-inverted", inversion.reconstruction, inversion.latent, {"source": "inversion"})
        return inversion.aligned, display_size(inversion.reconstruction), canvas, files, _info(inversion), state

    @friendly_errors("editing the photo")
    def edit(self, state, photo=None, refine_steps=DEFAULT_REFINE_STEPS, prompt="", mask_value=None, use_mask=True,
             strength=DEFAULT_STRENGTH, layers="all", method=AUTO_METHOD, seed=0, clip_steps=DEFAULT_CLIP_STEPS,
             progress=gr.Progress()):
        """-> (before/after pair, edited image, identity text, downloads, info, state).

        Inverts the photo first when it has not been inverted yet (or a new one was uploaded). Without a mask
        (``mask_value`` None) and with ``use_mask``, the photo's own mask from the inversion is used.
        ``method="auto"`` lets the pipeline choose (:attr:`FaceEditPipeline.default_edit_method`); the info
        line says which method ran and why.
        """
        # The settings are checked (by the library's validators) before anything slow runs.
        prompt = check_prompt(prompt, self.max_prompt_chars, "the description of the change")
        use_mask = check_flag(use_mask, "“Use the mask”")
        strength = check_number(strength, "the strength", 0.0, MAX_STRENGTH)
        layers = check_choice(layers, "the layer range", LAYER_RANGE_NAMES)
        method = check_choice(method, "the method", METHOD_CHOICES)
        clip_steps = check_integer(clip_steps, "the optimisation steps", 0, UI_MAX_CLIP_STEPS, InvalidStepsError)
        seed = check_seed(seed)
        painted = canvases.mask_from_canvas(mask_value) if use_mask and mask_value is not None else None
        pipeline = self.edit_pipeline
        chosen = pipeline.default_edit_method if method == AUTO_METHOD else method
        if chosen == "guided" and clip_steps == 0:
            clip_steps = None  # the guided edit's own default (DEFAULT_GUIDED_STEPS)
        if state is None or (photo is not None and state.photo_key != _photo_key(photo)):
            state = self._invert(photo, refine_steps, progress)
        # No mask given: the photo's own, as the editor shows it after inverting.
        mask = (painted if mask_value is not None else state.inversion.mask) if use_mask else None
        steps = DEFAULT_GUIDED_STEPS if clip_steps is None else clip_steps
        callback = None
        if progress is not None and steps:
            def callback(step, loss):
                progress((step, steps), desc=f"Optimising the edit (loss {loss:.4f})")
        result = pipeline.edit(state.inversion, prompt, mask=mask, strength=strength, layers=layers,
                               method=None if method == AUTO_METHOD else method, seed=seed, clip_steps=clip_steps,
                               progress=False, callback=callback)
        files = self._save(file_stem(prompt or "", "edited"), result.image, result.latent, result.settings)
        after = display_size(result.image)
        before = state.inversion.aligned.resize(after.size, Image.Resampling.LANCZOS)
        info = _edit_info(result, state.inversion.reconstruction, layers, strength, pipeline.trained)
        return (before, after), after, identity_text(result.identity_similarity, pipeline.name), files, info, state

    def _save(self, stem: str, image: Image.Image, latent, settings: dict) -> list[str]:
        """The downloads of one result, in a folder of the output store: PNG with settings, W+ ``.npy``."""
        folder = self.store.new_folder()
        save_png(image, folder / f"{stem}.png", settings)
        latents = save_latents(folder / f"{stem}-wplus.npy", latent.detach().float().cpu().numpy())
        return [str(folder / f"{stem}.png"), str(latents)]


def build_edit_tab(edit_pipeline: Any | Callable[[], Any], concurrency_limit: int | None = 1,
                   store: OutputStore | None = None, session_ttl_s: float | None = None,
                   max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> dict[str, Any]:
    """Create the "Edit a photo" tab inside the current ``gr.Blocks`` and wire its endpoints.

    Args:
        edit_pipeline: the FaceEditPipeline or a function returning it.
        concurrency_limit: how many edits run at once.
        store: where downloads are written (default: a new temporary store).
        session_ttl_s: how long a visitor's inverted photo is kept between Invert and Edit (default:
            for the whole session); Edit inverts the photo again when it has been dropped.
        max_prompt_chars: the longest description of the change accepted (``MM2LATENT_MAX_PROMPT_CHARS``).
    """
    handlers = EditHandlers(edit_pipeline, store, max_prompt_chars)
    with gr.Tab("Edit photo", id=TAB_ID) as tab:
        gr.Markdown("Upload a photo with one face. It is aligned like the training faces, inverted to the "
                    "generator's latent space, and its own mask is loaded into the editor: repaint it and/or "
                    "describe the change, then click **Edit**. The person's identity is kept as far as possible.")
        with gr.Row():
            photo = UploadedImage(label="Photo", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                  elem_id="edit-photo-upload", height=320)
            aligned = gr.Image(label="Aligned", type="pil", interactive=False, height=320, elem_id="edit-aligned")
            reconstruction = gr.Image(label="Reconstruction", type="pil", interactive=False, height=320,
                                      elem_id="edit-reconstruction")
        with gr.Row():
            refine_steps = gr.Slider(0, UI_MAX_REFINE_STEPS, value=DEFAULT_REFINE_STEPS, step=10,
                                     label="Refinement steps (closer reconstruction, slower)")
            invert_button = gr.Button("Align & invert", elem_id="invert-photo")
        with gr.Row():
            with gr.Column():
                canvas = ReturnableCanvas(
                    what="mask", store=handlers.store,
                    type="pil", image_mode="RGBA", format="png", sources=(), transforms=(), layers=False,
                    canvas_size=(canvases.CANVAS_SIZE, canvases.CANVAS_SIZE), fixed_canvas=True,
                    label="The photo's mask (edit it)", elem_id="edit-mask-editor", height=520,
                    brush=gr.Brush(colors=canvases.palette_hex(), color_mode="fixed", default_size=12,
                                   default_color=canvases.class_colour_hex(canvases.DEFAULT_BRUSH_CLASS)),
                    eraser=gr.Eraser(default_size=12),
                )
                use_mask = gr.Checkbox(value=True, label="Use the mask (untick for a text-only edit)")
                gr.HTML(canvases.legend_html())
            with gr.Column():
                prompt = gr.Textbox("", label="Describe the change", placeholder="She has blonde hair and is smiling.",
                                    elem_id="edit-prompt", lines=2)
                strength = gr.Slider(0.0, MAX_STRENGTH, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                     info="0 keeps the photo, 1 applies the edit, above 1 exaggerates it")
                layers = gr.Radio(list(LAYER_RANGE_NAMES), value="all", label="Layers",
                                  info="coarse: pose and shape; middle: features and hair style; fine: colours")
                method = gr.Radio(list(METHOD_CHOICES), value=AUTO_METHOD, label="Method", elem_id="edit-method",
                                  info="auto: modulate with trained weights, guided otherwise · modulate: T's scale "
                                       "and shift on the photo's latent · mix: blend in the latent M draws from the "
                                       "text · guided: CLIP-guided optimisation with an identity term "
                                       "(training-free)")
                with gr.Row():
                    seed = WholeNumber(value=0, precision=0, label="Seed", minimum=0, maximum=MAX_SEED)
                    clip_steps = gr.Slider(0, UI_MAX_CLIP_STEPS, value=DEFAULT_CLIP_STEPS, step=5,
                                           label="Optimisation steps (slower)",
                                           info=f"guided: 0 = its default ({DEFAULT_GUIDED_STEPS}); modulate/mix: "
                                                "CLIP refinement steps after the edit (0 = none)")
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit-photo-button")
        info = gr.Markdown(elem_id="edit-info")
        with gr.Row():
            slider = gr.ImageSlider(label="Before / after (drag the handle)", type="pil", elem_id="edit-before-after",
                                    height=DISPLAY_SIZE, max_height=DISPLAY_SIZE,
                                    buttons=["download", "fullscreen"])
            edited = gr.Image(label="Edited", type="pil", interactive=False, height=DISPLAY_SIZE,
                              elem_id="edit-result")
        with gr.Row():
            identity = gr.Textbox(label="Identity similarity (ArcFace cosine, photo vs edit)", interactive=False,
                                  info=IDENTITY_INFO, elem_id="edit-identity")
            latent_download = gr.File(label="Downloads: PNG with settings, W+ latent (.npy)", file_count="multiple",
                                      interactive=False, elem_id="edit-downloads")
        state = gr.State(None, time_to_live=session_ttl_s)

    invert_button.click(handlers.invert, inputs=[photo, refine_steps],
                        outputs=[aligned, reconstruction, canvas, latent_download, info, state],
                        api_name="invert_photo", concurrency_limit=concurrency_limit)
    edit_button.click(handlers.edit,
                      inputs=[state, photo, refine_steps, prompt, canvas, use_mask, strength, layers, method, seed,
                              clip_steps],
                      outputs=[slider, edited, identity, latent_download, info, state],
                      api_name="edit_photo", concurrency_limit=concurrency_limit)
    photo.change(lambda: None, outputs=state, api_name=False, queue=False)
    return {"tab": tab, "photo": photo, "aligned": aligned, "reconstruction": reconstruction, "canvas": canvas,
            "prompt": prompt, "slider": slider, "edited": edited, "identity": identity, "state": state,
            "handlers": handlers, "download": latent_download, "info": info}
