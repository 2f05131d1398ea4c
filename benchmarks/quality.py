"""``quality`` suite: what NAG does to the images of a real diffusers pipeline, and how far fast mode is from exact.

For every prompt of a fixed set (``quality_prompts``: each with a NAG-negative prompt) and every seed, one image per
variant from the same initial noise (a CPU ``torch.Generator`` seeded per image):

- ``no_nag``: the stock pipeline call;
- ``nag_exact``: ``apply_nag(pipe, mode="exact")``, the authors' semantics;
- ``nag_fast``: ``apply_nag(pipe, mode="fast")``, the shared image stream (docs/spec.md, "Fast mode"), only where
  the model's family implements fast mode (``quality_pipeline.nag_modes`` asks ``apply_nag`` once, before any image).

Per image: seconds per pipeline call; PSNR and SSIM (``image_metrics``) of fast vs exact and, as the scale of a
difference NAG itself makes, exact vs no NAG and fast vs no NAG; with ``--clip-model``, the cosine similarity of the
image's CLIP embedding to its prompt and to its NAG-negative text (``clip_score``; NAG should lower the latter).
Written through the harness (``quality_report``): ``quality-<device>-<date>.json`` (per-image rows), ``.md``
(tables) and ``.png`` (the grid: one row per prompt and seed, one column per variant).

The model: ``--model`` (a hub id or a local directory) loaded with the class its ``model_index.json`` names, or
``--pipeline-class`` (FLUX.1, FLUX.2, Z-Image, Wan, ... whatever class NAG supports). ``--tiny`` (the default without
a GPU and without ``--model``) runs the same code on a random-weight Flux pipeline built in seconds, so the harness
can be tested on a CPU; its images are noise and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from . import harness as h
from . import image_metrics as im
from . import quality_pipeline as qp
from . import quality_report as report
from .clip_score import load_clip
from .quality_prompts import load_prompts

HELP = ("images of a real diffusers pipeline (--model; its class from model_index.json or --pipeline-class) for "
        "fixed prompts with NAG negatives: no NAG and NAG exact, plus NAG fast where the model has it, from the same "
        "seeds; PSNR/SSIM between variants, CLIP similarity to the prompt and the NAG negative (--clip-model); an "
        "image grid. Not part of 'all'; without a GPU and --model it runs a tiny random-weight pipeline whose "
        "figures are meaningless.")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Settings:
    model: str
    pipeline_class: str | None
    tiny: bool
    steps: int
    guidance_scale: float | None  # None: the pipeline's default
    max_sequence_length: int | None  # passed where the pipeline takes it
    num_frames: int | None  # video pipelines; None: the pipeline's default
    height: int
    width: int
    seeds: tuple[int, ...]
    nag_scale: float | None  # None: the integration's recommended setting for the pipeline
    nag_tau: float | None
    nag_alpha: float | None
    dtype: torch.dtype

    @property
    def nag(self) -> dict[str, float]:
        given = dict(nag_scale=self.nag_scale, nag_tau=self.nag_tau, nag_alpha=self.nag_alpha)
        return {k: v for k, v in given.items() if v is not None}

    def record(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "dtype"}
        return {**out, "dtype": str(self.dtype).replace("torch.", "")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers pipeline: hub id or local directory, e.g. black-forest-labs/FLUX.1-schnell "
                   "(required on a GPU unless --tiny)")
    p.add_argument("--pipeline-class", help="diffusers pipeline class to load --model with, e.g. Flux2Pipeline, "
                   "ZImagePipeline, WanPipeline (default: the class in the model's model_index.json)")
    p.add_argument("--tiny", action="store_true",
                   help="random-weight toy Flux pipeline built in code (default without a GPU and without --model): "
                   "tests the harness, its figures are meaningless")
    p.add_argument("--steps", type=int, help="inference steps (default: 4 for a schnell model, 25 otherwise, 2 tiny)")
    p.add_argument("--guidance-scale", type=float,
                   help="the pipeline's guidance_scale (default: 0 for schnell and tiny, the pipeline's own otherwise)")
    p.add_argument("--max-sequence-length", type=int,
                   help="text tokens of prompt and NAG negative, where the pipeline takes it (default 256; tiny 64)")
    p.add_argument("--num-frames", type=int, help="frames per video for video pipelines (default: the pipeline's)")
    p.add_argument("--nag-scale", type=float, help="default: the integration's recommended value for the pipeline")
    p.add_argument("--nag-tau", type=float, help="default: the integration's recommended value for the pipeline")
    p.add_argument("--nag-alpha", type=float, help="default: the integration's recommended value for the pipeline")
    p.add_argument("--seeds", default="0,1", help="comma list of generator seeds, one image per prompt each (default 0,1)")
    p.add_argument("--height", type=int, help="pixels (default 1024; tiny 32)")
    p.add_argument("--width", type=int, help="pixels (default 1024; tiny 32)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt set instead of the built-in one: JSON list of {\"prompt\", \"nag_negative_prompt\"} "
                   "objects or [prompt, negative] pairs, or a text file with one 'prompt<TAB>negative' per line")
    p.add_argument("--clip-model", help="CLIP model (hub id or directory) for image-text similarity, e.g. "
                   "openai/clip-vit-large-patch14; skipped with a note when it cannot be loaded")
    p.add_argument("--save-images", action="store_true", help="also save every image as its own PNG")
    p.add_argument("--grid-tile", type=int, default=256, help="pixel width of one image in the grid (default 256)")
    p.add_argument("--offload", action="store_true", help="pipe.enable_model_cpu_offload() instead of pipe.to(device)")


def _positive_int(value, name: str) -> int:
    if value is None or value < 1:
        raise SystemExit(f"{name} must be a positive integer, got {value!r}")
    return value


def settings_from(args, device: torch.device) -> Settings:
    tiny = bool(args.tiny) or (args.model is None and device.type != "cuda")
    if args.tiny and (args.model or args.pipeline_class):
        raise SystemExit("--tiny and --model/--pipeline-class exclude each other: --tiny builds a random-weight pipeline")
    if not tiny and not args.model:
        raise SystemExit("the quality suite needs --model (e.g. --model black-forest-labs/FLUX.1-schnell, or a local "
                         "directory), or --tiny for the random-weight harness check")
    qp.pipeline_class(args.pipeline_class)  # an unknown class fails before anything is loaded or written
    schnell = not tiny and "schnell" in args.model.lower()
    try:
        seeds = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    if not seeds:
        raise SystemExit("--seeds is empty")
    steps = args.steps if args.steps is not None else (2 if tiny else 4 if schnell else 25)
    size = 32 if tiny else 1024
    height = args.height if args.height is not None else size
    width = args.width if args.width is not None else size
    msl = args.max_sequence_length if args.max_sequence_length is not None else (64 if tiny else 256)
    for value, name in ((steps, "--steps"), (height, "--height"), (width, "--width"), (msl, "--max-sequence-length"),
                        (args.grid_tile, "--grid-tile")):
        _positive_int(value, name)
    if args.num_frames is not None:
        _positive_int(args.num_frames, "--num-frames")
    if height % 16 or width % 16:
        raise SystemExit(f"--height/--width must be multiples of 16 (VAE 8x, 2x2 patches), got {height}x{width}")
    if min(height, width) < im.SSIM_WINDOW:
        raise SystemExit(f"--height/--width below {im.SSIM_WINDOW} pixels leave no room for the SSIM window")
    for value, name, ok, rule in ((args.nag_scale, "--nag-scale", lambda v: v >= 1, ">= 1"),
                                  (args.nag_tau, "--nag-tau", lambda v: v > 0, "> 0"),
                                  (args.nag_alpha, "--nag-alpha", lambda v: 0 <= v <= 1, "in [0, 1]")):
        if value is not None and not ok(value):
            raise SystemExit(f"{name} must be {rule}, got {value}")
    return Settings(
        model="tiny-random-flux" if tiny else args.model, pipeline_class=args.pipeline_class, tiny=tiny, steps=steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else (0.0 if tiny or schnell else None),
        max_sequence_length=msl, num_frames=args.num_frames, height=height, width=width, seeds=seeds,
        nag_scale=args.nag_scale, nag_tau=args.nag_tau, nag_alpha=args.nag_alpha,
        dtype=DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")],
    )


def measure_image(row: dict, img: torch.Tensor, images: dict, key: tuple, clip, prompt: str, negative: str) -> None:
    """Fill ``row`` with the image's comparisons to the variants made before it (same seed) and its CLIP scores."""
    pid, seed, variant = key
    images[key] = img
    row["finite"] = bool(torch.isfinite(img).all())
    for a, b in report.COMPARISONS:
        if a == variant and (pid, seed, b) in images:
            row[f"psnr_vs_{b}"] = im.psnr(img, images[(pid, seed, b)])
            row[f"ssim_vs_{b}"] = im.ssim(img, images[(pid, seed, b)])
    if clip is not None:
        emb = clip.image(qp.to_pil(img))
        row["clip_prompt"] = clip.similarity(emb, prompt)
        row["clip_nag_negative"] = clip.similarity(emb, negative)


def run(args, device: torch.device) -> h.Results:
    settings = settings_from(args, device)
    prompts = load_prompts(args.prompts)
    api = h.integration_api()  # Skip (the integration is missing) ends the suite: nothing to compare without it
    env = h.environment(device)
    results = h.Results("quality", env, args.out)
    results.extra.update(model=settings.model, tiny=settings.tiny, settings=settings.record(),
                         prompts=[{"prompt": p, "nag_negative_prompt": n} for p, n in prompts])
    if settings.tiny:
        results.extra["note"] = report.TINY_NOTE
        h.log(f"quality suite: {report.TINY_NOTE}")
    t0 = time.perf_counter()
    pipe = qp.load_pipeline(settings, device, args.offload)
    accepted = qp.call_parameters(pipe)
    modes = qp.nag_modes(pipe, settings.nag, api, settings.model)  # an unsupported pipeline fails here, once
    variants = ["no_nag", "nag_exact"] + (["nag_fast"] if modes["fast"] == "supported" else [])
    clip, clip_note = load_clip(args.clip_model, device)
    results.extra.update(pipeline=type(pipe).__name__, load_s=round(time.perf_counter() - t0, 1), modes=modes,
                         variants=variants, clip_model=args.clip_model, clip_note=clip_note)
    h.log(f"quality suite on {env['device']}: {settings.model} ({type(pipe).__name__}, loaded in "
          f"{results.extra['load_s']}s), {len(prompts)} prompts x {len(settings.seeds)} seeds x {len(variants)} "
          f"variants, {settings.steps} steps, {settings.height}x{settings.width}; fast mode {modes['fast']}; {clip_note}")
    images_dir = results.stem.parent / (results.stem.name + "-images")
    if args.save_images:
        images_dir.mkdir(exist_ok=True)

    images: dict[tuple, torch.Tensor] = {}
    cases: list[dict] = []
    for pid, (prompt, negative) in enumerate(prompts):
        for seed in settings.seeds:
            case = dict(prompt_id=pid, prompt=prompt, nag_negative=negative, seed=seed, missing={})
            cases.append(case)
            for v in variants:
                row = {"case": f"prompt {pid} seed {seed} {v}", "variant": v, "prompt_id": pid, "prompt": prompt,
                       "nag_negative": negative, "seed": seed, "model": settings.model}
                if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                    row.update(status="skipped", reason="time budget spent (--budget-s)")
                    case["missing"][v] = row["reason"]
                    results.add(row)
                    continue

                def make(v=v):
                    with qp.nag_applied(pipe, v, settings.nag, api):
                        h.synchronize(device)
                        start = time.perf_counter()
                        img = qp.generate(pipe, accepted, prompt, negative, seed, settings, v)
                        h.synchronize(device)
                        return img, time.perf_counter() - start

                made, err = h.guarded(make, device)
                if err:
                    row.update(err)
                    case["missing"][v] = row.get("reason") or row.get("error")
                else:
                    img, secs = made
                    row["seconds"] = round(secs, 3)
                    measure_image(row, img, images, (pid, seed, v), clip, prompt, negative)
                    if args.save_images:
                        row["image"] = str(images_dir / f"p{pid}-s{seed}-{v}.png")
                        qp.to_pil(img).save(row["image"])
                results.add(row)
                h.log("    " + report.progress_line(row))
    title = (f"{'TINY RANDOM WEIGHTS, MEANINGLESS - ' if settings.tiny else ''}{settings.model}, {settings.steps} "
             f"steps, guidance {settings.guidance_scale}, NAG {settings.nag or 'recommended'}, {env['device']}, "
             f"{env['date']}")
    if images:
        grid = results.plot_path()
        results.extra["grid_size"] = list(report.save_grid(cases, images, variants, grid, args.grid_tile, title))
        results.extra["grid"] = grid.name
    results.extra["summary"] = report.summarize(results.rows, variants)
    results.finish(table(results.document()), summary=report.summary_lines(results.document()))
    if args.save_images:
        h.log(f"images in {images_dir}/")
    del pipe, clip
    h.free_memory(device)
    return results


def table(doc: dict) -> str:
    return report.markdown(doc)
