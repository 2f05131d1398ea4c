"""Where a FLUX.1-size step spends its GPU time, per variant (GPU only): ``python -m benchmarks.profile_flux``.

Builds the full FLUX.1 transformer with random bf16 weights (as the flux suite does), runs one warm step of each
variant under ``torch.profiler`` and prints the CUDA kernels that take the most time, plus which attention-with-LSE
backend fast mode picked. For finding the gap between fast mode's FLOP ratio (1.13x at 1024^2) and its time ratio.
Writes ``profile_flux.json`` to ``$OUT`` (or benchmarks/results/). Options: ``--resolution`` (default 1024),
``--variants`` (default no_nag,nag_fast,nag_exact_triton), ``--top`` (default 20).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_flux", description=__doc__)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--variants", default="no_nag,nag_fast,nag_exact_triton")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny config (a check of this script, also on a CPU)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        sys.exit("profile_flux needs a CUDA GPU (or --quick)")

    from nag_kernels import attention

    from . import flux, random_flux

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name, config, text_tokens = flux.model_config(quick=args.quick)
    transformer = random_flux.transformer(config, device, dtype)
    inputs = flux.make_inputs(config, args.resolution, text_tokens, 1, 2, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU

    chosen = collections.Counter()
    original_choose = attention.choose_backend

    def counting_choose(q, k, backend="auto"):
        result = original_choose(q, k, backend)
        chosen[f"{result} q{tuple(q.shape)} k{tuple(k.shape)}"] += 1
        return result

    attention.choose_backend = counting_choose
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "resolution": args.resolution,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}}
    for variant in args.variants.split(","):
        chosen.clear()
        with torch.no_grad(), flux.nag_applied(transformer, variant, device):
            step = flux.step_fn(transformer, variant, inputs, 1)
            step()
            step()
            sync()
            with torch.profiler.profile(activities=[activity]) as prof:
                step()
                sync()
        def spent(e):  # GPU kernel time, or self CPU time for a --quick run on a CPU
            return e.device_time_total if device.type == "cuda" else e.self_cpu_time_total

        events = [e for e in prof.key_averages() if spent(e) > 0]
        total_us = sum(spent(e) for e in events)
        events.sort(key=spent, reverse=True)
        top = [{"name": e.key[:120], "calls": e.count, "ms": spent(e) / 1e3} for e in events[: args.top]]
        print(f"\n== {name} {variant} at {args.resolution}^2: {total_us / 1e3:.1f} ms of {device.type} time in one step")
        for row in top:
            print(f"  {row['ms']:8.2f} ms  {row['calls']:5d}x  {row['name']}")
        if chosen:
            print("  attention_with_lse backends: " + "; ".join(f"{k}: {v}x" for k, v in chosen.most_common(8)))
        report["variants"][variant] = {"gpu_ms": total_us / 1e3, "top": top, "attention_with_lse": dict(chosen)}
    attention.choose_backend = original_choose
    out_dir = os.environ.get("OUT") or "benchmarks/results"
    with open(os.path.join(out_dir, "profile_flux.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
