"""The Space's words: title, banner, example prompts, About section and CSS."""

from __future__ import annotations

from ..pipelines.hub import DEFAULT_MODEL_REPO

TITLE = "MM2Latent faces: text + mask or sketch → StyleGAN2"

INTRO = (
    "Describe a face, then give it a layout: paint a **semantic mask** (start from a template) or draw a "
    "**sketch**. A frozen Stable Diffusion + ControlNet reads both; small networks turn what it sees into a "
    "StyleGAN2 latent, which draws the face. All faces here are synthetic."
)

# In the style of the CelebA / Multi-Modal-CelebA-HQ captions.
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "She has long wavy blonde hair and is smiling.",
    "He has short black hair, a beard and wears eyeglasses.",
    "This young woman has straight brown hair, arched eyebrows and her mouth slightly open.",
    "The man has gray hair, bushy eyebrows and a big nose.",
    "She wears heavy makeup and lipstick and has bangs.",
    "This smiling man has a goatee, rosy cheeks and wears a hat.",
)

CITATION = """@inproceedings{Kim_2024_CVPR,
  title     = {Diffusion-driven GAN Inversion for Multi-Modal Face Image Generation},
  author    = {Kim, Jihyun and Oh, Changjae and Do, Hoseok and Kim, Soohyun and Sohn, Kwanghoon},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024},
  pages     = {10403--10412}
}"""

ABOUT = f"""
**What it does.** A text prompt and a visual layout (a 19-class face mask or a sketch) go through a frozen
Stable Diffusion 1.5 U-Net with a ControlNet. Its features are turned into a StyleGAN2 **W+** latent by a
mapping network *M* (from the U-Net's middle block) and an attention-based style modulation network *T*
(from the decoder blocks and the cross-attention maps Ā), so the face is drawn by StyleGAN2: sharp,
consistent, and editable in W+. *Fast* mode reads the diffusion features once at the first step;
*quality* mode runs several DDIM steps and combines their latents (early steps carry the text, late steps
the structure). This Space runs an independent reimplementation; no official code was released.

**Outputs.** For every run you get the faces, the seed of each, the per-word attention maps Ā laid over
your input (which words act where), the W+ latents (`.npy`, one row per face) and PNGs whose metadata
holds the prompt, seed and settings and marks them as AI-generated. The optional diffusion preview shows
I<sup>d</sup><sub>0</sub>, what the diffusion model itself draws from the same inputs.

**Limits.** Faces only: aligned, FFHQ-like portrait crops, one face, roughly frontal. Masks use the 19
CelebAMask-HQ classes (left/right are the person's own, so they are mirrored on screen). The generator
learned from FFHQ and CelebA-HQ and inherits their biases. Prompts longer than the text encoder's 77
tokens (about 60 words) are cut by the encoder.

**Outputs are synthetic.** They show no real person; do not present them as photographs of someone.

**Cite.** Jihyun Kim, Changjae Oh, Hoseok Do, Soohyun Kim, Kwanghoon Sohn. *Diffusion-driven GAN Inversion for
Multi-Modal Face Image Generation.* CVPR 2024 ([arXiv:2405.04356](https://arxiv.org/abs/2405.04356)).

```bibtex
{CITATION}
```
"""


MAX_REASON_CHARS = 600  # a library message can carry a long "to fix" hint; the log keeps it whole


def model_banner(requested: str, loaded: str, trained: bool, failures: list[tuple[str, str]]) -> str | None:
    """Markdown for the top of the page: which model runs and why; None when the requested trained model runs.

    Args:
        requested: ``MM2LATENT_MODEL_REPO``.
        loaded: the name of the model that runs (``tiny``, ``public`` or the requested one).
        trained: whether its M and T are trained.
        failures: (model, reason) for each model of the load order that could not be loaded, in order.
    """
    if trained and not failures:
        return None
    why = [f"- `{model}` could not be loaded: {_short(reason)}" for model, reason in failures]
    if loaded == "tiny":
        if not failures:
            why = ["- The Space was started with `MM2LATENT_MODEL_REPO=tiny`."]
        return "\n\n".join([
            "⚠️ **Untrained demo weights: the Space is running the built-in `tiny` preset.** The app works end to "
            "end, but its networks hold random weights: the pictures are noise-like placeholders, not faces, and "
            "the identity score means nothing.", *why,
            f"To use a real model, set `MM2LATENT_MODEL_REPO` (default `{DEFAULT_MODEL_REPO}`) to a Hub "
            "repository or folder holding an `mm2latent.json` manifest, or to `public` for the training-free "
            "public networks; make sure the machine can reach the Hub (unset `HF_HUB_OFFLINE`), add an `HF_TOKEN` "
            "secret if a repository is gated, and restart.",
        ])
    if loaded == "public":
        if not failures:
            why = ["- The Space was started with `MM2LATENT_MODEL_REPO=public`."]
        return "\n\n".join([
            "ℹ️ **Training-free public model: the Space is running the `public` preset.** Every network comes "
            "from public checkpoints (Stable Diffusion 1.5 with a ControlNet, the FFHQ StyleGAN2, e4e, BiSeNet, "
            "ArcFace, CLIP), but the mapping networks M and T are not trained yet: faces are drawn by the "
            "diffusion model and inverted into StyleGAN2, and photo edits use CLIP guidance with an identity "
            "term rather than T.", *why,
            "Point `MM2LATENT_MODEL_REPO` at trained weights and restart for the full method.",
        ])
    return "\n\n".join([
        f"⚠️ **Untrained weights: `{loaded}` holds untrained M and T.** Generation works, but results are not "
        "meaningful faces.", *why, "Point `MM2LATENT_MODEL_REPO` at trained weights and restart.",
    ])


def _short(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


CSS = """
#mm2l-banner { border: 1px solid #e0a800; background: #fff8e1; color: #5c4400; border-radius: 8px;
               padding: 10px 14px; }
#mm2l-banner p { margin: 0; }
.mm2l-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.85em; line-height: 1.6; }
.mm2l-legend-item { display: inline-flex; align-items: center; gap: 5px; white-space: nowrap; }
/* Gradio sizes a gallery's grid as `columns` fixed 100px tracks, wider than a narrow panel: its last columns
   were cut off (at 1400 px and on phones). Fill the width with as many columns as fit, wrapping the rest. */
#attention .grid-container, #diffusion .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)) !important; }
/* The 3D tab's face and depth map fill their boxes (small models render 64² faces and 16² depth maps). */
#image-3d img, #depth-image-3d img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.mm2l-swatch { width: 14px; height: 14px; border-radius: 3px; border: 1px solid #8886;
               display: inline-block; }
"""
