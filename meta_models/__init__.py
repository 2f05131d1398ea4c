"""Full-size diffusion models on the meta device, and the one FLOP counter (repository-only, not installed).

``count.py``: ``count(fn)`` runs ``fn`` under ``torch.utils.flop_counter.FlopCounterMode`` and returns the total FLOPs,
the FLOPs per op and per module, and the ops it could not count. ``<family>.py``: one module per model family with
its public configurations (``CONFIGS``), ``build(name)`` (the model on ``torch.device("meta")``: no memory, no weights)
and ``step_inputs(model, variant, ...)`` (one denoising step's forward arguments per variant, as meta tensors); no
module counts on its own: callers (the flops suite of ``python -m benchmarks``, the ``tests/test_<family>_meta.py``
tests) pass a forward to ``count``.

Imported from the repository root, which ``python -m pytest`` and ``python -m benchmarks`` put on ``sys.path``.
"""
