"""The benchmark's sections, in order (:data:`SECTIONS`): each times one part of the method with the library's public
stages and writes its figures under its own key of ``bench.results`` (benchmarks/README.md lists the keys).

A section reads what the ones before it left in ``Bench.shared`` / ``Bench.results`` (the build section's pipeline,
the stages' encoded prompt and latents, ...). torch and mm2latent are imported inside the functions (see
:mod:`.harness`).
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import NEGATIVE_PROMPT, PROMPT, SEED, Bench, count_parameters, log, parse_dtype

# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(pipe):
    """Mask inputs drawn by code at the ControlNet's resolution: index map (L) and colour rendering (RGB)."""
    from PIL import Image

    from mm2latent.inputs.conditions import CELEBAMASK_PALETTE
    from mm2latent.pipelines.speedups import synthetic_face_mask

    ids = synthetic_face_mask(pipe.encoder.image_size)
    return Image.fromarray(ids, mode="L"), Image.fromarray(CELEBAMASK_PALETTE[ids], mode="RGB")


def build_pipeline(args, device, dtype):
    from mm2latent import FacePipeline

    pipe = FacePipeline.from_pretrained(args.preset, device=device, dtype=dtype)
    pipe.show_progress = False
    return pipe


def build_baseline(pipe):
    """diffusers' ControlNet pipeline on the very same module objects (same weights, device, dtype)."""
    from diffusers import StableDiffusionControlNetPipeline

    encoder = pipe.encoder
    modality = "mask" if "mask" in encoder.controlnets else next(iter(encoder.controlnets))
    baseline = StableDiffusionControlNetPipeline(
        vae=encoder.vae, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, unet=encoder.unet,
        controlnet=encoder.controlnets[modality], scheduler=encoder.make_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    baseline.set_progress_bar_config(disable=True)
    return baseline, modality



def section_build(bench: Bench) -> None:
    """Build (or load) the pipeline, apply the toggles, warm up once per the options."""
    from mm2latent.pipelines import speedups

    args, results = bench.args, bench.results
    log(f"building {args.preset} on {bench.device} in {args.dtype}")
    start = time.perf_counter()
    bench.pipe = build_pipeline(args, bench.device, bench.dtype)
    results["meta"]["build_s"] = time.perf_counter() - start
    pipe = bench.pipe
    encoder = pipe.encoder
    bench.index_mask, bench.colour_mask = make_inputs(pipe)
    if args.channels_last:
        speedups.enable_channels_last(pipe)
    if args.compile:
        bench.shared["compile_handle"] = speedups.compile_pipeline(pipe, mode=args.compile_mode,
                                                                   backend=args.compile_backend)
    log(f"warm-up: {args.warmup} fast call(s)")
    warm = []
    for _ in range(args.warmup + (1 if args.compile else 0)):  # with --compile: >= 2 calls
        bench.timer.sync()
        t0 = time.perf_counter()
        bench.fast_call()
        bench.timer.sync()
        warm.append((time.perf_counter() - t0) * 1e3)
    results["warmup_ms"] = warm
    results["meta"]["model"] = {
        "image_size": encoder.image_size, "latent_size": encoder.latent_size, "generator_resolution": pipe.resolution,
        "num_ws": pipe.generator.num_ws, "controlnets": pipe.modalities,
        "parameters": {name: count_parameters(part) for name, part in pipe.components().items()
                       if hasattr(part, "parameters")},
    }
    if args.compile:
        from torch._dynamo.utils import counters

        results["compile"] = {
            "mode": args.compile_mode, "backend": args.compile_backend,
            "regions": len(bench.shared["compile_handle"].regions),
            "first_call_s": warm[0] / 1e3 if warm else None,
            "second_call_s": warm[1] / 1e3 if len(warm) > 1 else None,
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "note": "compilation is lazy: first_call_s is compile time + one call; every new batch size compiles again",
        }


def section_stages(bench: Bench) -> None:
    """The public pipeline stages one by one, batch 1 (the U-Net pass, M and T also apart)."""
    from mm2latent.inputs.images import tensor_to_pil

    pipe = bench.pipe
    encoder = pipe.encoder
    stages: dict = {}

    def text_uncached():
        encoder.clear_prompt_cache()
        pipe.encode_prompts([PROMPT])

    stages["text_encoding"] = bench.measure("encode_prompts (CLIP, uncached)", text_uncached)
    stages["text_encoding"]["note"] = "tokenise + CLIP text encoder, cache emptied before each call"
    stages["text_encoding_cached"] = bench.measure("encode_prompts (cache hit)", lambda: pipe.encode_prompts([PROMPT]))
    stages["preprocess_mask"] = bench.measure("prepare_conditions (index map)",
                                              lambda: pipe.prepare_conditions(mask=bench.index_mask))
    stages["prepare_noise"] = bench.measure("prepare_noise", lambda: pipe.prepare_noise([SEED]))
    prompts = pipe.encode_prompts([PROMPT])
    controls, _ = pipe.prepare_conditions(mask=bench.index_mask)
    noise = pipe.prepare_noise([SEED])
    holder: dict = {}

    def unet_pass():
        holder["out"] = pipe.denoise(prompts, controls, noise, num_steps=1, feature_steps=[0], run_to_end=False)

    stages["unet_controlnet_capture"] = bench.measure("U-Net + ControlNet pass with feature capture", unet_pass)
    features = holder["out"].features[0]
    stages["mapper_M"] = bench.measure("M", lambda: pipe.mapper(features.h, pipe.generator.latent_avg))
    stages["modulator_T"] = bench.measure("T", lambda: pipe.modulator(features, prompts.word_mask))
    stages["predict_latents"] = bench.measure("predict_latents (U-Net pass, M, T)",
                                              lambda: pipe.predict_latents(prompts, controls, noise))
    latents = pipe.predict_latents(prompts, controls, noise).latents

    def render():
        holder["image"] = pipe.render(latents)

    stages["stylegan2_synthesis"] = bench.measure("render (StyleGAN2 synthesis)", render)
    stages["postprocess_to_pil"] = bench.measure("post-processing (tensor -> PIL)", lambda: tensor_to_pil(holder["image"]))
    bench.results["stages"] = stages
    bench.results["stage_sum_ms"] = sum(stages[k]["median_ms"] for k in (
        "text_encoding_cached", "unet_controlnet_capture", "mapper_M", "modulator_T", "stylegan2_synthesis"))
    bench.shared.update(prompts=prompts, controls=controls, noise=noise, features=features, latents=latents)


def section_end_to_end(bench: Bench) -> None:
    """Whole calls: fast (prompt cached or not), fast without pre/post-processing, quality mode."""
    from mm2latent.pipelines import speedups

    pipe, shared = bench.pipe, bench.shared
    e2e: dict = {}
    warm = 1 if bench.args.compile else 0  # the build section's warm-up already ran this exact call
    e2e["fast"] = bench.measure("fast mode end to end (prompt cached)", bench.fast_call, warmup=warm)
    e2e["fast"]["note"] = ("pipe(prompt, mask=index map, mode='fast'): mask parsing, cached CLIP embedding, U-Net "
                           "pass, M, T, StyleGAN2, PIL")

    def fast_uncached():
        with speedups.prompt_cache_disabled(pipe):
            bench.fast_call()

    e2e["fast_uncached_prompt"] = bench.measure("fast mode end to end (prompt not cached)", fast_uncached, warmup=warm)

    def model_only():
        return pipe.render(pipe.predict_latents(shared["prompts"], shared["controls"], pipe.prepare_noise([SEED])).latents)

    e2e["fast_model_only"] = bench.measure("fast model only (predict_latents + render)", model_only, warmup=warm)
    for steps in bench.args.quality_steps:
        e2e[f"quality_{steps}_steps"] = bench.measure(
            f"quality mode, {steps} steps",
            lambda steps=steps: pipe(PROMPT, mask=bench.index_mask, seed=SEED, mode="quality", num_steps=steps),
            heavy=True)
    bench.results["end_to_end"] = e2e


def section_throughput(bench: Bench) -> None:
    """Fast mode with num_images = each batch size: faces per second."""
    throughput: dict = {}
    for batch in bench.args.batch_sizes:
        if batch == 1:
            item = dict(bench.results["end_to_end"]["fast"])
        else:
            item = bench.measure(f"fast mode, batch {batch}", lambda batch=batch: bench.fast_call(batch=batch),
                                 heavy=True, per=batch)
        item["batch"] = batch
        item["faces_per_s"] = batch / (item["median_ms"] / 1e3)
        item["ms_per_face"] = item["median_ms"] / batch
        throughput[f"batch_{batch}"] = item
    bench.results["throughput"] = throughput


def section_space_overhead(bench: Bench) -> None:
    """What the Space does around the model per request, with the Space's own helpers.

    canvas (colour picture) -> class ids -> pipeline pre-processing -> [model] -> per-word attention maps (the
    Space asks for ``return_intermediates``) -> PIL -> PNG files with metadata + latents .npy -> overlays.
    """
    import io
    import shutil
    import tempfile

    from mm2latent.inputs.metadata import png_info
    from mm2latent.models.mapping import word_attention_maps
    from mm2latent.pipelines.generation import word_maps
    from mm2latent.ui.canvases import mask_from_canvas
    from mm2latent.ui.outputs import attention_gallery, save_run

    pipe, shared = bench.pipe, bench.shared
    canvas = {"background": bench.colour_mask, "layers": [], "composite": bench.colour_mask}
    parts: dict = {}
    parts["canvas_to_ids"] = bench.measure("Space: canvas colour map -> ids", lambda: mask_from_canvas(canvas))
    ids = mask_from_canvas(canvas)
    parts["pipeline_preprocess"] = bench.measure("Space: prepare_conditions", lambda: pipe.prepare_conditions(mask=ids))
    word_tokens = shared["prompts"].word_tokens[0]
    parts["attention_maps"] = bench.measure(
        "Space: per-word attention maps",
        lambda: word_maps(word_attention_maps(shared["features"].attn_probs, pipe.modulator.feature_size).float(),
                          word_tokens))
    parts["to_pil"] = bench.results["stages"]["postprocess_to_pil"]
    output = pipe(PROMPT, mask=ids, seed=SEED, return_intermediates=True)
    image, settings = output.images[0], output.settings
    root = Path(tempfile.mkdtemp(prefix="mm2latent-speed-"))
    counter = iter(range(10**6))

    def save():
        folder = root / str(next(counter))
        folder.mkdir()
        save_run(folder, output.images, output.latents.numpy(), output.seeds, settings, "bench")

    parts["save_png_and_latents"] = bench.measure("Space: PNG (+metadata) and .npy files", save)
    base = output.condition_images.get("mask", image)
    parts["attention_overlays"] = bench.measure(
        "Space: attention overlays",
        lambda: attention_gallery(base, output.attention_words, output.attention_maps[0].numpy()))
    shutil.rmtree(root, ignore_errors=True)

    def encoded(fmt, **kw):
        def fn():
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, **kw)
            return buffer.getvalue()
        return fn

    formats = {
        "png_level6_default": encoded("PNG", pnginfo=png_info(settings)),
        "png_level1": encoded("PNG", pnginfo=png_info(settings), compress_level=1),
        "png_level0": encoded("PNG", pnginfo=png_info(settings), compress_level=0),
        "jpeg_q90_preview": encoded("JPEG", quality=90),
    }
    encodings = {}
    for name, fn in formats.items():
        item = bench.measure(f"encode {name}", fn)
        item["bytes"] = len(fn())
        encodings[name] = item
    model_ms = bench.results["end_to_end"]["fast_model_only"]["median_ms"]
    overhead_ms = sum(item["median_ms"] for item in parts.values())
    png_saving = encodings["png_level6_default"]["median_ms"] - encodings["png_level1"]["median_ms"]
    space_call = bench.measure("Space's pipeline call (ids, return_intermediates)",
                               lambda: pipe(PROMPT, mask=ids, seed=SEED, return_intermediates=True), heavy=True)
    bench.results["space_overhead"] = {
        "source": "the Space's own helpers (mm2latent.ui.canvases.mask_from_canvas, mm2latent.ui.outputs.save_run, "
                  "attention_gallery) and the pipeline's word_maps",
        "parts": parts, "encodings": encodings, "space_pipeline_call": space_call, "model_ms": model_ms,
        "overhead_ms": overhead_ms, "overhead_share": overhead_ms / model_ms,
        "overhead_ms_png_level1": overhead_ms - png_saving,
        "overhead_share_png_level1": (overhead_ms - png_saving) / model_ms,
        "note": "overhead = sum of the parts (per request, one image); model = fast mode without pre/post-processing. "
                "Gradio's own serialisation and transport are not included. *_png_level1: the same with PNG "
                "compress_level=1 (lossless, larger files)",
    }


def section_invert_mode(bench: Bench) -> None:
    """The training-free mode (mode="invert"): I^d_0 with guidance, the e4e encoder, optional refinement, G.

    The e4e encoder has random weights, full size (IR-SE50 body, 18 heads) except on the tiny preset; the
    diffusion part uses the same steps and guidance as the baseline, so the two are comparable.
    """
    import torch

    from mm2latent.editing.inversion import PSPEncoder, tiny_psp_config
    from mm2latent.pipelines.editing import FaceEditPipeline

    pipe, args = bench.pipe, bench.args
    sizes = dict(num_ws=pipe.generator.num_ws, style_dim=pipe.generator.style_dim)
    config = tiny_psp_config(**sizes) if args.preset == "tiny" else sizes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        inverter = PSPEncoder(**config, architecture="e4e")
    editor = FaceEditPipeline(pipe, inverter=inverter).to(bench.device, bench.dtype)
    item: dict = {}
    for refine in args.invert_refine_steps:
        label = f"invert mode, {args.baseline_steps} steps, guidance {args.baseline_guidance}, refine {refine}"
        item[f"refine_{refine}"] = bench.measure(
            label, lambda refine=refine: editor(PROMPT, mask=bench.index_mask, seed=SEED, mode="invert",
                                                num_steps=args.baseline_steps, guidance_scale=args.baseline_guidance,
                                                refine_steps=refine), heavy=True)
    item["what"] = ("FaceEditPipeline(mode='invert'): the diffusion model's I^d_0 (DDIM, batched guidance pass, VAE "
                    "decode), e4e encoder, refine_k = k refinement steps (G forward + backward each), StyleGAN2, PIL")
    bench.results["invert_mode"] = item


def section_ablations(bench: Bench) -> None:
    """Each optimisation on and off."""
    from mm2latent.pipelines import speedups
    from mm2latent.pipelines.request import GenerationRequest

    pipe, shared, args = bench.pipe, bench.shared, bench.args
    encoder = pipe.encoder
    stages, e2e = bench.results["stages"], bench.results["end_to_end"]
    prompts, controls, noise = shared["prompts"], shared["controls"], shared["noise"]
    ablations: dict = {}
    if "mask" in encoder.modalities:
        controlnet = encoder.controlnet("mask")
        scheduler = encoder.make_scheduler()
        scheduler.set_timesteps(1, device=bench.device)
        t_first = scheduler.timesteps[0]

        def unet_no_capture():
            down, mid = controlnet(noise, t_first, encoder_hidden_states=prompts.embeds,
                                   controlnet_cond=controls["mask"], return_dict=False)
            encoder.unet(noise, t_first, encoder_hidden_states=prompts.embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)

        ablations["feature_capture"] = {
            "on": stages["unet_controlnet_capture"],
            "off": bench.measure("U-Net + ControlNet, no capture", unet_no_capture),
            "what": "the same pass without hooks and with SDPA in the captured attn2 layers (features are needed: "
                    "this is the capture's cost)",
        }

    def install_capture():
        with encoder.capturing({}):
            pass

    ablations["capture_install_per_call"] = {
        "cost": bench.measure("installing + removing capture hooks/processors (per U-Net pass)", install_capture),
        "what": "python time to install and remove the capture hooks and attn2 processors, paid on every captured "
                "U-Net pass (5 forward hooks and the 9 decoder attn2 processors, looked up once and swapped directly)",
    }

    def unet_pass():
        pipe.denoise(prompts, controls, noise, num_steps=1, feature_steps=[0], run_to_end=False)

    speedups.set_attention(pipe, "classic")
    try:
        classic = bench.measure("U-Net + ControlNet, classic attention", unet_pass, heavy=True)
    finally:
        speedups.set_attention(pipe, "sdpa")
    ablations["sdpa"] = {"on": stages["unet_controlnet_capture"], "off": classic,
                         "what": "SDPA vs explicit softmax attention in every non-captured layer"}
    ablations["prompt_cache"] = {"on": e2e["fast"], "off": e2e["fast_uncached_prompt"],
                                 "what": "per-prompt CLIP embedding cache, fast mode end to end"}
    if encoder.has_vae:
        ablations["no_vae_in_fast_mode"] = {
            "vae_decode": bench.measure("VAE decode (what fast mode skips)", lambda: encoder.decode_latents(noise),
                                        heavy=True),
            "what": "time a VAE decode would add per image; fast mode never runs it (nor loads the VAE)",
        }
    latents = shared["latents"]
    ablations["stylegan2_noise"] = {
        "const": stages["stylegan2_synthesis"],
        "random": bench.measure("render, fresh random noise", lambda: pipe.render(latents, noise_mode="random")),
        "what": "noise buffers prepared once (const) vs drawn per call",
    }
    if args.channels_last:
        speedups.disable_channels_last(pipe)
    else:
        speedups.enable_channels_last(pipe)
    try:
        toggled = bench.measure("fast mode, channels_last toggled", bench.fast_call, warmup=max(1, args.warmup))
    finally:
        if args.channels_last:
            speedups.enable_channels_last(pipe)
        else:
            speedups.disable_channels_last(pipe)
    ablations["channels_last"] = {"on": toggled if not args.channels_last else e2e["fast"],
                                  "off": e2e["fast"] if not args.channels_last else toggled,
                                  "what": "NHWC weights (U-Net, ControlNets, VAE, M, T), fast mode end to end"}
    # the smallest batch above 1: the gain of batching shows there already, and on CPU it is the cheapest
    size = min([b for b in args.batch_sizes if b > 1], default=1)
    if size > 1:
        requests = [GenerationRequest.create(f"{PROMPT} {i}", mask=bench.index_mask, seed=SEED + i) for i in range(size)]
        batched = bench.measure(f"{size} different requests batched", lambda: pipe.generate_batch(requests),
                                heavy=True, per=size)
        ablations["request_batching"] = {
            "on": batched, "off": {"median_ms": size * e2e["fast"]["median_ms"]},
            "what": f"{size} different requests (prompts, seeds) in one generate_batch call vs {size} sequential "
                    f"fast calls (off = {size} x fast mode batch 1)",
        }
    handle = shared.pop("compile_handle", None)
    if handle is not None:
        handle.undo()
        eager = bench.measure("fast mode, eager (compile undone)", bench.fast_call, warmup=max(1, args.warmup))
        ablations["compile"] = {"on": e2e["fast"], "off": eager,
                                "what": f"torch.compile(mode={args.compile_mode!r}) on capture-free regions"}
    bench.results["ablations"] = ablations


def section_baseline(bench: Bench) -> None:
    """diffusers' StableDiffusionControlNetPipeline on the same modules, and the ratios to it."""
    import torch

    args, results = bench.args, bench.results
    log(f"baseline: StableDiffusionControlNetPipeline, {args.baseline_steps} steps, guidance {args.baseline_guidance}")
    encoder = bench.pipe.encoder
    baseline, modality = build_baseline(bench.pipe)
    size = encoder.image_size
    control_image = bench.colour_mask if modality == "mask" else bench.index_mask.convert("RGB")

    def baseline_call(steps):
        return baseline(PROMPT, image=control_image, num_inference_steps=steps, guidance_scale=args.baseline_guidance,
                        height=size, width=size, output_type="pil", negative_prompt=NEGATIVE_PROMPT,
                        generator=torch.Generator("cpu").manual_seed(SEED)).images

    bench.memory.reset()
    bench.timer.sync()
    t0 = time.perf_counter()
    baseline_call(1)
    bench.timer.sync()
    warm_ms = (time.perf_counter() - t0) * 1e3
    item = bench.timer.measure(lambda: baseline_call(args.baseline_steps), bench.baseline_repeats, 0,
                               f"baseline, {args.baseline_steps} steps")
    item.update({
        "pipeline": "diffusers.StableDiffusionControlNetPipeline", "steps": args.baseline_steps,
        "guidance_scale": args.baseline_guidance, "resolution": size, "controlnet": modality,
        "scheduler": type(baseline.scheduler).__name__, "output_type": "pil", "vae_decode": True,
        "shares_modules_with_ours": all(getattr(baseline, name) is getattr(encoder, name)
                                        for name in ("unet", "vae", "text_encoder", "tokenizer"))
                                    and baseline.controlnet is encoder.controlnet(modality),
        "warmup_1_step_ms": warm_ms,
        "note": "text encoding of prompt and negative prompt every call, batch-2 guidance pass per step, "
                "VAE decode, PIL output; same device, dtype and attention processors (SDPA) as ours",
    })
    results["baseline"] = item
    e2e = results["end_to_end"]
    results["ratios"] = {
        "baseline_over_fast": item["median_ms"] / e2e["fast_uncached_prompt"]["median_ms"],
        "baseline_over_fast_cached_prompt": item["median_ms"] / e2e["fast"]["median_ms"],
        "baseline_over_fast_model_only": item["median_ms"] / e2e["fast_model_only"]["median_ms"],
        "note": "headline = baseline / fast mode end to end with the prompt NOT cached (both sides encode text)",
    }
    for steps in args.quality_steps:
        results["ratios"][f"baseline_over_quality_{steps}_steps"] = item["median_ms"] / e2e[f"quality_{steps}_steps"]["median_ms"]
    for key, value in results.get("invert_mode", {}).items():
        if isinstance(value, dict) and "median_ms" in value:
            results["ratios"][f"invert_{key}_over_baseline"] = value["median_ms"] / item["median_ms"]


def build_mm2latent_pipeline(bench: Bench):
    """The MM2Latent engine around the very same generator object as the DDGI pipeline (same device, dtype):
    toy networks with a tiny preset, else the real sizes (CLIP ViT-B/16, 256² autoencoders) with random weights."""
    from mm2latent.models.latent_mapper import (
        MM2LatentEngine,
        build_full_size_mm2latent_components,
        build_tiny_mm2latent_components,
    )
    from mm2latent.pipelines.mm2latent_engine import MM2LatentPipeline

    generator = bench.pipe.generator
    tiny = bench.args.preset.startswith("tiny")
    build = build_tiny_mm2latent_components if tiny else build_full_size_mm2latent_components
    pipe = MM2LatentPipeline(MM2LatentEngine(**build(generator)), generator, name=f"{bench.args.preset}+mm2latent")
    pipe.show_progress = False
    # Only the engine moves: the generator is DDGI's own (already on the device, in the dtype).
    pipe.mm2latent_engine.to(device=bench.device, dtype=bench.dtype)
    return pipe, "tiny" if tiny else "full-size, random weights"


def section_mm2latent(bench: Bench) -> None:
    """The MM2Latent engine (no diffusion model) beside DDGI fast mode and the baseline, same run, same generator."""
    from mm2latent.inputs.images import tensor_to_pil

    pipe, networks = build_mm2latent_pipeline(bench)
    results = bench.results
    engine = pipe.mm2latent_engine
    log(f"MM2Latent engine ({networks}) on the DDGI pipeline's generator")
    item: dict = {"networks": networks, "parameters": {name: count_parameters(getattr(engine, name))
                                                      for name in engine.COMPONENTS}}

    def call():
        return pipe(PROMPT, mask=bench.index_mask, seed=SEED)

    item["end_to_end"] = bench.measure("MM2Latent end to end (text + mask -> PIL)", call)
    item["end_to_end"]["note"] = ("pipe(prompt, mask=index map): mask parsing, text tower (no prompt cache), mask "
                                  "autoencoder, mapper, seed variation, generator, PIL")
    prompts = pipe.encode_prompts([PROMPT])
    codes, _ = pipe.prepare_conditions(mask=bench.index_mask)
    stages = {
        "encode_prompts": bench.measure("MM2Latent encode_prompts (text tower)", lambda: pipe.encode_prompts([PROMPT])),
        "prepare_conditions": bench.measure("MM2Latent prepare_conditions (mask -> code)",
                                            lambda: pipe.prepare_conditions(mask=bench.index_mask)),
        "predict_latents": bench.measure("MM2Latent predict_latents (mapper)", lambda: pipe.predict_latents(prompts, codes)),
    }
    latents = pipe.vary_latents(pipe.predict_latents(prompts, codes), [SEED])
    stages["render_to_pil"] = bench.measure("MM2Latent render + PIL", lambda: tensor_to_pil(pipe.render(latents)))
    item["stages"] = stages
    results["mm2latent"] = item
    e2e = results["end_to_end"]
    ratios = results.setdefault("ratios", {})
    # DDGI's headline comparison encodes the prompt every call, as the MM2Latent engine always does.
    ratios["ddgi_fast_over_mm2latent"] = e2e["fast_uncached_prompt"]["median_ms"] / item["end_to_end"]["median_ms"]
    if "baseline" in results:
        ratios["baseline_over_mm2latent"] = results["baseline"]["median_ms"] / item["end_to_end"]["median_ms"]


def section_precision(bench: Bench) -> None:
    """Fast mode, the U-Net pass and StyleGAN2 again in the other precisions (last: casts the pipeline)."""
    args, pipe = bench.args, bench.pipe
    alternatives = args.ablation_dtypes
    if alternatives is None:
        if bench.cuda:
            alternatives = [d for d in ("float16", "bfloat16", "float32") if d != args.dtype]
        else:
            alternatives = ["bfloat16"] if bench.results["meta"]["device"]["cpu_bf16"] and args.dtype != "bfloat16" else []
    per_dtype: dict = {}
    for name in alternatives:
        log(f"precision ablation: {name}")
        dtype = parse_dtype(name)
        pipe.to(dtype=dtype)
        pipe.encoder.clear_prompt_cache()
        entry = {"fast": bench.measure(f"fast mode in {name}", bench.fast_call, warmup=max(1, args.warmup))}
        prompts = pipe.encode_prompts([PROMPT])
        controls, _ = pipe.prepare_conditions(mask=bench.index_mask)
        noise = pipe.prepare_noise([SEED])
        entry["unet_controlnet_capture"] = bench.measure(
            f"U-Net pass in {name}",
            lambda p=prompts, c=controls, n=noise: pipe.denoise(p, c, n, num_steps=1, feature_steps=[0], run_to_end=False))
        latents = bench.shared["latents"].to(dtype)
        entry["stylegan2_synthesis"] = bench.measure(f"render in {name}", lambda w=latents: pipe.render(w))
        per_dtype[name] = entry
    if per_dtype:
        bench.results.setdefault("ablations", {})["precision"] = {
            "main_dtype": args.dtype, **per_dtype,
            "what": "fast mode, U-Net pass and StyleGAN2 with the whole pipeline cast"}


#: The sections in order; each reads what the ones before it left in ``Bench.shared`` / ``Bench.results``.
SECTIONS = {
    "build": section_build, "stages": section_stages, "end_to_end": section_end_to_end,
    "throughput": section_throughput, "space_overhead": section_space_overhead, "invert_mode": section_invert_mode,
    "ablations": section_ablations, "baseline": section_baseline, "mm2latent": section_mm2latent,
    "precision": section_precision,
}


def wanted_sections(args) -> list[str]:
    skip = set()
    if args.no_ablations:
        skip |= {"ablations", "precision"}
    if args.no_baseline:
        skip.add("baseline")
    if args.no_mm2latent:
        skip.add("mm2latent")
    if not args.invert_refine_steps:
        skip.add("invert_mode")
    return [name for name in SECTIONS if name not in skip]
