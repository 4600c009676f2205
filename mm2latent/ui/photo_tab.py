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
from PIL import Image

from ..editing.inversion import MAX_REFINE_STEPS, InversionResult
from ..editing.methods import LAYER_RANGE_NAMES, MAX_CLIP_STEPS, MAX_STRENGTH, METHODS
from ..inputs.metadata import save_png
from ..pipelines.generation import MAX_SEED
from . import canvases
from .handlers import call_reporting_warnings, checked_int, checked_number, friendly_errors, user_error
from .outputs import OutputStore, file_stem, save_latents
from .security import DrawingCanvas, UploadedImage, WholeNumber

DEFAULT_STRENGTH = 1.0
DEFAULT_REFINE_STEPS = 0
DEFAULT_CLIP_STEPS = 0
UI_MAX_REFINE_STEPS = 300
UI_MAX_CLIP_STEPS = 100
assert UI_MAX_REFINE_STEPS <= MAX_REFINE_STEPS and UI_MAX_CLIP_STEPS <= MAX_CLIP_STEPS


@dataclass
class PhotoState:
    """What the tab remembers between Invert and Edit (per visitor session)."""

    inversion: InversionResult
    photo_key: tuple  # identifies the uploaded photo, so a new upload is inverted again


def _photo_key(photo: Any) -> tuple:
    if photo is None:
        return ()
    if isinstance(photo, Image.Image):
        return (photo.size, photo.mode, hash(photo.resize((16, 16)).tobytes()))
    return (str(photo),)


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
    """

    def __init__(self, edit_pipeline: Any | Callable[[], Any], store: OutputStore | None = None):
        self._edit_pipeline = edit_pipeline
        self.store = store or OutputStore()

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
        steps = checked_int(refine_steps, "refinement steps", 0, UI_MAX_REFINE_STEPS)
        callback = None
        if progress is not None and steps:
            def callback(step, loss):
                progress((step, steps), desc=f"Refining (loss {loss:.4f})")
        inversion = call_reporting_warnings(self.edit_pipeline.invert, photo, refine_steps=steps, progress=False,
                                            callback=callback)
        return PhotoState(inversion, _photo_key(photo))

    @friendly_errors("aligning and inverting the photo")
    def invert(self, photo, refine_steps=DEFAULT_REFINE_STEPS, progress=gr.Progress()):
        """photo -> (aligned, reconstruction, mask editor value, latent file, info, state)."""
        state = self._invert(photo, refine_steps, progress)
        inversion = state.inversion
        canvas = canvases.mask_canvas(inversion.mask) if inversion.mask is not None else gr.skip()
        files = self._save("mm2latent-inverted", inversion.reconstruction, inversion.latent, {"source": "inversion"})
        return inversion.aligned, inversion.reconstruction, canvas, files, _info(inversion), state

    @friendly_errors("editing the photo")
    def edit(self, state, photo, refine_steps, prompt, mask_value, use_mask=True, strength=DEFAULT_STRENGTH,
             layers="all", method="modulate", seed=0, clip_steps=DEFAULT_CLIP_STEPS, progress=gr.Progress()):
        """-> (before/after pair, edited image, identity text, latent file, info, state).

        Inverts the photo first when it has not been inverted yet (or a new one was uploaded).
        """
        # The settings are checked before anything slow runs.
        if prompt is not None and not isinstance(prompt, str):
            raise user_error("The description of the change must be text")
        strength = checked_number(strength, "Strength", 0.0, MAX_STRENGTH)
        if layers not in LAYER_RANGE_NAMES:
            raise user_error(f"Choose a layer range among {', '.join(LAYER_RANGE_NAMES)}")
        if method not in METHODS:
            raise user_error(f"Choose a method among {', '.join(METHODS)}")
        clip_steps = checked_int(clip_steps, "CLIP steps", 0, UI_MAX_CLIP_STEPS)
        seed = checked_int(seed, "The seed", 0, MAX_SEED)
        mask = canvases.mask_from_canvas(mask_value) if use_mask else None
        if state is None or (photo is not None and state.photo_key != _photo_key(photo)):
            state = self._invert(photo, refine_steps, progress)
        callback = None
        if progress is not None and clip_steps:
            def callback(step, loss):
                progress((step, clip_steps), desc=f"CLIP refinement (loss {loss:.4f})")
        result = self.edit_pipeline.edit(state.inversion, prompt, mask=mask, strength=strength, layers=layers,
                                         method=method, seed=seed, clip_steps=clip_steps, progress=False,
                                         callback=callback)
        before = state.inversion.aligned.resize(result.image.size, Image.Resampling.LANCZOS)
        identity = ("no identity network loaded" if result.identity_similarity is None
                    else f"{result.identity_similarity:.3f}")
        files = self._save(file_stem(prompt or "", "edited"), result.image, result.latent, result.settings)
        info = f"Edited layers: {layers}, strength {strength:g}, method {method}."
        return (before, result.image), result.image, identity, files, info, state

    def _save(self, stem: str, image: Image.Image, latent, settings: dict) -> list[str]:
        """The downloads of one result, in a folder of the output store: PNG with settings, W+ ``.npy``."""
        folder = self.store.new_folder()
        save_png(image, folder / f"{stem}.png", settings)
        latents = save_latents(folder / f"{stem}-wplus.npy", latent.detach().float().cpu().numpy())
        return [str(folder / f"{stem}.png"), str(latents)]


def build_edit_tab(edit_pipeline: Any | Callable[[], Any], concurrency_limit: int | None = 1,
                   store: OutputStore | None = None, session_ttl_s: float | None = None) -> dict[str, Any]:
    """Create the "Edit a photo" tab inside the current ``gr.Blocks`` and wire its endpoints.

    Args:
        edit_pipeline: the FaceEditPipeline or a function returning it.
        concurrency_limit: how many edits run at once.
        store: where downloads are written (default: a new temporary store).
        session_ttl_s: how long a visitor's inverted photo is kept between Invert and Edit (default:
            for the whole session); Edit inverts the photo again when it has been dropped.
    """
    handlers = EditHandlers(edit_pipeline, store)
    with gr.Tab("Edit a photo", id="edit-photo") as tab:
        gr.Markdown("Upload a photo with one face. It is aligned like the training faces, inverted to the "
                    "generator's latent space, and its own mask is loaded into the editor: repaint it and/or "
                    "describe the change, then click **Edit**. The person's identity is kept as far as possible.")
        with gr.Row():
            photo = UploadedImage(label="Photo", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                  elem_id="edit-photo-upload", height=320)
            aligned = gr.Image(label="Aligned", type="pil", interactive=False, height=320)
            reconstruction = gr.Image(label="Reconstruction", type="pil", interactive=False, height=320)
        with gr.Row():
            refine_steps = gr.Slider(0, UI_MAX_REFINE_STEPS, value=DEFAULT_REFINE_STEPS, step=10,
                                     label="Refinement steps (closer reconstruction, slower)")
            invert_button = gr.Button("Align & invert", elem_id="invert-photo")
        info = gr.Markdown()
        with gr.Row():
            with gr.Column():
                canvas = DrawingCanvas(
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
                prompt = gr.Textbox(label="Describe the change", placeholder="She has blonde hair and is smiling.",
                                    elem_id="edit-prompt")
                strength = gr.Slider(0.0, 2.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength")
                layers = gr.Radio(list(LAYER_RANGE_NAMES), value="all", label="Layers",
                                  info="coarse: pose and shape; middle: features and hair style; fine: colours")
                method = gr.Radio(list(METHODS), value="modulate", label="Method",
                                  info="modulate: apply T's scale and shift to the photo's latent; "
                                       "mix: blend in the latent M draws from the text")
                with gr.Row():
                    seed = WholeNumber(value=0, precision=0, label="Seed", minimum=0, maximum=MAX_SEED)
                    clip_steps = gr.Slider(0, UI_MAX_CLIP_STEPS, value=DEFAULT_CLIP_STEPS, step=5,
                                           label="CLIP refinement steps (text only, slower)")
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit-photo-button")
        with gr.Row():
            slider = gr.ImageSlider(label="Before / after", type="pil", elem_id="edit-before-after", height=420)
            edited = gr.Image(label="Edited", type="pil", interactive=False, height=420)
        with gr.Row():
            identity = gr.Textbox(label="Identity similarity (ArcFace cosine, photo vs edit)", interactive=False)
            latent_download = gr.File(label="Downloads: PNG with settings, W+ latent (.npy)", file_count="multiple",
                                      interactive=False)
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
            "handlers": handlers, "download": latent_download}

