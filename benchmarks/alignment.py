#!/usr/bin/env python
"""Alignment benchmark: FFHQ crops moved by known transforms, aligned again, compared with the original.

    python benchmarks/alignment.py                       # ../shared/testdata/photos/ffhq_*.jpg
    python benchmarks/alignment.py --per-photo 1 --landmarks haar

Every FFHQ photo is already aligned, so aligning a transformed copy of it must give the photo back. Cases
per photo (seeded):

* ``similarity-black`` / ``similarity-reflect``: ``--per-photo`` random similarity transforms each
  (rotation +-15 degrees, scale 0.6-1.0, shift +-10 % of the side) onto a canvas of the photo's size, the
  uncovered canvas black or filled with the reflected photo;
* ``rotation-30``: turned by +30 and -30 degrees (scale 0.8, black corners): found upright, with the
  points predicted again on a levelled view;
* ``rotation-60``: turned by +-60 degrees: only the search on the photo turned by 30 degrees finds them;
* ``downscaled-200``: the photo resized to 200 px (still an FFHQ crop: usually kept as is);
* ``moved-200``: a random similarity transform (reflect padding), then resized to 200 px;
* ``two-faces``: the photo (scale 0.8) beside the next one (scale 0.55) on a wide canvas: the larger
  face must be chosen.

Measures per case: ``eye_error_px``, the distance between where the original's eyes land in the aligned
crop and where they are in the original, at 1024 px (through the known transform and the crop's quad, so
it measures geometry, not pixels); ``difference``, the mean absolute difference (0-255) at 256² between
the aligned crop and the original over the pixels the transformed photo still shows; ``flat``, whether the
crop is one colour per channel (what the old padding bug produced). A case is correct when a face is
found, the eyes are within ``--max-eye-error`` px of FFHQ's crop or of the untransformed photo's own
re-alignment (``consistency_px``; both are right answers), the difference is at most ``--max-difference``
and the crop is not flat. ``--landmarks haar`` measures the OpenCV fallback on the same cases.

``floor_px`` is the eye error of the untransformed photo aligned without the "already aligned" shortcut:
dlib's points on the 1024 crop do not give exactly the crop FFHQ made from the larger in-the-wild photo.

Writes ``--out`` (JSON, default ``benchmarks/results/alignment-<landmarks>.json``) and a Markdown table
with the same stem (also printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mm2latent.editing import align  # noqa: E402
from mm2latent.errors import InvalidImageError  # noqa: E402

SCHEMA = "mm2latent-alignment/1"
SIDE = 1024  # FFHQ crops; errors are reported at this size
COMPARE = 256
FLAT_STD = 4.0  # a crop whose every channel varies less than this is flat (the old padding bug gave 0)
GOALS = {"correct_rate": 0.98, "mean_eye_error_px": 4.0, "flat_outputs": 0}  # and every 30 degree case correct


def similarity(angle_deg: float, scale: float, centre_to: tuple[float, float], side: int = SIDE) -> np.ndarray:
    """[2, 3] map of original pixels to canvas pixels: turn by ``angle_deg`` (counter-clockwise as seen)
    and scale about the photo centre, which lands on ``centre_to``."""
    theta = math.radians(angle_deg)
    linear = scale * np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    centre = np.array([(side - 1) / 2, (side - 1) / 2])
    return np.concatenate([linear, (np.asarray(centre_to) - linear @ centre)[:, None]], axis=1)


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def invert(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, (-linear @ matrix[:, 2])[:, None]], axis=1)


def render(photo: Image.Image, matrix: np.ndarray, canvas: tuple[int, int], padding: str = "black") -> Image.Image:
    """``photo`` moved by ``matrix`` (original -> canvas pixels, centres at integers) onto a ``canvas``
    (width, height); outside the photo the canvas is black or the photo reflected about its edges."""
    source, margin = photo, 0
    if padding == "reflect":
        margin = max(photo.size)
        source = Image.fromarray(np.pad(np.asarray(photo), ((margin, margin), (margin, margin), (0, 0)), "reflect"))
    back = invert(matrix)
    # PIL's affine maps continuous canvas coordinates (centres at +0.5) to continuous source ones.
    offset = back[:, 2] + 0.5 - back[:, :2] @ [0.5, 0.5] + margin
    data = (*back[0, :2], offset[0], *back[1, :2], offset[1])
    return source.transform(canvas, Image.Transform.AFFINE, data, Image.Resampling.BICUBIC)


def visible_mask(matrix: np.ndarray, canvas: tuple[int, int], size: int = COMPARE, inset: float = 8.0) -> np.ndarray:
    """[size, size] bool: which pixels of the original (compared at ``size``²) the canvas still shows,
    ``inset`` original pixels away from the canvas edge (where resampling blends in the padding)."""
    step = SIDE / size
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size)), axis=-1) + 0.5) * step - 0.5
    on_canvas = apply(matrix, grid.reshape(-1, 2)).reshape(size, size, 2)
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    margin = inset * scale
    return ((on_canvas[..., 0] >= margin - 0.5) & (on_canvas[..., 0] <= canvas[0] - 0.5 - margin)
            & (on_canvas[..., 1] >= margin - 0.5) & (on_canvas[..., 1] <= canvas[1] - 0.5 - margin))


def _small(image: Image.Image) -> np.ndarray:
    return np.float32(image.convert("RGB").resize((COMPARE, COMPARE), Image.Resampling.LANCZOS))


@dataclass
class Reference:
    """An FFHQ photo and where its eyes are: in the photo, and in its own re-alignment."""

    name: str
    image: Image.Image
    eyes: np.ndarray  # [2, 2] dlib's eye centres in the photo
    realigned_eyes: np.ndarray  # [2, 2] where the photo aligned again (no shortcut) puts them

    @classmethod
    def of(cls, path: Path) -> Reference:
        image = Image.open(path).convert("RGB")
        result = align.align_face(image, size=SIDE, keep_aligned=False)
        eyes = result.landmarks.as_array()[:2]
        return cls(path.name, image, eyes, align.crop_points(eyes, result.quad, SIDE))

    @property
    def floor_px(self) -> float:
        return float(np.hypot(*(self.realigned_eyes - self.eyes).T).max())


def evaluate(reference: Reference, case: Image.Image, matrix: np.ndarray, *, max_eye_error: float,
             max_difference: float) -> dict:
    """Align ``case`` (the reference photo moved by ``matrix``) and compare with the reference."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # "2 faces were found": recorded as faces_found
            warnings.simplefilter("ignore", UserWarning)
            result = align.align_face(case, size=SIDE)
    except InvalidImageError as error:
        return {"found": False, "correct": False, "error": f"{type(error).__name__}: {error}",
                "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    landed = align.crop_points(apply(matrix, reference.eyes), result.quad, SIDE)
    eye_error = float(np.hypot(*(landed - reference.eyes).T).max())
    consistency = float(np.hypot(*(landed - reference.realigned_eyes).T).max())
    aligned, original = _small(result.image), _small(reference.image)
    mask = visible_mask(matrix, case.size)
    difference = float(np.abs(aligned - original)[mask].mean())
    flat = bool(aligned.reshape(-1, 3).std(axis=0).max() < FLAT_STD)  # every channel one value
    return {
        "found": True,
        # Either answer is right: FFHQ's crop, or what dlib's points on the untransformed photo give.
        "correct": min(eye_error, consistency) <= max_eye_error and difference <= max_difference and not flat,
        "eye_error_px": eye_error,
        "consistency_px": consistency,
        "difference": difference,
        "visible": float(mask.mean()),
        "flat": flat,
        "method": result.method,
        "search_angle": result.search_angle,
        "faces_found": result.faces_found,
        "seconds": seconds,
    }


def resized(matrix: np.ndarray, scale: float) -> np.ndarray:
    """``matrix`` followed by resizing its canvas by ``scale`` (pixel centres at integers)."""
    return np.concatenate([scale * matrix[:, :2], (scale * (matrix[:, 2] + 0.5) - 0.5)[:, None]], axis=1)


def random_similarity(rng: np.random.Generator, side: int) -> tuple[dict, np.ndarray]:
    angle, scale = rng.uniform(-15, 15), rng.uniform(0.6, 1.0)
    shift = rng.uniform(-0.1, 0.1, size=2) * side
    params = {"angle": round(angle, 2), "scale": round(scale, 3), "shift": [round(float(s), 1) for s in shift]}
    return params, similarity(angle, scale, (side - 1) / 2 + shift, side)


def cases(photo: Image.Image, other: Image.Image, rng: np.random.Generator, per_photo: int):
    """(kind, parameters, transformed image, matrix) for one photo."""
    side = photo.width
    for padding in ("black", "reflect"):
        for _ in range(per_photo):
            params, matrix = random_similarity(rng, side)
            yield f"similarity-{padding}", {**params, "padding": padding}, render(photo, matrix, (side, side), padding), matrix
    for kind, angles in (("rotation-30", (30.0, -30.0)), ("rotation-60", (60.0, -60.0))):
        for angle in angles:
            matrix = similarity(angle, 0.8, ((side - 1) / 2,) * 2, side)
            yield kind, {"angle": angle, "scale": 0.8}, render(photo, matrix, (side, side)), matrix
    small = 200
    yield ("downscaled-200", {"side": small}, photo.resize((small, small), Image.Resampling.LANCZOS),
           resized(np.eye(2, 3), small / side))
    params, matrix = random_similarity(rng, side)
    moved = render(photo, matrix, (side, side), "reflect").resize((small, small), Image.Resampling.LANCZOS)
    yield "moved-200", {**params, "padding": "reflect", "side": small}, moved, resized(matrix, small / side)
    canvas = (1700, 1000)
    matrix = similarity(0.0, 0.8, (480, 500), side)
    pair = render(photo, matrix, canvas)
    pair.paste(other.resize((round(0.55 * side),) * 2, Image.Resampling.LANCZOS), (1050, 300))
    yield "two-faces", {"scale": 0.8, "other_scale": 0.55}, pair, matrix


def summarise(rows: list[dict]) -> dict:
    found = [r for r in rows if r["found"]]
    errors = [r["eye_error_px"] for r in found]
    return {
        "cases": len(rows),
        "found": len(found),
        "correct": sum(r["correct"] for r in rows),
        "correct_rate": sum(r["correct"] for r in rows) / len(rows),
        "mean_eye_error_px": statistics.fmean(errors) if errors else None,
        "mean_consistency_px": statistics.fmean(r["consistency_px"] for r in found) if found else None,
        "within_10px_of_ffhq": sum(r["eye_error_px"] <= 10 for r in found) / len(rows),
        "median_eye_error_px": statistics.median(errors) if errors else None,
        "max_eye_error_px": max(errors) if errors else None,
        "mean_difference": statistics.fmean(r["difference"] for r in found) if found else None,
        "flat_outputs": sum(r.get("flat", False) for r in rows),
        "turned_search": sum(r.get("search_angle", 0.0) != 0.0 for r in found),
        "haar_fallback": sum(r.get("method", "").startswith("haar") for r in found),
        "mean_seconds": statistics.fmean(r["seconds"] for r in rows),
    }


def markdown(report: dict) -> str:
    meta, floor = report["meta"], report["floor"]
    lines = [f"## mm2latent alignment — {meta['landmarks']} landmarks, {meta['photos']} FFHQ photos",
             "",
             f"{meta['date']} · seed {meta['seed']} · {meta['per_photo']} random transforms per photo and padding · "
             f"dlib {meta['dlib']} · eye errors in px at 1024 · correct = face found, eyes within "
             f"{meta['max_eye_error']:g} px of FFHQ's crop or of the untransformed photo's own re-alignment, difference ≤ "
             f"{meta['max_difference']:g} (0-255 at 256², visible pixels), not flat · floor (untransformed photo "
             f"re-aligned vs FFHQ's crop): mean {floor['mean_px']:.2f} px, max {floor['max_px']:.2f} px",
             "",
             "| cases | n | correct | eye error vs FFHQ: mean | median | max | ≤ 10 px | vs re-alignment: mean | "
             "difference | flat | turned search | Haar | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def number(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    for name, s in [*report["summary"]["by_kind"].items(), ("**all**", report["summary"]["all"])]:
        lines.append(f"| {name} | {s['cases']} | {100 * s['correct_rate']:.1f} % | {number(s['mean_eye_error_px'])} | "
                     f"{number(s['median_eye_error_px'])} | {number(s['max_eye_error_px'])} | "
                     f"{100 * s['within_10px_of_ffhq']:.0f} % | {number(s['mean_consistency_px'])} | "
                     f"{number(s['mean_difference'], 1)} | {s['flat_outputs']} | {s['turned_search']} | "
                     f"{s['haar_fallback']} | {s['mean_seconds']:.2f} |")
    lines += ["", "| goal | value | target | met |", "|---|---:|---:|---|"]
    for goal in report["goals"]:
        lines.append(f"| {goal['name']} | {goal['value']:.3g} | {goal['target']} | {'yes' if goal['met'] else 'no'} |")
    failures = [r for r in report["cases"] if not r["correct"]]
    if failures:
        lines += ["", "Incorrect cases:", ""]
        for r in failures:
            detail = r.get("error") or (f"eye error {r['eye_error_px']:.1f} px (vs re-alignment "
                                        f"{r['consistency_px']:.1f}), difference {r['difference']:.1f}"
                                        f"{', flat' if r['flat'] else ''}")
            lines.append(f"- {r['photo']} {r['kind']} {json.dumps(r['params'])}: {detail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=REPO_ROOT.parent / "shared" / "testdata" / "photos",
                        help="folder of 1024² FFHQ crops")
    parser.add_argument("--glob", default="ffhq_*.jpg", help="which files of --photos to use")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random transforms")
    parser.add_argument("--per-photo", type=int, default=3, help="random similarity transforms per photo and padding")
    parser.add_argument("--max-eye-error", type=float, default=10.0, help="px at 1024 for a correct case")
    parser.add_argument("--max-difference", type=float, default=25.0,
                        help="mean abs difference (0-255) for a correct case (another FFHQ face: 34-125)")
    parser.add_argument("--landmarks", choices=["dlib", "haar"], default="dlib",
                        help="haar: force the Haar fallback, for comparison")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/alignment-<landmarks>.json)")
    args = parser.parse_args(argv)

    paths = sorted(args.photos.glob(args.glob), key=lambda p: (len(p.stem), p.stem))
    if not paths:
        parser.error(f"no {args.glob} in {args.photos}")
    rng = np.random.default_rng(args.seed)
    force_haar = mock.patch.object(align, "_find_landmarks", return_value=None) if args.landmarks == "haar" else nullcontext()
    rows = []
    # The references always use dlib: they say where the eyes are, whatever method is measured.
    references = [Reference.of(p) for p in tqdm(paths, desc="reference landmarks", leave=False)]
    if any(r.image.size != (SIDE, SIDE) for r in references):
        parser.error(f"the photos must be {SIDE}² FFHQ crops")
    with force_haar:
        work = [(reference, case) for i, reference in enumerate(references)
                for case in cases(reference.image, references[(i + 1) % len(references)].image, rng, args.per_photo)]
        for reference, (kind, params, image, matrix) in tqdm(work, desc="alignment cases"):
            row = evaluate(reference, image, matrix, max_eye_error=args.max_eye_error,
                           max_difference=args.max_difference)
            rows.append({"photo": reference.name, "kind": kind, "params": params, **row})

    kinds = sorted({r["kind"] for r in rows}, key=[r["kind"] for r in rows].index)
    summary = {"by_kind": {k: summarise([r for r in rows if r["kind"] == k]) for k in kinds},
               "all": summarise(rows)}
    similarity_rows = [r for r in rows if r["kind"].startswith("similarity")]
    rotations = [r for r in rows if r["kind"] == "rotation-30"]
    similarity_error = summarise(similarity_rows)["mean_eye_error_px"]
    similarity_error = math.inf if similarity_error is None else similarity_error
    goals = [
        {"name": "correct rate (all cases)", "value": summary["all"]["correct_rate"], "target": ">= 0.98",
         "met": summary["all"]["correct_rate"] >= GOALS["correct_rate"]},
        {"name": "mean eye error vs FFHQ, similarity cases (px)", "value": similarity_error, "target": "<= 4",
         "met": similarity_error <= GOALS["mean_eye_error_px"]},
        {"name": "flat outputs", "value": summary["all"]["flat_outputs"], "target": "0",
         "met": summary["all"]["flat_outputs"] == GOALS["flat_outputs"]},
        {"name": "30 degree rotations found and correct", "value": sum(r["correct"] for r in rotations) / len(rotations),
         "target": "1", "met": all(r["correct"] for r in rotations)},
    ]
    import dlib

    report = {
        "schema": SCHEMA,
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "python": platform.python_version(), "dlib": dlib.__version__, "numpy": np.__version__,
            "pillow": Image.__version__, "landmarks": args.landmarks, "photos": len(references), "seed": args.seed,
            "per_photo": args.per_photo, "max_eye_error": args.max_eye_error, "max_difference": args.max_difference,
        },
        "floor": {"per_photo": {r.name: r.floor_px for r in references},
                  "mean_px": statistics.fmean(r.floor_px for r in references),
                  "max_px": max(r.floor_px for r in references)},
        "summary": summary,
        "goals": goals,
        "cases": rows,
    }
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"alignment-{args.landmarks}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
