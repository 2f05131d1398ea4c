"""``flops`` suite: the machine-independent cost model, FLOPs per transformer step counted exactly.

Each model configuration of the registry (``flops_models.MODELS``: FLUX.1, Wan, SDXL, LTX-Video, SD3.5, Qwen-Image,
Chroma, FLUX.2, Z-Image, ...) is built at full size on the meta device (no memory, no weights; ``meta_models/``) and
each of its variants' forwards is counted by ``meta_models.count.count`` (``FlopCounterMode``: every matmul and
attention op from its shapes). Runs anywhere in minutes at full size. Elementwise work (norms, the NAG combine itself)
is not counted: it is memory-bound and its FLOPs are negligible next to the matmuls. Ops that look like
matmul/attention but have no FLOP formula (a custom attention kernel, say) are listed under ``uncounted_ops`` so an
undercount cannot go unnoticed. Where an entry's issue sets a target (NAG at most ``x`` times a plain step), its row
says PASS or FAIL.
"""

from __future__ import annotations

import time

import torch

from meta_models.count import count

from . import harness as h
from .flops_models import META, MODELS, FlopsModel, selected
from .flux import nag_applied

HELP = ("FLOPs per transformer step counted on the meta device with FlopCounterMode, per model configuration of "
        "the registry in flops_models.py (--models; FLUX.1 1024^2/2048^2, Wan 2.1 14B 480p/720p, Wan 2.2 TI2V-5B, "
        "SDXL, LTX-Video, SD3.5 Large/Medium, Qwen-Image 1024^2/1328^2, Chroma, FLUX.2 [dev]/[klein], Z-Image): "
        "no NAG, true CFG, NAG (exact and fast on FLUX.1; the 2B layout of FLUX.2 and Z-Image for comparison); "
        "TFLOP, ratio to no NAG, PASS/FAIL per target. Runs anywhere, full size, in minutes.")
# apply_nag's settings per NAG variant (flux.nag_applied): FLUX.1's two modes, or the family's default mode
_NAG_APPLIED = {"nag_exact": "nag_exact_torch", "nag_fast": "nag_fast", "nag": "nag"}


def add_arguments(p) -> None:
    p.add_argument("--models", help=f"comma list of model configurations ({', '.join(MODELS)}; default: every real "
                   "model, with --quick the toys)")


def count_variant(model, entry: FlopsModel, variant: str, inputs: dict[str, list[dict]], batch: int = 1) -> dict:
    """FLOPs of one step of ``variant``: its forwards (``entry.step_inputs``) counted, NAG applied for NAG variants;
    a derived variant (``entry.derived``) derived from the counts of other forwards."""
    if variant in entry.derived:
        counted = entry.derived[variant](model, batch)
    elif variant in ("no_nag", "cfg"):
        counted = count(lambda: [model(**kw) for kw in inputs[variant]])
    elif variant in _NAG_APPLIED:
        # exact mode counted with the PyTorch combine: the combine is elementwise either way and not counted
        with nag_applied(model, _NAG_APPLIED[variant], META):
            counted = count(lambda: [model(**kw) for kw in inputs["nag"]])
    else:
        raise ValueError(f"unknown flops variant {variant!r}")
    return {"flops": counted.flops, "by_op": counted.by_op, "uncounted_ops": counted.uncounted_ops,
            "elementwise_nag_ops": counted.elementwise_nag_ops}


def run(args, device: torch.device) -> h.Results:
    entries = selected(args.models, bool(args.quick))  # full size by default, also on a CPU: nothing is computed
    env = h.environment(META)
    env["counted_on"] = h.device_name(torch.device("cpu"))
    results = h.Results("flops", env, args.out)
    results.extra.update(models=[m.key for m in entries], batch=args.batch)
    h.log(f"flops suite on the meta device: {', '.join(m.key for m in entries)}, batch {args.batch}")
    for entry in entries:
        base = dict(model=entry.key, config=entry.config, resolution=entry.resolution, size=entry.size_label,
                    image_tokens=entry.image_tokens, text_tokens=entry.text_tokens, tokens=entry.tokens_label,
                    batch=args.batch)
        t0 = time.perf_counter()
        model, built_err = h.guarded(entry.build, META)
        inputs, inputs_err = (None, built_err) if built_err else h.guarded(
            lambda: entry.step_inputs(model, args.batch), META)
        h.log(f"{entry.key}: built on meta in {time.perf_counter() - t0:.1f}s")
        for v in entry.variants:
            t0 = time.perf_counter()
            res_, err = (None, inputs_err) if inputs_err else h.guarded(
                lambda: count_variant(model, entry, v, inputs, args.batch), META)
            row = {**base, "variant": v, "case": f"{entry.config} {entry.resolution} {v}", **(err or res_)}
            if v in entry.targets:
                t = entry.targets[v]
                row["target"] = {"max_ratio": t.max_ratio, "label": t.label, "like": list(t.like) if t.like else None}
            if res_:
                row["tflop"] = res_["flops"] / 1e12
                row["count_s"] = round(time.perf_counter() - t0, 1)
            results.add(row)
            h.log("  " + progress_line(row))
    add_ratios(results.rows)
    results.finish(markdown(results.rows), summary=target_lines(results.rows))
    return results


def add_ratios(rows: list[dict]) -> None:
    """Each ok row's ratio to its entry's no_nag row; each target's bound (a ``like`` target: the ratio of that row
    in the same run, else its fallback) and whether the row meets it."""

    def where(r):  # runs from before the registry have no "model" key: one config per run
        return r.get("model", r["config"]), r["resolution"]

    for r in rows:
        ref = next((x for x in rows if where(x) == where(r) and x["variant"] == "no_nag" and x["status"] == "ok"), None)
        if r["status"] == "ok" and ref:
            r["ratio_vs_no_nag"] = r["flops"] / ref["flops"]
    for r in rows:
        t = r.get("target")
        if not t:
            continue
        if t.get("like"):
            key, variant = t["like"]
            like = next((x for x in rows if x.get("model") == key and x["variant"] == variant
                         and x.get("ratio_vs_no_nag") is not None), None)
            if like:
                t["max_ratio"] = like["ratio_vs_no_nag"]
            t["bound_from"] = f"{key} {variant} in this run" if like else "the committed FLUX.1 figures"
        ratio = r.get("ratio_vs_no_nag")
        r["target_met"] = None if ratio is None else bool(ratio <= t["max_ratio"])


def progress_line(r: dict) -> str:
    where = f"{r.get('size') or str(r['resolution']) + '^2'} {r['variant']:<10}"
    if r["status"] != "ok":
        return f"{where} {r['status']}: {r.get('reason') or r.get('error')}"
    extra = f"  UNCOUNTED: {', '.join(r['uncounted_ops'])}" if r["uncounted_ops"] else ""
    return f"{where} {fmt_tflop(r['tflop'])} TFLOP ({r['count_s']}s){extra}"


def table(doc: dict) -> str:
    add_ratios(doc["rows"])
    return markdown(doc["rows"])


def summary(doc: dict) -> list[str]:
    add_ratios(doc["rows"])
    return target_lines(doc["rows"])


def target_cell(r: dict) -> str:
    t = r.get("target")
    if not t:
        return ""
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r.get("target_met")]
    ratio = r.get("ratio_vs_no_nag")
    # a bound taken from another row: 4 decimals, the two ratios can agree to 3
    bound = f" ({t['max_ratio']:.4f}x{'' if ratio is None else f'; counted {ratio:.4f}x'})" if t.get("like") else ""
    return f"{t['label']}{bound}: **{verdict}**"


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target, printed last by ``python -m benchmarks``."""
    out = []
    for r in rows:
        if r.get("target"):
            ratio = r.get("ratio_vs_no_nag")
            got = "not counted" if ratio is None else f"{ratio:.3f}x"
            out.append(f"flops target {r['config']} {r.get('size') or r['resolution']} {r['variant']}: "
                       f"{target_cell(r).replace('**', '')} (counted {got})")
    return out


VARIANT_NOTES = {
    "no_nag": "one plain forward",
    "cfg": "true CFG: two plain passes (two calls, or one call at 2 rows where the pipelines batch CFG: same FLOPs)",
    "nag_exact": "FLUX.1 exact mode (the authors' semantics, double blocks' image attention split)",
    "nag_fast": "FLUX.1 fast mode (shared image stream)",
    "nag": "the guided forward in the family's default mode: exact mode, the only one (Wan, SDXL, LTX-Video, SD3.5, "
           "Qwen-Image); the shared image stream (Chroma, FLUX.2, Z-Image, where it computes the authors'-style "
           "layout exactly)",
    "nag_2b": "for comparison, the authors'-style 2B layout (FLUX.2: single blocks at 2B image rows; Z-Image: joined "
              "layers at 2B): derived from the counts, CFG minus the parts that stay at one row",
}


def markdown(rows: list[dict]) -> str:
    header = ["config", "size (tokens)", "variant", "TFLOP / step", "vs no NAG", "target", "note"]
    body = []
    for r in rows:
        size = r.get("size") or f"{r['resolution']}^2"
        tokens = r.get("tokens") or f"{r['image_tokens']}+{r['text_tokens']}"
        where = [r["config"], f"{size} ({tokens})", f"`{r['variant']}`"]
        if r["status"] != "ok":
            body.append(where + ["", "", target_cell(r), f"{r['status']}: {r.get('reason') or r.get('error')}"])
            continue
        ratio = r.get("ratio_vs_no_nag")
        note = ("uncounted ops: " + ", ".join(r["uncounted_ops"])) if r["uncounted_ops"] else ""
        body.append(where + [fmt_tflop(r["tflop"]), "" if ratio is None else f"{ratio:.3f}x", target_cell(r), note])
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    legend = "".join(f"- `{v}`: {VARIANT_NOTES[v]}.\n" for v in variants if v in VARIANT_NOTES)
    return h.markdown_table(header, body) + (
        "\nCounted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (matmuls and attention; "
        "elementwise ops, the NAG combine included, are not counted), full-size models from "
        "`benchmarks/flops_models.py` (configs and builders from `meta_models/`). Batch 1 unless the "
        "header says otherwise. Tokens: image (video; SDXL: latent positions) + text; a NAG step adds the "
        "NAG-negative text rows. The target column is the issues' bound on the NAG row's ratio to no NAG.\n\n"
        + legend +
        "\nParallel models are not counted here: diffusers' context and tensor parallelism hooks need a process "
        "group and real collectives, which a single meta-device process does not have (docs/parallelism.md, "
        "\"FLOPs per rank\"). Per rank, the FLOPs are the plain model's divided by the degree, up to the "
        "conditioning embedders every rank runs whole: tests/parallel/test_parallel_flux.py counts each rank of a "
        "context-parallel FLUX.1 model under FlopCounterMode and finds per rank x degree / one process = 1.01-1.02 "
        "in fast mode (exact mode about 1.08: under context parallelism its double blocks run the unsplit per-branch "
        "attention); under tensor parallelism the AdaLN modulation and the embedders stay replicated. So the ratios "
        "above hold per rank, except FLUX.1 exact mode under context parallelism.\n")


def fmt_tflop(t: float) -> str:
    """One decimal from 10 TFLOP; three below (SDXL's NAG step, 6.846, differs from its plain 6.761 in the second)."""
    return f"{t:.1f}" if t >= 10 else f"{t:.3f}" if t >= 1 else f"{t:.3g}"
