"""``sweep`` suite (CUDA only): is ``combine.launch_config`` the best launch setting of the fused NAG combine?

At each shape (default: Flux 1024^2 batch 1, Flux 2048^2 batch 2, SDXL's first attention level, Wan2.1-14B 480p;
bf16, L1) it times the heuristic's setting and every (ROWS, num_warps) of the row kernel, and the chunk/warp settings
of the chunked kernel, with ``triton.testing.do_bench``. It exists to check and retune the heuristic on a new card.
Rows: one per (shape, setting); the table sets the heuristic next to the best.
"""

from __future__ import annotations

import itertools

import torch

from . import harness as h
from .configs import kernel_shape
from .kernel import DTYPES, PARAMS, case_grid

HELP = ("every launch setting of the combine kernel (rows per program, warps, chunked or not) at model shapes, "
        "timed with do_bench: the heuristic's choice next to the best. CUDA only.")
DEFAULT_SHAPES = ("flux-1024-b1", "flux-2048-b2", "sdxl-1024", "wan14b-480p")


def settings(channels: int, n_rows: int) -> list[dict]:
    """The heuristic's setting first, then every row-kernel and chunked-kernel setting worth trying."""
    import triton

    from nag_kernels.combine import MAX_BLOCK_C, launch_config

    out = [{**launch_config(channels, n_rows), "heuristic": True}]
    if channels <= MAX_BLOCK_C:
        block = triton.next_power_of_2(channels)
        for rows, warps in itertools.product([1, 2, 4], [4, 8, 16]):
            if rows * block <= 16384:
                out.append({"chunked": False, "BLOCK_C": block, "ROWS": rows, "num_warps": warps})
    for block, warps in itertools.product([2048, 4096], [8, 16]):
        out.append({"chunked": True, "BLOCK_C": block, "ROWS": 1, "num_warps": warps})
    return out


def run_shape(results: h.Results, shape_name: str, dtype_name: str, norm: str, device) -> None:
    from triton.testing import do_bench

    from nag_kernels.combine import _launch

    from .kernel import make_inputs

    spec = kernel_shape(shape_name)
    z_pos, z_neg = make_inputs(spec.shape, DTYPES[dtype_name], device)
    out = torch.empty_like(z_pos)
    channels = spec.shape[-1]
    nbytes = 3 * z_pos.numel() * z_pos.element_size()
    s, tau, alpha = PARAMS["scale"], PARAMS["tau"], PARAMS["alpha"]
    base = dict(shape_name=shape_name, shape=list(spec.shape), dtype=dtype_name, norm=norm, bytes=nbytes)
    for cfg in settings(channels, z_pos.numel() // channels):
        setting = {k: v for k, v in cfg.items() if k != "heuristic"}
        row = {**base, "case": f"{shape_name} {setting}", "setting": setting, "heuristic": cfg.get("heuristic", False)}
        # a setting that does not compile (too many registers, say) is recorded as an error and the sweep goes on
        ms, err = h.guarded(lambda: do_bench(lambda: _launch(z_pos, z_neg, out, s, tau, alpha, norm, setting),
                                             warmup=25, rep=100), device)
        row.update(err or {"median_ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9})
        results.add(row)
    ok = [r for r in results.rows if r["shape_name"] == shape_name and r["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda r: r["median_ms"])
        best["best"] = True
        results.write_json()
        h.log("  " + summary_line([r for r in ok if r["heuristic"]], best, shape_name))
    del z_pos, z_neg, out
    h.free_memory(device)


def summary_line(heuristic: list[dict], best: dict, shape_name: str) -> str:
    if not heuristic:
        return f"{shape_name}: heuristic setting failed; best {best['setting']} {best['median_ms'] * 1e3:.1f} us"
    hr = heuristic[0]
    return (f"{shape_name}: heuristic {hr['setting']} {hr['median_ms'] * 1e3:.1f} us ({hr['gbps']:.0f} GB/s); "
            f"best {best['setting']} {best['median_ms'] * 1e3:.1f} us ({best['gbps']:.0f} GB/s), "
            f"heuristic at {best['median_ms'] / hr['median_ms']:.0%} of the best's speed")


def fmt_setting(s: dict) -> str:
    kind = "chunked" if s.get("chunked") else "rows"
    return f"{kind} BLOCK_C={s.get('BLOCK_C')} ROWS={s.get('ROWS')} warps={s.get('num_warps')}"


def table(doc: dict) -> str:
    rows = doc["rows"]
    shapes = list(dict.fromkeys(r["shape_name"] for r in rows))
    header = ["shape", "heuristic setting", "heuristic us", "best setting", "best us", "heuristic / best time"]
    body = []
    for s in shapes:
        ok = [r for r in rows if r["shape_name"] == s and r["status"] == "ok"]
        hr = next((r for r in ok if r["heuristic"]), None)
        best = min(ok, key=lambda r: r["median_ms"]) if ok else None
        shape = f"{s} {tuple(next(r for r in rows if r['shape_name'] == s)['shape'])}"
        body.append([shape, fmt_setting(hr["setting"]) if hr else "failed", f"{hr['median_ms'] * 1e3:.1f}" if hr else "",
                     fmt_setting(best["setting"]) if best else "none ran", f"{best['median_ms'] * 1e3:.1f}" if best else "",
                     f"{hr['median_ms'] / best['median_ms']:.2f}x" if hr and best else ""])
    text = h.markdown_table(header, body)
    text += "\n## Every setting\n\n" + h.markdown_table(
        ["shape", "setting", "us", "GB/s", ""],
        [[r["shape_name"], fmt_setting(r["setting"]),
          f"{r['median_ms'] * 1e3:.1f}" if r["status"] == "ok" else f"{r['status']}: {r.get('error')}",
          f"{r['gbps']:.0f}" if r["status"] == "ok" else "",
          " ".join(w for w, on in (("heuristic", r["heuristic"]), ("best", r.get("best"))) if on)] for r in rows])
    return text + ("\n`triton.testing.do_bench` medians (L2 flushed before each call). rows: one program per ROWS rows "
                   "of BLOCK_C >= channels; chunked: one program per row, BLOCK_C channels at a time.\n")


def run(args, device: torch.device) -> h.Results:
    h.require_cuda(device, "sweep", "it times compiled Triton launches with do_bench")
    todo = case_grid(args, DEFAULT_SHAPES, ["bf16"], ["l1"])
    env = h.environment(device)
    results = h.Results("sweep", env, args.out)
    h.log(f"sweep suite on {env['device']}: {len(todo)} cases -> {results.json_path}")
    for s, d, n in todo:
        run_shape(results, s, d, n, device)
    results.finish(table(results.document()))
    return results
