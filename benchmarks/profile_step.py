"""``profile`` suite: where one Flux transformer step spends its time, per variant, under ``torch.profiler``.

Builds the transformer the flux suite builds (the FLUX.1 config with random weights on a GPU; the Flux-shaped toy
with ``--quick``, the default without a GPU), runs one warm step of each variant under ``torch.profiler`` and keeps
the kernels that take the most time, plus which attention-with-LSE backend each attention call picked
(``nag_kernels.attention.choose_backend``, counted per query/key shape). It finds where a variant's time goes that its
FLOP count does not explain (fast mode's time ratio against its FLOP ratio, say).

On CUDA the figures are GPU kernel times; on a CPU they are the self CPU time of the toy's ops, which only shows the
suite works. Rows: one per (resolution, variant), each with its top kernels.
"""

from __future__ import annotations

import collections
import contextlib

import torch

from . import flux
from . import harness as h
from . import random_flux

HELP = ("the top GPU kernels of one warm Flux transformer step per variant (torch.profiler), and the attention-with-LSE "
        "backend each attention call picked. On a CPU: the toy model's CPU ops (a check of the suite).")
DEFAULT_VARIANTS = ("no_nag", "nag_fast", "nag_exact_triton")
CPU_VARIANTS = ("no_nag", "nag_fast", "nag_exact_torch")


def add_arguments(p) -> None:
    p.add_argument("--top", type=int, default=20, help="profile: kernels listed per variant (default 20)")


@contextlib.contextmanager
def counting_attention_backends():
    """Count ``attention.choose_backend``'s answers (backend, query and key shapes) while the block runs."""
    from nag_kernels import attention

    chosen: collections.Counter = collections.Counter()
    original = attention.choose_backend

    def counting(q, k, backend="auto"):
        result = original(q, k, backend)
        chosen[f"{result} q{tuple(q.shape)} k{tuple(k.shape)}"] += 1
        return result

    attention.choose_backend = counting
    try:
        yield chosen
    finally:
        attention.choose_backend = original


def profile_variant(transformer, variant: str, inputs: dict, device: torch.device, top: int) -> dict:
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU

    def spent(e):  # GPU kernel time, or self CPU time on a CPU
        return e.device_time_total if cuda else e.self_cpu_time_total

    with torch.no_grad(), flux.nag_applied(transformer, variant, device), counting_attention_backends() as chosen:
        step = flux.step_fn(transformer, variant, inputs, 1)
        step()
        step()
        h.synchronize(device)
        chosen.clear()
        with torch.profiler.profile(activities=[activity]) as prof:
            step()
            h.synchronize(device)
    events = sorted((e for e in prof.key_averages() if spent(e) > 0), key=spent, reverse=True)
    return {
        "total_ms": sum(spent(e) for e in events) / 1e3,
        "top": [{"name": e.key[:120], "calls": e.count, "ms": spent(e) / 1e3} for e in events[:top]],
        "attention_with_lse": dict(chosen.most_common()),
    }


def progress_line(r: dict) -> str:
    head = f"{r['config']} {r['resolution']}^2 {r['variant']}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}: {r.get('reason') or r.get('error')}"
    top = r["top"][0] if r["top"] else None
    return (f"{head}: {r['total_ms']:.1f} ms of {r['timed']} in one step"
            + (f"; most: {top['name']} {top['ms']:.2f} ms" if top else ""))


def table(doc: dict) -> str:
    rows = doc["rows"]
    header = ["config", "resolution", "variant", "time in one step", "attention-with-LSE backends"]
    body = []
    for r in rows:
        where = [r["config"], f"{r['resolution']}^2", f"`{r['variant']}`"]
        if r["status"] != "ok":
            body.append(where + [f"{r['status']}: {r.get('reason') or r.get('error')}", ""])
            continue
        backends = "; ".join(f"{k}: {v}x" for k, v in r["attention_with_lse"].items()) or "none called"
        body.append(where + [f"{r['total_ms']:.1f} ms ({r['timed']})", backends])
    text = h.markdown_table(header, body)
    for r in rows:
        if r["status"] == "ok":
            text += f"\n## {r['config']} {r['resolution']}^2 `{r['variant']}`: top {len(r['top'])} by {r['timed']}\n\n"
            text += h.markdown_table(["ms", "calls", "kernel / op"],
                                     [[f"{k['ms']:.2f}", k["calls"], f"`{k['name']}`"] for k in r["top"]])
    return text + ("\nOne warm step per variant under `torch.profiler` (batch 1, random weights). On CUDA: GPU kernel "
                   "time; on a CPU: self CPU time of the toy model's ops, which says nothing about a GPU.\n")


def run(args, device: torch.device) -> h.Results:
    quick = args.quick if args.quick is not None else device.type != "cuda"
    name, config, text_tokens = flux.model_config(quick)
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else ([64] if quick else [1024])
    variants = args.variants.split(",") if args.variants else list(
        DEFAULT_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    for v in variants:
        if v not in flux.VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(flux.VARIANTS)}")
    if args.top < 1:
        raise SystemExit(f"--top must be a positive integer, got {args.top}")
    dtype = flux.DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    env = h.environment(device)
    results = h.Results("profile", env, args.out)
    timed = "GPU kernel time" if device.type == "cuda" else "self CPU time"
    results.extra.update(config_name=name, config=config, dtype=str(dtype), timed=timed)
    h.log(f"profile suite on {env['device']}: {name}, {dtype}, resolutions {resolutions}, variants {variants}")
    transformer = random_flux.transformer(config, device, dtype)
    for res in resolutions:
        inputs = flux.make_inputs(config, res, text_tokens, 1, 2, dtype, device)
        for v in variants:
            row = dict(case=f"{name} {res} {v}", config=name, resolution=res, variant=v, timed=timed)
            got, err = h.guarded(lambda: profile_variant(transformer, v, inputs, device, args.top), device)
            row.update(err or got)
            results.add(row)
            h.log("  " + progress_line(row))
        del inputs
        h.free_memory(device)
    results.finish(table(results.document()))
    del transformer
    h.free_memory(device)
    return results
