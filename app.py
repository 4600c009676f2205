"""Hugging Face Space: text + mask or sketch -> face, with the mm2latent library.

This file only builds the Gradio Blocks and wires events; everything that computes lives in
``mm2latent/`` (event handlers in ``mm2latent/ui/handlers.py``). Settings come from ``MM2LATENT_*``
environment variables (see ``mm2latent/ui/settings.py``). Run with ``python app.py``.
"""

from mm2latent.ui.gpu import gpu_task  # isort: skip  (imports `spaces` before torch, as ZeroGPU requires)

import json
import logging
import os
import re
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from mm2latent.ui import canvases, text
from mm2latent.ui.drawing import with_drawing_previews
from mm2latent.ui.examples import mask_example_rows, sketch_example_rows, write_examples
from mm2latent.ui.handlers import COMBINE_CHOICES, SpaceHandlers
from mm2latent.ui.loading import load_fast_engine, load_pipeline
from mm2latent.ui.outputs import GradioCacheLimit, OutputStore
from mm2latent.ui.photo_tab import build_edit_tab
from mm2latent.ui.returned_files import ReturnableCanvas
from mm2latent.ui.security import (
    NoSniffMiddleware,
    SpaceBlocks,
    UploadedFile,
    WholeNumber,
    limit_image_decoding,
)
from mm2latent.ui.settings import Settings
from mm2latent.ui.three_d import ThreeDHandlers, build_3d_tab, load_3d_pipeline

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SETTINGS = Settings.from_env()
limit_image_decoding()  # before anything can decode an upload
MODEL = load_pipeline(SETTINGS)
# Output files live only until Gradio has copied them (room for every run in flight); Gradio's cache is
# trimmed after every event (SpaceBlocks) and by age (delete_cache).
STORE = OutputStore(max_runs=max(16, 4 * SETTINGS.concurrency), max_age_s=SETTINGS.cache_max_age_s)
CACHE_LIMIT = GradioCacheLimit(SETTINGS.cache_max_files, max_bytes=SETTINGS.cache_max_mb * 2**20,
                               max_age_s=SETTINGS.cache_max_age_s)


@gpu_task(duration=SETTINGS.gpu_duration)
def run_pipeline(**request):
    """The one call that needs the accelerator; returns CPU data (PIL images, CPU tensors).

    The edit pipeline generates too, and also runs the training-free mode ("invert") that public weights need.
    """
    return MODEL.editor(**request)


# The MM2Latent engine beside the main model, or None; the tiny one is built on its first use.
FAST_ENGINE = load_fast_engine(SETTINGS, MODEL)


@gpu_task(duration=SETTINGS.gpu_duration)
def run_fast_engine(**request):
    """The engine selector's second engine (MM2Latent: no diffusion model)."""
    return FAST_ENGINE.get()(**request)


HANDLERS = SpaceHandlers(MODEL.pipe, run=run_pipeline, settings=SETTINGS, store=STORE,
                         default_mode=MODEL.editor.default_mode,
                         engines=None if FAST_ENGINE is None else {"mm2latent": run_fast_engine})
ENGINE_LABELS = {"ddgi": "diffusion features (DDGI)", "mm2latent": "fast (MM2Latent, no diffusion model)"}
MODEL_3D = load_3d_pipeline(SETTINGS, MODEL)  # None: no 3D tab; tiny-eg3d is built on its first use
HANDLERS_3D = None if MODEL_3D is None else ThreeDHandlers(MODEL_3D.pipe, settings=SETTINGS, store=STORE,
                                                           gpu=gpu_task(duration=SETTINGS.gpu_duration))
# How long the plain template picture covers the mask editor (when the visitor does not touch it first): the
# editor's own re-render took 3-6 s in headless Chromium on 2 software-rendering cores.
TEMPLATE_PREVIEW_MS = 8000
RESELECT_SKETCH_BRUSH = """() => { setTimeout(() => {
  document.querySelector('#sketchpad button[aria-label="Brush"]')?.click(); }, 250); }"""


def template_loader_js(urls: dict[str, str]) -> str:
    """A page function that takes a template's name and returns the mask editor's value showing it.

    The editor re-renders a new picture slowly where the browser draws WebGL in software (seconds), so the page
    also lays the template over the editor at once, as a plain picture marked "loading", until the visitor
    touches the editor or it has had time to draw it.
    """
    return f"""(name) => {{
  const url = {json.dumps(urls)}[name];
  if (!url) return undefined;
  const editor = document.querySelector('#mask-editor');
  const canvas = editor && editor.querySelector('canvas');
  if (canvas) {{
    document.querySelector('#template-preview')?.remove();
    const holder = canvas.parentElement;
    if (getComputedStyle(holder).position === 'static') holder.style.position = 'relative';
    const preview = document.createElement('div');
    preview.id = 'template-preview';
    preview.setAttribute('aria-live', 'polite');
    preview.innerHTML = `<img alt="template: ${{name}}" src="${{url}}"><span>loading into the editor…</span>`;
    holder.appendChild(preview);
    const done = () => preview.remove();
    editor.addEventListener('pointerdown', done, {{once: true, capture: true}});
    setTimeout(done, {TEMPLATE_PREVIEW_MS});
  }}
  const picture = {{path: "template.png", url: url, orig_name: "template.png", mime_type: "image/png",
                   meta: {{_type: "gradio.FileData"}}}};
  return {{background: picture, layers: [], composite: picture}};
}}"""


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "model"


def build_mask_tab() -> dict:
    # Short tab labels: all four fit a phone's width (longer ones went behind an overflow button at 390 px).
    with gr.Tab("Mask", id="mask") as tab:
        # Generate sits above the 600 px canvas, so it is in view without scrolling.
        with gr.Row(equal_height=False):
            template = gr.Radio(list(canvases.TEMPLATE_CHOICES), value=canvases.DEFAULT_TEMPLATE,
                                label="Start from a template", scale=5, elem_id="template")
            with gr.Column(scale=1, min_width=130):
                button = gr.Button("Generate", variant="primary", elem_id="generate-mask")
                reload_template = gr.Button("↺ Reset canvas", size="sm", min_width=110)
        canvas = ReturnableCanvas(
            what="mask", store=STORE,
            value=canvases.template_canvas(canvases.DEFAULT_TEMPLATE), type="pil", image_mode="RGBA", format="png",
            sources=(), transforms=(), layers=False, canvas_size=(canvases.CANVAS_SIZE, canvases.CANVAS_SIZE),
            fixed_canvas=True, label="Mask", elem_id="mask-editor", height=600,
            brush=gr.Brush(colors=canvases.palette_hex(), color_mode="fixed", default_size=12,
                           default_color=canvases.class_colour_hex(canvases.DEFAULT_BRUSH_CLASS)),
            eraser=gr.Eraser(default_size=12),
        )
        gr.HTML(canvases.legend_html(), label="Brush colours", elem_id="legend")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=240):
                gr.Markdown("Pick a class colour with the palette button in the editor's toolbar and paint. Paint "
                            "**black** (background) to remove parts of the template; the eraser removes your own "
                            "strokes. *Left* and *right* are the person's own, so they are mirrored on screen.")
                status = gr.Markdown(elem_id="mask-status")
            upload = UploadedFile(label="Or upload a mask (class ids, palette PNG or colour map)",
                                  file_types=["image"], elem_id="mask-upload", scale=2, min_width=200)
    return {"tab": tab, "template": template, "reload": reload_template, "canvas": canvas, "upload": upload,
            "status": status, "button": button}


def build_sketch_tab() -> dict:
    with gr.Tab("Sketch", id="sketch") as tab:
        with gr.Row(equal_height=False):
            stroke = gr.Radio(list(canvases.STROKE_WIDTHS), value=canvases.DEFAULT_STROKE, label="Stroke width",
                              elem_id="stroke-width", scale=5)
            button = gr.Button("Generate", variant="primary", elem_id="generate-sketch", scale=1, min_width=130)
        canvas = ReturnableCanvas(
            what="sketch", store=STORE,
            value=canvases.sketch_canvas(), type="pil", image_mode="RGBA", format="png", sources=(), transforms=(),
            layers=False, canvas_size=(canvases.CANVAS_SIZE, canvases.CANVAS_SIZE), fixed_canvas=True,
            label="Sketch", elem_id="sketchpad", height=600,
            brush=sketch_brush(canvases.DEFAULT_STROKE), eraser=gr.Eraser(default_size=10),
        )
        with gr.Row():
            upload = UploadedFile(label="Upload a sketch", file_types=["image"], elem_id="sketch-upload")
            photo = UploadedFile(label="Sketch from a photo (edges)", file_types=["image"], elem_id="photo-upload")
    return {"tab": tab, "stroke": stroke, "canvas": canvas, "upload": upload, "photo": photo, "button": button}


def sketch_brush(width: str) -> gr.Brush:
    return gr.Brush(colors=["#000000"], color_mode="fixed", default_color="#000000",
                    default_size=canvases.STROKE_WIDTHS.get(width, canvases.STROKE_WIDTHS[canvases.DEFAULT_STROKE]))


def build_settings() -> list:
    """The Advanced settings accordion; returns its inputs in handler order."""
    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        with gr.Row():
            mode = gr.Radio([("fast", "fast"), ("quality", "quality"), ("training-free", "invert")],
                            value=HANDLERS.default_mode, label="Mode",
                            info="fast: one U-Net pass · quality: several DDIM steps, latents combined · "
                            "training-free: the diffusion model draws, the photo encoder inverts (public weights; "
                            "slow: full denoising)")
            steps = gr.Slider(1, 50, value=20, step=1, label="Steps",
                              info="DDIM steps in quality mode and for the diffusion preview")
        with gr.Row():
            feature_steps = gr.Textbox("all", label="Steps that feed the latent (quality mode)",
                                       info="all, a range such as 0-4, or a list such as 0, 5, 10")
            combine = gr.Radio(list(COMBINE_CHOICES), value="mean", label="Combine steps",
                               info="coarse-to-fine: early steps feed coarse layers, late steps fine ones")
        with gr.Row():
            seed = WholeNumber(0, precision=0, label="Seed", info="0 to 4294967295", elem_id="seed")
            randomize = gr.Checkbox(True, label="Random seed", info="untick to reuse the seed above",
                                    elem_id="randomize")
        with gr.Row():
            truncation = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Truncation ψ",
                                   info="lower = closer to the average face")
            num_images = gr.Slider(1, SETTINGS.max_images, value=1, step=1, label="Number of images")
        show_diffusion = gr.Checkbox(False, label="Also show the diffusion image",
                                     info="what the diffusion model itself draws; slower: full denoising and a "
                                     "VAE decode")
    # Shown when a second engine is loaded (MM2LATENT_FAST_ENGINE_REPO); its value is what the API's `engine` takes.
    engine = gr.Radio([(ENGINE_LABELS.get(name, name), name) for name in HANDLERS.engine_choices],
                      value=MODEL.pipe.engine, label="Engine", elem_id="engine",
                      visible=len(HANDLERS.engine_choices) > 1,
                      info="diffusion features: the paper's method · fast: text and mask/sketch codes mapped "
                      "straight to W+ (mode, steps and the diffusion image do not apply)")
    return [mode, steps, feature_steps, combine, seed, randomize, truncation, num_images, show_diffusion, engine]


def build_outputs() -> dict:
    gallery = gr.Gallery(label="Generated faces", columns=2, height=420, format="png", object_fit="contain",
                         elem_id="gallery", buttons=["download", "fullscreen"])
    summary = gr.Markdown(elem_id="run-summary")
    attention = gr.Gallery(label="Attention per word over your input (first image)",
                           columns=6, height=300, format="png", elem_id="attention")
    files = gr.File(label="Downloads: PNG with metadata, W+ latents (.npy)", file_count="multiple",
                    interactive=False, elem_id="downloads")
    diffusion = gr.Gallery(label="Diffusion image: what the diffusion model draws", columns=2, height=300, format="png",
                           visible=False, elem_id="diffusion")
    return {"gallery": gallery, "summary": summary, "attention": attention, "files": files,
            "diffusion": diffusion}


def build_demo() -> gr.Blocks:
    cache_age = SETTINGS.cache_max_age_s
    with SpaceBlocks(title=text.TITLE, cache_limit=CACHE_LIMIT,
                     delete_cache=(min(300, cache_age), cache_age)) as demo:
        # What runs, in one sentence; why, and how to get real faces, folded under it.
        with gr.Column(visible=MODEL.status is not None, elem_id="mm2l-status"):
            gr.Markdown(MODEL.status or "", elem_id="mm2l-status-line")
            with gr.Accordion("Why, and how to get real faces", open=False, elem_id="mm2l-status-details"):
                gr.Markdown(MODEL.details or "")
        gr.Markdown(f"# {text.TITLE}\n{text.INTRO}", elem_id="mm2l-intro")
        active_tab = gr.State("mask")
        with gr.Row(equal_height=False):
            with gr.Column(scale=6):
                with gr.Column(elem_id="prompt-panel") as prompt_panel:
                    prompt = gr.Textbox(label="Prompt", placeholder=text.EXAMPLE_PROMPTS[0], lines=1, max_lines=1,
                                        elem_id="prompt", info="Describe the face. Enter generates from the open "
                                        "tab; the prompt may be empty when you draw.")
                    gr.Examples([[p] for p in text.EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts",
                                api_name="load_example_prompt")
                with gr.Tabs(selected="mask"):
                    mask = build_mask_tab()
                    sketch = build_sketch_tab()
                    edit = build_edit_tab(lambda: MODEL.editor, concurrency_limit=SETTINGS.concurrency, store=STORE,
                                          session_ttl_s=SETTINGS.session_ttl_s,
                                          max_prompt_chars=SETTINGS.max_prompt_chars)
                    three_d = (build_3d_tab(MODEL_3D, HANDLERS_3D, prompt, mask["canvas"], sketch["canvas"])
                               if MODEL_3D is not None else None)
                with gr.Column() as settings_panel:
                    settings = build_settings()
            with gr.Column(scale=5, elem_id="generation-outputs") as output_panel:
                out = build_outputs()
        seed = settings[4]
        outputs = [out["gallery"], seed, out["summary"], out["attention"], out["files"], out["diffusion"]]
        with gr.Column() as examples_panel:
            mask_examples = add_examples(prompt, mask["canvas"], sketch["canvas"], outputs)
        # The edit tab has its own description box, settings and results, the 3D tab its own settings and
        # results (it reads the shared prompt): the generation panels that do not apply hide there.
        generation_panels = [prompt_panel, settings_panel, output_panel, examples_panel]
        shown_on = [(mask["tab"], (True, True, True, True)), (sketch["tab"], (True, True, True, True)),
                    (edit["tab"], (False, False, False, False))]
        if three_d is not None:
            shown_on.append((three_d["tab"], (True, False, False, False)))
        for tab, visible in shown_on:
            tab.select(lambda shown=visible: [gr.Column(visible=v) for v in shown],
                       outputs=generation_panels, queue=False, api_visibility="private")
        with gr.Accordion("About this Space", open=False, elem_id="about"):
            gr.Markdown(text.ABOUT)
        wire_events(prompt, active_tab, mask, sketch, settings, outputs)
        # The template choice says what the canvas shows, also after an example or an upload replaced it.
        mask_examples.load_input_event.then(HANDLERS.template_on_canvas, inputs=mask["canvas"],
                                            outputs=mask["template"], api_visibility="private",
                                            concurrency_id="uploads", concurrency_limit=2)
    # api_open=False: POST /gradio_api/run/<name> would run a queued event at once, past its concurrency limit.
    demo.queue(max_size=SETTINGS.queue_size, default_concurrency_limit=SETTINGS.concurrency, api_open=False)
    return demo


def add_examples(prompt, mask_canvas, sketch_canvas, outputs) -> gr.Examples:
    """The example rows under the inputs; returns the mask examples (their clicks update the template choice)."""
    write_examples(EXAMPLES_DIR, overwrite=False)
    # Cached results belong to one model: keep the tiny preset's apart from the real model's.
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", f".gradio/cached_examples/{slug(MODEL.pipe.name)}")
    cache = SETTINGS.cache_examples != "off"
    mode = SETTINGS.cache_examples if cache else None
    with gr.Row():
        mask_examples = gr.Examples(mask_example_rows(EXAMPLES_DIR), inputs=[prompt, mask_canvas], outputs=outputs,
                    fn=HANDLERS.example_from_mask, cache_examples=cache, cache_mode=mode,
                    label="Examples: text + mask", api_name="load_mask_example")
        gr.Examples(sketch_example_rows(EXAMPLES_DIR), inputs=[prompt, sketch_canvas], outputs=outputs,
                    fn=HANDLERS.example_from_sketch, cache_examples=cache, cache_mode=mode,
                    label="Examples: text + sketch", api_name="load_sketch_example")
    return mask_examples


def wire_events(prompt, active_tab, mask: dict, sketch: dict, settings: list, outputs: list) -> None:
    # Progress shows on the gallery alone: not once per output box, and never over the last run's summary.
    generation = {"outputs": outputs, "concurrency_id": "generate", "trigger_mode": "once", "scroll_to_output": True,
                  "show_progress_on": outputs[0]}
    quick = {"queue": False, "api_visibility": "private"}

    # The page sets a template itself: any server event that outputs to the mask editor makes the page export
    # the editor's whole content (software WebGL read-back + PNG encode, seconds) on every status update.
    gr.on([mask["template"].input, mask["reload"].click], None, inputs=mask["template"], outputs=mask["canvas"],
          js=template_loader_js(canvases.template_data_urls()), api_visibility="private", queue=False)
    # The same pictures for API callers; no trigger on the page.
    gr.on([], HANDLERS.load_template, inputs=mask["template"], outputs=mask["canvas"], api_name="load_template",
          concurrency_limit=None)
    # Uploads are checked by an event without outputs first: a damaged file is a toast, and nothing covers or
    # replaces the visitor's canvas. (Queued: errors of unqueued events reach the page as a bare HTTP 500.)
    check = {"api_visibility": "private", "concurrency_id": "uploads", "concurrency_limit": 2}
    mask["upload"].upload(HANDLERS.check_mask_upload, inputs=mask["upload"], **check).success(
        HANDLERS.upload_mask, inputs=mask["upload"], outputs=[mask["canvas"], mask["status"]],
        api_name="upload_mask", concurrency_id="uploads", concurrency_limit=2).success(
        HANDLERS.template_on_canvas, inputs=mask["canvas"], outputs=mask["template"], api_visibility="private",
        concurrency_id="uploads", concurrency_limit=2)
    sketch["upload"].upload(HANDLERS.check_sketch_upload, inputs=sketch["upload"], **check).success(
        HANDLERS.upload_sketch, inputs=sketch["upload"], outputs=sketch["canvas"], api_name="upload_sketch",
        concurrency_id="uploads", concurrency_limit=2).success(lambda: None, outputs=sketch["photo"], **quick)
    sketch["photo"].upload(HANDLERS.check_photo_upload, inputs=sketch["photo"], **check).success(
        HANDLERS.sketch_from_photo, inputs=[sketch["photo"], sketch["stroke"]], outputs=sketch["canvas"],
        api_name="sketch_from_photo", concurrency_id="uploads", concurrency_limit=2).success(
        lambda: None, outputs=sketch["upload"], **quick)  # only the file now on the pad keeps its name
    # A new brush re-creates the editor's tools; re-selecting the brush lets the visitor draw straight on.
    sketch["stroke"].change(lambda width: gr.ImageEditor(brush=sketch_brush(width)), inputs=sketch["stroke"],
                            outputs=sketch["canvas"], api_name="set_stroke_width", **quick).then(
        None, js=RESELECT_SKETCH_BRUSH, api_name="reselect_sketch_brush", **quick)

    mask["tab"].select(lambda: "mask", outputs=active_tab, api_name="select_mask_tab", **quick)
    sketch["tab"].select(lambda: "sketch", outputs=active_tab, api_name="select_sketch_tab", **quick)

    # The training-free mode shows its drawing while it forms (ui/drawing.py); the API returns the final result.
    mask["button"].click(with_drawing_previews(HANDLERS.generate_from_mask, len(outputs)),
                         inputs=[prompt, mask["canvas"], *settings],
                         api_name="generate_from_mask", **generation)
    sketch["button"].click(with_drawing_previews(HANDLERS.generate_from_sketch, len(outputs)),
                           inputs=[prompt, sketch["canvas"], *settings],
                           api_name="generate_from_sketch", **generation)
    show_diffusion = settings[8]
    show_diffusion.change(lambda show: gr.Gallery(visible=show), inputs=show_diffusion, outputs=outputs[-1],
                          api_name="show_diffusion_preview", **quick)
    prompt.submit(with_drawing_previews(HANDLERS.generate_from_active_tab, len(outputs)),
                  inputs=[active_tab, prompt, mask["canvas"], sketch["canvas"], *settings],
                  api_name="generate_from_active_tab", api_visibility="private", **generation)


demo = build_demo()


def launch(**overrides):
    """Start the server with the Space's options (``overrides`` win, e.g. ``prevent_thread_lock=True``)."""
    # show_error: Gradio's own failures (a payload it cannot parse, too few arguments) reach the caller in
    # words; the handlers' errors are gr.Error already. No allowed_paths: examples reach the page through
    # Gradio's cache, so no folder of the server needs serving.
    options = {"server_name": SETTINGS.server_name, "server_port": SETTINGS.server_port,
               "max_file_size": SETTINGS.max_file_size, "show_error": True,
               "state_session_capacity": SETTINGS.max_sessions, "css": text.CSS,
               "head": canvases.swatch_names_script(), "app_kwargs": {"middleware": [Middleware(NoSniffMiddleware)]}}
    return demo.launch(**{**options, **overrides})


if __name__ == "__main__":
    launch()
