"""The training-free mode's drawing, shown while it forms, with a progress bar of its real steps.

In the training-free mode (``mode="invert"``) the diffusion model draws I^d_0 over the full denoising schedule
(seconds to minutes) before the photo encoder inverts it. :func:`with_drawing_previews` turns a generation
handler into a Gradio generator: the handler runs in a worker thread with a ``callback_on_step_end``
(:func:`~mm2latent.pipelines.sampling.preview_callback`, the cheap latent-to-RGB preview, no VAE) reachable
through :data:`STEP_CALLBACK`; every preview is yielded into the gallery with "step k of n" and moves the
progress bar, then the handler's own result replaces it. Other modes and engines have no drawing: the
handler's result is the only yield.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from PIL import Image

#: The ``callback_on_step_end`` of the running event, or None (read by the handler that calls the pipeline).
STEP_CALLBACK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("mm2latent_step_callback",
                                                                               default=None)
PREVIEW_EVERY = 2  # steps between previews: each costs a PNG and a page update, not a U-Net pass
PREVIEW_SIZE = 256  # px: the latent-resolution preview (64² for SD-1.5 at 512²) enlarged for the gallery


def preview_picture(images) -> Image.Image:
    """The first image of a preview batch ([B, 3, H, W] in [-1, 1]) as a PIL picture for the gallery."""
    from ..inputs.images import tensor_to_pil

    return tensor_to_pil(images[:1].clamp(-1, 1))[0].resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.BILINEAR)


def with_drawing_previews(handler: Callable[..., tuple], num_outputs: int, gallery: int = 0,
                          summary: int = 2) -> Callable[..., Iterator[tuple]]:
    """``handler`` as a Gradio generator that yields the drawing while it forms, then the handler's result.

    Args:
        handler: a generation handler returning one value per output; it passes :data:`STEP_CALLBACK` to the
            pipeline when the run draws with the diffusion model.
        num_outputs: how many outputs the event has (every yield has one value per output).
        gallery: index of the output that shows the drawing.
        summary: index of the output that says which step is being drawn.
    """

    @functools.wraps(handler)
    def run_with_previews(*args, **kwargs) -> Iterator[tuple]:
        progress = next((value for value in (*args, *kwargs.values()) if isinstance(value, gr.Progress)), None)
        events: queue.Queue = queue.Queue()

        def on_preview(step: int, total: int, images) -> bool:
            events.put(("preview", step, total, preview_picture(images)))
            return False  # never stop the drawing early

        def work() -> None:
            from ..pipelines.sampling import preview_callback

            STEP_CALLBACK.set(preview_callback(on_preview, every=PREVIEW_EVERY))
            try:
                events.put(("done", handler(*args, **kwargs)))
            except BaseException as error:  # re-raised in the event's own thread, where Gradio reports it
                events.put(("error", error))

        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True,
                         name="mm2latent-generation").start()
        while True:
            kind, *payload = events.get()
            if kind == "error":
                raise payload[0]
            if kind == "done":
                yield payload[0]
                return
            step, total, picture = payload
            if progress is not None:
                progress((step + 1, total), desc="The diffusion model is drawing", unit="steps")
            shown: list[Any] = [gr.skip()] * num_outputs
            shown[gallery] = [(picture, f"drawing… step {step + 1} of {total}")]
            shown[summary] = (f"Training-free mode: the diffusion model is drawing (step {step + 1} of {total}); "
                              "the photo encoder then turns the drawing into the face.")
            yield tuple(shown)

    return run_with_previews
