"""The one FLOP counter: ``count(fn)`` runs ``fn()`` under ``torch.utils.flop_counter.FlopCounterMode`` (no grad) and
returns what it counted.

FlopCounterMode counts every matmul, convolution and attention op from its shapes, so a model on the meta device
(no memory, no values) is counted exactly. Elementwise ops are not counted: memory-bound, their FLOPs are negligible
next to the matmuls. Ops that look like matmul/attention work but have no FLOP formula (a custom attention kernel,
say) are listed in ``uncounted_ops``, so an undercount cannot go unnoticed; this package's own NAG combine / LSE
merge ops are elementwise and listed apart (``elementwise_nag_ops``).

``repeat`` counts a shallow model as a deep one: ``{module path: extra copies}`` adds that module's FLOPs that many more
times (a stack's first block standing for the blocks a model built with fewer of them lacks: exact, since the blocks
of a stack are identical, and much quicker to count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_SUSPECT = ("mm", "matmul", "attention", "attn", "conv", "linear", "einsum")


@dataclass(frozen=True)
class Counted:
    flops: int  # the total, the repeated modules' copies included
    by_op: dict[str, int]  # per op (its overload packet), the copies included
    by_module: dict[str, int]  # per module path ("Global": everything) as it ran, the copies not added
    uncounted_ops: list[str]  # matmul/attention-like ops with no FLOP formula
    elementwise_nag_ops: list[str]  # this package's NAG ops that ran (elementwise: rightly not counted)
    value: Any = None  # what ``fn`` returned

    @property
    def tflop(self) -> float:
        return self.flops / 1e12


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], Any], repeat: Mapping[str, int] | None = None) -> Counted:
    """The FLOPs of ``fn()`` (``repeat``: module path -> extra copies of that module's FLOPs, see the module doc)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter, _OpRecorder() as recorder:
        value = fn()
    per_module = counter.get_flop_counts()
    by_op = {str(op): n for op, n in per_module.get("Global", {}).items()}
    for path, copies in (repeat or {}).items():
        for op, n in per_module.get(path, {}).items():
            by_op[str(op)] += copies * n
    registry = getattr(counter, "flop_registry", {})
    packets = {getattr(k, "_overloadpacket", k) for k in registry}
    seen = [op for op in recorder.ops if getattr(op, "_overloadpacket", op) not in packets]
    own = sorted(str(op) for op in seen
                 if op.namespace == "nag_kernels" and op.name().split("::")[-1].startswith("nag"))
    uncounted = sorted(str(op) for op in seen if str(op) not in own
                       and (op.namespace not in ("aten", "prims") or any(s in op.name() for s in _SUSPECT)))
    return Counted(flops=sum(by_op.values()), by_op=by_op,
                   by_module={m: sum(ops.values()) for m, ops in per_module.items()}, uncounted_ops=uncounted,
                   elementwise_nag_ops=own, value=value)
