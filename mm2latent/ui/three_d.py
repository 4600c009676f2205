"""The 3D tab: a face from an EG3D pipeline, turned with yaw and pitch sliders, as a turntable video.

The Space may hold a 3D-aware pipeline next to the 2D one (``MM2LATENT_3D_MODEL_REPO``, see
``settings.py``). A visitor generates a face once from the prompt and the mask or sketch canvas; its W+
latent is kept in the session (``gr.State``), so moving the camera, asking for the depth map or a
turntable re-renders that same face without running the diffusion encoder again.

Endpoints: ``/generate_3d``, ``/render_view`` and ``/turntable`` (the last two act on the face the
caller's session generated last).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from ..pipelines.request import (
    GenerationRequest,
    check_camera,
    check_choice,
    check_flag,
    check_integer,
    check_prompt,
)
from .handlers import chosen_seed, friendly_errors, user_error, visual_input
from .loading import LoadedModel, OnFirstUse, plain_reason
from .outputs import OutputStore, describe_run, file_stem, save_latents
from .security import WholeNumber
from .settings import AUTO_3D_MODEL, DEFAULT_3D_MODEL_REPO, Settings

log = logging.getLogger("mm2latent.space")

#: Where the visual input of a 3D face comes from: a canvas of the 2D tabs, or none.
SOURCES = ("mask", "sketch", "text only")
# The camera range EG3D's FFHQ training cameras cover well; beyond it faces smear.
YAW_LIMIT = 60.0
PITCH_LIMIT = 30.0
TURNTABLE_FPS = 24
DEFAULT_TURNTABLE_FRAMES = 24
IMAGE_SIZE = 320  # px, square: small models' 64² faces and 16² depth maps are shown scaled up
NO_FACE_HINT = "Generate a face first (the “Generate 3D face” button); the sliders then turn it."


@dataclass
class Loaded3DModel:
    pipe: OnFirstUse  # FacePipeline with a 3D generator, tiny-eg3d built on its first use
    banner: str | None  # one sentence shown in the tab, or None
    requested: str
    problem: str | None = None  # why the requested model is not the one running (for the log)


def load_3d_pipeline(settings: Settings, main: LoadedModel) -> Loaded3DModel | None:
    """The 3D tab's model, or None for no 3D tab; the same rule as the engine selector's second engine.

    ``settings.model_3d_repo``: None (off) → None; ``"auto"`` → ``tiny-eg3d`` beside a tiny main model (the
    offline demo; built on first use), else None: an untrained toy tab beside real weights would only mislead.
    A named repository or folder is loaded now; when it cannot be had or is 2D, the tab falls back to
    ``tiny-eg3d`` beside a tiny main model and is left out otherwise (logged).
    """
    requested = settings.model_3d_repo
    if requested is None or (requested == AUTO_3D_MODEL and not main.is_tiny):
        return None

    def load_tiny():
        return _shown_progress(_from_pretrained(DEFAULT_3D_MODEL_REPO, settings))

    if requested in (AUTO_3D_MODEL, DEFAULT_3D_MODEL_REPO):
        return Loaded3DModel(pipe=OnFirstUse(DEFAULT_3D_MODEL_REPO, load_tiny),
                             banner=untrained_3d_banner(None), requested=requested)
    from ..models.generator import is_3d

    problem, plain = None, None
    try:
        pipe = _from_pretrained(requested, settings, revision=settings.model_3d_revision,
                                load_vae=settings.load_vae)
        if not is_3d(pipe.generator):
            problem = plain = f"its generator ({type(pipe.generator).__name__}) is 2D"
    except Exception as error:  # offline, no token, damaged files: keep the Space up
        problem, plain = f"{type(error).__name__}: {error}", plain_reason(error)
    if problem is None:
        log.info("Loaded 3D model %s (trained=%s) on %s", pipe.name, pipe.trained, pipe.device)
        return Loaded3DModel(pipe=OnFirstUse.loaded(_shown_progress(pipe)),
                             banner=None if pipe.trained else untrained_3d_banner(None, requested),
                             requested=requested)
    if not main.is_tiny:
        log.warning("Could not use %r as the 3D model (%s); no 3D tab.", requested, problem)
        return None
    log.warning("Could not use %r as the 3D model (%s); the 3D tab runs the untrained '%s' preset.",
                requested, problem, DEFAULT_3D_MODEL_REPO)
    return Loaded3DModel(pipe=OnFirstUse(DEFAULT_3D_MODEL_REPO, load_tiny),
                         banner=untrained_3d_banner(f"`{requested}` could not be used: {plain}."),
                         requested=requested, problem=problem)


def _from_pretrained(name: str, settings: Settings, **options):
    from ..pipelines.generation import FacePipeline

    return FacePipeline.from_pretrained(name, device=settings.device, dtype=settings.dtype, **options)


def _shown_progress(pipe):
    pipe.show_progress = True  # tqdm bars feed gr.Progress(track_tqdm=True)
    return pipe


def untrained_3d_banner(why: str | None, name: str = DEFAULT_3D_MODEL_REPO) -> str:
    """One sentence for the 3D tab on untrained weights (``why``: what was asked for instead, or None)."""
    return (f"⚠️ **Untrained 3D demo (`{name}`): the cameras, depth and videos work, but the pictures are noise, "
            "not faces.**" + (f" {why}" if why else ""))


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


def checked_face(face: Any) -> dict:
    """The session's face (``generate_3d``'s state) or a plain-worded refusal."""
    if not isinstance(face, dict) or "latents" not in face:
        raise user_error(NO_FACE_HINT)
    return face


def describe_camera(yaw: float, pitch: float) -> str:
    return f"yaw {yaw:g}°, pitch {pitch:g}°"


def view_summary(face: dict, yaw: float, pitch: float) -> str:
    """The face's run summary and the camera it is seen from now."""
    return f"{face.get('summary', '')} &nbsp;·&nbsp; {describe_camera(yaw, pitch)}"


class ThreeDHandlers:
    """Event handlers of the 3D tab, bound to one 3D pipeline.

    Args:
        pipe: a :class:`~mm2latent.pipelines.generation.FacePipeline` whose generator is 3D, or an
            :class:`~mm2latent.ui.loading.OnFirstUse` that builds it at the first event that needs it.
        settings: the Space settings (prompt length, most turntable frames).
        store: where output files are written.
        gpu: decorator for the calls that need the accelerator (``gpu_task`` in ``app.py``); default none.
    """

    def __init__(self, pipe, settings: Settings | None = None, store: OutputStore | None = None,
                 gpu: Callable[[Callable], Callable] | None = None):
        from ..pipelines.views import render_turntable

        self.model = pipe if isinstance(pipe, OnFirstUse) else OnFirstUse.loaded(pipe)
        self.settings = settings or Settings()
        self.store = store or OutputStore()
        decorate = gpu or (lambda function: function)
        self.run = decorate(lambda **request: self.pipe(**request))
        self.render = decorate(lambda latents, **options: self.pipe.render_outputs(latents, **options))
        self.render_turntable = decorate(
            lambda latents, path, **options: render_turntable(self.pipe, latents, path, **options))

    @property
    def pipe(self):
        """The 3D pipeline (built now when this is its first use)."""
        return self.model.get()

    @friendly_errors("generating the 3D face")
    def generate_3d(self, prompt: str, source: str, mask: Any, sketch: Any, seed: Any = 0,
                    randomize_seed: bool = True, truncation: float = 1.0, yaw: float = 0.0, pitch: float = 0.0,
                    show_depth: bool = False, progress=gr.Progress(track_tqdm=True)) -> tuple:
        """A face from the prompt and the mask or sketch canvas, seen from (yaw, pitch).

        Returns the image (PNG with the settings and camera), the depth map (or None), the seed, a
        summary, the files to download and the face (the session state the other 3D events read).
        """
        # The library's validators check every setting; the UI only reads the canvas.
        prompt = check_prompt(prompt, self.settings.max_prompt_chars)
        source = check_choice(source, "Draw from", SOURCES)
        yaw, pitch = check_camera(yaw, pitch, YAW_LIMIT, PITCH_LIMIT)
        show_depth = check_flag(show_depth, "“Show the depth map”")
        seed = chosen_seed(seed, randomize_seed)
        if source == "text only":
            if not prompt:
                raise user_error("Text only needs a prompt: describe the face, or draw from the mask or sketch")
            mask_ids, scribble = None, None
        else:
            mask_ids, scribble = visual_input(source, mask if source == "mask" else sketch, prompt)
        request = GenerationRequest.create(prompt, mask_ids, scribble, seed=seed, truncation=truncation,
                                           max_prompt_chars=self.settings.max_prompt_chars)
        seed = request.seed
        started = time.perf_counter()
        progress(0, desc="Generating")
        output = self.run(prompt=request.prompt, mask=mask_ids, scribble=scribble, seed=seed,
                          truncation=request.truncation, camera=(yaw, pitch), return_depth=show_depth)
        for warning in output.warnings:
            gr.Warning(warning)
        # The latents are already truncated: every later view renders them with ψ = 1 (the same face).
        run = describe_run(output.settings, [seed], time.perf_counter() - started, str(self.pipe.device))
        face = {"latents": output.latents.numpy(), "settings": output.settings, "seed": seed,
                "stem": file_stem(prompt, "3d"), "summary": run}
        depth = output.depth[0] if output.depth is not None else None
        image_path, depth_path, files = self._save_view(face, output.images[0], depth, yaw, pitch)
        return image_path, depth_path, seed, view_summary(face, yaw, pitch), files, face

    @friendly_errors("turning the face")
    def render_view(self, face: Any, yaw: float = 0.0, pitch: float = 0.0, show_depth: bool = False,
                    progress=gr.Progress(track_tqdm=True)) -> tuple:
        """The session's face from another camera (no new encoding): image, depth map (or None), files."""
        from ..inputs.images import tensor_to_pil

        face = checked_face(face)
        yaw, pitch = check_camera(yaw, pitch, YAW_LIMIT, PITCH_LIMIT)
        show_depth = check_flag(show_depth, "“Show the depth map”")
        progress(0, desc="Rendering")
        rendered = self.render(self._latents(face), camera=(yaw, pitch), return_depth=show_depth)
        depth = rendered.depth[0] if rendered.depth is not None else None
        return self._save_view(face, tensor_to_pil(rendered.images)[0], depth, yaw, pitch)

    def turn_view(self, face: Any, yaw: float = 0.0, pitch: float = 0.0, show_depth: bool = False,
                  progress=gr.Progress(track_tqdm=True)) -> tuple:
        """The page's sliders: :meth:`render_view` plus the summary naming the new camera. Before a face exists,
        one short hint in the summary instead of an error (a drag sends many events; an error would stack a
        pop-up per event and mark both pictures)."""
        if not isinstance(face, dict) or "latents" not in face:
            return gr.skip(), gr.skip(), gr.skip(), NO_FACE_HINT
        image, depth, files = self.render_view(face, yaw, pitch, show_depth, progress)
        return image, depth, files, view_summary(face, *check_camera(yaw, pitch, YAW_LIMIT, PITCH_LIMIT))

    @friendly_errors("rendering the turntable")
    def turntable(self, face: Any, frames: Any = DEFAULT_TURNTABLE_FRAMES,
                  progress=gr.Progress(track_tqdm=True)) -> str:
        """An MP4 (H.264) of the camera circling the session's face, at 24 frames per second."""
        face = checked_face(face)
        frames = check_integer(frames, "frames", 4, self.settings.turntable_max_frames)
        progress(0, desc="Rendering the turntable")
        path = self.store.new_folder() / f"{face['stem']}-seed{face['seed']}-turntable.mp4"
        return str(self.render_turntable(self._latents(face), path, num_frames=frames, fps=TURNTABLE_FPS))

    @staticmethod
    def _latents(face: dict):
        import torch

        return torch.from_numpy(np.asarray(face["latents"], dtype=np.float32))

    def _save_view(self, face: dict, image, depth, yaw: float, pitch: float) -> tuple[str, str | None, list[str]]:
        """The view as a PNG whose metadata holds the camera, the depth map beside it, and the latents."""
        from ..inputs.metadata import save_png
        from ..pipelines.views import depth_to_image

        settings = {**face["settings"], "camera": [yaw, pitch], "return_depth": depth is not None}
        folder = self.store.new_folder()
        stem = f"{face['stem']}-seed{face['seed']}-yaw{yaw:g}-pitch{pitch:g}"
        image_path = folder / f"{stem}.png"
        save_png(image, image_path, settings)
        files = [str(image_path)]
        depth_path = None
        if depth is not None:
            depth_path = folder / f"{stem}-depth.png"
            save_png(depth_to_image(depth), depth_path, {**settings, "content": "depth (near is white)"})
            files.append(str(depth_path))
        files.append(str(save_latents(folder / f"{face['stem']}-seed{face['seed']}-wplus.npy", face["latents"])))
        return str(image_path), None if depth_path is None else str(depth_path), files


# --------------------------------------------------------------------------------------------
# The tab
# --------------------------------------------------------------------------------------------


def build_3d_tab(model: Loaded3DModel, handlers: ThreeDHandlers, prompt, mask_canvas, sketch_canvas,
                 concurrency_id: str = "generate") -> dict:
    """The "3D" tab (call inside ``gr.Tabs``): reads the shared prompt and the mask and sketch canvases.

    Registers ``/generate_3d``, ``/render_view`` and ``/turntable``; returns the tab's components.
    """
    max_frames = handlers.settings.turntable_max_frames
    with gr.Tab("3D", id="3d") as tab:
        gr.Markdown(model.banner or "", visible=model.banner is not None, elem_id="mm2l-3d-banner")
        # The button first: it is in view without scrolling; the pictures follow, the sliders right under them.
        with gr.Row(equal_height=False):
            source = gr.Radio(list(SOURCES), value="mask", label="Draw from", elem_id="source-3d", scale=3,
                              info="the canvas of the mask or sketch tab, or the prompt alone")
            with gr.Column(scale=1, min_width=150):
                button = gr.Button("Generate 3D face", variant="primary", elem_id="generate-3d")
                show_depth = gr.Checkbox(False, label="Show the depth map (near is white)", elem_id="depth-3d")
        summary = gr.Markdown("Generate a face once, then turn it with the sliders or make a turntable video: "
                              "the same face is kept while you turn it.", elem_id="summary-3d")
        # Labels as captions above the pictures: Gradio's label badge sat on the picture at phone width.
        with gr.Row(equal_height=False):
            with gr.Column(min_width=160):
                gr.Markdown("**Face**", elem_classes="mm2l-caption")
                image = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                 elem_id="image-3d", buttons=["download"], height=IMAGE_SIZE, width=IMAGE_SIZE)
            with gr.Column(min_width=160):
                gr.Markdown("**Depth map**", elem_classes="mm2l-caption")
                depth = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                 elem_id="depth-image-3d", height=IMAGE_SIZE, width=IMAGE_SIZE)
        with gr.Row():
            yaw = gr.Slider(-YAW_LIMIT, YAW_LIMIT, value=0, step=1, label="Yaw (°)", elem_id="yaw",
                            info="positive moves the camera to your right")
            pitch = gr.Slider(-PITCH_LIMIT, PITCH_LIMIT, value=0, step=1, label="Pitch (°)", elem_id="pitch",
                              info="positive looks from below")
        with gr.Row():
            seed = WholeNumber(0, precision=0, label="Seed", info="0 to 4294967295", elem_id="seed-3d")
            randomize = gr.Checkbox(True, label="Random seed", elem_id="randomize-3d")
            truncation = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Truncation ψ",
                                   info="lower = closer to the average face")
        with gr.Row():
            frames = gr.Slider(4, max_frames, value=min(DEFAULT_TURNTABLE_FRAMES, max_frames), step=1,
                               label="Turntable frames", info=f"{TURNTABLE_FPS} per second")
            turntable = gr.Button("Turntable video", elem_id="turntable")
        video = gr.Video(label="Turntable", format="mp4", interactive=False, autoplay=True, loop=True,
                         elem_id="video-3d", height=IMAGE_SIZE)
        files = gr.File(label="Downloads: PNG with settings and camera, depth map, W+ latents (.npy)",
                        file_count="multiple", interactive=False, elem_id="downloads-3d")
        face = gr.State(None)

    events = {"concurrency_id": concurrency_id, "trigger_mode": "always_last"}
    button.click(handlers.generate_3d,
                 inputs=[prompt, source, mask_canvas, sketch_canvas, seed, randomize, truncation, yaw, pitch,
                         show_depth],
                 outputs=[image, depth, seed, summary, files, face], api_name="generate_3d",
                 **{**events, "trigger_mode": "once"})
    # `input`: a drag and a typed angle both re-render; always_last renders only the latest of a fast drag.
    gr.on([yaw.input, pitch.input, show_depth.input], handlers.turn_view,
          inputs=[face, yaw, pitch, show_depth], outputs=[image, depth, files, summary], api_visibility="private",
          show_progress="minimal", **events)
    # The same view for API callers (an error, not a hint, before a face exists); no trigger on the page.
    gr.on([], handlers.render_view, inputs=[face, yaw, pitch, show_depth], outputs=[image, depth, files],
          api_name="render_view", **events)
    turntable.click(handlers.turntable, inputs=[face, frames], outputs=video, api_name="turntable", **events)
    return {"tab": tab, "source": source, "yaw": yaw, "pitch": pitch, "depth": show_depth, "button": button,
            "image": image, "depth_image": depth, "video": video, "files": files, "face": face}
