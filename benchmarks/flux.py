"""``flux`` suite: what NAG costs in one Flux transformer step, eager and compiled.

A ``FluxTransformer2DModel`` with the FLUX.1 config (``meta_models.flux.FLUX1``, about 12B parameters) and random
weights (``random_flux.transformer``: nothing is downloaded, the model is built straight on the device in the run's
dtype).
On a CPU (``--quick``) the same code runs a Flux-shaped toy (``meta_models.flux.FLUX_TINY``).

Variants, one transformer step each (batch ``B`` images, 512 text tokens):

- ``no_nag``: plain forward, the cost NAG is compared against;
- ``cfg``: true CFG as the pipelines run it, two plain forwards (positive and negative prompt), for comparison;
- ``nag_exact_torch``: ``apply_nag(mode="exact", backend="torch")``, the NAG combine in PyTorch;
- ``nag_exact_triton``: ``apply_nag(mode="exact", backend="triton")``, the fused kernel;
- ``nag_fast``: ``apply_nag(mode="fast")`` (docs/spec.md, "Fast mode").

The fast-mode step-time target, evaluated on CUDA runs of the FLUX.1 config in each mode measured: a fast-mode step at
1024^2 takes at most 1.2x the plain step's time. The JSON keeps the verdicts under ``targets``; the markdown ends with them.

``compiled`` runs compile the transformer's repeated blocks (diffusers' ``_repeated_blocks``: regional compilation,
the same graph reused by all 19 double and 38 single blocks) after NAG is applied; each variant compiles afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import torch

from . import harness as h
from . import random_flux
from meta_models.flux import FLUX1, FLUX1_TEXT_TOKENS, FLUX_TINY, FLUX_TINY_TEXT_TOKENS
from meta_models.flux import image_tokens as flux_image_tokens

HELP = ("one FLUX.1-size transformer step with random weights: no NAG, true CFG, NAG exact (PyTorch / Triton "
        "combine), NAG fast; eager and torch.compile'd; ms per step, overhead, peak memory, graphs compiled, and the "
        "fast-mode step-time target on CUDA.")
VARIANTS = ("no_nag", "cfg", "nag_exact_torch", "nag_exact_triton", "nag_fast")
VARIANT_LEGEND = {
    "no_nag": "the plain forward, the cost NAG is compared against",
    "cfg": "true CFG: two plain forwards (positive and negative prompt)",
    "nag_exact_torch": "NAG exact mode, the combine in PyTorch (backend='torch')",
    "nag_exact_triton": "NAG exact mode, the combine in the fused Triton kernel",
    "nag_fast": "NAG fast mode (shared image stream, LSE-merged attention)",
}
COMPILED_ORDER = ("no_nag", "nag_exact_triton", "nag_exact_torch", "nag_fast", "cfg")
NAG_ARGS = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_end=1.0)
# (label, config, resolution, variant, most time relative to no_nag)
TARGETS = [("fast-mode step-time target: fast <= 1.2x no NAG", "FLUX.1", 1024, "nag_fast", 1.2)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(quick: bool) -> tuple[str, dict, int]:
    return ("flux-tiny", FLUX_TINY, FLUX_TINY_TEXT_TOKENS) if quick else ("FLUX.1", FLUX1, FLUX1_TEXT_TOKENS)


def image_ids(height_tokens: int, width_tokens: int, device) -> torch.Tensor:
    """Latent image ids as FluxPipeline builds them: (0, row, col)."""
    ids = torch.zeros(height_tokens, width_tokens, 3, device=device)
    ids[..., 1] = torch.arange(height_tokens, device=device)[:, None]
    ids[..., 2] = torch.arange(width_tokens, device=device)[None, :]
    return ids.reshape(-1, 3)


def make_inputs(config: dict, resolution: int, text_tokens: int, batch: int, text_batch: int, dtype, device, seed=0):
    """One step's transformer inputs: ``batch`` images, ``text_batch`` text rows (``2 * batch`` for NAG)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = flux_image_tokens(resolution)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    side = resolution // 16
    inputs = dict(
        hidden_states=randn(batch, tokens, config["in_channels"]),
        encoder_hidden_states=randn(text_batch, text_tokens, config["joint_attention_dim"]),
        pooled_projections=randn(text_batch, config["pooled_projection_dim"]),
        # Pipelines pass t / 1000; 1.0 is the first step, where NAG is on for any nag_end.
        timestep=torch.full((text_batch,), 1.0, device=device, dtype=dtype),
        img_ids=image_ids(side, side, device),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((text_batch,), 3.5, device=device, dtype=torch.float32)
    return inputs


def split_rows(inputs: dict, rows: slice) -> dict:
    """The inputs of one CFG pass: rows ``rows`` of the text-side tensors, the image tensors as they are."""
    out = dict(inputs)
    for k in ("encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        if out.get(k) is not None:
            out[k] = out[k][rows]
    return out


@contextlib.contextmanager
def nag_applied(transformer, variant: str, device: torch.device):
    """Apply the variant's NAG to ``transformer`` for the duration of the block; no-op for no_nag/cfg."""
    if variant in ("no_nag", "cfg"):
        yield
        return
    apply_nag, remove_nag = h.integration_api()
    from nag_kernels.ops import triton_runs_on

    if variant == "nag_exact_triton" and not triton_runs_on(device):
        raise h.Skip("backend='triton' needs a CUDA/ROCm GPU")
    kw = dict(mode="exact", backend="torch") if variant == "nag_exact_torch" else {}
    if variant == "nag_exact_triton":
        kw = dict(mode="exact", backend="triton")
    if variant == "nag_fast":
        kw = dict(mode="fast", backend="auto")
    apply_nag(transformer, **NAG_ARGS, **kw)
    try:
        yield
    finally:
        remove_nag(transformer)


def compile_blocks(transformer) -> list:
    """Regional compilation: ``Module.compile()`` on every repeated block (diffusers' ``_repeated_blocks``)."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ("FluxTransformerBlock", "FluxSingleTransformerBlock"))
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    for m in blocks:
        m.compile(dynamic=False)
    return blocks


def uncompile_blocks(blocks: list) -> None:
    # nn.Module.compile() stores the compiled call in _compiled_call_impl; clearing it restores eager calls, and
    # dynamo.reset() drops the cached graphs so the next variant compiles afresh (no recompile-limit fallback).
    for m in blocks:
        m._compiled_call_impl = None
    torch._dynamo.reset()


def step_fn(transformer, variant: str, inputs_nag: dict, batch: int):
    """A zero-argument callable for one step of ``variant`` (inputs carry 2B text rows: positive, then negative)."""
    pos, neg = split_rows(inputs_nag, slice(0, batch)), split_rows(inputs_nag, slice(batch, 2 * batch))
    if variant == "no_nag":
        return lambda: transformer(**pos)[0]
    if variant == "cfg":
        def cfg():
            out_pos = transformer(**pos)[0]
            out_neg = transformer(**neg)[0]
            return out_pos, out_neg

        return cfg
    return lambda: transformer(**inputs_nag)[0]


def run_variant(results, transformer, variant, mode, res, base, inputs, batch, device, timer, budget_left):
    row = {**base, "variant": variant, "mode": mode, "case": f"{base['config']} {res} {mode} {variant}"}
    if budget_left is not None and budget_left() <= 0:
        row.update(status="skipped", reason="time budget spent")
        return results.add(row)
    blocks: list = []

    def measure():
        nonlocal blocks
        with torch.no_grad(), nag_applied(transformer, variant, device):
            if mode == "compiled":
                from torch._dynamo.utils import counters

                graphs_before = counters["stats"].get("unique_graphs", 0)
                breaks_before = sum(counters["graph_break"].values())
                blocks = compile_blocks(transformer)
            fn = step_fn(transformer, variant, inputs, batch)
            t0 = time.perf_counter()
            out = fn()  # compiles in the compiled mode
            h.synchronize(device)
            first = time.perf_counter() - t0
            out_main = out[0] if isinstance(out, tuple) else out
            info = {"output_shape": list(out_main.shape), "output_finite": bool(torch.isfinite(out_main).all())}
            if mode == "compiled":  # a recompile per block or a graph break shows up here, not as an error
                info["dynamo_unique_graphs"] = counters["stats"].get("unique_graphs", 0) - graphs_before
                info["dynamo_graph_breaks"] = sum(counters["graph_break"].values()) - breaks_before
            del out, out_main
            peak = h.peak_extra_bytes(fn, device)
            peak_abs = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            t = h.time_fn(fn, device, slow=True, **timer)
            return {"first_call_s": round(first, 2), "peak_extra_bytes": peak, "peak_bytes": peak_abs, **info, **t}

    try:
        res_, err = h.guarded(measure, device)
    finally:
        if blocks:
            uncompile_blocks(blocks)
    row.update(err or res_)
    if res_ and res_["output_shape"][0] != batch:
        row.update(status="error", error=f"NAG forward returned batch {res_['output_shape'][0]}, expected {batch}")
    row = results.add(row)
    h.log("    " + progress_line(row))
    h.free_memory(device)
    return row


def progress_line(r: dict) -> str:
    head = f"{r['mode']:<8} {r['variant']:<17}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason') or r.get('error')}"
    return (f"{head} {h.fmt_ms(r['median_ms'])} ms/step [{h.fmt_ms(r['q20_ms'])}-{h.fmt_ms(r['q80_ms'])}]  "
            f"peak +{h.fmt_bytes(r['peak_extra_bytes'])}  first call {r['first_call_s']}s"
            + (f"  graphs {r['dynamo_unique_graphs']}, breaks {r['dynamo_graph_breaks']}" if r["mode"] == "compiled" else "")
            + ("" if r["output_finite"] else "  (non-finite output)"))


def add_overheads(rows: list[dict]) -> None:
    """overhead = time / time(no_nag) - 1, within each (resolution, mode)."""
    for r in rows:
        ref = next((x for x in rows if x["resolution"] == r["resolution"] and x["mode"] == r["mode"]
                    and x["variant"] == "no_nag" and x["status"] == "ok"), None)
        if r["status"] == "ok" and ref:
            r["overhead_vs_no_nag"] = r["median_ms"] / ref["median_ms"] - 1
            r["peak_extra_vs_no_nag_bytes"] = (
                r["peak_extra_bytes"] - ref["peak_extra_bytes"] if r.get("peak_extra_bytes") is not None else None
            )


def evaluate_targets(rows: list[dict], device_type: str) -> list[dict]:
    """``TARGETS`` against the rows of a CUDA run, one verdict per mode measured (none on other devices)."""
    if device_type != "cuda":
        return []
    out = []
    for label, config, resolution, variant, limit in TARGETS:
        modes = dict.fromkeys(r["mode"] for r in rows if (r["config"], r["resolution"]) == (config, resolution))
        for mode in modes:
            def ms(v):
                match = [r for r in rows if (r["config"], r["resolution"], r["mode"], r["variant"], r["status"])
                         == (config, resolution, mode, v, "ok")]
                return match[0]["median_ms"] if match else None

            value = None if ms(variant) is None or ms("no_nag") is None else ms(variant) / ms("no_nag")
            verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
            out.append(dict(target=label, config=config, resolution=resolution, mode=mode, variant=variant,
                            limit=limit, value=value, verdict=verdict))
    return out


def target_lines(targets: list[dict]) -> list[str]:
    return [
        f"{t['verdict']:<4} {t['target']}, {t['config']} {t['resolution']}^2 {t['mode']}: {t['variant']} / no_nag = "
        + ("not measured" if t["value"] is None else f"{t['value']:.3f}") + f" (needs <= {t['limit']})"
        for t in targets
    ]


def markdown(rows: list[dict], targets: list[dict] = ()) -> str:
    header = ["config", "resolution (tokens)", "mode", "variant", "ms/step [q20-q80]", "overhead vs no NAG",
              "peak extra", "first call s"]
    body = []
    for r in rows:
        where = [r["config"], f"{r['resolution']}^2 ({r['image_tokens']}+{r['text_tokens']})", r["mode"], f"`{r['variant']}`"]
        if r["status"] != "ok":
            body.append(where + [f"{r['status']}: {r.get('reason') or r.get('error')}", "", "", ""])
            continue
        ov = r.get("overhead_vs_no_nag")
        body.append(where + [
            f"{h.fmt_ms(r['median_ms'])} [{h.fmt_ms(r['q20_ms'])}-{h.fmt_ms(r['q80_ms'])}]",
            "" if ov is None else f"{100 * ov:+.0f}%", h.fmt_bytes(r.get("peak_extra_bytes")),
            f"{r['first_call_s']}" + (f" ({r['dynamo_unique_graphs']} graphs)" if "dynamo_unique_graphs" in r else ""),
        ])
    return h.markdown_table(header, body) + (
        "\nOne transformer step (batch 1), random weights. Peak extra: CUDA allocator peak "
        "above weights and inputs during one step (n/a on CPU). First call includes compilation in compiled mode "
        "(graphs: how many dynamo compiled for the variant; with regional compilation a few, not one per block).\n\n"
        + "\n".join(f"- `{v}`: {VARIANT_LEGEND[v]}" for v in VARIANTS if any(r["variant"] == v for r in rows)) + "\n"
    ) + ("\n## Targets\n\n```\n" + "\n".join(target_lines(targets)) + "\n```\n" if targets else "")


def table(doc: dict) -> str:
    """The markdown body of a run from its JSON document (overheads and targets recomputed from the rows)."""
    add_overheads(doc["rows"])
    return markdown(doc["rows"], evaluate_targets(doc["rows"], doc["environment"]["device_type"]))


def summary(doc: dict) -> list[str]:
    """The target's PASS/FAIL lines, recomputed from the rows (``python -m benchmarks.report`` prints them last)."""
    return target_lines(evaluate_targets(doc["rows"], doc["environment"]["device_type"]))


def plot(rows: list[dict], path) -> bool:
    plt = h.try_matplotlib()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return False
    groups = list(dict.fromkeys((r["resolution"], r["mode"]) for r in ok))
    fig, ax = plt.subplots(figsize=(10, 4))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in ok)]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        vals = [next((r["median_ms"] for r in ok if (r["resolution"], r["mode"]) == g and r["variant"] == v), 0)
                for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=f"{v}: {VARIANT_LEGEND[v]}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{g[0]}^2 {g[1]}" for g in groups])
    ax.set_ylabel("ms per step")
    ax.set_title(f"{ok[0]['config']} transformer step on {ok[0]['device']}", fontsize=9)
    ax.legend(fontsize=7)
    return h.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolutions", help="comma list of square resolutions (default 1024,2048; quick: 256,512)")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--compile-resolutions",
                   help="resolutions also run torch.compile'd: comma list, 'all' or 'none' "
                   "(default: the first on GPU, none on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="flux weights/activations (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    p.add_argument("--reps", type=int, help="timed steps per case (default 5 at <=1024^2, 3 above; CPU 3)")


def timer_for(device, resolution: int, reps: int | None) -> dict[str, Any]:
    if device.type == "cuda":
        # The first call and the peak-memory call already warmed the step up; one more warm-up at small sizes.
        return {"warmup": 1 if resolution <= 1024 else 0, "reps": reps or (5 if resolution <= 1024 else 3)}
    return {"warmup": 0, "min_reps": reps or 3, "max_reps": reps or 3, "budget_s": 0.0}


def run(args, device: torch.device) -> h.Results:
    quick = args.quick if args.quick is not None else device.type != "cuda"
    name, config, text_tokens = model_config(quick)
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else ([256, 512] if quick else [1024, 2048])
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    # Compiling even the toy model takes minutes on a CPU (C++ codegen), so CPU runs compile only when asked.
    cr = args.compile_resolutions or (str(resolutions[0]) if device.type == "cuda" else "none")
    compiled_res = [] if cr == "none" else (resolutions if cr == "all" else [int(r) for r in cr.split(",")])
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    env = h.environment(device)
    results = h.Results("flux", env, args.out)
    results.extra.update(config_name=name, config=config, nag=NAG_ARGS, dtype=str(dtype), batch=args.batch)
    h.log(f"flux suite on {env['device']}: {name}, {dtype}, resolutions {resolutions}, compiled at {compiled_res}")
    start = time.perf_counter()
    budget_left = (lambda: args.budget_s - (time.perf_counter() - start)) if args.budget_s else None

    t0 = time.perf_counter()
    transformer, err = h.guarded(lambda: random_flux.transformer(config, device, dtype), device)
    if err:
        h.log(f"building the transformer failed: {err.get('error') or err.get('reason')}")
        results.extra["build_error"] = err
        results.write_markdown(f"Building the transformer failed: {err.get('error') or err.get('reason')}\n")
        return results
    n_params = sum(p.numel() for p in transformer.parameters())
    results.extra.update(params=n_params, build_s=round(time.perf_counter() - t0, 1))
    h.log(f"built {n_params / 1e6:,.1f}M random parameters on {device} in {time.perf_counter() - t0:.1f}s")

    phases = [(r, "eager") for r in resolutions] + [(r, "compiled") for r in compiled_res]
    for res, mode in phases:
        t_phase = time.perf_counter()
        base = dict(config=name, resolution=res, image_tokens=flux_image_tokens(res), text_tokens=text_tokens,
                    batch=args.batch, dtype=str(dtype).replace("torch.", ""))
        h.log(f"[{res}^2 {mode}] {base['image_tokens']} image + {text_tokens} text tokens")
        inputs, err = h.guarded(
            lambda: make_inputs(config, res, text_tokens, args.batch, 2 * args.batch, dtype, device), device)
        # Compiled: each variant compiles afresh (tens of seconds on a GPU), so the ones that matter most go first
        # and a time budget cuts the least useful (CFG compiled, about twice no_nag compiled) first.
        order = variants if mode == "eager" else sorted(variants, key=COMPILED_ORDER.index)
        for v in order:
            if err:
                results.add({**base, "variant": v, "mode": mode, **err})
                continue
            run_variant(results, transformer, v, mode, res, base, inputs, args.batch, device,
                        timer_for(device, res, args.reps), budget_left)
        del inputs
        h.free_memory(device)
        add_overheads(results.rows)
        results.write_json()
        h.log(f"  phase {res}^2 {mode}: {time.perf_counter() - t_phase:.0f}s")
    targets = evaluate_targets(results.rows, device.type)
    results.extra["targets"] = targets
    results.finish(markdown(results.rows, targets), lambda path: plot(results.rows, path), target_lines(targets))
    del transformer
    h.free_memory(device)
    return results
