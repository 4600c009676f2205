"""Command line: ``python -m mm2latent generate ...``, ``convert ...`` and ``doctor [--preset public|<repo>]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MM2LatentError


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from .pipelines.generation import PRESETS

    parser.add_argument("--prompt", default="", help="text description of the face")
    visual = parser.add_mutually_exclusive_group()
    visual.add_argument("--mask", help="19-class face mask (index, palette or colour PNG)")
    visual.add_argument("--scribble", help="sketch image (white-on-black or black-on-white)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--mode", choices=["fast", "quality", "invert"], default=None,
                        help="fast (one U-Net pass, trained M/T), quality (DDIM steps) or invert (training-free: "
                             "I^d_0 inverted by the photo encoder); default: fast, or invert on untrained weights "
                             "that have an inverter (the public preset)")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="invert mode: optimisation steps after the encoder (0 = the encoder's answer)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance of the diffusion drawing (default 7.5 in invert mode)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps in quality mode (default 20)")
    parser.add_argument("--feature-steps", type=int, nargs="+", default=None, help="steps that feed the latent")
    parser.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--out", default="face.png", help="output PNG (with several images: face_0.png, ...)")
    parser.add_argument("--save-latent", action="store_true", help="also save the W+ latent as .npy")
    camera = parser.add_argument_group("3D models (EG3D)")
    camera.add_argument("--yaw", type=float, default=None,
                        help="camera yaw in degrees, -180..180 (positive: the camera moves to the image's right)")
    camera.add_argument("--pitch", type=float, default=None,
                        help="camera pitch in degrees, -90..90 exclusive (positive: the camera moves down)")
    camera.add_argument("--conditioning-camera", type=float, nargs=2, metavar=("YAW", "PITCH"), default=None,
                        help="truncate toward the mean latent at this camera (default: the checkpoint's mean)")
    camera.add_argument("--save-depth", action="store_true", help="also save each depth map as <out>_depth.png")
    camera.add_argument("--turntable", default=None, metavar="VIDEO",
                        help="also write a turntable of the first face (.mp4 H.264 or .gif)")
    camera.add_argument("--frames", type=int, default=24, help="turntable frames (default 24)")
    camera.add_argument("--fps", type=float, default=24.0, help="turntable frames per second (default 24)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS),
                        help="built-in preset: tiny, tiny-eg3d (untrained, offline), full-random (full size, "
                             "random weights), public (the published networks, training-free mode)")
    source.add_argument("--model", default=None, help="Hub repo or local folder (default: MM2LATENT_MODEL_REPO)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .inputs.metadata import save_png
    from .pipelines.editing import FaceEditPipeline
    from .pipelines.generation import FacePipeline
    from .pipelines.hub import DEFAULT_MODEL_REPO

    name = args.preset or args.model or os.environ.get("MM2LATENT_MODEL_REPO", DEFAULT_MODEL_REPO)
    with tqdm(total=3, desc="mm2latent", unit="stage") as bar:
        bar.set_postfix_str(f"loading {name}")
        # The photo encoder (and the VAE that shows I^d_0) only load for the training-free mode.
        if args.mode == "invert" or (args.mode is None and name == "public"):
            pipe = FaceEditPipeline.from_pretrained(name, device=args.device)
            extra = {"refine_steps": args.refine_steps}
            mode = args.mode  # None: the edit pipeline's default_mode (invert on untrained M and T)
        else:
            pipe = FacePipeline.from_pretrained(name, device=args.device, load_vae=False)
            extra = {}
            mode = args.mode or "fast"
        bar.update()
        if not pipe.trained:
            print(f"Note: '{name}' has untrained weights; the faces are a demo of the mechanics only.", file=sys.stderr)
        bar.set_postfix_str("generating")
        # Camera options only when asked for: on a 2D model they are an error, not silently ignored.
        camera = None if args.yaw is None and args.pitch is None else (args.yaw or 0.0, args.pitch or 0.0)
        options = {"camera": camera, "conditioning_camera": args.conditioning_camera, "return_depth": args.save_depth}
        extra.update({key: value for key, value in options.items() if value not in (None, False)})
        output = pipe(args.prompt, mask=args.mask, scribble=args.scribble, seed=args.seed,
                      mode=mode, guidance_scale=args.guidance,
                      num_steps=args.steps, feature_steps=args.feature_steps, truncation=args.truncation,
                      num_images=args.num_images, **extra)
        bar.update()
        bar.set_postfix_str("saving")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] if len(output.images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(output.images))]
        for i, (path, image) in enumerate(zip(paths, output.images)):
            save_png(image, path, {**output.settings, "seed": output.seeds[i]})
            if args.save_latent:
                np.save(path.with_suffix(".npy"), output.latents[i].numpy())
            if args.save_depth:
                from .pipelines.views import depth_to_image

                save_png(depth_to_image(output.depth[i]), path.with_name(f"{path.stem}_depth.png"),
                         {**output.settings, "seed": output.seeds[i]})
        bar.update()
    if args.turntable:
        from .pipelines.views import render_turntable

        # The output's latents are already truncated: ψ = 1 shows the first image's face.
        video = render_turntable(pipe, output.latents[0], args.turntable, args.frames, args.fps,
                                 noise_mode=output.settings["noise_mode"])
        print(video)
    for path, seed in zip(paths, output.seeds):
        print(f"{path} (seed {seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models.stylegan2_checkpoints import add_convert_arguments, run_convert

    parser = argparse.ArgumentParser(prog="python -m mm2latent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="text + mask/scribble -> face PNG")
    _add_generate_arguments(generate)
    convert = commands.add_parser("convert", help="convert a StyleGAN2 or EG3D checkpoint to safetensors (offline)")
    add_convert_arguments(convert)
    from .doctor import add_doctor_arguments, run_doctor

    add_doctor_arguments(commands.add_parser("doctor", help="check every file of a model (present / converted / "
                                                            "mismatch, with the fix)"))
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            return run_doctor(args)
        return run_generate(args) if args.command == "generate" else run_convert(args)
    except MM2LatentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
