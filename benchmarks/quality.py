"""``quality`` suite: how far NAG fast mode's images are from exact mode's, on a real Flux pipeline.

For every prompt of a fixed set (each with a NAG-negative prompt) and every seed, one image per variant from the same
initial noise (a CPU ``torch.Generator`` seeded per image):

- ``no_nag``: the stock pipeline call;
- ``nag_exact``: ``apply_nag(pipe, mode="exact")``, the authors' semantics;
- ``nag_fast``: ``apply_nag(pipe, mode="fast")``, the shared image stream (NAG.md section 4).

Per image: seconds per pipeline call; PSNR and SSIM (``image_metrics``, on the decoded ``[0, 1]`` float images) of
fast vs exact and, as the scale of a difference NAG itself makes, exact vs no NAG and fast vs no NAG; with
``--clip-model``, the cosine similarity of the image's CLIP embedding to its prompt and to its NAG-negative text
(NAG should lower the latter). Written through the harness: ``quality-<device>-<date>.json`` (per-image rows and a
summary of means), ``.md`` (tables) and ``.png`` (the grid: one row per prompt and seed, one column per variant).

It needs real weights: ``--model black-forest-labs/FLUX.1-schnell`` (a hub id or a local directory). ``--tiny``
(the default without a GPU and without ``--model``) runs the same code on a random-weight Flux pipeline built here in
seconds, so the harness can be tested on a CPU; its images are noise and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import harness as h
from . import image_metrics as im
from . import random_flux

HELP = ("images of a real Flux pipeline (--model) for fixed prompts with NAG negatives: no NAG, NAG exact and "
        "NAG fast from the same seeds; PSNR/SSIM between "
        "variants, CLIP similarity to the prompt and the NAG negative (--clip-model); an image grid. Not part of "
        "'all'; without a GPU and --model it runs a tiny random-weight pipeline whose figures are meaningless.")
VARIANTS = ("no_nag", "nag_exact", "nag_fast")
LABELS = {"no_nag": "no NAG", "nag_exact": "NAG exact", "nag_fast": "NAG fast"}
MODES = {"nag_exact": "exact", "nag_fast": "fast"}
COMPARISONS = (("nag_fast", "nag_exact"), ("nag_exact", "no_nag"), ("nag_fast", "no_nag"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Prompt and NAG-negative pairs: the first is the paper's; the others each name one thing the negative should remove
# (an object, a colour, an attribute), plus one quality negative as people use NAG in practice.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("Portrait of AI researcher.", "Glasses."),
    ("A tabby cat sleeping on a sunny windowsill.", "Stripes."),
    ("A bowl of fruit on a wooden kitchen table.", "Apples."),
    ("A busy city street at night in the rain.", "Cars."),
    ("A lighthouse on a rocky coast at sunset.", "Clouds."),
    ("A child's bedroom full of toys.", "Teddy bear."),
    ("A bouquet of flowers in a glass vase.", "Red."),
    ("A red sports car parked in front of a modern house.", "Blurry, low quality, deformed, cartoon."),
)

TINY_NOTE = (
    "TINY RANDOM-WEIGHT PIPELINE: these images are noise and every figure below is meaningless; the run only shows "
    "that the harness works end to end. Measure with --model (real weights) on a GPU."
)


@dataclass(frozen=True)
class Settings:
    model: str
    tiny: bool
    steps: int
    guidance_scale: float
    max_sequence_length: int
    height: int
    width: int
    seeds: tuple[int, ...]
    nag_scale: float
    nag_tau: float
    nag_alpha: float
    dtype: torch.dtype

    @property
    def nag(self) -> dict[str, float]:
        return dict(nag_scale=self.nag_scale, nag_tau=self.nag_tau, nag_alpha=self.nag_alpha)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="FLUX.1 pipeline: hub id or local directory, e.g. black-forest-labs/FLUX.1-schnell "
                   "(required on a GPU unless --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="random-weight toy pipeline built in code (default without a GPU and without --model): "
                   "tests the harness, its figures are meaningless")
    p.add_argument("--steps", type=int, help="inference steps (default: 4 for a schnell model, 25 otherwise, 2 tiny)")
    p.add_argument("--guidance-scale", type=float,
                   help="distilled guidance (default: 0 for schnell, 3.5 otherwise); true CFG is not used")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens of prompt and NAG negative (default 256)")
    p.add_argument("--nag-scale", type=float, default=5.0, help="default 5")
    p.add_argument("--nag-tau", type=float, default=2.5, help="default 2.5")
    p.add_argument("--nag-alpha", type=float, default=0.25, help="default 0.25")
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
    if args.tiny and args.model:
        raise SystemExit("--tiny and --model exclude each other: --tiny builds a random-weight pipeline")
    if not tiny and not args.model:
        raise SystemExit("the quality suite needs --model (e.g. --model black-forest-labs/FLUX.1-schnell, or a local "
                         "directory), or --tiny for the random-weight harness check")
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
    if height % 16 or width % 16:
        raise SystemExit(f"--height/--width must be multiples of 16 for Flux, got {height}x{width}")
    if min(height, width) < im.SSIM_WINDOW:
        raise SystemExit(f"--height/--width below {im.SSIM_WINDOW} pixels leave no room for the SSIM window")
    if args.nag_scale < 1 or args.nag_tau <= 0 or not 0 <= args.nag_alpha <= 1:
        raise SystemExit("--nag-scale must be >= 1, --nag-tau > 0 and --nag-alpha in [0, 1], got "
                         f"{args.nag_scale}, {args.nag_tau}, {args.nag_alpha}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return Settings(
        model="tiny-random-flux" if tiny else args.model, tiny=tiny, steps=steps,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else (0.0 if tiny or schnell else 3.5),
        max_sequence_length=msl, height=height, width=width, seeds=seeds, nag_scale=args.nag_scale,
        nag_tau=args.nag_tau, nag_alpha=args.nag_alpha, dtype=dtype,
    )


def load_prompts(path: str | None) -> list[tuple[str, str]]:
    """The built-in set, or ``--prompts FILE`` (JSON or tab-separated text); errors name the file and the entry."""
    if path is None:
        return list(PROMPTS)
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise SystemExit(f"--prompts: cannot read {path}: {exc}") from None
    pairs: list[tuple[str, str]] = []
    if file.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--prompts: {path} is not valid JSON: {exc}") from None
        if not isinstance(doc, list):
            raise SystemExit(f"--prompts: {path} must hold a JSON list, got {type(doc).__name__}")
        for i, item in enumerate(doc):
            if isinstance(item, dict) and {"prompt", "nag_negative_prompt"} <= set(item):
                pairs.append((item["prompt"], item["nag_negative_prompt"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((item[0], item[1]))
            else:
                raise SystemExit(f"--prompts: entry {i} of {path} must be {{\"prompt\": ..., \"nag_negative_prompt\": "
                                 f"...}} or [prompt, negative], got {item!r}")
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise SystemExit(f"--prompts: line {n} of {path} must be 'prompt<TAB>NAG negative', got {line!r}")
            pairs.append((parts[0].strip(), parts[1].strip()))
    for prompt, negative in pairs:
        if not (isinstance(prompt, str) and isinstance(negative, str) and prompt.strip() and negative.strip()):
            raise SystemExit(f"--prompts: every prompt and NAG negative must be a non-empty string, got "
                             f"{prompt!r} / {negative!r} in {path}")
    if not pairs:
        raise SystemExit(f"--prompts: {path} holds no prompts")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(settings: Settings, device: torch.device, offload: bool):
    if settings.tiny:
        pipe = random_flux.tiny_pipeline(settings.dtype).to(device)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(settings.model, torch_dtype=settings.dtype)
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# CLIP similarity
# ----------------------------------------------------------------------------------------------------------------


class ClipScorer:
    """Cosine similarity of CLIP image and text embeddings (transformers' ``CLIPModel``), both L2-normalized."""

    def __init__(self, name: str, device: torch.device):
        from transformers import AutoProcessor, CLIPModel

        self.name = name
        self.device = device
        self.model = CLIPModel.from_pretrained(name).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(name)
        self._text: dict[str, torch.Tensor] = {}

    @staticmethod
    def _embedding(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor; 5 a BaseModelOutputWithPooling whose pooler_output it is
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        if text not in self._text:
            inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True).to(self.device)
            self._text[text] = self._embedding(self.model.get_text_features(**inputs))[0]
        return self._text[text]

    @torch.no_grad()
    def image(self, image) -> torch.Tensor:
        inputs = self.processor(images=[image], return_tensors="pt").to(self.device)
        pixels = inputs["pixel_values"].to(self.model.dtype)
        return self._embedding(self.model.get_image_features(pixel_values=pixels))[0]

    def similarity(self, image_embedding: torch.Tensor, text: str) -> float:
        return float(image_embedding @ self.text(text))


def load_clip(name: str | None, device: torch.device) -> tuple[ClipScorer | None, str]:
    """The scorer and a one-line note of what happened (loaded, not asked for, or why it was skipped)."""
    if not name:
        return None, "CLIP similarity not measured (no --clip-model given)"
    try:
        scorer = ClipScorer(name, device)
    except ImportError as exc:
        return None, f"CLIP similarity skipped: transformers is needed (pip install transformers): {h.error_text(exc)}"
    except Exception as exc:  # noqa: BLE001 - a missing CLIP model must not cost the images
        return None, f"CLIP similarity skipped: --clip-model {name} could not be loaded ({h.error_text(exc)})"
    return scorer, f"CLIP similarity with {name}"


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nag_mode(pipe, mode: str, settings: Settings, api):
    """``apply_nag(pipe, mode=mode)`` for the block, ``remove_nag`` after it."""
    apply_nag, remove_nag = api
    apply_nag(pipe, mode=mode, **settings.nag)
    try:
        yield
    finally:
        remove_nag(pipe)


def generate(pipe, prompt: str, negative: str, seed: int, settings: Settings, variant: str) -> torch.Tensor:
    """One image ``[3, H, W]`` float32 in ``[0, 1]`` on the CPU; the NAG variants get the NAG negative and scale."""
    kwargs = dict(
        num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
        max_sequence_length=settings.max_sequence_length, height=settings.height, width=settings.width,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
    )
    if variant != "no_nag":
        kwargs.update(nag_negative_prompt=negative, **settings.nag)
    with torch.no_grad():
        images = pipe(prompt, **kwargs).images
    return images[0].detach().float().clamp(0, 1).cpu()


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------------------
# Grid, tables, summary
# ----------------------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def save_grid(cases: list[dict], images: dict, path: Path, tile: int, title: str) -> tuple[int, int]:
    """One row per (prompt, seed), one column per variant; a missing image is a grey tile saying why."""
    from PIL import Image, ImageDraw

    any_image = next(iter(images.values()))
    tile_h = max(1, round(tile * any_image.shape[1] / any_image.shape[2]))
    label_w, head_h, pad = max(tile, 220), 40 + 16 * (len(title) // 120 + 1), 6
    width = label_w + len(VARIANTS) * (tile + pad) + pad
    height = head_h + len(cases) * (tile_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    small, big = _font(12), _font(16)
    draw.multiline_text((pad, 4), textwrap.fill(title, 120), fill="black", font=small)
    for j, v in enumerate(VARIANTS):
        draw.text((label_w + pad + j * (tile + pad), head_h - 22), LABELS[v], fill="black", font=big)
    chars = max(12, label_w // 7)
    for i, case in enumerate(cases):
        y = head_h + pad + i * (tile_h + pad)
        label = (f"{textwrap.fill(case['prompt'], chars)}\n\nNAG negative:\n{textwrap.fill(case['nag_negative'], chars)}"
                 f"\n\nseed {case['seed']}")
        draw.multiline_text((pad, y), label, fill="black", font=small)
        for j, v in enumerate(VARIANTS):
            x = label_w + pad + j * (tile + pad)
            img = images.get((case["prompt_id"], case["seed"], v))
            if img is None:
                draw.rectangle([x, y, x + tile - 1, y + tile_h - 1], fill=(200, 200, 200))
                why = textwrap.fill(case.get("missing", {}).get(v, "no image"), max(8, tile // 8))
                draw.multiline_text((x + 4, y + 4), why, fill="black", font=small)
                continue
            resample = Image.NEAREST if img.shape[2] < tile else Image.LANCZOS  # tiny images: keep the pixels visible
            grid.paste(to_pil(img).resize((tile, tile_h), resample), (x, y))
    grid.save(path)
    return grid.size


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {"variants": {}, "comparisons": {}}
    for v in VARIANTS:
        mine = [r for r in ok if r["variant"] == v]
        secs = sorted(r["seconds"] for r in mine)
        out["variants"][v] = {
            "images": len(mine),
            "median_seconds": statistics.median(secs) if secs else None,
            "clip_prompt_mean": _mean(r.get("clip_prompt") for r in mine),
            "clip_nag_negative_mean": _mean(r.get("clip_nag_negative") for r in mine),
        }
    for a, b in COMPARISONS:
        key = f"{a}_vs_{b}"
        pairs = [r for r in ok if r["variant"] == a and r.get(f"psnr_vs_{b}") is not None]
        psnrs = [r[f"psnr_vs_{b}"] for r in pairs]
        out["comparisons"][key] = {
            "pairs": len(pairs),
            # dB averaged as they are; one identical pair makes the mean inf, as it should read
            "psnr_mean": (sum(psnrs) / len(psnrs)) if psnrs else None,
            "psnr_min": min(psnrs) if psnrs else None,
            "ssim_mean": _mean(r[f"ssim_vs_{b}"] for r in pairs),
            "ssim_min": min((r[f"ssim_vs_{b}"] for r in pairs), default=None),
        }
    return out


def _f(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(doc: dict) -> str:
    return markdown(doc["rows"], summarize(doc["rows"]), doc)


def markdown(rows: list[dict], summary: dict, extra: dict) -> str:
    parts = []
    if extra.get("tiny"):
        parts.append(f"**{TINY_NOTE}**\n")
    s = extra["settings"]
    parts.append(
        f"Model `{s['model']}`, {s['steps']} steps, guidance {s['guidance_scale']}, {s['height']}x{s['width']}, "
        f"{s['dtype']}, max_sequence_length {s['max_sequence_length']}, NAG scale {s['nag_scale']} tau {s['nag_tau']} "
        f"alpha {s['nag_alpha']}, seeds {', '.join(map(str, s['seeds']))}. {extra['clip_note']}. "
        f"Grid: `{extra.get('grid') or 'not written'}`.\n"
    )
    head = ["variant", "images", "median s/image", "CLIP to prompt", "CLIP to NAG negative"]
    body = [[LABELS[v], d["images"], _f(d["median_seconds"], 2), _f(d["clip_prompt_mean"]),
             _f(d["clip_nag_negative_mean"])] for v, d in summary["variants"].items()]
    parts.append(h.markdown_table(head, body))
    head = ["images compared", "pairs", "PSNR dB mean", "PSNR dB min", "SSIM mean", "SSIM min"]
    body = []
    for (a, b) in COMPARISONS:
        d = summary["comparisons"][f"{a}_vs_{b}"]
        body.append([f"{LABELS[a]} vs {LABELS[b]}", d["pairs"], im.fmt_psnr(d["psnr_mean"]), im.fmt_psnr(d["psnr_min"]),
                     _f(d["ssim_mean"]), _f(d["ssim_min"])])
    parts.append(h.markdown_table(head, body))
    parts.append("Same seed, same initial noise per row: NAG exact vs no NAG is the change NAG itself makes; fast vs "
                 "exact should be well below it. Higher PSNR/SSIM = closer. CLIP: cosine similarity of image and text "
                 "embeddings; NAG should lower the similarity to the NAG negative.\n")
    head = ["prompt", "NAG negative", "seed", "fast vs exact PSNR / SSIM", "exact vs no NAG PSNR / SSIM",
            "CLIP to negative: no NAG / exact / fast"]
    body = []
    for case in dict.fromkeys((r["prompt_id"], r["seed"]) for r in rows):
        by_v = {r["variant"]: r for r in rows if (r["prompt_id"], r["seed"]) == case}
        any_row = next(iter(by_v.values()))
        fast, exact = by_v.get("nag_fast", {}), by_v.get("nag_exact", {})

        def pair(row, other):
            if row.get("status") != "ok" or row.get(f"psnr_vs_{other}") is None:
                return row.get("reason") or row.get("error") or "n/a"
            return f"{im.fmt_psnr(row[f'psnr_vs_{other}'])} / {_f(row[f'ssim_vs_{other}'])}"

        clip = " / ".join(_f(by_v.get(v, {}).get("clip_nag_negative")) for v in VARIANTS)
        body.append([any_row["prompt"], any_row["nag_negative"], any_row["seed"], pair(fast, "nag_exact"),
                     pair(exact, "no_nag"), clip])
    parts.append(h.markdown_table(head, body))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------------


def run(args, device: torch.device) -> h.Results:
    settings = settings_from(args, device)
    prompts = load_prompts(args.prompts)
    api = h.integration_api()  # Skip (the integration is missing) ends the suite: nothing to compare without it
    env = h.environment(device)
    results = h.Results("quality", env, args.out)
    results.extra.update(
        model=settings.model, tiny=settings.tiny,
        settings={**{k: getattr(settings, k) for k in Settings.__dataclass_fields__ if k != "dtype"},
                  "dtype": str(settings.dtype).replace("torch.", "")},
        prompts=[{"prompt": p, "nag_negative_prompt": n} for p, n in prompts],
    )
    if settings.tiny:
        results.extra["note"] = TINY_NOTE
        h.log(f"quality suite: {TINY_NOTE}")
    h.log(f"quality suite on {env['device']}: {settings.model}, {len(prompts)} prompts x {len(settings.seeds)} seeds "
          f"x {len(VARIANTS)} variants, {settings.steps} steps, {settings.height}x{settings.width}")
    t0 = time.perf_counter()
    pipe = load_pipeline(settings, device, args.offload)
    results.extra["pipeline"] = type(pipe).__name__
    results.extra["load_s"] = round(time.perf_counter() - t0, 1)
    apply_nag, remove_nag = api
    try:  # an unsupported pipeline fails here, once, rather than in every NAG row
        remove_nag(apply_nag(pipe, mode="exact", **settings.nag))
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--model {settings.model}: {h.error_text(exc)}") from None
    clip, clip_note = load_clip(args.clip_model, device)
    results.extra["clip_model"] = args.clip_model
    results.extra["clip_note"] = clip_note
    h.log(f"  loaded {results.extra['pipeline']} in {results.extra['load_s']}s; {clip_note}")
    images_dir = results.stem.parent / (results.stem.name + "-images")
    if args.save_images:
        images_dir.mkdir(exist_ok=True)

    budget = getattr(args, "budget_s", None)
    images: dict[tuple, torch.Tensor] = {}
    cases: list[dict] = []
    for pid, (prompt, negative) in enumerate(prompts):
        for seed in settings.seeds:
            case = dict(prompt_id=pid, prompt=prompt, nag_negative=negative, seed=seed, missing={})
            cases.append(case)
            for v in VARIANTS:
                row = {"case": f"prompt {pid} seed {seed} {v}", "variant": v, "prompt_id": pid, "prompt": prompt,
                       "nag_negative": negative, "seed": seed, "model": settings.model}
                if budget is not None and time.perf_counter() - t0 > budget:
                    row.update(status="skipped", reason="time budget spent (--budget-s)")
                    case["missing"][v] = row["reason"]
                    results.add(row)
                    continue

                def make(v=v):
                    ctx = contextlib.nullcontext() if v == "no_nag" else nag_mode(pipe, MODES[v], settings, api)
                    with ctx:
                        h.synchronize(device)
                        start = time.perf_counter()
                        img = generate(pipe, prompt, negative, seed, settings, v)
                        h.synchronize(device)
                        return img, time.perf_counter() - start

                made, err = h.guarded(make, device)
                if err:
                    row.update(err)
                    case["missing"][v] = row.get("reason") or row.get("error")
                if made:
                    img, secs = made
                    images[(pid, seed, v)] = img
                    row.update(seconds=round(secs, 3), finite=bool(torch.isfinite(img).all()))
                    for a, b in COMPARISONS:
                        if a == v and (pid, seed, b) in images:
                            row[f"psnr_vs_{b}"] = im.psnr(img, images[(pid, seed, b)])
                            row[f"ssim_vs_{b}"] = im.ssim(img, images[(pid, seed, b)])
                    if clip is not None:
                        emb = clip.image(to_pil(img))
                        row["clip_prompt"] = clip.similarity(emb, prompt)
                        row["clip_nag_negative"] = clip.similarity(emb, negative)
                    if args.save_images:
                        path = images_dir / f"p{pid}-s{seed}-{v}.png"
                        to_pil(img).save(path)
                        row["image"] = str(path)
                results.add(row)
                h.log("    " + progress_line(row))
    summary = summarize(results.rows)
    results.extra["summary"] = summary
    grid = results.plot_path()
    title = (f"{'TINY RANDOM WEIGHTS, MEANINGLESS - ' if settings.tiny else ''}{settings.model}, {settings.steps} "
             f"steps, guidance {settings.guidance_scale}, NAG {settings.nag_scale}/{settings.nag_tau}/"
             f"{settings.nag_alpha}, {env['device']}, {env['date']}")
    if images:
        results.extra["grid_size"] = list(save_grid(cases, images, grid, args.grid_tile, title))
        results.extra["grid"] = grid.name
    md = results.write_markdown(markdown(results.rows, summary, results.extra))
    h.log(f"wrote {results.json_path}, {md}" + (f", {grid}" if images else " (no images, no grid)")
          + (f", {images_dir}/" if args.save_images else ""))
    results.markdown_path = md
    results.summary = summary_lines(summary, results.extra)
    del pipe, clip
    h.free_memory(device)
    return results


def progress_line(r: dict) -> str:
    head = f"prompt {r['prompt_id']} seed {r['seed']} {r['variant']:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason') or r.get('error')}"
    cmp = "  ".join(f"vs {b}: PSNR {im.fmt_psnr(r[f'psnr_vs_{b}'])} SSIM {r[f'ssim_vs_{b}']:.3f}"
                    for a, b in COMPARISONS if a == r["variant"] and f"psnr_vs_{b}" in r)
    clip = (f"  CLIP prompt {r['clip_prompt']:.3f} negative {r['clip_nag_negative']:.3f}"
            if "clip_prompt" in r else "")
    return f"{head} {r['seconds']:.2f}s  {cmp}{clip}" + ("" if r["finite"] else "  (non-finite image)")


def summary_lines(summary: dict, extra: dict) -> list[str]:
    lines = [f"quality: {TINY_NOTE}"] if extra.get("tiny") else []
    fe = summary["comparisons"]["nag_fast_vs_nag_exact"]
    en = summary["comparisons"]["nag_exact_vs_no_nag"]
    if fe["pairs"]:
        lines.append(f"quality: fast vs exact PSNR {im.fmt_psnr(fe['psnr_mean'])} dB, SSIM {_f(fe['ssim_mean'])} "
                     f"(exact vs no NAG: PSNR {im.fmt_psnr(en['psnr_mean'])} dB, SSIM {_f(en['ssim_mean'])}) "
                     f"over {fe['pairs']} image pairs")
    else:
        lines.append(f"quality: no fast vs exact pairs; exact vs no NAG PSNR {im.fmt_psnr(en['psnr_mean'])} dB, "
                     f"SSIM {_f(en['ssim_mean'])} over {en['pairs']} image pairs")
    return lines
