"""The suites of ``python -m benchmarks``: each name and the module that runs it.

A suite module has ``HELP`` (one paragraph for ``--help``), ``run(args, device) -> harness.Results`` and
``table(doc) -> str`` (the markdown body of a run, from its JSON document: ``python -m benchmarks.report`` rerenders
with it); ``add_arguments(group)`` when it has options of its own; ``summary(doc) -> list[str]`` when it has targets
(their PASS/FAIL lines, which the report prints after every table).
"""

from __future__ import annotations

import importlib

SUITES = {
    "kernel": "benchmarks.kernel",
    "flux": "benchmarks.flux",
    "flops": "benchmarks.flops",
    "quality": "benchmarks.quality",
    "overhead": "benchmarks.overhead",
    "profile": "benchmarks.profile_step",
    "sweep": "benchmarks.launch_sweep",
}
# ``all``: the suites that run anywhere on random weights. quality needs a real model (--model) to say anything;
# overhead and sweep need a CUDA GPU; profile repeats what flux builds. They run only when named.
ALL_SUITES = ("kernel", "flux", "flops")


def module(name: str):
    try:
        return importlib.import_module(SUITES[name])
    except KeyError:
        raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)} or all") from None
