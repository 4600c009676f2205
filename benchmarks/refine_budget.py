#!/usr/bin/env python
"""The training-free mode's refinement: time against closeness to the target, to choose the faithfulness budgets.

    python benchmarks/refine_budget.py --preset tiny --photos 8 --max-steps 200
    python benchmarks/refine_budget.py --preset full-random --photos 1 --max-steps 12

For each target (real FFHQ-aligned photos from ``--photos-dir``, standing in for I^d_0: the refinement only sees
an image), the e4e-shaped encoder gives w0 and ``refine_latent`` runs L2 + LPIPS Adam steps exactly as the
training-free mode does (same learning rate and regulariser, no early stop), recording the loss and the time
after every step. The JSON holds, per preset: seconds per step, the mean loss curve relative to step 0, the step
at which the curve has made 50 / 80 / 90 / 95 % of its ``--max-steps`` improvement, and the L2 / LPIPS closeness
(``mm2latent.editing.closeness``) at each named budget of ``FAITHFULNESS`` with its early stop.

With random weights (every preset here: no downloads) the curve's shape is that of Adam on this loss and G's
architecture; the absolute figures are not those of trained networks (docs/training_free.md says how the
budgets were chosen from it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FRACTIONS = (0.5, 0.8, 0.9, 0.95)


def build(preset: str):
    """(generator, e4e-shaped encoder, LPIPS) at the preset's size, random weights, seeded."""
    import torch

    from mm2latent import FacePipeline
    from mm2latent.editing.inversion import PSPEncoder, tiny_psp_config
    from mm2latent.models.networks import LPIPS, build_tiny_network

    pipe = FacePipeline.from_pretrained(preset, device="cpu")
    generator = pipe.generator
    sizes = dict(num_ws=generator.num_ws, style_dim=generator.style_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = PSPEncoder(**(tiny_psp_config(**sizes) if preset == "tiny" else sizes), architecture="e4e")
        lpips = build_tiny_network("lpips") if preset == "tiny" else LPIPS()
    for module in (encoder, lpips):
        module.eval().requires_grad_(False)
    return generator, encoder, lpips


def targets(photos_dir: Path, count: int, size: int):
    from PIL import Image

    from mm2latent.inputs.images import image_to_tensor

    files = sorted(photos_dir.glob("ffhq_*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no ffhq_*.jpg photos in {photos_dir}")
    return [image_to_tensor(Image.open(f), size) for f in files]


def improvement_steps(curve: list[float]) -> dict[str, int]:
    """The first step at which the curve has made each fraction of its total improvement."""
    start, end = curve[0], min(curve)
    out = {}
    for fraction in FRACTIONS:
        goal = start - fraction * (start - end)
        out[f"{round(fraction * 100)}%"] = next(i for i, v in enumerate(curve) if v <= goal)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny or full-random")
    parser.add_argument("--photos", type=int, default=4, help="how many target photos")
    parser.add_argument("--photos-dir", type=Path, default=REPO_ROOT.parent / "shared" / "testdata" / "photos")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--budgets", action="store_true", help="also run every FAITHFULNESS budget with early stop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from mm2latent.editing.closeness import FAITHFULNESS, measure_closeness
    from mm2latent.editing.inversion import encode_images, refine_latent
    from mm2latent.pipelines.editing import REFINE_LR, REFINE_W_REG

    torch.set_num_threads(max(1, torch.get_num_threads()))
    generator, encoder, lpips = build(args.preset)
    curves, step_seconds, budgets = [], [], {name: [] for name in FAITHFULNESS}
    for target in targets(args.photos_dir, args.photos, generator.resolution):
        w0 = encode_images(encoder, target, generator)
        stamps: list[float] = []
        start = time.perf_counter()
        result = refine_latent(generator, w0, target, steps=args.max_steps, lr=REFINE_LR, lpips=lpips,
                               patience=args.max_steps + 1, w_reg_weight=REFINE_W_REG,
                               latent_avg=generator.latent_avg, progress=False,
                               callback=lambda step, loss, stamps=stamps: stamps.append(time.perf_counter()))
        seconds = [b - a for a, b in zip([start, *stamps], stamps)][1:]  # step 0 is the first forward only
        step_seconds.append(sum(seconds) / max(1, len(seconds)))
        curves.append([v / result.losses[0] for v in result.losses])
        print(f"target {len(curves)}: loss {result.losses[0]:.4f} -> {min(result.losses):.4f}, "
              f"{step_seconds[-1]:.3f} s/step", flush=True)
        if args.budgets:
            for name, budget in FAITHFULNESS.items():
                begin = time.perf_counter()
                refined = refine_latent(generator, w0, target, steps=budget.steps, lr=REFINE_LR, lpips=lpips,
                                        patience=max(1, budget.patience), w_reg_weight=REFINE_W_REG,
                                        latent_avg=generator.latent_avg, progress=False)
                elapsed = time.perf_counter() - begin
                with torch.no_grad():
                    image = generator.synthesis(refined.latent)
                closeness = measure_closeness(image, target, lpips)[0]
                budgets[name].append({"seconds": elapsed, "steps_run": len(refined.losses) - 1,
                                      **closeness.as_dict()})
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
    results = {
        "preset": args.preset, "targets": len(curves), "max_steps": args.max_steps,
        "seconds_per_step": sum(step_seconds) / len(step_seconds),
        "mean_relative_loss": [round(v, 5) for v in mean_curve],
        "steps_to_improvement": improvement_steps(mean_curve),
        "budgets": {name: {"steps": FAITHFULNESS[name].steps, "patience": FAITHFULNESS[name].patience,
                           "runs": runs,
                           **({k: sum(r[k] for r in runs) / len(runs) for k in ("seconds", "steps_run", "l2")}
                              if runs else {})}
                    for name, runs in budgets.items()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"refine-budget-{args.preset}.json"
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("mean_relative_loss", "budgets")}, indent=1))
    for name, item in results["budgets"].items():
        if item["runs"]:
            print(f"{name}: {item['steps_run']:.1f} steps, {item['seconds']:.2f} s, L2 {item['l2']:.4f}, "
                  f"LPIPS {sum(r['lpips'] for r in item['runs']) / len(item['runs']):.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
