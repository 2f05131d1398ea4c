"""Host overhead vs device time of the NAG combine (GPU only): where a small call's time goes.

``python -m benchmarks.host_overhead`` measures, at the issue-2 shapes in bf16:

- device time: the call replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``), so no host work is timed:
  the kernel's own bandwidth, for ``nag_kernels.nag``, ``torch.compile(nag_reference)`` and a device-to-device copy;
- host time per call: ``time.perf_counter`` over many back-to-back calls with the GPU busy on a long queued kernel,
  so the host is never waiting: the Python cost of each layer (public ``nag``, ``launch_nag``, the raw Triton launch,
  the compiled ``nag_reference``).

``do_bench`` (the kernel suite) times whole calls between CUDA events with an L2 flush before each; host work
shorter than the flush is hidden, longer host work is timed. This script separates the two. Informative; it writes
``host_overhead.json`` to ``$OUT`` (or benchmarks/results/).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def host_us(fn, n: int = 500) -> float:
    """Median-of-5 host microseconds per call, with a long kernel queued first so the host never waits."""
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


def main() -> None:
    import triton
    from triton.testing import do_bench_cudagraph

    from nag_kernels import nag, nag_reference
    from nag_kernels.combine import _launch, launch_nag

    if not torch.cuda.is_available():
        sys.exit("host_overhead needs a CUDA GPU")
    rows = []
    for shape in [(1, 4096, 3072), (2, 16384, 3072)]:
        z_pos = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        z_neg = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(z_pos)
        nbytes = 3 * z_pos.numel() * 2
        compiled = torch.compile(nag_reference)
        compiled(z_pos, z_neg, 5.0)
        calls = {
            "nag": lambda: nag(z_pos, z_neg, 5.0),
            "nag_out": lambda: nag(z_pos, z_neg, 5.0, out=out),
            "launch_nag": lambda: launch_nag(z_pos, z_neg, 5.0, 2.5, 0.25, "l1", out),
            "raw_launch": lambda: _launch(z_pos, z_neg, out, 5.0, 2.5, 0.25, "l1"),
            "torch_compile": lambda: compiled(z_pos, z_neg, 5.0),
            "copy": lambda: out.copy_(z_pos),
        }
        row = {"shape": list(shape), "bytes": nbytes, "device_us": {}, "host_us": {}}
        for name, fn in calls.items():
            fn()
            ms = do_bench_cudagraph(fn, rep=50, return_mode="median")
            row["device_us"][name] = ms * 1e3
            row["host_us"][name] = host_us(fn)
        copy_bytes = 2 * z_pos.numel() * 2
        row["copy_GBps"] = copy_bytes / (row["device_us"]["copy"] * 1e-6) / 1e9
        row["nag_GBps"] = nbytes / (row["device_us"]["nag"] * 1e-6) / 1e9
        row["nag_share_of_copy"] = row["nag_GBps"] / row["copy_GBps"]
        row["nag_vs_compile_device"] = row["device_us"]["torch_compile"] / row["device_us"]["nag"]
        print(f"{shape}: device us " + ", ".join(f"{k} {v:.1f}" for k, v in row["device_us"].items()))
        print(f"{shape}: host us   " + ", ".join(f"{k} {v:.1f}" for k, v in row["host_us"].items()))
        print(f"{shape}: nag {row['nag_GBps']:.0f} GB/s = {row['nag_share_of_copy']:.0%} of copy "
              f"({row['copy_GBps']:.0f} GB/s); {row['nag_vs_compile_device']:.2f}x torch.compile in device time")
        rows.append(row)
    out_dir = os.environ.get("OUT") or "benchmarks/results"
    with open(os.path.join(out_dir, "host_overhead.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
