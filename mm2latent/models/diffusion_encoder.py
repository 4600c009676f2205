"""The frozen diffusion encoder E: ControlNet + Stable Diffusion 1.5 U-Net as a feature extractor.

For a text prompt, visual conditions (mask and/or scribble) and a noisy latent z_t, one U-Net pass
gives what METHOD.md calls

* ``h``: the mid-block output after the ControlNet mid residual is added (what the decoder sees),
* ``f``: the output of every decoder (up) block,
* ``attn_out``: the outputs of the decoder's cross-attention (``attn2``) layers, per block,
* ``attn_probs``: their attention probabilities, max-pooled over heads.

Hooks and attention processors are installed for the duration of one call and removed afterwards;
all other attention layers keep diffusers' default (SDPA) processor.

This module has one job: one U-Net(+ControlNet) pass with its features (:meth:`DiffusionEncoder.extract`,
:meth:`DiffusionEncoder.predict_noise`), the hooks that record them, and the prompt encodings (cached). Sampling
— the scheduler loop, guidance, img2img starts, step callbacks — is the pipeline's
(:meth:`~mm2latent.pipelines.ddgi.FacePipeline.denoise`), as diffusers pipelines own their denoising loop. ControlNets and the VAE may be given
as :class:`LazyComponent` loaders: they are read from disk on first use, so a request that needs neither
never holds them in memory.
"""

from __future__ import annotations

import string
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import UnsupportedConditionError

MODALITIES = ("mask", "scribble")


@dataclass
class PromptEncoding:
    """CLIP text embeddings of one prompt and which token positions are real words.

    Attributes:
        embeds: [1, 77, D] text embeddings.
        word_mask: [1, 77] bool, True for word tokens (not BOS/EOS/padding): what T's Ā averages over.
        words: the prompt's words, sub-word pieces merged ("bushy", not "bu", "sh", "y"), punctuation left out.
        word_tokens: for each word, the token positions it spans (its attention map is their mean).
        truncated: whether the prompt was longer than the 77 tokens CLIP reads.
        kept: the part of the prompt CLIP read, when truncated (else the whole prompt).
    """

    embeds: torch.Tensor
    word_mask: torch.Tensor
    words: list[str]
    word_tokens: list[list[int]]
    truncated: bool
    kept: str = ""


@dataclass
class PromptBatch:
    """The encodings of a batch of prompts, stacked (one row per sample)."""

    embeds: torch.Tensor  # [B, 77, D]
    word_mask: torch.Tensor  # [B, 77] bool
    words: list[list[str]]
    word_tokens: list[list[list[int]]]
    truncated: list[bool]

    @classmethod
    def stack(cls, encodings: Sequence[PromptEncoding]) -> PromptBatch:
        return cls(embeds=torch.cat([e.embeds for e in encodings]), word_mask=torch.cat([e.word_mask for e in encodings]),
                   words=[e.words for e in encodings], word_tokens=[e.word_tokens for e in encodings],
                   truncated=[e.truncated for e in encodings])

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class LazyComponent:
    """A network read from disk on first use.

    Attributes:
        load: ``load(dtype) -> module`` (weights read straight in that dtype).
        config: the module's config, known without loading its weights (e.g. the VAE's scale factor).
    """

    load: Callable[[torch.dtype], nn.Module]
    config: dict = field(default_factory=dict)


@dataclass
class EncoderFeatures:
    """Features of one U-Net pass (batch B), as consumed by M and T."""

    h: torch.Tensor  # [B, C_mid, h, w]
    f: list[torch.Tensor]  # N decoder blocks: [B, C_n, H_n, W_n]
    attn_out: list[list[torch.Tensor]]  # per decoder block, K layers of [B, C_n, H'_n, W'_n]
    attn_probs: list[torch.Tensor]  # every attn2 layer: [B, T, H', W'] (max over heads)
    timestep: int | list[int]  # one t for the batch, or one per sample (training)


class _CrossAttentionCapture:
    """Attention processor for ``attn2`` layers that keeps outputs and head-max probabilities."""

    def __init__(self, store: list, index: int):
        self.store = store
        self.index = index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert hidden_states.ndim == 3, "cross-attention capture expects [B, HW, C] tokens"
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, HW, T]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        head_max = probs.view(batch, attn.heads, *probs.shape[1:]).amax(dim=1)
        self.store.append((self.index, out, head_max))
        return out


class DiffusionEncoder(nn.Module):
    """ControlNet + SD-1.5 U-Net + CLIP text encoder used as a frozen feature extractor.

    Args:
        unet: the SD-1.5 ``UNet2DConditionModel``.
        text_encoder: the CLIP ``CLIPTextModel``.
        tokenizer: its ``CLIPTokenizer`` (77 tokens).
        scheduler: a ``DDIMScheduler``; its config is kept (``make_scheduler`` gives a fresh one per sampling),
            ``timestep_spacing`` forced to "trailing" so that the first step is t = T.
        controlnets: one ``ControlNetModel`` (or a :class:`LazyComponent` loading one) per visual modality,
            keys among ``MODALITIES``.
        vae: the ``AutoencoderKL`` (or a :class:`LazyComponent`); only needed to decode I^d_0 or to encode
            training photos.
        prompt_cache_size: how many prompt encodings are kept (least recently used dropped first).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        controlnets: dict[str, ControlNetModel | LazyComponent],
        vae: AutoencoderKL | LazyComponent | None = None,
        prompt_cache_size: int = 64,
    ):
        super().__init__()
        unknown = set(controlnets) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown ControlNet modalities {sorted(unknown)}; expected {MODALITIES}")
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler.config)
        self.scheduler_config["timestep_spacing"] = "trailing"
        self.controlnets = nn.ModuleDict({m: c for m, c in controlnets.items() if isinstance(c, nn.Module)})
        self._pending: dict[str, LazyComponent] = {f"controlnet_{m}": c for m, c in controlnets.items()
                                                   if isinstance(c, LazyComponent)}
        self._modalities = [m for m in MODALITIES if m in controlnets]
        if isinstance(vae, LazyComponent):
            self._pending["vae"] = vae
            vae = None
        self._vae = vae
        self._vae_config = dict(vae.config) if vae is not None else dict(self._pending["vae"].config) \
            if "vae" in self._pending else None
        self.prompt_cache_size = prompt_cache_size
        self._prompt_cache: OrderedDict[str, PromptEncoding] = OrderedDict()
        self._lock = threading.RLock()
        self._attn2_layers: list[tuple[str, nn.Module]] | None = None
        self.requires_grad_(False)
        self.eval()

    def __getstate__(self):
        # Locks cannot be copied or pickled; a copy gets its own (see __setstate__).
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- lazily loaded parts
    @property
    def modalities(self) -> list[str]:
        """Visual inputs there is a ControlNet for (loaded or not yet loaded)."""
        return list(self._modalities)

    @property
    def has_vae(self) -> bool:
        return self._vae_config is not None

    def _materialize(self, name: str) -> nn.Module:
        with self._lock:
            pending = self._pending.get(name)
            if pending is None:
                return self._vae if name == "vae" else self.controlnets[name.removeprefix("controlnet_")]
            module = pending.load(self.dtype).to(self.device).eval().requires_grad_(False)
            if name == "vae":
                self._vae = module
            else:
                self.controlnets[name.removeprefix("controlnet_")] = module
            del self._pending[name]
            return module

    def controlnet(self, modality: str) -> ControlNetModel:
        """The ControlNet of a modality, loaded on first use."""
        if modality not in self._modalities:
            available = ", ".join(self._modalities) or "none"
            raise UnsupportedConditionError(f"this model has no ControlNet for a {modality} input (available: {available})")
        return self._materialize(f"controlnet_{modality}")

    @property
    def vae(self) -> AutoencoderKL | None:
        """The VAE, loaded on first use (None when the pipeline has none)."""
        return self._materialize("vae") if "vae" in self._pending else self._vae

    def parts(self) -> dict[str, nn.Module | LazyComponent]:
        """Every network, by manifest name; parts not loaded yet appear as their :class:`LazyComponent`."""
        parts: dict = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.has_vae:
            parts["vae"] = self._pending.get("vae", self._vae)
        for modality in self._modalities:
            name = f"controlnet_{modality}"
            parts[name] = self._pending.get(name) or self.controlnets[modality]
        return parts

    # ----------------------------------------------------------------- structure
    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def image_size(self) -> int:
        """Pixel size of the visual conditions (and of I^d_0)."""
        channels = self._vae_config.get("block_out_channels") if self._vae_config else None
        factor = 2 ** (len(channels) - 1) if channels else 8
        return self.latent_size * factor

    @property
    def block_channels(self) -> list[int]:
        """Output channels of the decoder blocks, in order."""
        return list(reversed(self.unet.config.block_out_channels))

    @property
    def mid_channels(self) -> int:
        return self.unet.config.block_out_channels[-1]

    @property
    def mid_size(self) -> int:
        return self.latent_size // 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _cross_attention_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the decoder's cross-attention layers, in execution order (looked up once)."""
        if self._attn2_layers is None:
            names = [n.removesuffix(".processor") for n in self.unet.attn_processors
                     if n.startswith("up_blocks.") and ".attn2." in n]
            self._attn2_layers = [(n, self.unet.get_submodule(n)) for n in names]
        return self._attn2_layers

    # ----------------------------------------------------------------- text
    def clear_prompt_cache(self) -> None:
        """Forget every cached prompt encoding."""
        with self._lock:
            self._prompt_cache.clear()

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> PromptEncoding:
        """CLIP-encode one prompt (cached). Longer prompts are truncated to 77 tokens with a warning."""
        return self.encode_prompts([prompt])[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEncoding]:
        """CLIP-encode prompts; the ones not in the cache go through the text encoder as one batch.

        A prompt longer than the 77 tokens CLIP reads is truncated, with a warning showing what was kept.
        """
        found: dict[str, PromptEncoding] = {}
        with self._lock:
            for prompt in prompts:
                cached = self._prompt_cache.get(prompt)
                if cached is not None and cached.embeds.device == self.device and cached.embeds.dtype == self.dtype:
                    self._prompt_cache.move_to_end(prompt)
                    found[prompt] = cached
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            tok = self.tokenizer
            max_length = tok.model_max_length if tok.model_max_length < 10_000 else 77
            ids = tok(missing, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
            embeds = self.text_encoder(ids.to(self.device))[0]
            for row, prompt in enumerate(missing):
                encoding = self._describe_tokens(prompt, ids[row], embeds[row : row + 1], max_length)
                if encoding.truncated:
                    warnings.warn(f"The prompt is longer than the {max_length} tokens CLIP reads, so it was "
                                  f"truncated to: {encoding.kept!r}", stacklevel=3)
                found[prompt] = encoding
            with self._lock:
                for prompt in missing:
                    self._prompt_cache[prompt] = found[prompt]
                while len(self._prompt_cache) > self.prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
        return [found[p] for p in prompts]

    def _describe_tokens(self, prompt: str, ids: torch.Tensor, embeds: torch.Tensor, max_length: int) -> PromptEncoding:
        """Word mask, words (BPE pieces merged at CLIP's end-of-word marker) and truncation of one prompt."""
        tok = self.tokenizer
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        ids_list = ids.tolist()
        word_mask = torch.tensor([[i not in special for i in ids_list]])
        words, word_tokens, piece, positions = [], [], [], []
        for position, (token_id, is_word) in enumerate(zip(ids_list, word_mask[0].tolist())):
            if not is_word:
                continue
            token = tok.convert_ids_to_tokens(token_id)
            piece.append(token_id)
            positions.append(position)
            if token.endswith("</w>") or position == len(ids_list) - 1:
                text = tok.decode(piece).strip()
                if text.strip(string.punctuation):  # punctuation alone is no word to show
                    words.append(text)
                    word_tokens.append(positions)
                piece, positions = [], []
        if piece:
            words.append(tok.decode(piece).strip())
            word_tokens.append(positions)
        full_length = len(tok(prompt, truncation=False).input_ids)
        truncated = full_length > max_length
        kept = tok.decode([i for i in ids_list if i not in special]) if truncated else prompt
        return PromptEncoding(embeds=embeds, word_mask=word_mask.to(self.device), words=words,
                              word_tokens=word_tokens, truncated=truncated, kept=kept)

    # ----------------------------------------------------------------- one U-Net pass
    def check_controls(self, controls: dict[str, torch.Tensor]) -> None:
        """Raise UnsupportedConditionError for a visual input there is no ControlNet for."""
        for name in controls:
            if name not in self._modalities:
                available = ", ".join(self._modalities) or "none"
                raise UnsupportedConditionError(
                    f"this model has no ControlNet for a {name} input (available: {available})"
                )

    def _control_residuals(self, latents, t, embeds, controls, conditioning_scale):
        down, mid = None, None
        for name, image in controls.items():
            d, m = self.controlnet(name)(
                latents, t, encoder_hidden_states=embeds, controlnet_cond=image,
                conditioning_scale=conditioning_scale, return_dict=False,
            )
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        prompt_embeds: torch.Tensor,
        controls: dict[str, torch.Tensor],
        conditioning_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One U-Net(+ControlNet) pass without capture: (noise prediction, the ControlNets' mid residual or None).

        Arguments as :meth:`extract` (the controls already checked).
        """
        down, mid = self._control_residuals(latents, timestep, prompt_embeds, controls, conditioning_scale)
        noise_pred = self.unet(
            latents, timestep, encoder_hidden_states=prompt_embeds,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]
        return noise_pred, mid

    @contextmanager
    def capturing(self, store: dict):
        """Within the block, U-Net passes record h, f and the cross-attention into ``store``.

        Installs forward hooks on the mid and up blocks and swaps the decoder's cross-attention processors
        for recording ones; the U-Net is restored on exit. Yields the recorded layers' names.
        """
        # Only the decoder's attn2 layers are swapped (directly, not through a walk of the whole U-Net).
        layers = self._cross_attention_layers()
        originals = [module.processor for _, module in layers]
        store["attn"] = []
        store["f"] = [None] * len(self.unet.up_blocks)
        handles = [self.unet.mid_block.register_forward_hook(lambda m, i, o: store.__setitem__("mid", o))]
        for n, block in enumerate(self.unet.up_blocks):
            handles.append(block.register_forward_hook(lambda m, i, o, n=n: store["f"].__setitem__(n, o)))
        for i, (_, module) in enumerate(layers):
            module.set_processor(_CrossAttentionCapture(store["attn"], i))
        try:
            yield [name for name, _ in layers]
        finally:
            for handle in handles:
                handle.remove()
            for (_, module), processor in zip(layers, originals):
                module.set_processor(processor)

    def _collect(self, store, layers, mid_residual, latents, t, keep) -> EncoderFeatures:
        h = store["mid"] if mid_residual is None else store["mid"] + mid_residual
        height, width = latents.shape[-2:]
        attn_out: list[list[torch.Tensor]] = [[] for _ in self.unet.up_blocks]
        attn_probs = []
        for index, out, probs in sorted(store["attn"], key=lambda item: item[0]):
            block = int(layers[index].split(".")[1])
            scale = int(round((height * width / out.shape[1]) ** 0.5))
            size = (height // scale, width // scale)
            attn_out[block].append(out[keep].transpose(1, 2).reshape(-1, out.shape[-1], *size))
            attn_probs.append(probs[keep].transpose(1, 2).reshape(-1, probs.shape[-1], *size))
        t = torch.as_tensor(t)
        return EncoderFeatures(
            h=h[keep], f=[f[keep] for f in store["f"]], attn_out=attn_out, attn_probs=attn_probs,
            timestep=int(t) if t.numel() == 1 else t.tolist(),
        )

    def extract(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        prompt_embeds: torch.Tensor,
        controls: dict[str, torch.Tensor] | None = None,
        conditioning_scale: float = 1.0,
        rows: slice = slice(None),
    ) -> tuple[EncoderFeatures, torch.Tensor]:
        """One U-Net(+ControlNet) pass on a given noisy latent z_t, recording the features (a step of the
        pipeline's denoising loop, or training's pass on a noised photo latent).

        Args:
            latents: z_t, [B, 4, h, w].
            timestep: t, one for the batch or a [B] tensor (one per sample).
            prompt_embeds: CLIP embeddings, [B, 77, D].
            controls: modality -> condition image in [0, 1], [B, 3, H, W]; empty or None = text only.
            conditioning_scale: multiplier of the ControlNet residuals.
            rows: the batch rows whose features are kept (under classifier-free guidance: the conditional half).

        Returns:
            The features and the U-Net's noise prediction (of every row).
        """
        controls = controls or {}
        self.check_controls(controls)
        assert latents.ndim == 4 and prompt_embeds.shape[0] == latents.shape[0], "batch sizes differ"
        store: dict = {}
        with self._lock, self.capturing(store) as layers:
            noise_pred, mid = self.predict_noise(latents, timestep, prompt_embeds, controls, conditioning_scale)
        features = self._collect(store, layers, mid, latents, timestep, rows)
        return features, noise_pred

    # ----------------------------------------------------------------- schedule and noise
    def make_scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler of the loaded model's config ("trailing" spacing: the first step is t = T)."""
        return DDIMScheduler.from_config(self.scheduler_config)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Seeded Gaussian latents, one seed per sample, drawn on the CPU so every device agrees."""
        channels = self.unet.config.in_channels
        shape = (channels, self.latent_size, self.latent_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    # ----------------------------------------------------------------- VAE
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to images in [-1, 1]."""
        scaled = latents / self.vae.config.scaling_factor
        return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE-encode images in [-1, 1] to scaled latents (the training z_0)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor


def resize_features(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a [B, C, H, W] map to size x size (no-op when already there)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
