"""``flops`` suite: the machine-independent cost model, FLOPs per transformer step counted exactly.

Each model configuration of the registry (``flops_models.MODELS``: FLUX.1 at 1024^2 and 2048^2 today) is built on
the meta device (no memory, no weights) and each variant's forwards run under
``torch.utils.flop_counter.FlopCounterMode``, which counts every matmul and attention op from its shapes. Runs
anywhere in seconds at full size. Elementwise work (norms, the NAG combine itself) is not counted: it is memory-bound
and its FLOPs are negligible next to the matmuls. Ops that look like matmul/attention but have no FLOP formula (a
custom attention kernel, say) are listed under ``uncounted_ops`` so an undercount cannot go unnoticed.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from . import harness as h
from .flops_models import META, MODELS, FlopsModel, selected
from .flux import nag_applied

HELP = ("FLOPs per transformer step counted on the meta device with FlopCounterMode, per model configuration of "
        "the registry in flops_models.py (--models; FLUX.1 at 1024^2 and 2048^2): no NAG, true CFG, NAG exact, NAG "
        "fast; TFLOP and ratio to no NAG. Runs anywhere in seconds.")
VARIANTS = ("no_nag", "cfg", "nag_exact", "nag_fast")
_SUSPECT = ("mm", "matmul", "attention", "attn", "conv", "linear", "einsum")


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def count(fn) -> dict:
    with torch.no_grad(), FlopCounterMode(display=False) as fc, _OpRecorder() as rec:
        fn()
    registry = getattr(fc, "flop_registry", {})
    packets = {getattr(k, "_overloadpacket", k) for k in registry}
    seen = [op for op in rec.ops if getattr(op, "_overloadpacket", op) not in packets]
    # This package's own ops are the NAG combine / LSE merge: elementwise and memory-bound, rightly not counted.
    own = sorted(str(op) for op in seen if op.namespace == "nag_kernels" and op.name().split("::")[-1].startswith("nag"))
    uncounted = sorted(
        str(op) for op in seen
        if str(op) not in own
        and (op.namespace not in ("aten", "prims") or any(s in op.name() for s in _SUSPECT))
    )
    by_op = {str(k): v for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return {"flops": fc.get_total_flops(), "by_op": by_op, "uncounted_ops": uncounted, "elementwise_nag_ops": own}


def add_arguments(p) -> None:
    p.add_argument("--models", help=f"comma list of model configurations ({', '.join(MODELS)}; default: every real "
                   "model, with --quick the toys)")


def count_variant(model, entry: FlopsModel, variant: str, inputs: dict[str, list[dict]]) -> dict:
    """FLOPs of one step of ``variant``: its forwards (``entry.step_inputs``) counted, NAG applied for NAG variants."""
    if variant in ("no_nag", "cfg"):
        return count(lambda: [model(**kw) for kw in inputs[variant]])
    mode = variant.removeprefix("nag_")
    if mode not in entry.nag_modes:
        raise h.Skip(f"{entry.config} has no NAG {mode} mode")
    # exact mode counted with the PyTorch combine: the combine is elementwise either way and not counted
    with nag_applied(model, "nag_exact_torch" if mode == "exact" else "nag_fast", META):
        return count(lambda: [model(**kw) for kw in inputs["nag"]])


def run(args, device: torch.device) -> h.Results:
    entries = selected(args.models, bool(args.quick))  # full size by default, also on a CPU: nothing is computed
    env = h.environment(META)
    env["counted_on"] = h.device_name(torch.device("cpu"))
    results = h.Results("flops", env, args.out)
    results.extra.update(models=[m.key for m in entries], batch=args.batch)
    h.log(f"flops suite on the meta device: {', '.join(m.key for m in entries)}, batch {args.batch}")
    for entry in entries:
        model = entry.build()
        inputs = entry.step_inputs(args.batch)
        base = dict(model=entry.key, config=entry.config, resolution=entry.resolution, image_tokens=entry.image_tokens,
                    text_tokens=entry.text_tokens, batch=args.batch)
        for v in VARIANTS:
            t0 = time.perf_counter()
            res_, err = h.guarded(lambda: count_variant(model, entry, v, inputs), META)
            row = {**base, "variant": v, "case": f"{entry.config} {entry.resolution} {v}", **(err or res_)}
            if res_:
                row["tflop"] = res_["flops"] / 1e12
                row["count_s"] = round(time.perf_counter() - t0, 1)
            results.add(row)
            h.log("  " + progress_line(row))
    add_ratios(results.rows)
    results.finish(markdown(results.rows))
    return results


def add_ratios(rows: list[dict]) -> None:
    def where(r):  # runs from before the registry have no "model" key: one config per run
        return r.get("model", r["config"]), r["resolution"]

    for r in rows:
        ref = next((x for x in rows if where(x) == where(r) and x["variant"] == "no_nag" and x["status"] == "ok"), None)
        if r["status"] == "ok" and ref:
            r["ratio_vs_no_nag"] = r["flops"] / ref["flops"]


def progress_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['resolution']}^2 {r['variant']:<10} {r['status']}: {r.get('reason') or r.get('error')}"
    extra = f"  UNCOUNTED: {', '.join(r['uncounted_ops'])}" if r["uncounted_ops"] else ""
    return f"{r['resolution']}^2 {r['variant']:<10} {fmt_tflop(r['tflop'])} TFLOP ({r['count_s']}s){extra}"


def table(doc: dict) -> str:
    add_ratios(doc["rows"])
    return markdown(doc["rows"])


def markdown(rows: list[dict]) -> str:
    header = ["config", "resolution (tokens)", "variant", "TFLOP / step", "vs no NAG", "note"]
    body = []
    for r in rows:
        where = [r["config"], f"{r['resolution']}^2 ({r['image_tokens']}+{r['text_tokens']})", f"`{r['variant']}`"]
        if r["status"] != "ok":
            body.append(where + ["", "", f"{r['status']}: {r.get('reason') or r.get('error')}"])
            continue
        ratio = r.get("ratio_vs_no_nag")
        note = ("uncounted ops: " + ", ".join(r["uncounted_ops"])) if r["uncounted_ops"] else ""
        body.append(where + [fmt_tflop(r["tflop"]), "" if ratio is None else f"{ratio:.3f}x", note])
    return h.markdown_table(header, body) + (
        "\nCounted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (matmuls and attention; "
        "elementwise ops are not counted). `cfg` = two plain passes. Batch 1 unless the header says otherwise.\n")


def fmt_tflop(t: float) -> str:
    return f"{t:.1f}" if t >= 1 else f"{t:.3g}"
