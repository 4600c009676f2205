"""``FacePipeline``: text + mask/scribble -> diffusion features -> M and T -> W+ -> the GAN's face.

:class:`FacePipelineBase` holds what every engine shares (loading, saving, the call, batching, stage 5 and the
output); :class:`FacePipeline` is the DDGI engine below, :class:`~.mm2latent_engine.MM2LatentPipeline` the
MM2Latent one. ``FacePipeline.from_pretrained`` returns whichever the preset or manifest names.

The method is written once, as public stages that every caller composes (``__call__``, batched requests,
photo editing, the benchmark, training):

1. :meth:`FacePipeline.prepare_conditions` — mask / scribble -> ControlNet images;
2. :meth:`FacePipeline.encode_prompts` — prompts -> CLIP embeddings (batched, cached);
3. :meth:`FacePipeline.prepare_noise` — seeds -> initial latents z_T;
4. :meth:`FacePipeline.predict_latents` — one U-Net(+ControlNet) pass per feature step, then M and T:
   w = w^m ⊙ w^γ + w^β (:meth:`FacePipeline.latents_from_features` on given features);
5. :meth:`FacePipeline.render` — truncation and the generator.

With a 3D-aware generator (EG3D) the last stage takes a camera: ``pipe(..., camera=(yaw°, pitch°))``,
``pipe.render(latents, camera=...)``, and :meth:`FacePipeline.render_views` renders one face from several
cameras (tri-planes computed once); :mod:`.views` writes turntable videos.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from PIL import Image
from torch.profiler import record_function
from tqdm.auto import tqdm

from ..errors import CheckpointFormatError, InvalidSettingError, InvalidStepsError, UnsupportedConditionError
from ..inputs.conditions import (
    mask_to_color,
    parse_mask,
    parse_scribble,
    scribble_is_empty,
    scribble_to_image,
)
from ..inputs.images import tensor_to_pil
from ..models.diffusion_encoder import MODALITIES, DiffusionEncoder, EncoderFeatures, PromptBatch
from ..models.generator import Generator, is_3d, truncate_latents
from ..models.mapping import MappingNetwork, Modulation, StyleModulationNetwork, word_attention_maps
from ..models.stylegan2 import LATENT_AVG_SAMPLES
from . import views
from .components import load_components, save_components, write_manifest
from .request import COMBINE, MAX_IMAGES, MAX_SEED, MAX_STEPS, MODES, GenerationRequest, check_integer
from .sampling import (
    DEFAULT_STEP_TENSORS,
    STOP,
    DenoisingOutput,
    StepCallback,
    check_step_tensors,
    predicted_clean_latents,
    schedule_timesteps,
    step_kwargs,
)

__all__ = [
    "CAMERA_OPTIONS", "COMBINE", "ENGINES", "MAX_IMAGES", "MAX_SEED", "MAX_STEPS", "MODES", "PRESETS",
    "PRESET_ENGINES", "FacePipeline", "FacePipelineBase", "FacePipelineOutput", "GenerationRequest",
    "LatentPrediction", "RenderSettings", "RenderedImages", "parse_visual_inputs", "pipeline_class", "resolve_dtype",
]

#: The engines: DDGI's diffusion features -> M, T (:class:`FacePipeline`), or MM2Latent's CLIP text embedding
#: and mask / sketch autoencoder codes -> one mapper (:class:`~.mm2latent_engine.MM2LatentPipeline`). A manifest
#: names its engine in ``"engine"``; absent means DDGI.
ENGINES = ("ddgi", "mm2latent")
DEFAULT_ENGINE = "ddgi"
# Built-in presets: name -> builder in presets.py. "tiny", "tiny-eg3d", "tiny-mm2latent", "tiny-eg3d-mm2latent",
# "full-random" and "full-random-mm2latent" have deterministic random (untrained) weights; "public" gathers the
# public networks (untrained M and T: use the training-free mode).
PRESETS = {"tiny": "build_tiny_components", "tiny-eg3d": "build_tiny_eg3d_components",
           "tiny-mm2latent": "build_tiny_mm2latent_pipeline_components",
           "tiny-eg3d-mm2latent": "build_tiny_eg3d_mm2latent_pipeline_components",
           "full-random": "build_full_size_components",
           "full-random-mm2latent": "build_full_size_mm2latent_pipeline_components",
           "public": "build_public_components"}
#: The engine of each preset that is not DDGI's.
PRESET_ENGINES = {"tiny-mm2latent": "mm2latent", "tiny-eg3d-mm2latent": "mm2latent", "full-random-mm2latent": "mm2latent"}

#: The rendering options (``render_kwargs``, also ``GenerationRequest.render_kwargs``) of a 3D generator.
CAMERA_OPTIONS = ("camera", "conditioning_camera", "return_depth", "return_raw_image", "neural_rendering_resolution")
MAX_NEURAL_RENDERING_RESOLUTION = 512
# The camera-conditioned mean latent is an average over this many z drawn from this seed: fixed, so one
# camera always gives the same mean (and the same truncated face) in every process.
CONDITIONED_MEAN_SAMPLES = LATENT_AVG_SAMPLES
CONDITIONED_MEAN_SEED = 0
# Conditioned means kept per pipeline (a Space's camera sliders visit many cameras; an entry is one w).
CONDITIONED_MEAN_CACHE_SIZE = 64


@dataclass
class FacePipelineOutput:
    """What one call returns.

    Attributes:
        images: the generated faces.
        latents: their W+ latents, [B, L, style_dim] (float32, CPU).
        seeds: the seed of each image (image i of a call with seed s uses s + i).
        settings: everything needed to reproduce the call (also written into PNG metadata).
        condition_images: the visual inputs as the model saw them ("mask" colour map, "scribble").
        step_latents: with ``return_intermediates``: w_t of each feature step, [S, B, L, D].
        timesteps: the diffusion timestep of each feature step.
        attention_words: with ``return_intermediates``: the prompt's words (sub-word pieces merged).
        attention_maps: per-word cross-attention maps Ā, [B, n_words, H, W], each scaled to peak 1.
        diffusion_images: with ``return_diffusion_image``: I^d_0, what the diffusion model itself draws.
        warnings: notes for the user (e.g. the prompt was truncated to what CLIP reads).
        cameras: 3D generators: the camera label each image was rendered from, [B, 25]. The settings hold
            the camera as given (``"camera"``; default [0, 0]: frontal yaw and pitch) and the conditioning
            camera (``"conditioning_camera"``; None: the checkpoint's w̄).
        depth: 3D, with ``return_depth``: expected ray depth in world units, [B, 1, n, n] (float32, CPU;
            :func:`~mm2latent.pipelines.views.depth_to_image` shows one).
        raw_images: 3D, with ``return_raw_image``: the neural renderings before super-resolution (n x n).
        closeness: the training-free mode: per image, how close G(w) is to I^d_0 (``l2``, ``lpips``, ``miou``;
            :func:`~mm2latent.editing.closeness.measure_closeness`).
    """

    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    settings: dict
    condition_images: dict[str, Image.Image] = field(default_factory=dict)
    step_latents: torch.Tensor | None = None
    timesteps: list[int] = field(default_factory=list)
    attention_words: list[str] = field(default_factory=list)
    attention_maps: torch.Tensor | None = None
    diffusion_images: list[Image.Image] | None = None
    warnings: list[str] = field(default_factory=list)
    cameras: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    raw_images: list[Image.Image] | None = None
    closeness: list[dict] | None = None


@dataclass(frozen=True)
class RenderSettings:
    """Rendering options (``render_kwargs``) checked against the loaded generator, for a batch of B images.

    Attributes:
        cameras: 3D: the rendering camera of each image, [B, 25] (frontal when none was given); 2D: None.
        conditioning: 3D: the conditioning camera of each image, [B, 25], whose mean latent truncation pulls
            toward; None: the checkpoint's w̄ (what official truncation uses).
        return_depth: also return depth maps.
        return_raw_image: also return the neural renderings before super-resolution.
        neural_rendering_resolution: side of the volume rendering (None: the model's).
        extra: 2D: other keyword arguments of the generator's ``synthesis``, passed through unchanged.
    """

    cameras: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None
    return_depth: bool = False
    return_raw_image: bool = False
    neural_rendering_resolution: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RenderedImages:
    """Stage 5's output with its 3D by-products.

    Attributes:
        images: [B, 3, R, R] in [-1, 1] (the generator's device and dtype).
        latents: the truncated latents that were rendered, [B, L, D].
        cameras: 3D: the camera label of each image, [B, 25].
        depth: 3D, on request: expected ray depth, [B, 1, n, n].
        raw_images: 3D, on request: the neural renderings, [B, 3, n, n] in [-1, 1].
    """

    images: torch.Tensor
    latents: torch.Tensor
    cameras: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    raw_images: torch.Tensor | None = None


@dataclass
class LatentPrediction:
    """Stage 4's output for a batch of B samples and S feature steps.

    Attributes:
        latents: the latent of each sample, the per-step latents combined, [B, L, D] (not truncated).
        step_latents: w_t = w^m_t ⊙ w^γ_t + w^β_t of each step, [S, B, L, D].
        w_m: M's latents w^m_t, [S, B, L, D].
        gamma: T's scales w^γ_t, [S, B, L, D].
        beta: T's shifts w^β_t, [S, B, L, D].
        attention: T's word-averaged attention Ā_t, [S, B, 1, H, W].
        timesteps: the diffusion timestep of each step.
        token_maps: with ``return_attention``: per-token cross-attention maps averaged over the steps,
            [B, 77, H, W] (float32, CPU).
        features: with ``return_features``: the encoder's features of each step.
        diffusion_images: with ``decode``: I^d_0, [B, 3, H, W] in [-1, 1].
    """

    latents: torch.Tensor
    step_latents: torch.Tensor
    w_m: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    attention: torch.Tensor
    timesteps: list[int]
    token_maps: torch.Tensor | None = None
    features: list[EncoderFeatures] | None = None
    diffusion_images: torch.Tensor | None = None

    def modulation(self, step: int = 0) -> Modulation:
        """T's modulation at one feature step."""
        return Modulation(gamma=self.gamma[step], beta=self.beta[step], attention=self.attention[step])


@dataclass
class DiffusionDrawing:
    """What the diffusion model itself draws (:meth:`FacePipeline.draw`).

    Attributes:
        images: I^d_0, [B, 3, H, W] in [-1, 1] at the diffusion model's resolution.
        token_maps: per-token cross-attention maps of the first step, [B, 77, h, w] (when asked).
        timesteps: the timestep of the first step (whose attention maps these are).
        latents: the latents that were decoded, [B, 4, h, w].
        stopped: whether a step callback ended the sampling early (the images are then still noisy).
    """

    images: torch.Tensor
    token_maps: torch.Tensor | None
    timesteps: list[int]
    latents: torch.Tensor | None = None
    stopped: bool = False


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


def combine_steps(step_latents: torch.Tensor, combine: str = "mean") -> torch.Tensor:
    """[S, B, L, D] per-step latents -> [B, L, D].

    ``mean`` averages the steps. ``coarse-to-fine`` gives layer l the step ⌊l·S/L⌋: early, text-heavy
    steps feed the coarse layers, late, structure-heavy steps the fine ones.
    """
    if combine not in COMBINE:
        raise InvalidSettingError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    if combine == "mean":
        return step_latents.mean(dim=0)
    steps, _, layers, _ = step_latents.shape
    pick = torch.arange(layers) * steps // layers
    return step_latents[pick, :, torch.arange(layers)].permute(1, 0, 2)


def word_maps(token_maps: torch.Tensor, word_tokens: list[list[int]]) -> torch.Tensor:
    """Per-word maps from per-token maps: the mean over each word's tokens, scaled to peak 1.

    Args:
        token_maps: [B, T, H, W] per-token maps.
        word_tokens: the token positions of each word (shared by the B samples).

    Returns:
        [B, n_words, H, W] in [0, 1].
    """
    if not word_tokens:
        return token_maps.new_zeros(token_maps.shape[0], 0, *token_maps.shape[2:])
    maps = torch.stack([token_maps[:, positions].mean(dim=1) for positions in word_tokens], dim=1)
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)




def pipeline_class(engine: str) -> type[FacePipelineBase]:
    """The pipeline class of an engine ("ddgi" or "mm2latent")."""
    if engine == "ddgi":
        return FacePipeline
    if engine == "mm2latent":
        from .mm2latent_engine import MM2LatentPipeline

        return MM2LatentPipeline
    raise CheckpointFormatError(f"unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")


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


class FacePipelineBase:
    """What every engine shares: loading and saving through the component registry, the call, batching, the
    rendering stage (truncation, G, cameras) and the output.

    An engine subclass predicts W+ latents from (prompt, mask, sketch, seed) in :meth:`_generate_group` and
    names its components; :meth:`from_pretrained` on this class or on :class:`FacePipeline` returns the
    engine's class that the preset or the manifest names (``pipe.engine``: "ddgi" or "mm2latent").

    Args:
        generator: the frozen GAN G (any :class:`~mm2latent.models.generator.Generator`: StyleGAN2, EG3D).
        trained: whether the engine's networks carry trained weights.
        name: where the pipeline was loaded from (for messages and metadata).
    """

    #: The engine's name, as manifests and settings record it.
    engine: str = ""

    def __init__(self, generator: Generator, trained: bool = False, name: str = "custom"):
        self.generator = generator
        self.trained = trained
        self.name = name
        self.show_progress = True
        generator.requires_grad_(False).eval()
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
    ) -> FacePipelineBase:
        """Load a pipeline of the engine its preset or manifest names.

        Args:
            name_or_path: ``"tiny"`` (built-in untrained toy preset), ``"tiny-eg3d"`` (the same with a toy
                3D-aware EG3D generator), ``"tiny-mm2latent"`` / ``"tiny-eg3d-mm2latent"`` (the toy MM2Latent engine,
                no diffusion model, with the tiny StyleGAN2 / EG3D),
                ``"full-random"`` / ``"full-random-mm2latent"`` (real sizes, random weights, for benchmarks),
                ``"public"`` (the public networks, untrained M and T: see ``FaceEditPipeline`` and
                ``mode="invert"``), a local folder written by ``save_pretrained``, or a Hub repository holding an
                ``mm2latent.json`` manifest. The manifest's ``"engine"`` ("ddgi" when absent) picks the class:
                :class:`FacePipeline` or :class:`~mm2latent.pipelines.mm2latent_engine.MM2LatentPipeline`.
            revision: Hub revision of that repository.
            device: default CUDA when available, else CPU.
            dtype: a torch dtype or its name; default ("auto") float16 on CUDA, float32 on CPU (bfloat16 on a
                CPU with AMX/AVX512-BF16 halves memory and time, see benchmarks/README.md).
            load_vae: keep the VAE (DDGI; needed only for I^d_0 previews and training; loaded on first use anyway).

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
            pipe = target(**getattr(presets, PRESETS[name])(dtype=dtype), trained=False, name=name)
        else:
            manifest, parts = load_components(name_or_path, revision, dtype, skip=() if load_vae else ("vae",))
            target = pipeline_class(manifest.get("engine", DEFAULT_ENGINE))
            cls._check_engine_class(target)
            pipe = target.from_components(parts, trained=bool(manifest.get("pipeline", {}).get("trained", False)),
                                          name=name)
        return pipe.to(device, dtype)

    @classmethod
    def _check_engine_class(cls, target: type[FacePipelineBase]) -> None:
        # FacePipeline is the library's entry point for every engine (as diffusers' DiffusionPipeline).
        if cls not in (FacePipelineBase, FacePipeline) and not issubclass(target, cls):
            raise InvalidSettingError(f"this model runs the {target.engine} engine ({target.__name__}), not "
                                      f"{cls.__name__}'s; load it with FacePipeline.from_pretrained")

    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> FacePipelineBase:
        """Assemble a pipeline from loaded manifest components ({"generator": ..., ...})."""
        raise NotImplementedError

    def components(self) -> dict:
        """Every network by manifest name."""
        raise NotImplementedError

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
            if isinstance(part, torch.nn.Module):
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

    def _generate_group(self, requests: list[GenerationRequest]) -> list[FacePipelineOutput]:
        raise NotImplementedError

    # ------------------------------------------------------------------ 5. rendering
    def resolve_render_kwargs(self, render_kwargs: dict, counts: Sequence[int]) -> RenderSettings:
        """Check rendering options against the loaded generator.

        A 3D generator takes :data:`CAMERA_OPTIONS`:

        * ``camera``: where each image is seen from: (yaw°, pitch°) on the model's orbit, ``[N, 2]`` angles, a
          25-number label or ``[N, 25]`` labels (:func:`~mm2latent.models.camera.parse_camera`); default the
          frontal camera. N is 1 (every image) or one per image.
        * ``conditioning_camera``: the same forms; truncation pulls toward the mean latent of the mapping
          network conditioned on this camera. Default None: the checkpoint's w̄ (NVIDIA's running mean over
          the training cameras, what official truncation uses).
        * ``return_depth``, ``return_raw_image``: booleans.
        * ``neural_rendering_resolution``: side of the volume rendering, 1..512 (default the model's).

        None values count as absent. A 2D generator takes none of them; other options go to its ``synthesis``.

        Args:
            render_kwargs: the options.
            counts: the images of each request that shares these options (``[B]`` for one batch): a camera
                list must give one camera per image of each.

        Raises:
            InvalidSettingError: an option the generator does not take, a bad camera, a list of cameras of
                another length, a bad flag or resolution.
        """
        given = {name: value for name, value in render_kwargs.items() if value is not None}
        if not is_3d(self.generator):
            camera_options = sorted(set(given) & set(CAMERA_OPTIONS))
            if camera_options:
                raise InvalidSettingError(
                    f"this model's generator ({type(self.generator).__name__}) is 2D: it takes no "
                    f"{', '.join(camera_options)}. Cameras and depth need a 3D generator such as EG3D (e.g. the "
                    "'tiny-eg3d' preset)")
            return RenderSettings(extra={k: v for k, v in render_kwargs.items() if k not in CAMERA_OPTIONS})
        unknown = sorted(set(given) - set(CAMERA_OPTIONS))
        if unknown:
            raise InvalidSettingError(f"unknown rendering option {', '.join(unknown)}; a 3D generator takes "
                                      f"{', '.join(CAMERA_OPTIONS)}")
        for flag in ("return_depth", "return_raw_image"):
            if not isinstance(given.get(flag, False), (bool, np.bool_)):
                raise InvalidSettingError(f"{flag} must be True or False, got {given[flag]!r}")
        resolution = given.get("neural_rendering_resolution")
        if resolution is not None:
            resolution = check_integer(resolution, "neural_rendering_resolution", 1, MAX_NEURAL_RENDERING_RESOLUTION)
        conditioning = given.get("conditioning_camera")
        return RenderSettings(
            cameras=self._per_image_cameras(given.get("camera", self.generator.default_camera()), counts, "camera"),
            conditioning=None if conditioning is None else self._per_image_cameras(conditioning, counts,
                                                                                    "conditioning_camera"),
            return_depth=bool(given.get("return_depth", False)),
            return_raw_image=bool(given.get("return_raw_image", False)),
            neural_rendering_resolution=resolution,
        )

    def _per_image_cameras(self, camera, counts: Sequence[int], name: str) -> torch.Tensor:
        """A camera spec as one label per image of each request: ``[sum(counts), 25]``."""
        labels = self.generator.camera_labels(camera, name=name)
        if labels.shape[0] == 1:
            return labels.expand(sum(counts), -1)
        if any(count != labels.shape[0] for count in counts):
            raise InvalidSettingError(f"{name} lists {labels.shape[0]} cameras for {'/'.join(map(str, counts))} "
                                      "images: give one camera, or one per image")
        return labels.repeat(len(counts), 1)

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

    def _synthesize(self, ws: torch.Tensor, noise_mode: str, settings: RenderSettings) -> RenderedImages:
        """Render truncated latents with checked settings."""
        if settings.cameras is None:
            return RenderedImages(self.generator.synthesis(ws, noise_mode=noise_mode, **settings.extra), ws)
        cameras = settings.cameras.to(ws.device)
        resolution = settings.neural_rendering_resolution
        if not (settings.return_depth or settings.return_raw_image):
            # synthesis, not render: the method speedups.compile_pipeline compiles.
            images = self.generator.synthesis(ws, noise_mode, camera=cameras, neural_rendering_resolution=resolution)
            return RenderedImages(images, ws, settings.cameras)
        out = self.generator.render(ws, cameras, noise_mode, neural_rendering_resolution=resolution)
        return RenderedImages(out.image, ws, settings.cameras, out.depth if settings.return_depth else None,
                              out.image_raw if settings.return_raw_image else None)

    @torch.no_grad()
    def render_outputs(self, latents: torch.Tensor, truncation: float | torch.Tensor = 1.0,
                       noise_mode: str = "const", **render_kwargs) -> RenderedImages:
        """Stage 5 with everything it produces: images, the truncated latents, and for a 3D generator the
        cameras and on request depth maps and raw neural renderings (see :meth:`resolve_render_kwargs`)."""
        settings = self.resolve_render_kwargs(render_kwargs, [latents.shape[0]])
        with self.lock, record_function("mm2latent.render"):
            return self._synthesize(self._truncate(latents, truncation, settings.conditioning), noise_mode, settings)

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
        generator = views.require_3d(self, "rendering several views")
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


    # ------------------------------------------------------------------ the whole call
    def __call__(
        self,
        prompt: str | None = None,
        mask=None,
        scribble=None,
        seed: int | None = None,
        mode: str = "fast",
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
            mode: "fast" (one U-Net pass at t = T) or DDGI "quality" (DDIM steps, latents combined).
            num_steps: DDGI: DDIM steps (quality mode, and the preview's denoising); default 20.
            feature_steps: DDGI: which steps feed the latent (quality mode); default all.
            truncation: ψ, pulls latents toward the mean (1 = none).
            num_images: images in one batch (1..16).
            return_intermediates: also return per-step w_t and (DDGI) per-word attention maps.
            return_diffusion_image: DDGI: also denoise ``num_steps`` steps and decode I^d_0 (a full sampling).
            combine: DDGI: how quality mode merges per-step latents ("mean" or "coarse-to-fine").
            guidance_scale: DDGI: classifier-free guidance of the diffusion sampling (default 1 = off).
            noise_mode: the generator's noise: "const", "random" or "none".
            camera: 3D generators: where the faces are seen from: (yaw°, pitch°) (default (0, 0), frontal), a
                25-number label, or one of either per image (see :meth:`resolve_render_kwargs`).
            conditioning_camera: 3D: truncation pulls toward the mean latent at this camera (default: the
                checkpoint's w̄, as official EG3D truncation); changes nothing at ψ = 1.
            return_depth: 3D: also return depth maps (``output.depth``).
            return_raw_image: 3D: also return the neural renderings before super-resolution.
            render_kwargs: other options of the generator (``neural_rendering_resolution`` for EG3D).
        """
        # Only what was asked for enters the request: a 2D call's settings (and PNG metadata) stay as they were.
        for name, value in (("camera", camera), ("conditioning_camera", conditioning_camera),
                            ("return_depth", return_depth or None), ("return_raw_image", return_raw_image or None)):
            if value is not None:
                render_kwargs[name] = value
        request = GenerationRequest.create(
            prompt, mask, scribble, seed, mode, num_steps, feature_steps, truncation, num_images, combine,
            guidance_scale, noise_mode, return_intermediates, return_diffusion_image, render_kwargs)
        return self.generate(request)


    def generate(self, request: GenerationRequest) -> FacePipelineOutput:
        """Run one validated request (see :class:`~mm2latent.pipelines.request.GenerationRequest`)."""
        return self.generate_batch([request])[0]

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[FacePipelineOutput]:
        """Several requests in as few batched passes as possible (what a Space queue that batches calls).

        Requests with the same :meth:`batch_key` (visual inputs, mode, steps, guidance, preview, noise mode,
        rendering options) share one pass of the engine and one generator pass; their prompts, masks, seeds and
        truncations may all differ. Each output equals the request run alone up to batched-kernel rounding.
        """
        for request in requests:
            self.check_request(request)
        results: list[FacePipelineOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self.batch_key(request), []).append(index)
        for indices in groups.values():
            for index, output in zip(indices, self._generate_group([requests[i] for i in indices])):
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
            rendered = self._synthesize(truncated, requests[0].noise_mode, render_settings)
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


class FacePipeline(FacePipelineBase):
    """The DDGI engine: text + mask/scribble -> diffusion features -> M and T -> W+ -> G (``engine = "ddgi"``).

    ``FacePipeline.from_pretrained`` is also the entry point of every engine: it returns the class the preset or
    manifest names (see :meth:`FacePipelineBase.from_pretrained`).

    Args:
        encoder: the frozen diffusion encoder E (U-Net, ControlNets, text encoder, VAE, scheduler).
        generator: the frozen GAN G (any :class:`~mm2latent.models.generator.Generator`: StyleGAN2, EG3D).
        mapper: the mapping network M.
        modulator: the style modulation network T (AbSMNet).
        trained: whether M and T carry trained weights (False for the tiny preset and fresh models).
        name: where the pipeline was loaded from (for messages and metadata).
    """

    engine = "ddgi"

    def __init__(
        self,
        encoder: DiffusionEncoder,
        generator: Generator,
        mapper: MappingNetwork,
        modulator: StyleModulationNetwork,
        trained: bool = False,
        name: str = "custom",
    ):
        if mapper.num_ws != generator.num_ws or mapper.style_dim != generator.style_dim:
            raise ValueError(f"M outputs {mapper.num_ws}x{mapper.style_dim} latents but G expects "
                             f"{generator.num_ws}x{generator.style_dim}")
        super().__init__(generator, trained, name)
        self.encoder, self.mapper, self.modulator = encoder, mapper, modulator
        for module in (mapper, modulator):
            module.requires_grad_(False).eval()

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> FacePipeline:
        """Assemble a pipeline from loaded manifest components ({"unet": ..., "mapper": ..., ...})."""
        encoder = DiffusionEncoder(
            unet=parts["unet"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
            scheduler=parts["scheduler"], vae=parts.get("vae"),
            controlnets={m: parts[f"controlnet_{m}"] for m in MODALITIES if f"controlnet_{m}" in parts},
        )
        return cls(encoder=encoder, generator=parts["generator"], mapper=parts["mapper"],
                   modulator=parts["modulator"], trained=trained, name=name)

    def components(self) -> dict:
        """Every network by manifest name (parts not loaded yet appear as their lazy loaders)."""
        return {**self.encoder.parts(), "tokenizer": self.encoder.tokenizer, "scheduler": self.encoder.make_scheduler(),
                "generator": self.generator, "mapper": self.mapper, "modulator": self.modulator}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FacePipeline:
        """Move every network to ``device`` and/or cast to ``dtype`` (in place; returns self)."""
        # The encoder moves its own parts (and remembers where lazily loaded ones go): diffusers warns when
        # its models are cast one by one.
        self.encoder.to(device=device, dtype=dtype)
        inside = {id(part) for part in self.encoder.parts().values()}
        for part in self.components().values():
            if isinstance(part, torch.nn.Module) and id(part) not in inside:
                part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def modalities(self) -> list[str]:
        """Visual inputs this model has a ControlNet for."""
        return self.encoder.modalities

    # ------------------------------------------------------------------ 1. conditions
    def check_request(self, request: GenerationRequest) -> None:
        """What depends on the loaded model: a ControlNet for each visual input, a VAE for the preview."""
        wanted = request.inputs
        if len(wanted) == 2 and not all(m in self.modalities for m in wanted):
            raise UnsupportedConditionError(
                f"both a mask and a scribble were given, but this model has only a {self.modalities[0]} "
                "ControlNet: pass one of them")
        for name in wanted:
            if name not in self.modalities:
                available = ", ".join(self.modalities) or "none"
                raise UnsupportedConditionError(f"this model has no ControlNet for a {name} (available: {available})")
        if (request.return_diffusion_image or request.mode == "invert") and not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        self.resolve_render_kwargs(request.render_kwargs, [request.num_images])

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Visual inputs, mode, steps, guidance, preview, noise mode and rendering options."""
        return (tuple(request.inputs), request.mode, request.sampling_steps, request.feature_steps, request.combine,
                request.guidance_scale, request.return_diffusion_image, request.noise_mode,
                repr(sorted(request.render_kwargs.items())))

    def prepare_conditions(self, mask=None, scribble=None) -> tuple[dict[str, torch.Tensor], dict[str, Image.Image]]:
        """Stage 1: user inputs -> ControlNet images ([1, 3, H, W] in [0, 1]) and their previews.

        Args:
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map), or None.
            scribble: a sketch (white-on-black or black-on-white), or None. A sketch without strokes is
                ignored with a warning.
        """
        self.check_request(GenerationRequest(mask=mask, scribble=scribble))
        with record_function("mm2latent.prepare_conditions"):
            _, _, previews = parse_visual_inputs(mask, scribble, self.encoder.image_size)
            controls = {
                name: torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                .to(self.device, self.dtype)
                for name, image in previews.items()
            }
        return controls, previews

    # ------------------------------------------------------------------ 2. text
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Stage 2: CLIP embeddings and word masks of one prompt per sample (cached, new ones batched)."""
        with record_function("mm2latent.encode_prompts"):
            return PromptBatch.stack(self.encoder.encode_prompts(list(prompts)))

    # ------------------------------------------------------------------ 3. noise
    def prepare_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Stage 3: seeded initial latents z_T, one seed per sample, drawn on the CPU so every device agrees."""
        with record_function("mm2latent.prepare_noise"):
            return self.encoder.initial_noise(list(seeds))

    # ------------------------------------------------------------------ 4. latents
    def latents_from_features(
        self,
        features: EncoderFeatures,
        word_mask: torch.Tensor,
        mapper: torch.nn.Module | None = None,
        modulator: torch.nn.Module | None | bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, Modulation | None]:
        """M and T on one step's features: (w, w^m, modulation) with w = w^m ⊙ w^γ + w^β.

        Args:
            features: one U-Net pass's features (batch B).
            word_mask: [B, 77] word-token mask of the prompts.
            mapper: M to use (default the pipeline's; training passes the module it optimises).
            modulator: T to use (True: the pipeline's; None: T at identity, w = w^m, as in stage 1).
        """
        mapper = self.mapper if mapper is None else mapper
        modulator = self.modulator if modulator is True else modulator
        mapper_dtype = next(mapper.parameters()).dtype
        w_m = mapper(features.h.to(mapper_dtype), self.generator.latent_avg)
        if modulator is None:
            return w_m, w_m, None
        modulation = modulator(features, word_mask.expand(features.h.shape[0], -1))
        return w_m * modulation.gamma + modulation.beta, w_m, modulation

    @torch.no_grad()
    def predict_latents(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 1,
        feature_steps: Sequence[int] = (0,),
        combine: str = "mean",
        guidance_scale: float = 1.0,
        decode: bool = False,
        return_attention: bool = False,
        return_features: bool = False,
    ) -> LatentPrediction:
        """Stage 4: the encoder's features at the feature steps, then M and T.

        Args:
            prompts: stage 2's output, one row per sample (B).
            controls: modality -> [B or 1, 3, H, W] ControlNet images (stage 1; a single row is broadcast).
            noise: [B, 4, h, w] initial latents (stage 3).
            num_steps: DDIM steps of the schedule (1 = fast mode: one pass at t = T).
            feature_steps: the step indices whose features feed the latent.
            combine: how per-step latents merge ("mean" or "coarse-to-fine").
            guidance_scale: classifier-free guidance of the denoising (> 1 runs the unconditional pass too).
            decode: also denoise to the end and decode I^d_0.
            return_attention: also return the per-token attention maps (averaged over the steps).
            return_features: also return the encoder's features.
        """
        if not feature_steps:
            raise InvalidStepsError("feature steps must name at least one step")
        with self.lock, record_function("mm2latent.predict_latents"):
            denoised = self.denoise(prompts, controls, noise, num_steps=num_steps, guidance_scale=guidance_scale,
                                    feature_steps=feature_steps, run_to_end=decode)
            per_step = [self.latents_from_features(f, prompts.word_mask) for f in denoised.features]
            images = self.decode(denoised.latents) if decode else None
        step_latents = torch.stack([w for w, _, _ in per_step])
        token_maps = None
        if return_attention:
            size = self.modulator.feature_size
            token_maps = torch.stack([word_attention_maps(f.attn_probs, size) for f in denoised.features]).mean(dim=0)
            token_maps = token_maps.float().cpu()
        return LatentPrediction(
            latents=combine_steps(step_latents, combine),
            step_latents=step_latents,
            w_m=torch.stack([w_m for _, w_m, _ in per_step]),
            gamma=torch.stack([m.gamma for _, _, m in per_step]),
            beta=torch.stack([m.beta for _, _, m in per_step]),
            attention=torch.stack([m.attention for _, _, m in per_step]),
            timesteps=denoised.timesteps,
            token_maps=token_maps,
            features=denoised.features if return_features else None,
            diffusion_images=images,
        )

    @torch.no_grad()
    def denoise(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        feature_steps: Sequence[int] = (),
        run_to_end: bool = True,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = DEFAULT_STEP_TENSORS,
    ) -> DenoisingOutput:
        """The denoising loop that stage 4 (:meth:`predict_latents`) and the drawing (:meth:`draw`) share.

        Runs the scheduler's steps from seeded noise (or from ``init_latents`` noised to t ≈ ``strength``·T),
        one U-Net(+ControlNet) pass each, the unconditional pass batched with the conditional one when
        ``guidance_scale > 1``; the passes at ``feature_steps`` record the encoder's features. Without
        ``run_to_end`` it stops after the last feature step's pass (fast mode: one pass at t = T).

        Args:
            prompts, controls, noise: stages 2, 1 (a single row is broadcast) and 3; B samples.
            num_steps: steps of the schedule (1..1000).
            guidance_scale: classifier-free guidance (<= 1: off, no unconditional pass).
            feature_steps: indices, into the steps that run, of the passes whose features are recorded.
            run_to_end: denoise through the last step (else stop after the last feature step's pass).
            init_latents: [B, 4, h, w] clean VAE latents to start from (img2img), or None.
            strength: how far ``init_latents`` are noised (1 = pure noise); only the last
                ``round(strength·num_steps)`` steps of the schedule run.
            scheduler: any diffusers scheduler (e.g. ``LCMScheduler`` for an LCM-LoRA); default a fresh DDIM of
                the model's config. It is configured in place (``set_timesteps``): give each thread its own.
            generator: random source of schedulers that add noise in their step (LCM).
            callback_on_step_end: ``callback(pipe, step_index, timestep, state) -> dict | None`` after each
                scheduler step (see :mod:`~mm2latent.pipelines.sampling`): a returned ``"latents"`` replaces the
                latents, ``{"stop": True}`` ends the loop after this step.
            callback_on_step_end_tensor_inputs: the tensors ``state`` carries (of
                :data:`~mm2latent.pipelines.sampling.STEP_TENSORS`).

        Raises:
            InvalidStepsError: bad ``num_steps``, ``strength`` or feature step indices.
            UnsupportedConditionError: a visual input there is no ControlNet for.
        """
        # 1. check inputs
        batch = noise.shape[0]
        assert len(prompts) == batch, f"{len(prompts)} prompts for {batch} noise samples"
        tensor_inputs = check_step_tensors(callback_on_step_end_tensor_inputs)
        controls = {k: v.expand(batch, -1, -1, -1) if v.shape[0] == 1 else v for k, v in controls.items()}
        self.encoder.check_controls(controls)
        # 2. text: guidance runs the unconditional prompt as the first half of one batch
        use_guidance = guidance_scale > 1.0
        embeds = prompts.embeds
        if use_guidance:
            embeds = torch.cat([self.encode_prompts([""] * batch).embeds, embeds])
            controls = {k: torch.cat([v, v]) for k, v in controls.items()}
        conditional = slice(batch, None) if use_guidance else slice(None)
        # 3. timesteps
        scheduler = self.encoder.make_scheduler() if scheduler is None else scheduler
        timesteps = schedule_timesteps(scheduler, num_steps, strength, self.device, init_latents is not None)
        capture = sorted(set(feature_steps))
        if (capture and (capture[0] < 0 or capture[-1] >= len(timesteps))) or (not capture and not run_to_end):
            raise InvalidStepsError(f"feature steps must be indices in [0, {len(timesteps) - 1}] of the "
                                    f"{len(timesteps)} steps that run, got {list(feature_steps)}")
        last = len(timesteps) - 1 if run_to_end else capture[-1]
        # 4. initial latents
        if init_latents is not None and strength < 1.0:
            latents = scheduler.add_noise(init_latents.to(noise.dtype), noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * scheduler.init_noise_sigma
        # 5. the loop
        out = DenoisingOutput(latents=latents)
        extra = step_kwargs(scheduler, generator)
        steps = timesteps[: last + 1]
        with self.lock:
            for i, t in enumerate(tqdm(steps, desc="diffusion encoder", leave=False,
                                       disable=not (self.show_progress and len(steps) > 1))):
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if use_guidance else latents, t)
                if i in capture:
                    features, noise_pred = self.encoder.extract(model_input, t, embeds, controls, rows=conditional)
                    out.features.append(features)
                    out.timesteps.append(int(t))
                else:
                    noise_pred, _ = self.encoder.predict_noise(model_input, t, embeds, controls)
                out.steps_run.append(int(t))
                if i == last and not run_to_end:
                    break
                if use_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                stepped = scheduler.step(noise_pred, t, latents, **extra)
                latents = stepped.prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "pred_original_sample": predicted_clean_latents(stepped),
                               "noise_pred": noise_pred}
                    state = {"num_steps": len(timesteps), **{name: tensors[name] for name in tensor_inputs}}
                    returned = callback_on_step_end(self, i, int(t), state) or {}
                    latents = returned.get("latents", latents)
                    if returned.get(STOP):
                        out.stopped = True
                        break
        out.latents = latents
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode clean latents [B, 4, h, w] to images [B, 3, H, W] in [-1, 1]."""
        if not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        return self.encoder.decode_latents(latents)

    @torch.no_grad()
    def draw(
        self,
        prompts: PromptBatch,
        controls: dict[str, torch.Tensor],
        noise: torch.Tensor,
        *,
        num_steps: int = 20,
        guidance_scale: float = 7.5,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        return_attention: bool = False,
        scheduler: SchedulerMixin | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = DEFAULT_STEP_TENSORS,
    ) -> DiffusionDrawing:
        """Stage 4 of the training-free mode (and stage 2's training target): I^d_0, what the diffusion model draws.

        Sampling with classifier-free guidance (the unconditional pass batched with the conditional one)
        from seeded noise, or from ``init_latents`` noised to t ≈ ``strength``·T, to the end; VAE-decoded.
        A callback sees every step (e.g. :func:`~mm2latent.pipelines.sampling.preview_callback` shows the
        drawing forming) and may stop the loop: the images are then the decoded latents after that step.

        Args:
            prompts, controls, noise: stages 2, 1 and 3.
            num_steps: steps of the schedule.
            guidance_scale: classifier-free guidance (<= 1: off, no unconditional pass).
            init_latents: [B, 4, h, w] clean VAE latents to start from (a training photo's), or None.
            strength: how far ``init_latents`` are noised (1 = pure noise).
            return_attention: also return the per-token attention maps of the first step.
            scheduler, generator, callback_on_step_end, callback_on_step_end_tensor_inputs: as :meth:`denoise`.
        """
        if not self.encoder.has_vae:
            raise UnsupportedConditionError("this pipeline was loaded without a VAE, so it cannot decode I^d_0")
        with self.lock, record_function("mm2latent.draw"):
            # 1-5. denoise to the end. The first pass records features (its attention maps are what
            # return_attention shows); it always does, so I^d_0 does not depend on return_attention.
            denoised = self.denoise(
                prompts, controls, noise, num_steps=num_steps, guidance_scale=guidance_scale, feature_steps=[0],
                init_latents=init_latents, strength=strength, scheduler=scheduler, generator=generator,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
            # 6. decode
            images = self.decode(denoised.latents)
        token_maps = None
        if return_attention:
            token_maps = word_attention_maps(denoised.features[0].attn_probs, self.modulator.feature_size).float().cpu()
        return DiffusionDrawing(images=images, token_maps=token_maps, timesteps=denoised.timesteps,
                                latents=denoised.latents, stopped=denoised.stopped)

    # ------------------------------------------------------------------ the whole call
    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[FacePipelineOutput]:
        """Several requests batched (see :meth:`FacePipelineBase.generate_batch`): one U-Net pass, one M, one T
        and one generator pass per group of compatible requests."""
        for request in requests:
            if request.mode == "invert":
                raise UnsupportedConditionError(
                    "mode='invert' (training-free) needs the photo inverter: load FaceEditPipeline.from_pretrained("
                    "...), which runs it, or use mode='fast' / 'quality' with trained M and T")
        return super().generate_batch(requests)

    def _generate_group(self, requests: list[GenerationRequest]) -> list[FacePipelineOutput]:
        first = requests[0]
        prepared = [self.prepare_conditions(r.mask, r.scribble) for r in requests]
        counts = [r.num_images for r in requests]
        prompts = self.encode_prompts([r.prompt for r, n in zip(requests, counts) for _ in range(n)])
        controls = {kind: torch.cat([c[kind].expand(n, -1, -1, -1) for (c, _), n in zip(prepared, counts)])
                    for kind in prepared[0][0]}
        seeds = [s for r in requests for s in r.seeds]
        want_maps = any(r.return_intermediates for r in requests)
        prediction = self.predict_latents(
            prompts, controls, self.prepare_noise(seeds), num_steps=first.sampling_steps,
            feature_steps=first.feature_steps, combine=first.combine, guidance_scale=first.guidance_scale,
            decode=first.return_diffusion_image, return_attention=want_maps)
        outputs = self.render_requests(requests, prediction.latents, [previews for _, previews in prepared])
        start = 0
        for request, output, count in zip(requests, outputs, counts):
            rows = slice(start, start + count)
            output.timesteps = prediction.timesteps
            if prompts.truncated[start]:
                output.warnings.append("The prompt is longer than the 77 tokens CLIP reads; only its first part "
                                       "was used.")
            if request.return_intermediates:
                output.step_latents = prediction.step_latents[:, rows].float().cpu()
                output.attention_words = prompts.words[start]
                output.attention_maps = word_maps(prediction.token_maps[rows], prompts.word_tokens[start])
            if request.return_diffusion_image:
                output.diffusion_images = tensor_to_pil(prediction.diffusion_images[rows])
            start += count
        return outputs
