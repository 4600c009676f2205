"""The paper's Table 1 (and Table 2's ablations) on sampled mask/scribble–text pairs of the test split.

    python -m mm2latent.training.evaluate --model runs/stage2_modulator/final --data data/celebamask-hq-prepared \
        --num-samples 2000 --controlnet-baseline --output eval/
    python -m mm2latent.training.evaluate --runs full=runs/stage2/final "w/o A=runs/stage2_no_a/final" \
        "w/o T=runs/stage1_mapper/final" --data data/celebamask-hq-prepared --output eval/table2

For every sampled test image and modality, the model generates a face from (caption, mask or scribble)
and is compared with the ground-truth photo: FID (set level), LPIPS, MS-SSIM, ArcFace identity
similarity — at 256² like the paper's Table 1 (``--resolution``; pSp's pooling) — ; for masks, pixel accuracy
and mIoU of the face parser's mask of the output against the input mask; CLIP score of output vs caption
(transformers' CLIP). ``--controlnet-baseline`` adds the reference row: the images SD-1.5 with the same
ControlNet draws itself from the same prompts, inputs and seeds. Writes ``metrics.json`` and ``table1.md``
(``table2.md`` with ``--runs``), one row per method.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InvalidSettingError
from ..inputs.images import image_to_tensor
from ..models.generator import is_3d
from ..models.networks import build_tiny_network, load_network
from ..pipelines.generation import FacePipeline
from . import metrics as M

COLUMNS = {  # key -> (header, higher is better)
    "fid": ("FID↓", False), "lpips": ("LPIPS↓", False), "ms_ssim": ("MS-SSIM↑", True), "id": ("ID↑", True),
    "pixel_accuracy": ("ACC↑", True), "miou": ("mIoU↑", True), "clip_score": ("CLIP↑", True),
}
MODALITY_TITLES = {"mask": "Text + Mask", "scribble": "Text + Scribble"}


#: (item, modality, seed) -> the generated image [1, 3, H, W] in [-1, 1].
ImageSource = Callable[[dict, str, int], torch.Tensor]


def pil_inputs(item: dict, modality: str):
    control = (item["controls"][modality].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(control) if modality == "mask" else Image.fromarray(control[..., 0])


def mm2latent_images(pipe: FacePipeline, mode: str = "fast") -> ImageSource:
    """The method's images: the pipeline called with the item's caption, its visual input and the seed; a 3D
    generator renders each at the item's own camera (``item["camera"]``, the photo's label), as training does."""
    def generate(item: dict, modality: str, seed: int) -> torch.Tensor:
        view = {"camera": item["camera"]} if "camera" in item and is_3d(pipe.generator) else {}
        out = pipe(item["caption"], seed=seed, mode=mode, **{modality: pil_inputs(item, modality)}, **view)
        return torch.cat([image_to_tensor(i) for i in out.images])

    return generate


def controlnet_images(pipe: FacePipeline, num_steps: int = 50, guidance_scale: float = 7.5) -> ImageSource:
    """Table 1's ControlNet row: what SD-1.5 with the modality's ControlNet draws itself from seeded noise.

    ``FacePipeline.draw`` is the computation of diffusers' ``StableDiffusionControlNetPipeline`` with a DDIM
    scheduler (classifier-free guidance, the unconditional pass batched) on the same networks, prompts, inputs and
    seeds as the method's images; 50 steps and guidance 7.5 are that pipeline's defaults.
    """
    def generate(item: dict, modality: str, seed: int) -> torch.Tensor:
        control = item["controls"][modality][None].to(pipe.device, pipe.encoder.dtype)
        drawing = pipe.draw(pipe.encode_prompts([item["caption"]]), {modality: control}, pipe.prepare_noise([seed]),
                            num_steps=num_steps, guidance_scale=guidance_scale)
        return drawing.images.float()

    return generate


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
    resolution: int | None = M.PAPER_RESOLUTION,
    images: ImageSource | None = None,
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
        resolution: LPIPS, MS-SSIM, ID and FID compare output and photo at this size (``metrics.to_resolution``:
            pSp's average pooling); None: at the output's size. The face parser reads the full-size output.
        images: where the images come from (default :func:`mm2latent_images` of ``pipe`` in ``mode``;
            :func:`controlnet_images` for the baseline row).
    """
    images = images or mm2latent_images(pipe, mode)
    if is_3d(pipe.generator):
        if len(dataset) and "camera" not in dataset[(0, 0)]:
            raise InvalidSettingError("evaluating a 3D generator renders each sample at its photo's camera: give the "
                                      "dataset camera labels (a `prepare --generator eg3d` folder or --camera-labels)")
        if arcface is not None:
            arcface.face_crop = "eg3d"  # the ID metric crops EG3D's framing (networks/arcface.py FACE_CROPS)
    positions = np.random.default_rng(seed).permutation(len(dataset))[:num_samples]
    results: dict[str, dict[str, float]] = {}
    for modality in modalities:
        sums: dict[str, list[float]] = {}
        confusion = torch.zeros(19, 19, dtype=torch.long)
        fid = M.make_fid(fid_feature) if fid_feature is not None else None
        for i, position in enumerate(tqdm(positions, desc=f"evaluate {modality}", disable=not show_progress)):
            item = dataset[(int(position), 0)]
            image = images(item, modality, seed + i).to(pipe.device).float()
            target = item["target"][None].to(pipe.device).float()
            if resolution:
                output, photo = M.to_resolution(image, resolution), M.to_resolution(target, resolution)
            else:
                output, photo = image, M.to_resolution(target, image.shape[-1])
            scores = {"ms_ssim": M.ms_ssim(output.cpu(), photo.cpu())}
            if lpips is not None:
                scores["lpips"] = M.lpips_distance(lpips, output, photo)
            if arcface is not None:
                scores["id"] = M.identity_similarity(arcface, output, photo)
            if clip is not None:
                scores["clip_score"] = clip(image, [item["caption"]])
            for key, value in scores.items():
                sums.setdefault(key, []).append(float(value.mean()))
            if modality == "mask" and face_parser is not None:
                from ..inputs.conditions import parse_mask

                ids = torch.from_numpy(parse_mask(pil_inputs(item, "mask"), require_face=False).astype(np.int64))
                predicted = face_parser.parse(image, size=ids.shape[-1])[0].cpu()
                confusion += M.confusion_matrix(predicted, ids)
            if fid is not None:
                M.fid_update(fid, photo, real=True)
                M.fid_update(fid, output, real=False)
        row = {key: float(np.mean(values)) for key, values in sums.items()}
        if modality == "mask" and face_parser is not None:
            row.update(M.mask_scores(confusion))
        if fid is not None and len(positions) >= 2:
            row["fid"] = float(fid.compute())
        row["num_samples"] = len(positions)
        results[modality] = row
    return results


@torch.no_grad()
def multiview_grid(pipe: FacePipeline, dataset, modality: str = "mask", num_faces: int = 4,
                   yaws: tuple[float, ...] = (-30.0, -15.0, 0.0, 15.0, 30.0), seed: int = 0) -> Image.Image:
    """3D: the first ``num_faces`` test items generated from their inputs, each row one face seen from ``yaws``
    (pitch 0), the first column the ground-truth photo (at its own camera)."""
    rows = []
    for position in range(min(num_faces, len(dataset))):
        item = dataset[(position, 0)]
        out = pipe(item["caption"], seed=seed + position, camera=item["camera"],
                   **{modality: pil_inputs(item, modality)})
        views = pipe.render_views(out.latents.to(pipe.device), yaws=list(yaws)).images[0]
        size = views.shape[-1]
        photo = torch.nn.functional.interpolate(item["target"][None].float(), size=(size, size), mode="bilinear",
                                                align_corners=False)
        rows.append(torch.cat([photo, views.float()]))
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    return Image.fromarray(((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def results_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Table 1's layout: one row per method (or Table 2 ablation), the metric columns grouped by input modality."""
    columns = []
    for results in rows.values():
        for modality, row in results.items():
            for key in COLUMNS:
                if key in row and (modality, key) not in columns:
                    columns.append((modality, key))
    headers = ["Method"] + [f"{MODALITY_TITLES.get(m, m)} {COLUMNS[k][0]}" for m, k in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, results in rows.items():
        cells = [method]
        for modality, key in columns:
            value = results.get(modality, {}).get(key)
            cells.append("–" if value is None else f"{value:.2f}" if key == "fid" else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def markdown_table(results: dict[str, dict[str, float]], method: str = "mm2latent (ours)") -> str:
    """One method's results as Table 1."""
    return results_table({method: results})


def write_report(rows: dict[str, dict], output: str | Path, settings: dict | None = None,
                 table_name: str = "table1.md") -> tuple[Path, Path]:
    """``metrics.json`` ({"rows": {method: results}, "settings"}) and the markdown table of the rows."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps({"rows": rows, "settings": settings or {}}, indent=2) + "\n")
    (output / table_name).write_text(results_table(rows))
    return output / "metrics.json", output / table_name


def tiny_fid_feature() -> M.FIDFeatures:
    """FID in the space of the toy ArcFace (offline smoke tests only: not comparable to published FIDs)."""
    return M.FIDFeatures(build_tiny_network("arcface"), 32, 112)


def parse_runs(items: list[str]) -> dict[str, str]:
    """["label=folder", ...] -> {label: folder} (a bare folder is its own label)."""
    runs = {}
    for item in items:
        label, sep, model = item.partition("=")
        runs[label if sep else item] = model if sep else item
    return runs


def main(argv: list[str] | None = None) -> None:
    from .cameras import read_dataset_json
    from .data import FaceDataset
    from .prepare_3d import prepared_camera_labels

    parser = argparse.ArgumentParser(prog="python -m mm2latent.training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder, Hub repo, or 'tiny' (one row: Table 1)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="LABEL=MODEL",
                        help="several pipelines, one row each (Table 2's ablations)")
    parser.add_argument("--data", required=True, help="folder written by `python -m mm2latent.training prepare`")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", default="eval")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--modalities", nargs="+", default=["mask", "scribble"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="fast", choices=["fast", "quality"])
    parser.add_argument("--resolution", type=int, default=M.PAPER_RESOLUTION,
                        help="LPIPS, MS-SSIM, ID and FID at this size (Table 1: 256); 0 = the output's size")
    parser.add_argument("--controlnet-baseline", action="store_true",
                        help="add Table 1's ControlNet row (the first model's diffusion networks draw the images)")
    parser.add_argument("--baseline-steps", type=int, default=50)
    parser.add_argument("--baseline-guidance", type=float, default=7.5)
    parser.add_argument("--camera-labels", default=None,
                        help="EG3D dataset.json of the photos (default: the cameras.json of a `prepare --generator "
                             "eg3d` folder); a 3D model renders each sample at its photo's camera")
    parser.add_argument("--multiview", type=int, default=4,
                        help="3D: also write multiview.png, this many faces from five yaws (0 = none)")
    parser.add_argument("--multiview-only", action="store_true",
                        help="3D: only write multiview.png (style transfer: no photo to compare with)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--lpips", default=None, help="LPIPS weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--arcface", default=None, help="IR-SE50 weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--face-parser", default=None, help="BiSeNet weights: default repo, folder, org/name or 'tiny'")
    parser.add_argument("--fid-feature", default="inception", choices=["inception", "tiny", "none"])
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--clip", default=None,
                        help="CLIP weights: default openai/clip-vit-base-patch32, a folder, org/name or 'tiny'")
    args = parser.parse_args(argv)
    runs = parse_runs(args.runs)
    if args.model:
        runs = {"mm2latent (ours)": args.model, **runs}
    if not runs:
        parser.error("give --model or --runs")

    metric_nets = None
    rows: dict[str, dict] = {}
    for index, (label, model) in enumerate(runs.items()):
        pipe = FacePipeline.from_pretrained(model, device=args.device)
        pipe.show_progress = False
        device = pipe.device
        camera_file = args.camera_labels or prepared_camera_labels(args.data)
        dataset = FaceDataset(args.data, args.split, image_size=pipe.encoder.image_size, target_size=pipe.resolution,
                              condition_size=pipe.encoder.image_size, modalities=tuple(args.modalities), seed=args.seed,
                              camera_labels=read_dataset_json(camera_file) if camera_file else None)
        if args.multiview_only and not is_3d(pipe.generator):
            parser.error(f"--multiview-only needs a 3D model; {model} has a 2D generator")
        if not args.multiview_only:
            if metric_nets is None:
                metric_nets = dict(
                    lpips=load_network("lpips", args.lpips, device),
                    arcface=load_network("arcface", args.arcface, device),
                    face_parser=load_network("face_parser", args.face_parser, device)
                    if "mask" in args.modalities else None,
                    fid_feature={"inception": "inception", "tiny": tiny_fid_feature(), "none": None}[args.fid_feature],
                    clip=None if args.no_clip else M.CLIPScorer(args.clip, device))
            settings = dict(modalities=tuple(args.modalities), num_samples=args.num_samples, seed=args.seed,
                            resolution=args.resolution or None, **metric_nets)
            if args.controlnet_baseline and not rows:  # the first model's diffusion networks draw the reference row
                images = controlnet_images(pipe, args.baseline_steps, args.baseline_guidance)
                rows["ControlNet"] = evaluate(pipe, dataset, images=images, **settings)
            rows[label] = evaluate(pipe, dataset, mode=args.mode, **settings)
        if is_3d(pipe.generator) and (args.multiview or args.multiview_only):
            Path(args.output).mkdir(parents=True, exist_ok=True)
            path = Path(args.output) / ("multiview.png" if len(runs) == 1 else f"multiview_{index}.png")
            multiview_grid(pipe, dataset, args.modalities[0], args.multiview or 4, seed=args.seed).save(path)
            print("wrote", path, f"({label})")
        del pipe
    if args.multiview_only:
        return
    table_name = "table2.md" if args.runs else "table1.md"
    paths = write_report(rows, args.output, vars(args), table_name)
    print(results_table(rows))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
