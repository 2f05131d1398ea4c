"""nag-kernels benchmarks: ``python -m benchmarks SUITE ...`` from the repo root (``--help`` lists every suite).

``suites.py`` names the suites and their modules (kernel, flux, flops, quality, overhead, profile, sweep), all over
the shared ``harness.py``; shapes come from the model configs in ``configs.py``, random-weight Flux models from
``random_flux.py``, the flops suite's models from ``flops_models.py`` (over the meta-device builders and the FLOP
counter of ``meta_models/`` at the repository root). Results go to ``benchmarks/results/`` (or
``--out``): one JSON per run, a markdown table and, where a figure helps and matplotlib is installed, a PNG.
``gpu_suite.sh`` is the one-call GPU measurement behind the README.
"""
