"""``kernel`` suite: the NAG combine alone, at shapes taken from real models, against eager, compiled and the limit.

For every case (shape x dtype x norm) it times each provider, counts the ideal traffic (read ``z_pos`` and ``z_neg``,
write the output: ``3 * numel * element_size`` bytes, the same for every provider) and turns it into GB/s, measures a
device-to-device copy moving the same number of bytes in the same run (the memory-bound limit) and reports each
provider's share of it, its speedup over each baseline and the peak extra memory one call allocates. Every provider's
output is checked once against ``nag_reference`` (the error is recorded, never asserted: the authors' formula is
expected to overflow in fp16 with L1).

Providers (strings, as in the rows):

- ``torch``: ``nag_reference`` in eager PyTorch (the specification);
- ``authors``: ``nag_authors_formula``, the authors' eager formula as they wrote it;
- ``torch_compile``: ``torch.compile(nag_reference)`` (compiled per case; the compile time is recorded);
- ``torch_backend``: ``nag_kernels.nag(backend="torch")``, the package's fused PyTorch path (CPU, MPS);
- ``triton``: ``nag_kernels.nag(backend="triton")``, the fused kernel;
- ``triton_inplace``: ``nag_kernels.nag(out=z_pos, backend="triton")``, writing over ``z_pos``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

import torch

from . import harness as h
from .configs import KERNEL_SHAPES, QUICK_KERNEL_SHAPES, kernel_shape

HELP = ("the NAG combine alone at model shapes: eager nag_reference, the authors' formula, torch.compile, "
        'nag(backend="torch"), the Triton kernel and its in-place form; ms, GB/s, share of copy bandwidth, speedups, '
        "peak extra memory, and the kernel targets (bandwidth, speedups) with PASS/FAIL.")
PROVIDERS = ("torch", "authors", "torch_compile", "torch_backend", "triton", "triton_inplace")
BASELINES = ("torch", "authors", "torch_compile")
# What each provider is, for the table's legend (long) and the plot's legend (short).
PROVIDER_LEGEND = {
    "torch": "`nag_reference` in eager PyTorch: the specification, one op at a time",
    "authors": "`nag_authors_formula`: the authors' eager formula as they wrote it",
    "torch_compile": "`torch.compile(nag_reference)`: Inductor's fused kernel (compiled per case)",
    "torch_backend": "`nag(backend=\"torch\")`: this package's fused PyTorch path (CPU, MPS)",
    "triton": "`nag(backend=\"triton\")`: this package's fused Triton kernel",
    "triton_inplace": "`nag(out=z_pos, backend=\"triton\")`: the Triton kernel writing over `z_pos`",
}
PROVIDER_LABELS = {
    "torch": "eager nag_reference",
    "authors": "authors' eager formula",
    "torch_compile": "torch.compile(nag_reference)",
    "torch_backend": "nag, PyTorch backend",
    "triton": "nag, Triton kernel",
    "triton_inplace": "nag, Triton kernel, in place",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NORMS = ("l1", "l2")
# The authors' recommended Flux values (docs/spec.md, "Recommended settings").
PARAMS = dict(scale=5.0, tau=2.5, alpha=0.25)

# What the kernel must reach, named by what it is. Each: (label, shape, dtype, norm, provider, metric, threshold,
# device type); PASS when the row's metric is at least the threshold.
BANDWIDTH = "kernel bandwidth target: triton >= 85% of copy bandwidth"
VS_COMPILE = "kernel speed target vs torch.compile: triton >= 1.1x torch.compile(nag_reference)"
VS_EAGER = "kernel speed target vs eager: triton >= 8x eager nag_reference"
CPU_BACKEND = "CPU backend speed target: nag(backend='torch') >= 2x the authors' eager formula"
TARGETS = [
    (BANDWIDTH, "flux-1024-b1", "bf16", "l1", "triton", "copy_share", 0.85, "cuda"),
    (BANDWIDTH, "flux-2048-b2", "bf16", "l1", "triton", "copy_share", 0.85, "cuda"),
    (VS_COMPILE, "flux-1024-b1", "bf16", "l1", "triton", "x_torch_compile", 1.1, "cuda"),
    (VS_COMPILE, "flux-2048-b2", "bf16", "l1", "triton", "x_torch_compile", 1.1, "cuda"),
    (VS_EAGER, "flux-1024-b1", "bf16", "l1", "triton", "x_torch", 8.0, "cuda"),
    (VS_EAGER, "flux-2048-b2", "bf16", "l1", "triton", "x_torch", 8.0, "cuda"),
    (CPU_BACKEND, "flux-1024-b1", "fp32", "l1", "torch_backend", "x_authors", 2.0, "cpu"),
]

PRESETS: dict[str, list[tuple[str, str, str]]] = {
    # The README's full sweep.
    "full": [(s, d, n) for s in KERNEL_SHAPES for d in DTYPES for n in NORMS],
    # Small enough for a CPU in a minute; holds the CPU backend target's case (flux-1024-b1, fp32, l1).
    "quick": [(s, d, "l1") for s in QUICK_KERNEL_SHAPES for d in ("fp32", "bf16")] + [("flux-1024-b1", "fp32", "l2")],
    # What gpu_suite.sh measures in its kernel phase: every shape in bf16 + L1 (the targets' shapes among them), the
    # other dtypes and L2 at the two Flux resolutions. 15 cases: one torch.compile each.
    "gpu-suite": [(s, "bf16", "l1") for s in KERNEL_SHAPES]
    + [(s, d, "l1") for s in ("flux-1024-b1", "flux-2048-b1") for d in ("fp16", "fp32")]
    + [(s, "bf16", "l2") for s in ("flux-1024-b1", "flux-2048-b2")],
}


def default_providers(device: torch.device) -> list[str]:
    from nag_kernels.ops import triton_runs_on

    if device.type == "cuda" or triton_runs_on(device):
        return list(PROVIDERS)
    return [p for p in PROVIDERS if not p.startswith("triton")]


def make_inputs(shape, dtype, device, seed: int = 0):
    """``z_pos ~ N(0, 1)`` and a correlated ``z_neg``, drawn on ``device`` (a CPU draw of 200M values takes seconds)."""
    g = torch.Generator(device=device).manual_seed(seed)
    z_pos = torch.randn(shape, generator=g, device=device)
    z_neg = torch.randn(shape, generator=g, device=device).mul_(0.7).add_(z_pos, alpha=0.3).to(dtype)
    return z_pos.to(dtype), z_neg


def make_provider(provider: str, z_pos, z_neg, norm: str, device: torch.device) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running ``provider`` once on the inputs (``triton_inplace`` writes into ``z_pos``)."""
    from nag_kernels import nag
    from nag_kernels.ops import triton_runs_on
    from nag_kernels.reference import nag_authors_formula, nag_reference

    s, tau, alpha = PARAMS["scale"], PARAMS["tau"], PARAMS["alpha"]
    if provider == "torch":
        return lambda: nag_reference(z_pos, z_neg, s, tau, alpha, norm=norm)
    if provider == "authors":
        return lambda: nag_authors_formula(z_pos, z_neg, s, tau, alpha, norm=norm)
    if provider == "torch_compile":
        # A fresh compile per case: dynamo caches per code object and, after its recompile limit, silently falls
        # back to eager; reset() keeps every case compiled (Inductor's on-disk cache still speeds repeats).
        torch._dynamo.reset()
        compiled = torch.compile(nag_reference, dynamic=False)
        return lambda: compiled(z_pos, z_neg, s, tau, alpha, norm=norm)
    if provider == "torch_backend":
        return lambda: nag(z_pos, z_neg, s, tau, alpha, norm=norm, backend="torch")
    if provider in ("triton", "triton_inplace"):
        if not triton_runs_on(device):
            raise h.Skip("Triton needs a CUDA/ROCm GPU (or TRITON_INTERPRET=1, far too slow to time)")
        if provider == "triton":
            return lambda: nag(z_pos, z_neg, s, tau, alpha, norm=norm, backend="triton")
        return lambda: nag(z_pos, z_neg, s, tau, alpha, norm=norm, out=z_pos, backend="triton")
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32; inf/NaN in ``out`` where ``ref`` is finite shows as inf."""
    out32, ref32 = out.float(), ref.float()
    bad = ~torch.isfinite(out32) & torch.isfinite(ref32)
    if bool(bad.any()):
        return math.inf
    scale = ref32.abs().max().item() or 1.0
    return (out32 - ref32).abs().nan_to_num(0.0).max().item() / scale


def timer_kwargs(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type == "cuda":
        return {"warmup_ms": 25, "rep_ms": 50 if quick else 100}
    return {"warmup": 1, "min_reps": 3, "budget_s": 0.3 if quick else 1.0}


def run_case(results: h.Results, shape_name: str, dtype_name: str, norm: str, providers: list[str], device, quick):
    spec = kernel_shape(shape_name)
    dtype = DTYPES[dtype_name]
    tkw = timer_kwargs(device, quick)
    base = dict(case=f"{shape_name} {dtype_name} {norm}", shape_name=shape_name, shape=list(spec.shape),
                dtype=dtype_name, norm=norm, **PARAMS)
    (z_pos, z_neg), err = h.guarded(lambda: make_inputs(spec.shape, dtype, device), device)
    if err:
        for p in providers:
            results.add({**base, "provider": p, **err})
        h.log(f"  {base['case']}: inputs failed: {err['error']}")
        return
    numel = z_pos.numel()
    nbytes = 3 * numel * z_pos.element_size()
    copy, err = h.guarded(lambda: h.copy_bandwidth(nbytes, dtype, device, **tkw), device)
    copy_gbps = copy["gbps"] if copy else None
    ref = None
    if device.type != "meta":
        from nag_kernels.reference import nag_reference

        ref = nag_reference(z_pos, z_neg, **PARAMS, norm=norm)
    h.log(f"  {base['case']} {tuple(spec.shape)}: copy {copy_gbps and round(copy_gbps)} GB/s"
          + (f" (copy failed: {err['error']})" if err else ""))

    rows = []
    for p in providers:
        row = {**base, "provider": p, "bytes": nbytes, "copy_gbps": copy_gbps,
               "copy_median_ms": copy and copy["median_ms"]}
        zp = z_pos.clone() if p == "triton_inplace" else z_pos  # keep the shared input intact for the others

        def measure():
            fn = make_provider(p, zp, z_neg, norm, device)
            t0 = time.perf_counter()
            first = fn()  # compile / autotune / first launch, kept out of the timing
            h.synchronize(device)
            first_s = time.perf_counter() - t0
            error = relative_error(first, ref) if ref is not None else None
            del first
            peak = h.peak_extra_bytes(fn, device)
            t = h.time_fn(fn, device, **tkw)
            return {"first_call_s": round(first_s, 3), "max_rel_err": error, "peak_extra_bytes": peak, **t}

        res, err = h.guarded(measure, device)
        if err:
            row.update(err)
        else:
            row.update(res)
            row["gbps"] = nbytes / (res["median_ms"] * 1e-3) / 1e9
            row["copy_share"] = row["gbps"] / copy_gbps if copy_gbps else None
        row = results.add(row)
        rows.append(row)
        del zp
        h.log("    " + progress_line(row))
        h.free_memory(device)

    # Speedups once the whole case is measured: time(baseline) / time(provider).
    medians = {r["provider"]: r.get("median_ms") for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok":
            for b in BASELINES:
                r[f"x_{b}"] = medians[b] / r["median_ms"] if medians.get(b) else None
    results.write_json()
    del z_pos, z_neg, ref
    h.free_memory(device)


def progress_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['provider']:<15} {r['status']}: {r.get('reason') or r.get('error')}"
    share = f"{100 * r['copy_share']:.0f}% of copy" if r.get("copy_share") else ""
    return (f"{r['provider']:<15} {h.fmt_ms(r['median_ms'])} ms [{h.fmt_ms(r['q20_ms'])}-{h.fmt_ms(r['q80_ms'])}] "
            f"{fmt_gbps(r['gbps'])} GB/s {share}  peak +{h.fmt_bytes(r['peak_extra_bytes'])}  "
            f"first call {r['first_call_s']}s  err {fmt_err(r['max_rel_err'])}")


def fmt_err(v) -> str:
    """Relative error vs nag_reference; inf (JSON "inf") = non-finite output where the reference is finite."""
    if v is None:
        return ""
    v = float(v)
    return "non-finite" if math.isinf(v) else f"{v:.1e}"


def fmt_gbps(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def evaluate_targets(rows: list[dict], device: torch.device) -> list[dict]:
    out = []
    for label, shape, dtype, norm, provider, metric, threshold, dev in TARGETS:
        if dev != device.type:
            continue
        match = [r for r in rows if (r["shape_name"], r["dtype"], r["norm"], r["provider"]) == (shape, dtype, norm, provider)]
        value = match[0].get(metric) if match and match[0]["status"] == "ok" else None
        verdict = "n/a" if value is None else ("PASS" if value >= threshold else "FAIL")
        out.append(dict(target=label, shape=shape, dtype=dtype, norm=norm, provider=provider, metric=metric,
                        threshold=threshold, value=value, verdict=verdict))
    return out


def target_lines(targets: list[dict]) -> list[str]:
    lines = []
    for t in targets:
        v = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"{t['verdict']:<4} {t['target']} at {t['shape']} {t['dtype']} {t['norm']}: "
                     f"{t['metric']} = {v} (needs >= {t['threshold']})")
    return lines


def markdown(rows: list[dict], targets: list[dict]) -> str:
    header = ["shape", "dtype", "norm", "provider", "median ms [q20-q80]", "GB/s", "% of copy",
              "x eager ref", "x authors", "x compile", "peak extra", "max rel err"]
    body = []

    def x(v):
        return "" if v is None else f"{v:.2f}x"

    for r in rows:
        if r["status"] != "ok":
            body.append([r["shape_name"], r["dtype"], r["norm"], r["provider"],
                         f"{r['status']}: {r.get('reason') or r.get('error')}", "", "", "", "", "", "", ""])
            continue
        body.append([
            f"{r['shape_name']} {tuple(r['shape'])}", r["dtype"], r["norm"], f"`{r['provider']}`",
            f"{h.fmt_ms(r['median_ms'])} [{h.fmt_ms(r['q20_ms'])}-{h.fmt_ms(r['q80_ms'])}]",
            fmt_gbps(r["gbps"]), "" if r.get("copy_share") is None else f"{100 * r['copy_share']:.0f}%",
            x(r.get("x_torch")), x(r.get("x_authors")), x(r.get("x_torch_compile")),
            h.fmt_bytes(r.get("peak_extra_bytes")), fmt_err(r.get("max_rel_err")),
        ])
    text = h.markdown_table(header, body)
    text += ("\nGB/s counts reading both inputs and writing the output once; '% of copy' divides it by a "
             "device-to-device copy of the same bytes measured in the same run. 'x eager ref', 'x authors' and "
             "'x compile' are time(torch) / time(row), time(authors) / time(row) and time(torch_compile) / time(row). "
             "Peak extra: CUDA allocator peak above the inputs during one call (n/a on CPU). Max rel err: "
             "max |out - ref| / max |ref| against eager nag_reference.\n\nProviders:\n\n"
             + "\n".join(f"- `{p}`: {PROVIDER_LEGEND[p]}" for p in PROVIDERS if any(r["provider"] == p for r in rows))
             + "\n\nShapes `[batch, tokens, channels]`:\n\n"
             + "\n".join(f"- `{n}` {kernel_shape(n).shape}: {kernel_shape(n).source}"
                         for n in dict.fromkeys(r["shape_name"] for r in rows))
             + "\n")
    if targets:
        text += "\n## Targets\n\n```\n" + "\n".join(target_lines(targets)) + "\n```\n"
    return text


def table(doc: dict) -> str:
    """The markdown body of a run, targets included (recomputed from the rows: a run stopped early has none)."""
    return markdown(doc["rows"], evaluate_targets(doc["rows"], torch.device(doc["environment"]["device_type"])))


def summary(doc: dict) -> list[str]:
    """The targets' PASS/FAIL lines, recomputed from the rows (``python -m benchmarks.report`` prints them last)."""
    return target_lines(evaluate_targets(doc["rows"], torch.device(doc["environment"]["device_type"])))


def plot(rows: list[dict], path) -> bool:
    plt = h.try_matplotlib()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return False
    groups = sorted({(r["dtype"], r["norm"]) for r in ok}, key=lambda g: (g[0] != "bf16", g))[:4]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for ax, (dt, nm) in zip(axes[:, 0], groups):
        sel = [r for r in ok if (r["dtype"], r["norm"]) == (dt, nm)]
        shapes = list(dict.fromkeys(r["shape_name"] for r in sel))
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            vals = [next((r["gbps"] for r in sel if r["shape_name"] == s and r["provider"] == p), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=f"{PROVIDER_LABELS[p]} ({p})")
        copies = [next((r["copy_gbps"] for r in sel if r["shape_name"] == s and r.get("copy_gbps")), 0) for s in shapes]
        # The copy of the same bytes, the memory-bound limit: a dashed line across each shape's group of bars.
        ax.hlines(copies, [j - width / 2 for j in range(len(shapes))], [j + 0.8 - width / 2 for j in range(len(shapes))],
                  colors="k", linestyles="dashed", label="device-to-device copy of the same bytes (memory-bound limit)")
        ax.set_ylim(0, 1.25 * max([*copies, *(r["gbps"] for r in sel)]))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel("GB/s (read 2 inputs + write 1)")
        ax.set_title(f"NAG combine, {dt}, {nm} on {ok[0]['device']}", fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    return h.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="case list (default: full on GPU, quick on CPU)")
    p.add_argument("--shapes", help=f"comma list of shapes, overrides the preset's ({', '.join(KERNEL_SHAPES)})")
    p.add_argument("--dtypes", help="comma list of bf16, fp16, fp32")
    p.add_argument("--norms", help="comma list of l1, l2")
    p.add_argument("--providers", help=f"comma list of {', '.join(PROVIDERS)} (default: all that run here)")


def case_grid(args, shapes, dtypes, norms) -> list[tuple[str, str, str]]:
    """Every (shape, dtype, norm) of ``--shapes``/``--dtypes``/``--norms``, each defaulting to the list given; an
    unknown name is an error that lists the known ones. Also used by the overhead and sweep suites."""
    shapes = args.shapes.split(",") if args.shapes else list(shapes)
    dtypes = args.dtypes.split(",") if args.dtypes else list(dtypes)
    norms = args.norms.split(",") if args.norms else list(norms)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    for n in norms:
        if n not in NORMS:
            raise SystemExit(f"unknown norm {n!r}; known: {', '.join(NORMS)}")
    for s in shapes:
        kernel_shape(s)
    return [(s, d, n) for s in shapes for d in dtypes for n in norms]


def cases(args, device) -> list[tuple[str, str, str]]:
    quick = args.quick if args.quick is not None else device.type != "cuda"
    preset = args.preset or ("quick" if quick else "full")
    chosen = list(PRESETS[preset])
    if args.shapes or args.dtypes or args.norms:
        chosen = case_grid(args, *(list(dict.fromkeys(c[i] for c in chosen)) for i in range(3)))
    return chosen


def run(args, device: torch.device) -> h.Results:
    providers = args.providers.split(",") if args.providers else default_providers(device)
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; known: {', '.join(PROVIDERS)}")
    quick = args.quick if args.quick is not None else device.type != "cuda"
    todo = cases(args, device)
    env = h.environment(device)
    results = h.Results("kernel", env, args.out)
    results.extra.update(params=PARAMS, providers=providers, cases=[list(c) for c in todo])
    h.log(f"kernel suite on {env['device']}: {len(todo)} cases x {len(providers)} providers -> {results.json_path}")
    # One large copy as the run's headline memory bandwidth (bytes read + written).
    big = 2 * 2**30 if device.type == "cuda" else (64 if quick else 256) * 2**20
    copy, err = h.guarded(lambda: h.copy_bandwidth(big, torch.float32, device, **timer_kwargs(device, quick)), device)
    results.extra["copy_bandwidth"] = copy or err
    if copy:
        h.log(f"device-to-device copy, {h.fmt_bytes(copy['bytes'])} moved: {copy['gbps']:.0f} GB/s")
    if "torch_compile" in providers and device.type == "cuda":
        # Start Inductor (and its compile workers) before anything is timed: eager calls timed right after the
        # process's first torch.compile have measured host-bound (several times slower than the same shape later
        # in the same run).
        h.guarded(lambda: torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device)), device)
    start = time.perf_counter()
    for i, (s, d, n) in enumerate(todo, 1):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            h.log(f"[{i}/{len(todo)}] {s} {d} {n}: skipped (time budget of {args.budget_s}s spent)")
            for p in providers:
                results.add(dict(case=f"{s} {d} {n}", shape_name=s, shape=list(kernel_shape(s).shape), dtype=d,
                                 norm=n, provider=p, status="skipped", reason="time budget spent"))
            continue
        h.log(f"[{i}/{len(todo)}]")
        run_case(results, s, d, n, providers, device, quick)
    targets = evaluate_targets(results.rows, device)
    results.extra["targets"] = targets
    results.finish(markdown(results.rows, targets), lambda path: plot(results.rows, path), target_lines(targets))
    return results
