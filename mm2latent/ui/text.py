"""The Space's words: title, banner, example prompts, About section and CSS."""

from __future__ import annotations

import os

#: One naming everywhere (Space, README, docs): the project and library "mm2latent"; its two engines "DDGI"
#: (diffusion features, the CVPR 2024 method, the default) and "MM2Latent" (fast, no diffusion model); DDGI's
#: modes "fast", "quality" and "training-free".
PROJECT = "mm2latent"

TITLE = "mm2latent: faces from text + a mask or sketch"

INTRO = (
    "Describe a face, then paint a **mask** or draw a **sketch** and press **Generate**. The default engine, "
    "**DDGI**, reads both with a frozen Stable Diffusion + ControlNet and maps what it sees to a StyleGAN2 latent, "
    "which draws the face."
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
consistent, and editable in W+. This is the **DDGI** engine (Kim et al., CVPR 2024). Its *fast* mode reads the
diffusion features once at the first step; *quality* mode runs several DDIM steps and combines their latents
(early steps carry the text, late steps the structure); the *training-free* mode lets the diffusion model draw
and inverts the drawing into StyleGAN2 (public weights, no trained M and T). The **MM2Latent** engine, where
offered, maps text, mask and sketch codes straight to W+ without a diffusion model. This Space runs
**mm2latent**, an independent reimplementation of both; no official code was released.

**Outputs.** For every run you get the faces, the seed of each, the per-word attention maps Ā laid over
your input (which words act where), the W+ latents (`.npy`, one row per face) and PNGs whose metadata
holds the prompt, seed and settings and marks them as AI-generated. The optional diffusion preview shows
I<sup>d</sup><sub>0</sub>, what the diffusion model itself draws from the same inputs.

**Limits.** Faces only: aligned, FFHQ-like portrait crops, one face, roughly frontal. Masks use the 19
CelebAMask-HQ classes (left/right are the person's own, so they are mirrored on screen). The generator
learned from FFHQ and CelebA-HQ and inherits their biases. Prompts longer than the text encoder's 77
tokens (about 60 words) are cut by the encoder.

**Generated faces are synthetic** and show no real person. **Edited photos** still show the person in the
photo you uploaded: edit only photos you may use, and present neither as an unedited photograph of someone.

**Cite.** Jihyun Kim, Changjae Oh, Hoseok Do, Soohyun Kim, Kwanghoon Sohn. *Diffusion-driven GAN Inversion for
Multi-Modal Face Image Generation.* CVPR 2024 ([arXiv:2405.04356](https://arxiv.org/abs/2405.04356)).

```bibtex
{CITATION}
```
"""


WEIGHTS_DOC = "docs/weights.md"


def weights_link() -> str:
    """Where "how to get real faces" is written: the Space's own copy of docs/weights.md when it runs on a Space
    (Hugging Face sets ``SPACE_ID``), else the file's name in the repository."""
    space = os.environ.get("SPACE_ID", "").strip()
    if space:
        return f"[how to get real faces](https://huggingface.co/spaces/{space}/blob/main/{WEIGHTS_DOC})"
    return f"how to get real faces: `{WEIGHTS_DOC}`"


def model_status(requested: str, loaded: str, trained: bool, failures: list[tuple[str, str]],
                 skipped: list[str] = ()) -> tuple[str | None, str | None]:
    """One sentence for the top of the page (what runs, what it means for the pictures, where to read how to get
    real faces) and the Markdown of the collapsed details under it; (None, None) when the requested trained model
    runs. Neither names a server path or an exception: the log keeps the full messages.

    Args:
        requested: ``MM2LATENT_MODEL_REPO``.
        loaded: the name of the model that runs (``tiny``, ``public`` or the requested one).
        trained: whether its M and T are trained.
        failures: (model, plain reason) for each model of the load order that could not be loaded, in order.
        skipped: unpublished repositories of the load order, not tried.
    """
    if trained and not failures:
        return None, None
    if loaded == "tiny":
        sentence = ("⚠️ **Demo mode: untrained toy networks, so the pictures are noise, not faces** "
                    f"({weights_link()}).")
    elif loaded == "public":
        sentence = ("ℹ️ **Training-free mode: public networks draw real faces, slowly (no trained weights are "
                    f"published yet)** ({weights_link()}).")
    else:
        sentence = (f"⚠️ **`{loaded}` has untrained mapping networks, so the pictures are not real faces** "
                    f"({weights_link()}).")
    why = [f"- `{name}`: not published yet, so it was not tried." for name in skipped]
    why += [f"- `{model}`: {reason}." for model, reason in failures]
    if not why and requested == loaded:
        why = [f"- The Space was started with `MM2LATENT_MODEL_REPO={requested}`."]
    fix = ("To get real faces, run the Space on a machine that can reach the Hugging Face Hub with "
           "`MM2LATENT_MODEL_REPO=public` (training-free; every network is public, several GB are downloaded "
           "once), or point `MM2LATENT_MODEL_REPO` at trained weights (a Hub repository or folder holding an "
           "`mm2latent.json` manifest), and restart.")
    if loaded == "public":
        fix = "Point `MM2LATENT_MODEL_REPO` at trained weights and restart for the fast, trained method."
    return sentence, "\n".join(["What was tried:", "", *why, "", fix])


CSS = """
#mm2l-status { border: 1px solid #e0a800; background: #fff8e1; color: #5c4400; border-radius: 8px;
               padding: 6px 12px; gap: 4px; }
#mm2l-status p { margin: 0; }
#mm2l-status-details { background: transparent; border: none; padding: 0; }
#mm2l-intro h1 { font-size: 1.5em; margin: 0 0 4px; }
#mm2l-intro p { margin: 0; }
.mm2l-caption p { margin: 0; }
/* The template picked, shown as a plain picture over the mask editor until the editor has drawn it. */
#template-preview { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                    pointer-events: none; z-index: 5; }
#template-preview img { max-width: 100%; max-height: 100%; object-fit: contain; }
#template-preview span { position: absolute; bottom: 6px; left: 50%; transform: translateX(-50%);
                         background: #000a; color: #fff; border-radius: 4px; padding: 2px 8px; font-size: 0.85em; }
.mm2l-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.85em; line-height: 1.6; }
.mm2l-legend-item { display: inline-flex; align-items: center; gap: 5px; white-space: nowrap; }
/* Gradio sizes a gallery's grid as `columns` fixed 100px tracks, wider than a narrow panel: its last columns
   were cut off (at 1400 px and on phones). Fill the width with as many columns as fit, wrapping the rest. */
#attention .grid-container, #diffusion .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)) !important; }
/* The 3D tab's face and depth map fill their boxes (small models render 64² faces and 16² depth maps). */
#image-3d img, #depth-image-3d img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#image-3d, #depth-image-3d { max-width: 100%; }
.mm2l-swatch { width: 14px; height: 14px; border-radius: 3px; border: 1px solid #8886;
               display: inline-block; }
"""
