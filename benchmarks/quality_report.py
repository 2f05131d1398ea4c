"""What the quality suite writes: the summary of its rows, its markdown tables, its image grid, its progress lines.

Everything here takes the variants a run actually had (``doc["variants"]``: no NAG and NAG exact always, NAG fast
where the model has fast mode), so a model without fast mode reports the comparisons it has and no empty columns.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

from . import harness as h
from . import image_metrics as im

VARIANTS = ("no_nag", "nag_exact", "nag_fast")
LABELS = {"no_nag": "no NAG", "nag_exact": "NAG exact", "nag_fast": "NAG fast"}
# (a, b): the rows of variant a carry psnr_vs_b / ssim_vs_b, measured against b's image from the same seed.
COMPARISONS = (("nag_fast", "nag_exact"), ("nag_exact", "no_nag"), ("nag_fast", "no_nag"))
TINY_NOTE = (
    "TINY RANDOM-WEIGHT PIPELINE: these images are noise and every figure below is meaningless; the run only shows "
    "that the harness works end to end. Measure with --model (real weights) on a GPU."
)


def comparisons(variants) -> list[tuple[str, str]]:
    return [(a, b) for a, b in COMPARISONS if a in variants and b in variants]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], variants=VARIANTS) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {"variants": {}, "comparisons": {}}
    for v in variants:
        mine = [r for r in ok if r["variant"] == v]
        secs = sorted(r["seconds"] for r in mine)
        out["variants"][v] = {
            "images": len(mine),
            "median_seconds": statistics.median(secs) if secs else None,
            "clip_prompt_mean": _mean(r.get("clip_prompt") for r in mine),
            "clip_nag_negative_mean": _mean(r.get("clip_nag_negative") for r in mine),
        }
    for a, b in comparisons(variants):
        pairs = [r for r in ok if r["variant"] == a and r.get(f"psnr_vs_{b}") is not None]
        psnrs = [r[f"psnr_vs_{b}"] for r in pairs]
        out["comparisons"][f"{a}_vs_{b}"] = {
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


def _given(value, default: str) -> str:
    return default if value is None else str(value)


def settings_line(doc: dict) -> str:
    s = doc["settings"]
    nag = ", ".join(f"{k.removeprefix('nag_')} {_given(s[k], 'recommended')}" for k in ("nag_scale", "nag_tau", "nag_alpha"))
    modes = doc.get("modes", {})
    fast = "" if not modes.get("fast") or modes["fast"] == "supported" else f" Fast mode: {modes['fast']}."
    return (f"Model `{s['model']}` ({doc.get('pipeline', 'pipeline class not recorded')}), {s['steps']} steps, "
            f"guidance {_given(s['guidance_scale'], 'pipeline default')}, {s['height']}x{s['width']}, {s['dtype']}, "
            f"max_sequence_length {_given(s['max_sequence_length'], 'not passed')}, NAG {nag}, seeds "
            f"{', '.join(map(str, s['seeds']))}. {doc['clip_note']}.{fast} "
            f"Grid: `{doc.get('grid') or 'not written'}`.\n")


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    variants = doc.get("variants", VARIANTS)
    summary = summarize(rows, variants)
    parts = [f"**{TINY_NOTE}**\n"] if doc.get("tiny") else []
    parts.append(settings_line(doc))
    head = ["variant", "images", "median s/image", "CLIP to prompt", "CLIP to NAG negative"]
    body = [[LABELS[v], d["images"], _f(d["median_seconds"], 2), _f(d["clip_prompt_mean"]),
             _f(d["clip_nag_negative_mean"])] for v, d in summary["variants"].items()]
    parts.append(h.markdown_table(head, body))
    head = ["images compared", "pairs", "PSNR dB mean", "PSNR dB min", "SSIM mean", "SSIM min"]
    body = []
    for a, b in comparisons(variants):
        d = summary["comparisons"][f"{a}_vs_{b}"]
        body.append([f"{LABELS[a]} vs {LABELS[b]}", d["pairs"], im.fmt_psnr(d["psnr_mean"]), im.fmt_psnr(d["psnr_min"]),
                     _f(d["ssim_mean"]), _f(d["ssim_min"])])
    parts.append(h.markdown_table(head, body))
    parts.append("Same seed, same initial noise per row: NAG exact vs no NAG is the change NAG itself makes; fast vs "
                 "exact should be well below it. Higher PSNR/SSIM = closer. CLIP: cosine similarity of image and text "
                 "embeddings; NAG should lower the similarity to the NAG negative.\n")
    pairs = comparisons(variants)[:2]  # fast vs exact (when fast ran) and exact vs no NAG
    head = (["prompt", "NAG negative", "seed"] + [f"{LABELS[a]} vs {LABELS[b]} PSNR / SSIM" for a, b in pairs]
            + ["CLIP to negative: " + " / ".join(LABELS[v] for v in variants)])
    body = []
    for case in dict.fromkeys((r["prompt_id"], r["seed"]) for r in rows):
        by_v = {r["variant"]: r for r in rows if (r["prompt_id"], r["seed"]) == case}
        any_row = next(iter(by_v.values()))

        def pair(row, other):
            if row.get("status") != "ok" or row.get(f"psnr_vs_{other}") is None:
                return row.get("reason") or row.get("error") or "n/a"
            return f"{im.fmt_psnr(row[f'psnr_vs_{other}'])} / {_f(row[f'ssim_vs_{other}'])}"

        clip = " / ".join(_f(by_v.get(v, {}).get("clip_nag_negative")) for v in variants)
        body.append([any_row["prompt"], any_row["nag_negative"], any_row["seed"],
                     *(pair(by_v.get(a, {}), b) for a, b in pairs), clip])
    parts.append(h.markdown_table(head, body))
    return "\n".join(parts)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def save_grid(cases: list[dict], images: dict, variants, path: Path, tile: int, title: str) -> tuple[int, int]:
    """One row per (prompt, seed), one column per variant; a missing image is a grey tile saying why."""
    from PIL import Image, ImageDraw

    from .quality_pipeline import to_pil

    any_image = next(iter(images.values()))
    tile_h = max(1, round(tile * any_image.shape[-2] / any_image.shape[-1]))
    label_w, head_h, pad = max(tile, 220), 40 + 16 * (len(title) // 120 + 1), 6
    width = label_w + len(variants) * (tile + pad) + pad
    height = head_h + len(cases) * (tile_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    small, big = _font(12), _font(16)
    draw.multiline_text((pad, 4), textwrap.fill(title, 120), fill="black", font=small)
    for j, v in enumerate(variants):
        draw.text((label_w + pad + j * (tile + pad), head_h - 22), LABELS[v], fill="black", font=big)
    chars = max(12, label_w // 7)
    for i, case in enumerate(cases):
        y = head_h + pad + i * (tile_h + pad)
        label = (f"{textwrap.fill(case['prompt'], chars)}\n\nNAG negative:\n{textwrap.fill(case['nag_negative'], chars)}"
                 f"\n\nseed {case['seed']}")
        draw.multiline_text((pad, y), label, fill="black", font=small)
        for j, v in enumerate(variants):
            x = label_w + pad + j * (tile + pad)
            img = images.get((case["prompt_id"], case["seed"], v))
            if img is None:
                draw.rectangle([x, y, x + tile - 1, y + tile_h - 1], fill=(200, 200, 200))
                why = textwrap.fill(case.get("missing", {}).get(v, "no image"), max(8, tile // 8))
                draw.multiline_text((x + 4, y + 4), why, fill="black", font=small)
                continue
            pil = to_pil(img)
            resample = Image.NEAREST if pil.width < tile else Image.LANCZOS  # tiny images: keep the pixels visible
            grid.paste(pil.resize((tile, tile_h), resample), (x, y))
    grid.save(path)
    return grid.size


def progress_line(r: dict) -> str:
    head = f"prompt {r['prompt_id']} seed {r['seed']} {r['variant']:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason') or r.get('error')}"
    cmp = "  ".join(f"vs {b}: PSNR {im.fmt_psnr(r[f'psnr_vs_{b}'])} SSIM {r[f'ssim_vs_{b}']:.3f}"
                    for a, b in COMPARISONS if a == r["variant"] and f"psnr_vs_{b}" in r)
    clip = (f"  CLIP prompt {r['clip_prompt']:.3f} negative {r['clip_nag_negative']:.3f}"
            if "clip_prompt" in r else "")
    return f"{head} {r['seconds']:.2f}s  {cmp}{clip}" + ("" if r["finite"] else "  (non-finite image)")


def summary_lines(doc: dict) -> list[str]:
    summary = summarize(doc["rows"], doc["variants"])
    lines = [f"quality: {TINY_NOTE}"] if doc.get("tiny") else []
    en = summary["comparisons"]["nag_exact_vs_no_nag"]
    exact = (f"exact vs no NAG PSNR {im.fmt_psnr(en['psnr_mean'])} dB, SSIM {_f(en['ssim_mean'])} over "
             f"{en['pairs']} image pairs")
    fe = summary["comparisons"].get("nag_fast_vs_nag_exact")
    if fe:
        lines.append(f"quality: fast vs exact PSNR {im.fmt_psnr(fe['psnr_mean'])} dB, SSIM {_f(fe['ssim_mean'])} "
                     f"over {fe['pairs']} image pairs; {exact}")
    else:
        lines.append(f"quality: fast mode {doc['modes']['fast']}; {exact}")
    neg = summary["variants"]
    if neg["no_nag"]["clip_nag_negative_mean"] is not None:
        lines.append("quality: CLIP similarity to the NAG negative: " + ", ".join(
            f"{LABELS[v]} {_f(d['clip_nag_negative_mean'])}" for v, d in neg.items()))
    return lines
