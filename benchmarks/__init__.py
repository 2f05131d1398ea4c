"""nag-kernels benchmarks: ``python -m benchmarks {kernel,flux,flops,all}`` from the repo root (``--help``).

Suites live in ``kernel.py``, ``flux.py`` and ``flops.py`` over the shared ``harness.py``; shapes come from the
model configs in ``configs.py``. Results go to ``benchmarks/results/`` (or ``--out``): one JSON per run, a markdown
table and, with matplotlib installed, a PNG. ``gpu_suite.sh`` is the one-call GPU measurement behind the README.
"""
