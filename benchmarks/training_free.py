#!/usr/bin/env python
"""The training-free mode's time per face: 4-step LCM drawing against the 20-step guided baseline, in one run.

    nice python benchmarks/training_free.py --preset full-random            # real sizes, random weights
    python benchmarks/training_free.py --preset tiny --budgets encoder       # a quick check of the script

One process, one set of modules (SD-1.5 U-Net, ControlNet, CLIP text encoder, VAE, 1024² StyleGAN2, e4e-shaped
IR-SE50 encoder, LPIPS-VGG, BiSeNet at their real sizes with random weights: time does not depend on weight
values), in this order:

1. optionally (``--quality-draw``) our own 20-step guided drawing of I^d_0 (the "quality" drawing);
2. fusing a LoRA of the published LCM-LoRA's layout and rank (64) into the U-Net (once per process);
3. the "fast" drawing: 4 LCM steps, guidance 1 (no unconditional pass), VAE decode;
4. the e4e encoder, the alignment of I^d_0 (dlib), G, the closeness figures;
5. each refinement budget of ``FAITHFULNESS`` (L2 + LPIPS + the parser's mask term, as the mode runs it), and
   before the longest one the baseline: diffusers' ``StableDiffusionControlNetPipeline`` on the very same module
   objects (the LoRA unfused first), 20 DDIM steps, guidance 7.5 (batched unconditional pass), VAE decode, PIL.

The cheap stages come first so that a run interrupted on a busy machine keeps them (the JSON is rewritten
after every stage). Peak RSS is VmHWM from after the test LoRA file was written.

Time per face = drawing + alignment + encoder + refinement + G + closeness. The JSON (``--out``, default
``benchmarks/results/training-free-<device>-<preset>.json``) holds every figure, peak RSS, the CPU model and its
vector extensions and the load average before and after (the machine is shared: read the figures with it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROMPT = "She has long wavy blonde hair and is smiling."
SEED = 0
BASELINE_STEPS, BASELINE_GUIDANCE = 20, 7.5
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_description() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "vector_flags": [f for f in VECTOR_FLAGS if f in flags]}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Wall-clock seconds of each run of a labelled stage, kept in ``results``."""

    def __init__(self, results: dict):
        self.results = results

    def __call__(self, label: str, fn, repeats: int = 1):
        seconds, value = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn()
            seconds.append(time.perf_counter() - start)
        self.results[label] = {"seconds": [round(s, 3) for s in seconds], "best_s": round(min(seconds), 3)}
        log(f"{label}: {', '.join(f'{s:.2f}' for s in seconds)} s")
        return value


def peak_rss_since_reset_gib() -> float | None:
    """VmHWM (peak resident memory since the last :func:`reset_peak_rss`), or None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux: "5" to clear_refs), so that the test LoRA's writing does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def editing_networks(generator, preset: str) -> dict:
    """e4e-shaped encoder, LPIPS and BiSeNet: the preset's toy ones, or full size with random weights."""
    import torch

    from mm2latent.editing.inversion import PSPEncoder, tiny_psp_config
    from mm2latent.models.networks import NETWORKS, build_tiny_network

    sizes = dict(num_ws=generator.num_ws, style_dim=generator.style_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if preset == "tiny":
            parts = {"inverter": PSPEncoder(**tiny_psp_config(**sizes), architecture="e4e"),
                     "lpips": build_tiny_network("lpips"), "face_parser": build_tiny_network("face_parser")}
        else:
            parts = {"inverter": PSPEncoder(**sizes, architecture="e4e"), "lpips": NETWORKS["lpips"][0](),
                     "face_parser": NETWORKS["face_parser"][0]()}
    for module in parts.values():
        module.eval().requires_grad_(False)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full-random")
    parser.add_argument("--budgets", nargs="+", default=None, help="FAITHFULNESS names to time (default: all)")
    parser.add_argument("--quality-draw", action="store_true", help="also time our 20-step guided drawing")
    parser.add_argument("--lcm-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from mm2latent import FacePipeline
    from mm2latent.editing.closeness import FAITHFULNESS, measure_closeness
    from mm2latent.editing.drawing_alignment import align_drawing
    from mm2latent.editing.inversion import encode_images, refine_latent
    from mm2latent.inputs.conditions import CELEBAMASK_PALETTE
    from mm2latent.inputs.images import image_to_tensor, tensor_to_pil
    from mm2latent.models.few_step import (
        DRAWINGS,
        FewStepLoRA,
        make_scheduler,
        save_random_lora,
        step_generators,
    )
    from mm2latent.pipelines.editing import REFINE_LR, REFINE_MASK_WEIGHT, REFINE_W_REG
    from mm2latent.pipelines.speedups import synthetic_face_mask

    budgets = args.budgets or list(FAITHFULNESS)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"training-free-cpu-{args.preset}.json"
    results: dict = {"preset": args.preset, "cpu": cpu_description(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv),
                     "times": {}}
    timer = Timer(results["times"])

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        results["peak_rss_gib_with_lora_writing"] = round(peak_rss_gib(), 2)
        peak = peak_rss_since_reset_gib()
        results["peak_rss_gib"] = round(peak, 2) if peak is not None else None
        out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as folder:
        pipe = FacePipeline.from_pretrained(args.preset, device="cpu")
        pipe.show_progress = False
        encoder, generator = pipe.encoder, pipe.generator
        lora_path = save_random_lora(encoder.unet, Path(folder) / "pytorch_lora_weights.safetensors", seed=1)
        reset_peak_rss()
        networks = editing_networks(generator, args.preset)
        modality = "mask" if "mask" in encoder.modalities else encoder.modalities[0]
        controlnet, vae = encoder.controlnet(modality), encoder.vae  # loaded before any timing
        ids = synthetic_face_mask(encoder.image_size)
        mask_rgb = Image.fromarray(CELEBAMASK_PALETTE[ids], mode="RGB")
        controls, _ = pipe.prepare_conditions(**{modality: Image.fromarray(ids, mode="L") if modality == "mask"
                                                 else mask_rgb})
        prompts = pipe.encode_prompts([PROMPT])
        save()

        # 2. our quality drawing
        quality = DRAWINGS["quality"]
        if args.quality_draw:
            timer("draw: quality (20 DDIM steps, guidance 7.5)",
                  lambda: pipe.draw(prompts, controls, pipe.prepare_noise([SEED]), num_steps=quality.num_steps,
                                    guidance_scale=quality.guidance_scale))
            save()

        # 3-4. LCM-LoRA fused, 4 steps without guidance
        fast = DRAWINGS["fast"]
        lora = FewStepLoRA.from_file(lora_path, name="random LoRA, LCM-LoRA layout, rank 64")
        timer("LCM-LoRA: fuse into the U-Net (once per process)", lambda: lora.fuse(encoder.unet))
        noise = pipe.prepare_noise([SEED])

        def draw_fast():
            return pipe.draw(prompts, controls, noise, num_steps=fast.num_steps, guidance_scale=fast.guidance_scale,
                             scheduler=make_scheduler("lcm", encoder.scheduler_config),
                             generator=step_generators([SEED], tuple(noise.shape[1:])))

        drawing = timer("draw: fast (4 LCM steps, guidance 1)", draw_fast, repeats=args.lcm_repeats)
        save()

        # 5. alignment, encoder, G, closeness
        drawn = tensor_to_pil(drawing.images)[0]
        aligned = timer("align I^d_0 (dlib)", lambda: align_drawing(drawn, ids))
        target = image_to_tensor(aligned.image, generator.resolution)
        latent = timer("e4e encoder", lambda: encode_images(networks["inverter"], target, generator), repeats=2)

        def render(w):
            with torch.no_grad():
                return generator.synthesis(w)

        image = timer("G (1024² StyleGAN2 synthesis)", lambda: render(latent), repeats=2)
        mask_ids = torch.from_numpy(np.asarray(aligned.mask_ids, dtype=np.int64))[None]
        timer("closeness (L2, LPIPS, parser mIoU)",
              lambda: measure_closeness(image, target, networks["lpips"], networks["face_parser"], mask_ids))
        save()

        # 6. the refinement budgets; the baseline before the longest one, so that an interrupted run has it
        def run_budget(name):
            budget = FAITHFULNESS[name]
            refined = timer(f"refine: {name} ({budget.steps} steps, patience {budget.patience})",
                            lambda budget=budget: refine_latent(
                                generator, latent, target, steps=budget.steps, lr=REFINE_LR, lpips=networks["lpips"],
                                patience=max(1, budget.patience), face_parser=networks["face_parser"],
                                mask_ids=mask_ids, mask_weight=REFINE_MASK_WEIGHT, w_reg_weight=REFINE_W_REG,
                                latent_avg=generator.latent_avg, progress=False))
            results["times"][f"refine: {name} ({budget.steps} steps, patience {budget.patience})"]["steps_run"] = \
                len(refined.losses) - 1
            save()

        longest = max(budgets, key=lambda name: FAITHFULNESS[name].steps)
        for name in budgets:
            if name != longest:
                run_budget(name)
        # the baseline on the same modules (SD-1.5's own U-Net again)
        timer("LCM-LoRA: unfuse (before the baseline)", lambda: lora.unfuse(encoder.unet))
        baseline = StableDiffusionControlNetPipeline(
            vae=vae, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, unet=encoder.unet,
            controlnet=controlnet, scheduler=encoder.make_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        baseline.set_progress_bar_config(disable=True)
        timer("baseline: diffusers ControlNet pipeline, 20 DDIM steps, guidance 7.5",
              lambda: baseline(PROMPT, image=mask_rgb, num_inference_steps=BASELINE_STEPS,
                               guidance_scale=BASELINE_GUIDANCE, generator=torch.Generator().manual_seed(SEED)).images)
        save()

        run_budget(longest)

    # per face, and against the baseline
    times = {k: v["best_s"] for k, v in results["times"].items()}
    base = times["baseline: diffusers ControlNet pipeline, 20 DDIM steps, guidance 7.5"]
    common = sum(v for k, v in times.items() if k.startswith(("align", "e4e", "G (", "closeness")))
    per_face = {}
    for name in budgets:
        key = next(k for k in times if k.startswith(f"refine: {name} "))
        per_face[f"fast drawing, faithfulness {name}"] = times["draw: fast (4 LCM steps, guidance 1)"] + common + times[key]
        if args.quality_draw:
            per_face[f"quality drawing, faithfulness {name}"] = (times["draw: quality (20 DDIM steps, guidance 7.5)"]
                                                                 + common + times[key])
    results["per_face_s"] = {k: round(v, 2) for k, v in per_face.items()}
    results["baseline_over_training_free"] = {k: round(base / v, 2) for k, v in per_face.items()}
    results["load_average_after"] = os.getloadavg()
    save()
    log(json.dumps({"per_face_s": results["per_face_s"], "speedup": results["baseline_over_training_free"],
                    "peak_rss_gib": results["peak_rss_gib"]}, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
