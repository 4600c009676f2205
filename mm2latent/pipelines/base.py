"""``FacePipelineBase``: what every engine's pipeline shares — loading and saving through the component registry,
the call, batching, the rendering stage (truncation, G, cameras) and the output.

The engines subclass it: :class:`~mm2latent.pipelines.ddgi.FacePipeline` (DDGI: text + mask/scribble -> diffusion
features -> M and T -> W+) and :class:`~mm2latent.pipelines.mm2latent_engine.MM2LatentPipeline`.
``from_pretrained`` returns the class the preset or manifest names, found by name in :mod:`.registry` (the base
never imports its engines).

With a 3D-aware generator (EG3D) the last stage takes a camera: ``pipe(..., camera=(yaw°, pitch°))``,
``pipe.render(latents, camera=...)``, and :meth:`FacePipelineBase.render_views` renders one face from several
cameras (tri-planes computed once); :meth:`FacePipelineBase.render_turntable` writes turntable videos.

Why this module is over 600 lines: it is one class, the public surface every engine shares (loading, the call and
its documented arguments, batching, rendering and its 3D options, the editing components); what is not that class
already lives beside it (:mod:`.rendering`, :mod:`.outputs`, :mod:`.registry`, :mod:`.views`).
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.profiler import record_function

from ..editing.clip import ClipGuide
from ..editing.closeness import DEFAULT_FAITHFULNESS
from ..errors import InvalidSettingError
from ..inputs.conditions import (
    mask_to_color,
    parse_mask,
    parse_scribble,
    scribble_is_empty,
    scribble_to_image,
)
from ..inputs.images import tensor_to_pil
from ..models.generator import Generator, truncate_latents
from ..models.stylegan2 import LATENT_AVG_SAMPLES
from . import rendering, views
from .components import EDITING_COMPONENTS, ComponentCache, load_components, save_components, write_manifest
from .outputs import FacePipelineOutput
from .registry import DEFAULT_ENGINE, PRESET_ENGINES, PRESETS, pipeline_class, register_engine
from .rendering import CAMERA_OPTIONS, RenderedImages, RenderSettings
from .request import GenerationRequest
from .sampling import StepCallback

__all__ = ["CAMERA_OPTIONS", "CONDITIONED_MEAN_SAMPLES", "CONDITIONED_MEAN_SEED", "FacePipelineBase",
           "parse_visual_inputs", "resolve_dtype"]

# The camera-conditioned mean latent is an average over this many z drawn from this seed: fixed, so one
# camera always gives the same mean (and the same truncated face) in every process.
CONDITIONED_MEAN_SAMPLES = LATENT_AVG_SAMPLES
CONDITIONED_MEAN_SEED = 0
# Conditioned means kept per pipeline (a Space's camera sliders visit many cameras; an entry is one w).
CONDITIONED_MEAN_CACHE_SIZE = 64


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name ("float32", "bfloat16", "float16", "auto") or None (= auto).

    Auto is float16 on CUDA and float32 elsewhere.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InvalidSettingError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def parse_visual_inputs(mask, scribble, size: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                            dict[str, Image.Image]]:
    """A user's mask and sketch at ``size``², as every engine reads them: (mask class ids [size, size] or None,
    sketch strokes [size, size] bool or None, previews {"mask": colour map, "scribble": strokes}).

    A sketch without strokes is ignored with a warning.
    """
    ids = strokes = None
    previews: dict[str, Image.Image] = {}
    if mask is not None:
        ids = parse_mask(mask, size=size)
        previews["mask"] = mask_to_color(ids)
    if scribble is not None:
        binary = parse_scribble(scribble, size=size)
        if scribble_is_empty(binary):
            warnings.warn("the sketch has no strokes; it is ignored", stacklevel=4)
        else:
            strokes = binary
            previews["scribble"] = scribble_to_image(binary).convert("RGB")
    return ids, strokes, previews


def movable(part) -> bool:
    """Whether a component moves with ``pipe.to`` (networks and the CLIP guide; not tokenizers, schedulers or lazy
    loaders)."""
    return isinstance(part, (torch.nn.Module, ClipGuide))


class FacePipelineBase:
    """What every engine shares: loading and saving through the component registry, the call, batching, the
    rendering stage (truncation, G, cameras), the output and the optional editing components.

    An engine subclass predicts W+ latents from (prompt, mask, sketch, seed) in :meth:`_generate_group` and
    names its networks in :meth:`engine_components`; :meth:`from_pretrained` on this class or on
    :class:`~mm2latent.pipelines.ddgi.FacePipeline` returns the engine's class that the preset or the manifest
    names (``pipe.engine``: "ddgi" or "mm2latent").

    The editing components (:data:`~.components.EDITING_COMPONENTS`) are optional parts of the same pipeline:
    loaded with ``from_pretrained(..., editing=True)`` (or added with :meth:`from_pipe`), they enable photo
    editing (:class:`~mm2latent.pipelines.editing.PhotoEditingMixin`: ``invert``, ``edit``) and, with an
    inverter on the DDGI engine, the training-free ``mode="invert"``.

    Args:
        generator: the frozen GAN G (any :class:`~mm2latent.models.generator.Generator`: StyleGAN2, EG3D).
        trained: whether the engine's networks carry trained weights.
        name: where the pipeline was loaded from (for messages and metadata).
        inverter: the photo -> W+ encoder (pSp / e4e), or None: photos cannot be inverted.
        face_parser: BiSeNet, for a photo's own mask and mask losses, or None.
        identity: ArcFace IR-SE50, for identity scores and the identity term, or None.
        lpips: LPIPS, for the inversion's refinement, or None.
        clip: a :class:`~mm2latent.editing.clip.ClipGuide`, for text-guided refinement, or None.
    """

    #: The engine's name, as manifests and settings record it.
    engine: str = ""
    #: Whether the engine draws I^d_0 with a diffusion model, so that an inverter enables ``mode="invert"``.
    can_invert: bool = False

    def __init_subclass__(cls, **kwargs):
        # A class that names its engine runs it: from_pretrained finds it by that name (registry.py).
        super().__init_subclass__(**kwargs)
        if "engine" in cls.__dict__ and cls.engine:
            register_engine(cls.engine, cls)

    def __init__(
        self,
        generator: Generator,
        trained: bool = False,
        name: str = "custom",
        *,
        inverter: torch.nn.Module | None = None,
        face_parser: torch.nn.Module | None = None,
        identity: torch.nn.Module | None = None,
        lpips: torch.nn.Module | None = None,
        clip: ClipGuide | None = None,
    ):
        self.generator = generator
        self.trained = trained
        self.name = name
        self.show_progress = True
        generator.requires_grad_(False).eval()
        self.inverter, self.face_parser, self.identity, self.lpips, self.clip = (
            inverter, face_parser, identity, lpips, clip)
        for module in (inverter, face_parser, identity, lpips):
            if module is not None:
                module.eval().requires_grad_(False)
        # One generation at a time: feature capture swaps U-Net processors for the duration of a pass, and
        # the 3D mean-latent cache is shared by the Space's worker threads.
        self.lock = threading.RLock()
        # 3D: camera-conditioned mean latents, (label, device, dtype) -> [style_dim], least recent first.
        self._conditioned_means: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __getstate__(self):
        # Locks cannot be copied; ``copy.deepcopy(pipe)`` gives an independent pipeline with its own.
        state = self.__dict__.copy()
        state["lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @property
    def editing_components(self) -> dict:
        """The editing components that are loaded, by manifest name."""
        return {name: getattr(self, name) for name in EDITING_COMPONENTS if getattr(self, name) is not None}

    @classmethod
    def from_pipe(cls, pipe: FacePipelineBase, **editing) -> FacePipelineBase:
        """A pipeline sharing every network and the lock of ``pipe``, with editing components added, replaced or
        (given as None) left out — diffusers' ``from_pipe``. ``pipe`` itself is unchanged.

        Raises:
            InvalidSettingError: a name that is not an editing component.
        """
        unknown = sorted(set(editing) - set(EDITING_COMPONENTS))
        if unknown:
            raise InvalidSettingError(f"from_pipe adds editing components ({', '.join(EDITING_COMPONENTS)}), not "
                                      f"{', '.join(unknown)}")
        clone = copy.copy(pipe)
        clone.lock = pipe.lock  # one generation at a time across both: they share the networks
        clone.__dict__.pop("_generation_view", None)
        for name, part in editing.items():
            if isinstance(part, torch.nn.Module):
                part.eval().requires_grad_(False)
            setattr(clone, name, part)
        return clone

    @property
    def generation(self) -> FacePipelineBase:
        """This pipeline without its editing components (sharing every network and the lock): what
        ``FaceEditPipeline.generation`` was when editing was a separate object; its default mode is "fast"."""
        if not self.editing_components:
            return self
        view = self.__dict__.get("_generation_view")
        if view is None:
            view = self.from_pipe(self, **{name: None for name in EDITING_COMPONENTS})
            self.__dict__["_generation_view"] = view
        return view

    @property
    def default_mode(self) -> str:
        """"fast" with trained networks; "invert" (training-free) when they are untrained, the engine draws with a
        diffusion model and an inverter is loaded."""
        return "invert" if self.can_invert and not self.trained and self.inverter is not None else "fast"

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "tiny",
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        load_vae: bool = True,
        editing: bool = False,
        component_cache: ComponentCache | None = None,
    ) -> FacePipelineBase:
        """Load a pipeline of the engine its preset or manifest names.

        Args:
            name_or_path: ``"tiny"`` (built-in untrained toy preset), ``"tiny-eg3d"`` (the same with a toy
                3D-aware EG3D generator), ``"tiny-mm2latent"`` / ``"tiny-eg3d-mm2latent"`` (the toy MM2Latent engine,
                no diffusion model, with the tiny StyleGAN2 / EG3D),
                ``"full-random"`` / ``"full-random-mm2latent"`` (real sizes, random weights, for benchmarks),
                ``"public"`` (the public networks, untrained M and T: load it with ``editing=True`` for
                ``mode="invert"``), a local folder written by ``save_pretrained``, or a Hub repository holding an
                ``mm2latent.json`` manifest. The manifest's ``"engine"`` ("ddgi" when absent) picks the class:
                :class:`~mm2latent.pipelines.ddgi.FacePipeline` or
                :class:`~mm2latent.pipelines.mm2latent_engine.MM2LatentPipeline`.
            revision: Hub revision of that repository.
            device: default CUDA when available, else CPU.
            dtype: a torch dtype or its name; default ("auto") float16 on CUDA, float32 on CPU (bfloat16 on a
                CPU with AMX/AVX512-BF16 halves memory and time, see benchmarks/README.md).
            load_vae: keep the VAE (DDGI; needed only for I^d_0 previews and training; loaded on first use anyway).
            editing: also load the editing components the preset or manifest has (photo encoder, face parser,
                identity, LPIPS, CLIP): photo editing and, for DDGI, ``mode="invert"``. ``"tiny"`` and
                ``"tiny-mm2latent"`` come with toy ones.
            component_cache: a :class:`~.components.ComponentCache` shared by the pipelines of one process (the
                Space's): components they have in common (the same files, the tiny presets' encoder) are loaded
                once and are the same objects in each. Only for pipelines on one device and dtype that are
                never trained (a shared module moves and changes with every pipeline holding it).

        Raises:
            InvalidSettingError: an engine's own class (e.g. ``MM2LatentPipeline``) asked to load another engine.
        """
        device = torch.device(device) if device is not None else _default_device()
        dtype = resolve_dtype(dtype, device)
        name = str(name_or_path)
        if name in PRESETS:
            from . import presets

            target = pipeline_class(PRESET_ENGINES.get(name, DEFAULT_ENGINE))
            cls._check_engine_class(target)
            parts = presets.build_preset(name, dtype=dtype, cache=component_cache)
            if editing:
                parts.update(presets.build_editing_components(name, parts["generator"]))
            pipe = target(**parts, trained=False, name=name)
            if editing and name == "public":  # the training-free mode's fast drawing (LCM-LoRA)
                pipe.few_step = presets.public_few_step()
        else:
            manifest, parts = load_components(name_or_path, revision, dtype, skip=() if load_vae else ("vae",),
                                              cache=component_cache)
            if editing:
                parts.update(load_components(name_or_path, revision, pipeline="editing", cache=component_cache)[1])
            target = pipeline_class(manifest.get("engine", DEFAULT_ENGINE))
            cls._check_engine_class(target)
            pipe = target.from_components(parts, trained=bool(manifest.get("pipeline", {}).get("trained", False)),
                                          name=name)
        return pipe.to(device, dtype)

    @classmethod
    def _check_engine_class(cls, target: type[FacePipelineBase]) -> None:
        # FacePipeline (DDGI) is the library's entry point for every engine (as diffusers' DiffusionPipeline).
        if cls not in (FacePipelineBase, pipeline_class(DEFAULT_ENGINE)) and not issubclass(target, cls):
            raise InvalidSettingError(f"this model runs the {target.engine} engine ({target.__name__}), not "
                                      f"{cls.__name__}'s; load it with FacePipeline.from_pretrained")

    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> FacePipelineBase:
        """Assemble a pipeline from loaded manifest components ({"generator": ..., ...}; editing ones optional)."""
        raise NotImplementedError

    def engine_components(self) -> dict:
        """The engine's networks (with G) by manifest name."""
        raise NotImplementedError

    def components(self) -> dict:
        """Every network by manifest name: the engine's and the editing components that are loaded."""
        return {**self.engine_components(), **self.editing_components}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write every component (safetensors + configs) and the ``mm2latent.json`` manifest (with the engine)."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        entries = save_components(self.components(), root)
        write_manifest(root, entries, {"trained": self.trained, "source": self.name}, engine=self.engine)
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FacePipelineBase:
        """Move every network to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        for part in self.components().values():
            if movable(part):
                part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.generator.latent_avg.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.latent_avg.dtype

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    # ------------------------------------------------------------------ what the engine decides
    def check_request(self, request: GenerationRequest) -> None:
        """What depends on the loaded model (the engine's inputs and modes, the generator's rendering options).

        Raises:
            UnsupportedConditionError, InvalidSettingError.
        """
        raise NotImplementedError

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys run as one batch (everything that shapes the computation)."""
        raise NotImplementedError

    def request_settings(self, request: GenerationRequest) -> dict:
        """The settings an output (and its PNG metadata) records for ``request``."""
        return request.settings()

    def _generate_group(self, requests: list[GenerationRequest],
                        callback_on_step_end: StepCallback | None = None) -> list[FacePipelineOutput]:
        raise NotImplementedError

    # ------------------------------------------------------------------ 5. rendering
    def resolve_render_kwargs(self, render_kwargs: dict, counts: Sequence[int]) -> RenderSettings:
        """Check rendering options against the loaded generator (see :func:`.rendering.resolve_render_kwargs`:
        a 3D generator's :data:`~.rendering.CAMERA_OPTIONS`, a 2D one's ``synthesis`` options).

        Raises:
            InvalidSettingError: an option the generator does not take, a bad camera, a list of cameras of
                another length, a bad flag or resolution.
        """
        return rendering.resolve_render_kwargs(self.generator, render_kwargs, counts)

    def conditioned_mean_latents(self, cameras: torch.Tensor) -> torch.Tensor:
        """3D: the mean latent of the mapping network at each conditioning camera label, ``[N, 25]`` -> ``[N, D]``.

        Each mean averages :data:`CONDITIONED_MEAN_SAMPLES` z drawn from :data:`CONDITIONED_MEAN_SEED`; the
        last :data:`CONDITIONED_MEAN_CACHE_SIZE` cameras are cached.
        """
        like = self.generator.latent_avg
        means = []
        with self.lock:  # the cache is shared by the Space's worker threads
            for label in cameras:
                key = (tuple(label.tolist()), str(like.device), like.dtype)
                if key in self._conditioned_means:
                    self._conditioned_means.move_to_end(key)
                else:
                    rng = torch.Generator().manual_seed(CONDITIONED_MEAN_SEED)
                    self._conditioned_means[key] = self.generator.mean_latent(CONDITIONED_MEAN_SAMPLES, rng, label)
                    while len(self._conditioned_means) > CONDITIONED_MEAN_CACHE_SIZE:
                        self._conditioned_means.popitem(last=False)
                means.append(self._conditioned_means[key])
        return torch.stack(means)

    def truncate(self, latents: torch.Tensor, truncation: float | torch.Tensor = 1.0,
                 conditioning_camera=None) -> torch.Tensor:
        """Pull latents ``[B, L, D]`` toward the mean latent: ``w̄ + ψ (w − w̄)`` (ψ a float or ``[B]``).

        w̄ is the generator's mean latent; with a ``conditioning_camera`` (3D generators; one camera or one per
        image, in any form of :meth:`resolve_render_kwargs`) it is the mean latent at that camera. ψ = 1
        returns ``latents`` unchanged whatever the camera.
        """
        if conditioning_camera is None:
            return self.generator.truncate(latents, truncation)
        settings = self.resolve_render_kwargs({"conditioning_camera": conditioning_camera}, [latents.shape[0]])
        return self._truncate(latents, truncation, settings.conditioning)

    def _truncate(self, latents: torch.Tensor, truncation: float | torch.Tensor,
                  conditioning: torch.Tensor | None) -> torch.Tensor:
        if conditioning is None or (not isinstance(truncation, torch.Tensor) and float(truncation) == 1.0):
            return self.generator.truncate(latents, truncation)
        return truncate_latents(latents, self.conditioned_mean_latents(conditioning), truncation)

    @torch.no_grad()
    def render_outputs(self, latents: torch.Tensor, truncation: float | torch.Tensor = 1.0,
                       noise_mode: str = "const", **render_kwargs) -> RenderedImages:
        """Stage 5 with everything it produces: images, the truncated latents, and for a 3D generator the
        cameras and on request depth maps and raw neural renderings (see :meth:`resolve_render_kwargs`)."""
        settings = self.resolve_render_kwargs(render_kwargs, [latents.shape[0]])
        with self.lock, record_function("mm2latent.render"):
            return rendering.synthesize(self.generator, self._truncate(latents, truncation, settings.conditioning), noise_mode, settings)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, truncation: float | torch.Tensor = 1.0, noise_mode: str = "const",
               **render_kwargs) -> torch.Tensor:
        """Stage 5: truncate (ψ a float or one per image, [B]) and render with G: [B, 3, R, R] in [-1, 1].

        ``render_kwargs``: a 3D generator's ``camera``, ``conditioning_camera`` and
        ``neural_rendering_resolution`` (see :meth:`resolve_render_kwargs`); depth maps and raw renderings
        come from :meth:`render_outputs`. A 2D generator's ``synthesis`` gets them unchanged.
        """
        if render_kwargs.get("return_depth") or render_kwargs.get("return_raw_image"):
            raise InvalidSettingError("render returns the images only; render_outputs also returns depth maps and "
                                      "raw renderings")
        return self.render_outputs(latents, truncation, noise_mode, **render_kwargs).images

    @torch.no_grad()
    def render_views(
        self,
        latents: torch.Tensor,
        yaws: float | Sequence[float] | None = None,
        pitches: float | Sequence[float] = 0.0,
        *,
        cameras=None,
        truncation: float | torch.Tensor = 1.0,
        noise_mode: str = "const",
        conditioning_camera=None,
        return_depth: bool = False,
        return_raw_image: bool = False,
        neural_rendering_resolution: int | None = None,
        rng: torch.Generator | None = None,
    ) -> views.MultiViewOutput:
        """3D: each latent seen from several cameras; the tri-planes are computed once per latent.

        Args:
            latents: ``[B, L, D]`` (e.g. a call's ``output.latents``, already truncated: keep ψ = 1).
            yaws: the views' yaws in degrees (positive: the camera moves to the image's right).
            pitches: their pitches in degrees (positive: the camera moves down); one for all or one per yaw.
            cameras: instead of yaws and pitches: ``[V, 2]`` (yaw°, pitch°) or ``[V, 25]`` labels.
            truncation: ψ toward the mean latent (1 = none).
            noise_mode: the generator's noise. In "const" and "none" each view equals ``render`` at that
                camera; in "random" one noise draw serves every view.
            conditioning_camera: the camera whose mean latent truncation pulls toward (None: w̄).
            return_depth: also return depth maps.
            return_raw_image: also return the neural renderings before super-resolution.
            neural_rendering_resolution: side of the volume rendering (default the model's).
            rng: source of the random draws (noise in mode "random", ray samples).

        Returns:
            :class:`~mm2latent.pipelines.views.MultiViewOutput`: images ``[B, V, 3, R, R]``, cameras ``[V, 25]``.
        """
        generator = views.require_3d(self.generator, "rendering several views")
        labels = views.view_cameras(generator, yaws, pitches, cameras)
        settings = self.resolve_render_kwargs({"conditioning_camera": conditioning_camera,
                                               "neural_rendering_resolution": neural_rendering_resolution},
                                              [latents.shape[0]])
        with self.lock:
            ws = self._truncate(latents, truncation, settings.conditioning)
            rendered = list(views.iter_views(generator, ws, labels.to(ws.device), noise_mode, rng,
                                             settings.neural_rendering_resolution, self.show_progress))

        def stack(name: str) -> torch.Tensor:
            return torch.stack([getattr(view, name).float().cpu() for view in rendered], dim=1)

        return views.MultiViewOutput(images=stack("image"), cameras=labels, latents=ws.float().cpu(),
                                     depth=stack("depth") if return_depth else None,
                                     raw_images=stack("image_raw") if return_raw_image else None)


    def render_turntable(
        self,
        latents: torch.Tensor,
        path: str | os.PathLike,
        num_frames: int = 24,
        fps: float = 24.0,
        *,
        truncation: float | torch.Tensor = 1.0,
        conditioning_camera=None,
        neural_rendering_resolution: int | None = None,
        **options,
    ) -> Path:
        """3D: a video of the camera circling the face, written as it renders (:func:`.views.turntable`).

        Args:
            latents: ``[B, L, D]`` or one latent ``[L, D]`` (e.g. ``output.latents[0]`` of a call: those are
                already truncated, so keep ``truncation=1`` to see that image's face).
            path: ``.mp4`` (H.264, plays in browsers) or ``.gif``.
            num_frames: frames of one loop (1..1000).
            fps: frames per second.
            truncation: ψ toward the mean latent (1 = none).
            conditioning_camera: the camera whose mean latent truncation pulls toward (None: w̄).
            neural_rendering_resolution: side of the volume rendering (default: the model's).
            options: :func:`.views.turntable`'s ``noise_mode``, ``yaw_amplitude``, ``pitch``, ``pitch_amplitude``,
                ``content`` and ``rng``.

        Returns:
            The path written.
        """
        settings = self.resolve_render_kwargs({"conditioning_camera": conditioning_camera,
                                               "neural_rendering_resolution": neural_rendering_resolution},
                                              [1 if latents.ndim == 2 else latents.shape[0]])
        return views.turntable(
            self.generator, latents, path, num_frames, fps, lock=self.lock,
            truncate=lambda ws: self._truncate(ws, truncation, settings.conditioning),
            neural_rendering_resolution=settings.neural_rendering_resolution, show_progress=self.show_progress,
            **options)

    # ------------------------------------------------------------------ the whole call
    def __call__(
        self,
        prompt: str | None = None,
        mask=None,
        scribble=None,
        seed: int | None = None,
        mode: str | None = None,
        num_steps: int | None = None,
        feature_steps: list[int] | None = None,
        truncation: float = 1.0,
        num_images: int = 1,
        return_intermediates: bool = False,
        return_diffusion_image: bool = False,
        combine: str = "mean",
        guidance_scale: float | None = None,
        noise_mode: str = "const",
        camera=None,
        conditioning_camera=None,
        return_depth: bool = False,
        return_raw_image: bool = False,
        refine_steps: int | None = None,
        callback_on_step_end: StepCallback | None = None,
        drawing: str | None = None,
        faithfulness: str | None = None,
        **render_kwargs,
    ) -> FacePipelineOutput:
        """Generate faces. The same call for every engine; the arguments marked DDGI are the diffusion engine's
        (the MM2Latent engine refuses ``mode`` other than "fast", ``return_diffusion_image`` and ``guidance_scale``
        with a typed error, and ignores the step settings; its seed is explained in
        :mod:`~mm2latent.pipelines.mm2latent_engine`).

        Args:
            prompt: a description ("She has long wavy blonde hair and is smiling."); may be empty when a
                mask or scribble is given. With neither mask nor scribble, generation is text-only.
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map).
            scribble: a sketch (white-on-black or black-on-white).
            seed: 0..2**32-1; random when None. Image i uses seed + i.
            mode: "fast" (one U-Net pass at t = T), DDGI "quality" (DDIM steps, latents combined) or DDGI "invert"
                (training-free: the diffusion model draws I^d_0, the inverter maps it to W+; needs an inverter);
                default :attr:`default_mode`.
            num_steps: DDGI: DDIM steps (quality mode, and the preview's denoising); default 20.
            feature_steps: DDGI: which steps feed the latent (quality mode); default all.
            truncation: ψ, pulls latents toward the mean (1 = none).
            num_images: images in one batch (1..16).
            return_intermediates: also return per-step w_t and (DDGI) per-word attention maps.
            return_diffusion_image: DDGI: also denoise ``num_steps`` steps and decode I^d_0 (a full sampling).
            combine: DDGI: how quality mode merges per-step latents ("mean" or "coarse-to-fine").
            guidance_scale: DDGI: classifier-free guidance of the diffusion sampling (default 7.5 in invert mode,
                else 1 = off).
            noise_mode: the generator's noise: "const", "random" or "none".
            camera: 3D generators: where the faces are seen from: (yaw°, pitch°) (default (0, 0), frontal), a
                25-number label, or one of either per image (see :meth:`resolve_render_kwargs`).
            conditioning_camera: 3D: truncation pulls toward the mean latent at this camera (default: the
                checkpoint's w̄, as official EG3D truncation); changes nothing at ψ = 1.
            return_depth: 3D: also return depth maps (``output.depth``).
            return_raw_image: 3D: also return the neural renderings before super-resolution.
            refine_steps: invert mode: optimisation steps after the inverter (L2 + LPIPS to I^d_0, the mask's
                cross-entropy through the face parser, a latent regulariser); 0 = the inverter's answer; None =
                the ``faithfulness`` budget.
            drawing: invert mode: "fast" (4 LCM steps with the fused LCM-LoRA ``few_step``) or "quality" (20 DDIM
                steps with guidance); default "fast" when ``few_step`` is loaded. Sets the defaults of
                ``num_steps`` and ``guidance_scale``.
            faithfulness: invert mode: a budget of :data:`~mm2latent.editing.closeness.FAITHFULNESS` ("encoder",
                "balanced", "close"); default "balanced" unless ``refine_steps`` is given.
            callback_on_step_end: invert mode: called after each step of the drawing of I^d_0
                (``callback(pipe, step_index, timestep, state)``, see :mod:`~mm2latent.pipelines.sampling`;
                :func:`~mm2latent.pipelines.sampling.preview_callback` shows it forming); ``{"stop": True}``
                ends the drawing there and inverts what was drawn so far.
            render_kwargs: other options of the generator (``neural_rendering_resolution`` for EG3D).
        """
        # Only what was asked for enters the request: a 2D call's settings (and PNG metadata) stay as they were.
        for name, value in (("camera", camera), ("conditioning_camera", conditioning_camera),
                            ("return_depth", return_depth or None), ("return_raw_image", return_raw_image or None)):
            if value is not None:
                render_kwargs[name] = value
        mode = mode or self.default_mode
        if mode == "invert":
            drawing = drawing or getattr(self, "default_drawing", "quality")
            faithfulness = faithfulness or (DEFAULT_FAITHFULNESS if refine_steps is None else None)
        request = GenerationRequest.create(
            prompt, mask, scribble, seed, mode, num_steps, feature_steps, truncation, num_images,
            combine, guidance_scale, noise_mode, return_intermediates, return_diffusion_image, render_kwargs,
            refine_steps or 0, drawing=drawing, faithfulness=faithfulness)
        return self.generate(request, callback_on_step_end=callback_on_step_end)

    def generate(self, request: GenerationRequest,
                 callback_on_step_end: StepCallback | None = None) -> FacePipelineOutput:
        """Run one validated request (see :class:`~mm2latent.pipelines.request.GenerationRequest`); the callback
        watches invert mode's drawing (see :meth:`__call__`)."""
        return self.generate_batch([request], callback_on_step_end=callback_on_step_end)[0]

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest],
                       callback_on_step_end: StepCallback | None = None) -> list[FacePipelineOutput]:
        """Several requests in as few batched passes as possible (what a Space queue that batches calls).

        Requests with the same :meth:`batch_key` (visual inputs, mode, steps, guidance, preview, noise mode,
        rendering options) share one pass of the engine and one generator pass; their prompts, masks, seeds and
        truncations may all differ. Each output equals the request run alone up to batched-kernel rounding.
        Invert-mode requests run one at a time, each drawing watched by ``callback_on_step_end``.
        """
        for request in requests:
            self.check_request(request)
        results: list[FacePipelineOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self.batch_key(request), []).append(index)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            for index, output in zip(indices, self._generate_group(group, callback_on_step_end)):
                results[index] = output
        return results  # type: ignore[return-value]

    def render_requests(self, requests: Sequence[GenerationRequest], latents: torch.Tensor,
                        previews: Sequence[dict[str, Image.Image]]) -> list[FacePipelineOutput]:
        """Stage 5 of a batch of requests and their outputs: each request's ψ, G, and the 3D by-products.

        Args:
            requests: the requests of one batch (same :meth:`batch_key`).
            latents: the engine's latents, ``num_images`` rows per request in order, [B, L, D] (not truncated).
            previews: each request's condition images (``FacePipelineOutput.condition_images``).

        Returns:
            one output per request, with images, truncated latents, seeds, settings (with the engine) and
            cameras / depth / raw renderings as asked; the engine adds its own extras.
        """
        counts = [r.num_images for r in requests]
        psis = [r.truncation for r, n in zip(requests, counts) for _ in range(n)]
        # One ψ for the batch keeps ψ = 1 exact (no arithmetic); mixed ψ go in as one value per image.
        truncation = psis[0] if len(set(psis)) == 1 else torch.tensor(psis)
        render_settings = self.resolve_render_kwargs(requests[0].render_kwargs, counts)
        truncated = self._truncate(latents, truncation, render_settings.conditioning)
        with self.lock:
            rendered = rendering.synthesize(self.generator, truncated, requests[0].noise_mode, render_settings)
        images = tensor_to_pil(rendered.images)
        truncated = truncated.float().cpu()
        outputs, start = [], 0
        for request, condition_images, count in zip(requests, previews, counts):
            rows = slice(start, start + count)
            settings = {**self.request_settings(request), "inputs": sorted(condition_images), "model": self.name,
                        "trained": self.trained, "engine": self.engine}
            output = FacePipelineOutput(images=images[rows], latents=truncated[rows], seeds=request.seeds,
                                        settings=settings, condition_images=condition_images)
            if rendered.cameras is not None:
                output.cameras = rendered.cameras[rows].float().cpu()
                if settings.get("camera") is None:
                    settings["camera"] = [0.0, 0.0]  # what the default frontal camera is, as (yaw°, pitch°)
                settings.setdefault("conditioning_camera", None)
            if rendered.depth is not None:
                output.depth = rendered.depth[rows].float().cpu()
            if rendered.raw_images is not None:
                output.raw_images = tensor_to_pil(rendered.raw_images[rows])
            outputs.append(output)
            start += count
        return outputs
