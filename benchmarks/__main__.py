"""Command line of the benchmark suites: ``python -m benchmarks [kernel] [flux] [flops] [quality] [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import time

SUITES = ("kernel", "flux", "flops", "quality")
# ``all``: the suites that run on random weights. quality needs a real model (--model) to say anything, so it runs
# only when named.
ALL_SUITES = ("kernel", "flux", "flops")

EPILOG = """\
suites:
  kernel  the NAG combine alone at model shapes: eager nag_reference, the authors' formula, torch.compile,
          nag(backend="torch"), the Triton kernel and its in-place form; ms, GB/s, share of copy bandwidth,
          speedups, peak extra memory, and the pass/fail targets of issue 2.
  flux    one FLUX.1-size transformer step with random weights: no NAG, true CFG, NAG exact (PyTorch combine /
          Triton kernel), NAG fast; eager and torch.compile'd; ms per step, overhead, peak memory.
  flops   the same configurations counted on the meta device with FlopCounterMode: TFLOP per step, ratio to no NAG.
  quality images of a real Flux pipeline (--model) for fixed prompts with NAG negatives: no NAG, NAG exact, NAG fast
          from the same seeds; PSNR/SSIM of fast vs exact (and exact vs no NAG), CLIP similarity to the prompt and
          the NAG negative with --clip-model; an image grid PNG. Not part of "all" (it needs real weights); without
          a GPU and --model it runs a tiny random-weight pipeline (--tiny) whose figures are meaningless.

Without a GPU, kernel and flux run small shapes (--quick is the default there); flops always runs at full size.
Examples:
  python -m benchmarks kernel --quick
  python -m benchmarks kernel --shapes flux-1024-b1,flux-2048-b2 --dtypes bf16 --norms l1
  python -m benchmarks flux --resolutions 1024 --compile-resolutions none
  python -m benchmarks flops
  python -m benchmarks all --out /tmp/bench
  python -m benchmarks quality --model black-forest-labs/FLUX.1-schnell --clip-model openai/clip-vit-large-patch14
"""


def parser() -> argparse.ArgumentParser:
    from . import flux, kernel, quality

    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suites", nargs="*", default=["all"], help="kernel, flux, flops, quality or all (default: all = kernel, flux, flops)")
    common = p.add_argument_group("all suites")
    common.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    q = common.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="small shapes (default on a machine without a GPU); for flops: the toy Flux config")
    q.add_argument("--full", dest="quick", action="store_false", help="full-size shapes, also on a CPU")
    common.add_argument("--out", default=os.environ.get("NAG_BENCH_OUT"),
                        help="directory for the JSON/markdown/PNG files (default: benchmarks/results/)")
    common.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds per suite (skipped cases are recorded)")
    kernel.add_arguments(p.add_argument_group("kernel suite"))
    flux.add_arguments(p.add_argument_group("flux and flops suites (--dtype also for quality)"))
    quality.add_arguments(p.add_argument_group("quality suite"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    suites = list(ALL_SUITES) if "all" in args.suites else args.suites
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"unknown suite {s!r}; choose from {', '.join(SUITES)} or all")
    from . import harness as h

    device = h.pick_device(args.device)
    summaries = []
    failed = []
    for s in suites:
        t0 = time.perf_counter()
        mod = __import__(f"benchmarks.{s}", fromlist=["run"])
        try:
            results = mod.run(args, device)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - report and go on with the next suite
            import traceback

            traceback.print_exc()
            h.log(f"suite {s} failed: {h.error_text(exc)}")
            failed.append(s)
            continue
        errors = sum(r["status"] == "error" for r in results.rows)
        h.log(f"suite {s}: {len(results.rows)} rows, {errors} errors, {time.perf_counter() - t0:.0f}s")
        summaries.append((s, results))
    # Tables last, so the end of the output holds them.
    for s, results in summaries:
        if results.markdown_path:
            print("\n" + results.markdown_path.read_text(), flush=True)
        for line in results.summary:
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
