"""Launch-setting sweep of the fused NAG combine (GPU only): is ``combine.launch_config`` the best setting?

``python -m benchmarks.sweep_combine`` times every (ROWS, num_warps) of the row kernel, and the chunk/warp settings of
the chunked kernel, at the harness's realistic shapes in bf16, and prints the heuristic's time next to the best one.
It exists to check and retune the heuristic on a new card; its output is informative, not a figure for the README.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch


def main() -> None:
    import triton
    from triton.testing import do_bench

    from nag_kernels.combine import MAX_BLOCK_C, _launch, launch_config

    if not torch.cuda.is_available():
        sys.exit("sweep_combine needs a CUDA GPU")
    shapes = [(1, 4096, 3072), (2, 16384, 3072), (2, 4096, 640), (1, 32760, 5120)]
    rows_out = []
    for shape in shapes:
        C = shape[-1]
        z_pos = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        z_neg = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(z_pos)
        n_rows = z_pos.numel() // C
        nbytes = 3 * z_pos.numel() * z_pos.element_size()
        heuristic = launch_config(C, n_rows)
        configs = [heuristic]
        if C <= MAX_BLOCK_C:
            block = triton.next_power_of_2(C)
            for rows, warps in itertools.product([1, 2, 4], [4, 8, 16]):
                if rows * block <= 16384:
                    configs.append({"chunked": False, "BLOCK_C": block, "ROWS": rows, "num_warps": warps})
        for block, warps in itertools.product([2048, 4096], [8, 16]):
            configs.append({"chunked": True, "BLOCK_C": block, "ROWS": 1, "num_warps": warps})
        results = []
        for cfg in configs:
            try:
                ms = do_bench(lambda: _launch(z_pos, z_neg, out, 5.0, 2.5, 0.25, "l1", cfg), warmup=25, rep=100)
            except Exception as exc:  # a setting that does not compile (e.g. too many registers) is skipped
                print(f"  {shape} {cfg}: failed ({type(exc).__name__})")
                continue
            results.append((ms, cfg))
        h_ms = results[0][0]
        best_ms, best = min(results, key=lambda r: r[0])
        print(f"{shape}: heuristic {heuristic} {h_ms * 1e3:.1f} us ({nbytes / h_ms / 1e6:.0f} GB/s); "
              f"best {best} {best_ms * 1e3:.1f} us ({nbytes / best_ms / 1e6:.0f} GB/s)")
        rows_out.append({"shape": list(shape), "heuristic": heuristic, "heuristic_ms": h_ms, "best": best,
                         "best_ms": best_ms, "all": [{"ms": m, **c} for m, c in results]})
        # written after every shape, so a sweep stopped at its time limit keeps what it measured
        out_dir = os.environ.get("OUT") or "benchmarks/results"
        with open(os.path.join(out_dir, "sweep_combine.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
