"""The paper's Table 1 on sampled mask/scribble–text pairs of the test split.

    python -m mm2latent.training.evaluate --model runs/stage2_modulator/final --data data/celebamask-hq-prepared \
        --num-samples 2000 --output eval/

For every sampled test image and modality, the model generates a face from (caption, mask or scribble)
and is compared with the ground-truth photo: FID (set level), LPIPS, MS-SSIM, ArcFace identity
similarity; for masks, pixel accuracy and mIoU of the face parser's mask of the output against the
input mask; CLIP score of output vs caption (transformers' CLIP). Writes ``metrics.json`` and
``table1.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..inputs.images import image_to_tensor
from ..models.networks import build_tiny_network, load_network
from ..pipelines.generation import FacePipeline
from . import metrics as M

COLUMNS = {  # key -> (header, higher is better)
    "fid": ("FID↓", False), "lpips": ("LPIPS↓", False), "ms_ssim": ("MS-SSIM↑", True), "id": ("ID↑", True),
    "pixel_accuracy": ("ACC↑", True), "miou": ("mIoU↑", True), "clip_score": ("CLIP↑", True),
}
MODALITY_TITLES = {"mask": "Text + Mask", "scribble": "Text + Scribble"}


def _pil_inputs(item: dict, modality: str):
    control = (item["controls"][modality].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(control) if modality == "mask" else Image.fromarray(control[..., 0])


@torch.no_grad()
def evaluate(
    pipe: FacePipeline,
    dataset,
    modalities: tuple[str, ...] = ("mask", "scribble"),
    num_samples: int = 2000,
    seed: int = 0,
    lpips=None,
    arcface=None,
    face_parser=None,
    fid_feature: str | torch.nn.Module = "inception",
    clip: M.CLIPScorer | None = None,
    mode: str = "fast",
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per modality, averaged over ``num_samples`` seeded pairs (FID over the whole set).

    Args:
        pipe: the trained pipeline.
        dataset: items with ``target`` (G resolution, [-1, 1]), ``controls`` and ``caption``.
        modalities: visual inputs to evaluate (each needs a ControlNet in ``pipe``).
        num_samples: pairs per modality (capped at the dataset size).
        seed: picks the pairs and seeds the generation (sample i uses seed + i).
        lpips, arcface, face_parser: metric networks (``mm2latent.models.networks``); None skips that metric.
        fid_feature: "inception" (torch-fidelity's InceptionV3), a ``FIDFeatures`` module, or None to skip FID.
        clip: a ``CLIPScorer``, or None to skip the CLIP score.
        mode: the pipeline's generation mode.
        show_progress: tqdm bar.
    """
    positions = np.random.default_rng(seed).permutation(len(dataset))[:num_samples]
    results: dict[str, dict[str, float]] = {}
    for modality in modalities:
        sums: dict[str, list[float]] = {}
        confusion = torch.zeros(19, 19, dtype=torch.long)
        fid = M.make_fid(fid_feature) if fid_feature is not None else None
        for i, position in enumerate(tqdm(positions, desc=f"evaluate {modality}", disable=not show_progress)):
            item = dataset[(int(position), 0)]
            visual = {modality: _pil_inputs(item, modality)}
            out = pipe(item["caption"], seed=seed + i, mode=mode, **visual)
            image = torch.cat([image_to_tensor(i) for i in out.images]).to(pipe.device)
            target = item["target"][None].to(pipe.device)
            if target.shape[-1] != image.shape[-1]:
                target = F.interpolate(target, size=image.shape[-2:], mode="bilinear", antialias=True)
            scores = {"ms_ssim": M.ms_ssim(image.cpu(), target.cpu())}
            if lpips is not None:
                scores["lpips"] = M.lpips_distance(lpips, image, target)
            if arcface is not None:
                scores["id"] = M.identity_similarity(arcface, image, target)
            if clip is not None:
                scores["clip_score"] = clip(image, [item["caption"]])
            for key, value in scores.items():
                sums.setdefault(key, []).append(float(value.mean()))
            if modality == "mask" and face_parser is not None:
                from ..inputs.conditions import parse_mask

                ids = torch.from_numpy(parse_mask(visual["mask"], require_face=False).astype(np.int64))
                predicted = face_parser.parse(image, size=ids.shape[-1])[0].cpu()
                confusion += M.confusion_matrix(predicted, ids)
            if fid is not None:
                M.fid_update(fid, target, real=True)
                M.fid_update(fid, image, real=False)
        row = {key: float(np.mean(values)) for key, values in sums.items()}
        if modality == "mask" and face_parser is not None:
            row.update(M.mask_scores(confusion))
        if fid is not None and len(positions) >= 2:
            row["fid"] = float(fid.compute())
        row["num_samples"] = len(positions)
        results[modality] = row
    return results


def markdown_table(results: dict[str, dict[str, float]], method: str = "mm2latent (ours)") -> str:
    """Table 1's layout: one row per method, the metric columns grouped by input modality."""
    headers, cells = ["Method"], [method]
    for modality, row in results.items():
        for key, (title, _) in COLUMNS.items():
            if key in row:
                headers.append(f"{MODALITY_TITLES.get(modality, modality)} {title}")
                cells.append(f"{row[key]:.4f}" if key != "fid" else f"{row[key]:.2f}")
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), "| " + " | ".join(cells) + " |", ""])


def write_report(results: dict, output: str | Path, settings: dict | None = None) -> tuple[Path, Path]:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps({"results": results, "settings": settings or {}}, indent=2) + "\n")
    (output / "table1.md").write_text(markdown_table(results))
    return output / "metrics.json", output / "table1.md"


def tiny_fid_feature() -> M.FIDFeatures:
    """FID in the space of the toy ArcFace (offline smoke tests only: not comparable to published FIDs)."""
    return M.FIDFeatures(build_tiny_network("arcface"), 32, 112)


def main(argv: list[str] | None = None) -> None:
    from .data import FaceDataset

    parser = argparse.ArgumentParser(prog="python -m mm2latent.training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder, Hub repo, or 'tiny'")
    parser.add_argument("--data", required=True, help="folder written by `python -m mm2latent.training prepare`")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", default="eval")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--modalities", nargs="+", default=["mask", "scribble"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="fast", choices=["fast", "quality"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--lpips", default=None, help="LPIPS weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--arcface", default=None, help="IR-SE50 weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--face-parser", default=None, help="BiSeNet weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--fid-feature", default="inception", choices=["inception", "tiny", "none"])
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--clip", default=None,
                        help="CLIP weights: default openai/clip-vit-base-patch32, a folder, org/name or 'tiny'")
    args = parser.parse_args(argv)

    pipe = FacePipeline.from_pretrained(args.model, device=args.device)
    pipe.show_progress = False
    device = pipe.device
    dataset = FaceDataset(args.data, args.split, image_size=pipe.encoder.image_size, target_size=pipe.resolution,
                          condition_size=pipe.encoder.image_size, modalities=tuple(args.modalities), seed=args.seed)
    fid_feature = {"inception": "inception", "tiny": tiny_fid_feature(), "none": None}[args.fid_feature]
    clip = None if args.no_clip else M.CLIPScorer(args.clip, device)
    results = evaluate(
        pipe, dataset, tuple(args.modalities), args.num_samples, args.seed,
        lpips=load_network("lpips", args.lpips, device), arcface=load_network("arcface", args.arcface, device),
        face_parser=load_network("face_parser", args.face_parser, device) if "mask" in args.modalities else None,
        fid_feature=fid_feature, clip=clip, mode=args.mode,
    )
    paths = write_report(results, args.output, vars(args))
    print(markdown_table(results))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
