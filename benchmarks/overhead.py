"""``overhead`` suite: the integration's host cost per transformer forward (any device,
``integration_overhead.py``), and on CUDA the host time vs device time of one NAG combine call, per layer of the call.

At each shape (default: the Flux 1024^2 batch-1 and 2048^2 batch-2 shapes, bf16, L1) it measures, per call:

- device time: the call replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``), so no host work is timed:
  the kernel's own bandwidth, for ``nag_kernels.nag``, ``torch.compile(nag_reference)`` and a device-to-device copy;
- host time: ``time.perf_counter`` over many back-to-back calls while the GPU is busy with a long queued kernel, so
  the host never waits: the Python cost of each layer (public ``nag``, ``nag(out=)``, ``launch_nag``, the raw Triton
  launch, the compiled ``nag_reference``).

The kernel suite's ``do_bench`` times whole calls between CUDA events with an L2 flush before each: host work shorter
than the flush is hidden, longer host work is timed. This suite separates the two. Rows: one per (shape, call).
"""

from __future__ import annotations

import time

import torch

from . import harness as h
from . import integration_overhead
from .configs import kernel_shape
from .kernel import DTYPES, PARAMS, case_grid

HELP = ("the integration's host cost per transformer forward (hooks, record, checks; micro FLUX.1 and Wan, any "
        "device), and on CUDA the host time vs device time (CUDA graph replay) of one combine call, per layer: public "
        "nag, nag(out=), launch_nag, the raw Triton launch, torch.compile(nag_reference), a copy.")
DEFAULT_SHAPES = ("flux-1024-b1", "flux-2048-b2")
CALLS = ("nag", "nag_out", "launch_nag", "raw_launch", "torch_compile", "copy")
CALL_LABELS = {
    "nag": "nag_kernels.nag(z_pos, z_neg, ...): the public op",
    "nag_out": "nag(..., out=buffer): the public op writing into a given buffer",
    "launch_nag": "combine.launch_nag: the launcher under the op (checks, layout, launch)",
    "raw_launch": "combine._launch: the Triton launch alone",
    "torch_compile": "torch.compile(nag_reference)",
    "copy": "out.copy_(z_pos): a device-to-device copy, the memory-bound reference",
}


def host_us(fn, n: int = 500) -> float:
    """Median of 5 runs of host microseconds per call, with a long kernel queued first so the host never waits."""
    runs = []
    big = torch.empty(2**28, device="cuda", dtype=torch.float32)
    for _ in range(5):
        for _ in range(200):
            big.mul_(1.0)  # ~100 ms of queued GPU work (200 launches + n stay under the launch queue's depth)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    runs.sort()
    return runs[2]


def calls(z_pos, z_neg, out, norm: str) -> dict:
    from nag_kernels import nag
    from nag_kernels.combine import _launch, launch_nag
    from nag_kernels.reference import nag_reference

    s, tau, alpha = PARAMS["scale"], PARAMS["tau"], PARAMS["alpha"]
    torch._dynamo.reset()
    compiled = torch.compile(nag_reference, dynamic=False)
    return {
        "nag": lambda: nag(z_pos, z_neg, s, tau, alpha, norm=norm),
        "nag_out": lambda: nag(z_pos, z_neg, s, tau, alpha, norm=norm, out=out),
        "launch_nag": lambda: launch_nag(z_pos, z_neg, s, tau, alpha, norm, out),
        "raw_launch": lambda: _launch(z_pos, z_neg, out, s, tau, alpha, norm),
        "torch_compile": lambda: compiled(z_pos, z_neg, s, tau, alpha, norm=norm),
        "copy": lambda: out.copy_(z_pos),
    }


def run_shape(results: h.Results, shape_name: str, dtype_name: str, norm: str, device) -> None:
    from triton.testing import do_bench_cudagraph

    from .kernel import make_inputs

    spec = kernel_shape(shape_name)
    z_pos, z_neg = make_inputs(spec.shape, DTYPES[dtype_name], device)
    out = torch.empty_like(z_pos)
    nbytes = 3 * z_pos.numel() * z_pos.element_size()
    base = dict(shape_name=shape_name, shape=list(spec.shape), dtype=dtype_name, norm=norm, bytes=nbytes)
    measured = {}
    for name, fn in calls(z_pos, z_neg, out, norm).items():
        def measure(fn=fn):
            fn()  # compile / first launch
            device_us = do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
            return {"device_us": device_us, "host_us": host_us(fn)}

        res, err = h.guarded(measure, device)
        row = {**base, "case": f"{shape_name} {dtype_name} {norm} {name}", "call": name, **(err or res)}
        if res:
            moved = 2 * z_pos.numel() * z_pos.element_size() if name == "copy" else nbytes
            row["device_gbps"] = moved / (res["device_us"] * 1e-6) / 1e9
            measured[name] = row
        results.add(row)
        h.log("  " + progress_line(row))
    if "copy" in measured:
        for row in measured.values():
            row["share_of_copy"] = row["device_gbps"] / measured["copy"]["device_gbps"]
    results.write_json()
    del z_pos, z_neg, out
    h.free_memory(device)


def progress_line(r: dict) -> str:
    head = f"{r['shape_name']} {r['call']:<14}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason') or r.get('error')}"
    return f"{head} device {r['device_us']:.1f} us ({r['device_gbps']:.0f} GB/s), host {r['host_us']:.1f} us per call"


def table(doc: dict) -> str:
    integration = [r for r in doc["rows"] if r.get("part") == "integration"]
    rows = [r for r in doc["rows"] if r.get("part") != "integration"]
    text = "## The integration's host cost per transformer forward\n\n" + integration_overhead.table(integration)
    if not rows:
        return text + "\n(The combine-call part needs a CUDA GPU.)\n"
    header = ["shape", "dtype", "norm", "call", "device us (CUDA graph)", "GB/s", "% of copy", "host us per call"]
    body = []
    for r in rows:
        where = [f"{r['shape_name']} {tuple(r['shape'])}", r["dtype"], r["norm"], f"`{r['call']}`"]
        if r["status"] != "ok":
            body.append(where + [f"{r['status']}: {r.get('reason') or r.get('error')}", "", "", ""])
            continue
        share = r.get("share_of_copy")
        body.append(where + [f"{r['device_us']:.1f}", f"{r['device_gbps']:.0f}",
                             "" if share is None else f"{100 * share:.0f}%", f"{r['host_us']:.1f}"])
    legend = "\n".join(f"- `{c}`: {label}" for c, label in CALL_LABELS.items())
    return text + "\n## One combine call\n\n" + h.markdown_table(header, body) + (
        "\nDevice time: median of the call replayed in a CUDA graph (no host work timed). Host time: per call, "
        "measured with the GPU kept busy so the host never waits (median of 5 runs of 500 calls). A call whose host "
        "time exceeds its device time is host-bound when issued alone.\n\n" + legend + "\n")


def plot(rows: list[dict], path) -> bool:
    plt = h.try_matplotlib()
    ok = [r for r in rows if r["status"] == "ok" and r.get("part") != "integration"]
    if plt is None or not ok:
        return False
    shapes = list(dict.fromkeys(r["shape_name"] for r in ok))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in ok if r["shape_name"] == shape]
        names = [r["call"] for r in sel]
        xs = range(len(sel))
        ax.bar([x - 0.2 for x in xs], [r["device_us"] for r in sel], 0.4, label="device time (CUDA graph)")
        ax.bar([x + 0.2 for x in xs], [r["host_us"] for r in sel], 0.4, label="host time per call")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("microseconds")
        ax.set_title(f"{shape} {tuple(sel[0]['shape'])} {sel[0]['dtype']} on {sel[0]['device']}", fontsize=9)
        ax.legend(fontsize=7)
    return h.save_figure(fig, path)


def run(args, device: torch.device) -> h.Results:
    env = h.environment(device)
    results = h.Results("overhead", env, args.out)
    results.extra.update(params=PARAMS, calls=CALL_LABELS)
    h.log(f"overhead suite on {env['device']} -> {results.json_path}")
    for name in integration_overhead.MODELS:  # the integration's host cost: Python on the host, any device
        res, err = h.guarded(lambda name=name: integration_overhead.measure(name), torch.device("cpu"))
        for row in res or [{"case": f"{name} integration", "model": name, "call": "all", **(err or {})}]:
            results.add({**row, "part": "integration"})
            h.log(f"  {row['case']}: " + (f"{row['host_us']:.1f} us" if "host_us" in row else str(err)))
    if device.type == "cuda":
        todo = case_grid(args, DEFAULT_SHAPES, ["bf16"], ["l1"])
        for s, d, n in todo:
            run_shape(results, s, d, n, device)
    results.finish(table(results.document()), lambda path: plot(results.rows, path))
    return results
