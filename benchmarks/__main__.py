"""Command line of the benchmark suites: ``python -m benchmarks SUITE [SUITE ...] [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from .suites import ALL_SUITES, SUITES, module

EXAMPLES = """\
Without a GPU, kernel, flux and profile run small shapes (--quick is the default there); flops always counts the
full-size models. Exit status: 0 when every suite ran, 1 when one failed, 3 when none failed but one needs a CUDA GPU
that is not here.
Examples:
  python -m benchmarks kernel --quick
  python -m benchmarks kernel --shapes flux-1024-b1,flux-2048-b2 --dtypes bf16 --norms l1
  python -m benchmarks flux --resolutions 1024 --compile-resolutions none
  python -m benchmarks flops
  python -m benchmarks all --out /tmp/bench
  python -m benchmarks overhead profile sweep          # on a CUDA GPU
  python -m benchmarks quality --model black-forest-labs/FLUX.1-schnell --clip-model openai/clip-vit-large-patch14
"""
NEEDS_CUDA_STATUS = 3


def epilog() -> str:
    lines = ["suites:"]
    for name in SUITES:
        text = textwrap.wrap(module(name).HELP, 104)
        lines.append(f"  {name:<9} {text[0]}")
        lines += [" " * 12 + t for t in text[1:]]
    return "\n".join(lines) + "\n\n" + EXAMPLES


def parser() -> argparse.ArgumentParser:
    from . import flops, flux, kernel, profile_step, quality

    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suites", nargs="*", default=["all"],
                   help=f"{', '.join(SUITES)} or all (default: all = {', '.join(ALL_SUITES)})")
    common = p.add_argument_group("all suites")
    common.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    q = common.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="small shapes (default on a machine without a GPU); for flops: the toy Flux entries")
    q.add_argument("--full", dest="quick", action="store_false", help="full-size shapes, also on a CPU")
    common.add_argument("--out", default=os.environ.get("NAG_BENCH_OUT"),
                        help="directory for the JSON/markdown/PNG files (default: benchmarks/results/)")
    common.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds per suite (skipped cases are recorded)")
    kernel.add_arguments(p.add_argument_group("kernel suite (--shapes, --dtypes, --norms also for overhead and sweep)"))
    flux.add_arguments(p.add_argument_group(
        "flux suite (--resolutions, --variants, --dtype also for profile; --batch also for flops; --dtype also for "
        "quality)"))
    flops.add_arguments(p.add_argument_group("flops suite"))
    profile_step.add_arguments(p.add_argument_group("profile suite"))
    quality.add_arguments(p.add_argument_group("quality suite"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    suites = list(ALL_SUITES) if "all" in args.suites else args.suites
    modules = {s: module(s) for s in suites}  # an unknown name fails here, before anything runs
    from . import harness as h

    device = h.pick_device(args.device)
    summaries = []
    failed, needs_cuda = [], []
    for s, mod in modules.items():
        t0 = time.perf_counter()
        try:
            results = mod.run(args, device)
        except (KeyboardInterrupt, SystemExit):
            raise
        except h.NeedsCuda as exc:
            h.log(f"suite {s}: {exc}")
            needs_cuda.append(f"{s}: {exc}")
            continue
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
    for line in needs_cuda:
        print(f"not run: {line}", flush=True)
    return 1 if failed else NEEDS_CUDA_STATUS if needs_cuda else 0


if __name__ == "__main__":
    sys.exit(main())
