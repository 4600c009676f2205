"""``MM2LatentPipeline``: the MM2Latent engine behind the pipeline API (``pipe.engine == "mm2latent"``).

No diffusion model: a CLIP/FaRL text embedding and the codes of the mask and sketch autoencoders go through one
mapper to W+ (:class:`~mm2latent.models.latent_mapper.MM2LatentEngine`), then the same truncation and generator
as DDGI (:class:`~.base.FacePipelineBase`). The call, its output and its settings are DDGI's:
``pipe(prompt, mask=..., scribble=..., seed=..., truncation=..., num_images=...)``. Public stages:

1. :meth:`MM2LatentPipeline.prepare_conditions` — mask / sketch -> autoencoder codes (+ previews);
2. :meth:`MM2LatentPipeline.encode_prompts` — prompts -> unit-norm text embeddings (an empty prompt: none);
3. :meth:`MM2LatentPipeline.predict_latents` — text embedding + codes -> the mapper -> W+ (deterministic);
4. :meth:`MM2LatentPipeline.vary_latents` — what the seed does (below);
5. :meth:`~.base.FacePipelineBase.render` — truncation and G.

Seeds: the mapper is a deterministic function of its inputs, as in MM2Latent, so the same prompt, mask and
sketch always map to the same W+. The seed adds diversity only where the inputs say least: image i of a call
with seed s gets ``w[l] + seed_variation · (w_{s+i}[l] − w̄[l])`` in the *fine* layers l (64² and up: colour
balance, texture, lighting; :func:`~mm2latent.editing.methods.layer_ranges`), where ``w_s`` is G's mapping of a
z ~ N(0, I) drawn on the CPU from seed s (the same on every device). Coarse and middle layers — pose, face
shape, hair style, the layout a mask or sketch sets — are the mapper's alone. ``seed_variation = 0`` makes the
seed irrelevant (every image of a call is then the same).

``mode="quality"`` and ``"invert"``, the diffusion preview and classifier-free guidance belong to the DDGI
engine: asking this one for them raises :class:`~mm2latent.errors.InvalidSettingError` /
:class:`~mm2latent.errors.UnsupportedConditionError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.profiler import record_function

from ..editing.methods import layer_ranges
from ..errors import InvalidSettingError, UnsupportedConditionError
from ..models.generator import Generator
from ..models.latent_mapper import MM2LatentEngine
from .base import FacePipelineBase, parse_visual_inputs
from .components import EDITING_COMPONENTS
from .editing import PhotoEditingMixin
from .outputs import FacePipelineOutput
from .request import GenerationRequest
from .sampling import StepCallback

__all__ = ["DEFAULT_SEED_VARIATION", "DIFFUSION_SETTINGS", "MM2LatentPipeline", "PromptEmbeddings"]

#: Weight of the seeded sample of G's W in the fine layers (see the module doc).
DEFAULT_SEED_VARIATION = 0.5
#: Request settings that only the diffusion engine reads; this engine's outputs do not record them.
DIFFUSION_SETTINGS = ("num_steps", "feature_steps", "combine", "guidance_scale")
#: The visual inputs, as requests name them -> the mapper's modality names.
MAPPER_INPUTS = {"mask": "mask", "scribble": "sketch"}


@dataclass
class PromptEmbeddings:
    """Stage 2's output for B samples.

    Attributes:
        embeds: unit-norm text embeddings [B, text_dim] (zeros where ``present`` is False), or None when no
            sample has a prompt.
        present: [B] booleans: False where the prompt is empty (the mapper then reads its null text token).
    """

    embeds: torch.Tensor | None
    present: torch.Tensor

    def __len__(self) -> int:
        return self.present.shape[0]


class MM2LatentPipeline(PhotoEditingMixin, FacePipelineBase):
    """The MM2Latent engine: [text embedding | mask code | sketch code] -> mapper -> W+ -> G.

    Load it with ``FacePipeline.from_pretrained("tiny-mm2latent")`` or from a manifest whose ``"engine"`` is
    ``"mm2latent"`` (components ``generator`` and ``mm2latent_engine``).

    Args:
        mm2latent_engine: the engine's networks (text tower, mask and sketch autoencoders, mapper).
        generator: the frozen GAN G; the mapper must output its ``num_ws x style_dim`` latents.
        trained: whether the engine's networks carry trained weights.
        name: where the pipeline was loaded from (for messages and metadata).
        seed_variation: what the seed does (see the module doc); a setting of the pipeline, not saved.
        editing: the optional editing components (``inverter``, ``face_parser``, ``identity``, ``lpips``,
            ``clip``; see :class:`~mm2latent.pipelines.base.FacePipelineBase`).
    """

    engine = "mm2latent"

    def __init__(
        self,
        mm2latent_engine: MM2LatentEngine,
        generator: Generator,
        trained: bool = False,
        name: str = "custom",
        seed_variation: float = DEFAULT_SEED_VARIATION,
        **editing,
    ):
        mapper = mm2latent_engine.mapper
        if mapper.num_ws != generator.num_ws or mapper.style_dim != generator.style_dim:
            raise ValueError(f"the mapper outputs {mapper.num_ws}x{mapper.style_dim} latents but G expects "
                             f"{generator.num_ws}x{generator.style_dim}")
        super().__init__(generator, trained, name, **editing)
        self.mm2latent_engine = mm2latent_engine.eval().requires_grad_(False)
        self.seed_variation = float(seed_variation)

    @classmethod
    def from_components(cls, parts: dict, trained: bool = False, name: str = "custom") -> MM2LatentPipeline:
        """Assemble a pipeline from loaded manifest components ({"generator": ..., "mm2latent_engine": ...}, editing
        components optional)."""
        editing = {name: parts[name] for name in EDITING_COMPONENTS if name in parts}
        return cls(parts["mm2latent_engine"], parts["generator"], trained=trained, name=name, **editing)

    def engine_components(self) -> dict:
        """The engine's networks by manifest name."""
        return {"generator": self.generator, "mm2latent_engine": self.mm2latent_engine}

    @property
    def modalities(self) -> list[str]:
        """Visual inputs this engine reads (both, through its autoencoders)."""
        return list(MAPPER_INPUTS)

    # ------------------------------------------------------------------ what a request may ask
    def check_request(self, request: GenerationRequest) -> None:
        """Only fast mode, no diffusion preview, no guidance; the generator's rendering options."""
        if request.mode == "invert":
            raise InvalidSettingError("mode='invert' draws I^d_0 with the diffusion model of the DDGI engine; this "
                                      "model runs the MM2Latent engine, which has none: use mode='fast'")
        if request.mode != "fast":
            raise InvalidSettingError(
                f"mode={request.mode!r} belongs to the DDGI engine (diffusion features); this model runs the "
                "MM2Latent engine, which maps text, mask and sketch to a latent in one pass: use mode='fast'")
        if request.return_diffusion_image:
            raise UnsupportedConditionError("the MM2Latent engine has no diffusion model, so there is no diffusion "
                                            "image to show")
        if request.guidance_scale != 1.0:
            raise InvalidSettingError("guidance_scale steers diffusion sampling; the MM2Latent engine has none")
        self.resolve_render_kwargs(request.render_kwargs, [request.num_images])

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Visual inputs, noise mode and rendering options."""
        return tuple(request.inputs), request.noise_mode, repr(sorted(request.render_kwargs.items()))

    def request_settings(self, request: GenerationRequest) -> dict:
        """The request's settings without the diffusion-only ones, with the seed's ``seed_variation``."""
        settings = {k: v for k, v in request.settings().items() if k not in DIFFUSION_SETTINGS}
        settings["seed_variation"] = self.seed_variation
        return settings

    # ------------------------------------------------------------------ 1. conditions
    @torch.no_grad()
    def prepare_conditions(self, mask=None, scribble=None) -> tuple[dict[str, torch.Tensor], dict[str, Image.Image]]:
        """Stage 1: user inputs -> autoencoder codes (``{"mask": [1, code_dim], "scribble": [1, code_dim]}``, only
        the inputs given) and their previews at the autoencoders' size.

        Args:
            mask: a 19-class face mask (path, PIL image or array; index, palette or colour map), or None.
            scribble: a sketch (white-on-black or black-on-white), or None. A sketch without strokes is ignored
                with a warning.
        """
        engine = self.mm2latent_engine
        with record_function("mm2latent.prepare_conditions"):
            size = engine.mask_autoencoder.image_size
            ids, strokes, previews = parse_visual_inputs(mask, scribble, size)
            mask_ids = None if ids is None else torch.from_numpy(ids.astype(np.int64))[None]
            sketch = None if strokes is None else torch.from_numpy(np.ascontiguousarray(strokes))[None]
            mask_code, sketch_code = engine.codes(mask_ids, sketch)
        codes = {name: code for name, code in (("mask", mask_code), ("scribble", sketch_code)) if code is not None}
        return codes, previews

    # ------------------------------------------------------------------ 2. text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Stage 2: one prompt per sample -> text embeddings; each distinct prompt is encoded once."""
        prompts = [p.strip() for p in prompts]
        present = torch.tensor([bool(p) for p in prompts], dtype=torch.bool)
        distinct = sorted({p for p in prompts if p})
        if not distinct:
            return PromptEmbeddings(None, present)
        with record_function("mm2latent.encode_prompts"):
            encoded = self.mm2latent_engine.encode_prompts(distinct)
        rows = {p: i for i, p in enumerate(distinct)}
        embeds = torch.stack([encoded[rows[p]] if p else torch.zeros_like(encoded[0]) for p in prompts])
        return PromptEmbeddings(embeds, present)

    # ------------------------------------------------------------------ 3. latents
    @torch.no_grad()
    def predict_latents(self, prompts: PromptEmbeddings, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stage 3: the mapper on [text | mask code | sketch code] -> W+ ``[B, L, D]`` (not truncated, not varied).

        Args:
            prompts: stage 2's output, one row per sample (B).
            codes: stage 1's codes, ``[B or 1, code_dim]`` per given input (a single row is broadcast).
        """
        batch = len(prompts)
        inputs = {MAPPER_INPUTS[name]: code.expand(batch, -1) if code.shape[0] == 1 else code
                  for name, code in codes.items()}
        present = None if prompts.embeds is None else {"text": prompts.present}
        with self.lock, record_function("mm2latent.predict_latents"):
            return self.mm2latent_engine.mapper(self.generator.latent_avg, text=prompts.embeds, present=present,
                                                batch_size=batch, **inputs)

    # ------------------------------------------------------------------ 4. the seed
    def seeded_latent(self, seed: int) -> torch.Tensor:
        """G's mapping of one z ~ N(0, I) drawn on the CPU from ``seed``: ``[style_dim]``."""
        # The mean of one sample is that sample: the generator protocol's seeded draw, 2D and 3D alike.
        return self.generator.mean_latent(1, torch.Generator().manual_seed(int(seed)))

    @torch.no_grad()
    def vary_latents(self, latents: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Stage 4: ``w[l] + seed_variation · (w_seed[l] − w̄[l])`` in the fine layers, one seed per sample."""
        if self.seed_variation == 0.0:
            return latents
        fine = layer_ranges(latents.shape[1])["fine"]
        offsets = torch.stack([self.seeded_latent(s) for s in seeds]).to(latents) - self.generator.latent_avg.to(latents)
        varied = latents.clone()
        varied[:, fine] += self.seed_variation * offsets[:, None]
        return varied

    # ------------------------------------------------------------------ the whole call
    def _generate_group(self, requests: list[GenerationRequest],
                        callback_on_step_end: StepCallback | None = None) -> list[FacePipelineOutput]:
        prepared = [self.prepare_conditions(r.mask, r.scribble) for r in requests]
        prompts = self.encode_prompts([r.prompt for r in requests for _ in range(r.num_images)])
        # Each request's codes once, one row per image.
        codes = {name: torch.cat([c[name].expand(r.num_images, -1) for r, (c, _) in zip(requests, prepared)])
                 for name in prepared[0][0]}
        latents = self.predict_latents(prompts, codes)
        latents = self.vary_latents(latents, [s for r in requests for s in r.seeds])
        outputs = self.render_requests(requests, latents, [previews for _, previews in prepared])
        start = 0
        for request, output in zip(requests, outputs):
            if request.return_intermediates:
                # One "step": the mapper's latent (no diffusion steps, no attention maps in this engine).
                output.step_latents = latents[None, start:start + request.num_images].float().cpu()
            start += request.num_images
        return outputs
