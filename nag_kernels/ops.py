"""The NAG combine as a registered op and the public ``nag`` function (declared through ``op_factory``).

Registered: ``torch.ops.nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto")`` returns a new
tensor, ``nag_out(out, z_pos, ...)`` writes into ``out``, and their ``*_scalar_tensors`` twins take the scalars as
0-dim tensors (what ``nag`` calls under ``torch.compile``); ``op_factory`` generates all four, their fake impls and the
autograd formula (``torch_backend.nag_backward_torch``, PyTorch ops whichever backend ran the forward).

Backends: ``"triton"`` is the fused kernel of ``combine.py`` (CUDA/ROCm tensors, or CPU tensors when
``TRITON_INTERPRET=1``: the Triton interpreter, for tests); float32, float16 and bfloat16. ``"torch"`` is
``torch_backend.nag_torch``, fused PyTorch ops on any device and any float dtype. ``"auto"`` picks Triton where it can
run and the dtype is one it takes, PyTorch elsewhere (so float64 always runs on PyTorch).
"""

from __future__ import annotations

import torch

from .checks import check_out, check_pair  # noqa: F401  (check_out re-exported)
from .op_factory import (  # noqa: F401  (re-exported: callers import the backend helpers from here)
    OpSpec,
    define,
    direct_call_ok,
    read_scalars,
    refuse_grad_in_place,
    resolve_backend,
    triton_available,
    triton_interpreted,
    triton_runs_on,
    validate_backend,
)
from .torch_backend import nag_backward_torch, nag_torch

_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _nag_triton(z_pos, z_neg, scale, tau, alpha, norm, out=None) -> torch.Tensor:
    # imports Triton: only when the Triton backend runs
    from .combine import launch_nag

    return launch_nag(z_pos, z_neg, scale, tau, alpha, norm, out)


def _example() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 40, generator=g)[:, 1:], torch.randn(2, 2, 40, generator=g)


NAG = define(
    OpSpec(
        name="nag",
        tensors=("z_pos", "z_neg"),
        scalars=("scale", "tau", "alpha"),
        main="z_pos",
        check=lambda z_pos, z_neg: check_pair(z_pos, z_neg, dtypes=_OP_DTYPES),
        new_result=lambda z_pos, z_neg: z_pos.new_empty(z_pos.shape),
        torch_impl=nag_torch,
        triton_impl=_nag_triton,
        backward=nag_backward_torch,
        has_out=True,
        example=_example,
    )
)


@NAG.public
def nag(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float | torch.Tensor,
    tau: float | torch.Tensor = 2.5,
    alpha: float | torch.Tensor = 0.25,
    *,
    norm: str = "l1",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Normalized Attention Guidance combine, fused: one pass over memory on GPU.

    For each token (row of the last dim ``C``)::

        z_t = scale * z_pos - (scale - 1) * z_neg
        out = alpha * min(1, tau * ||z_pos|| / ||z_t||) * z_t + (1 - alpha) * z_pos

    with the factor 1 where ``||z_t|| = 0``, and ``out = z_pos`` exactly at ``scale = 1`` (NAG off); see
    ``nag_kernels.nag_reference`` for the exact semantics.

    Args:
        z_pos: ``(..., C)`` attention output under the positive context (heads merged, before the output
            projection). float32, float16 or bfloat16 (float64 on the ``"torch"`` backend). The last dim must be
            contiguous; leading dims may be strided (e.g. ``hidden[:, text_len:]``) and are not copied.
        z_neg: ``(..., C)`` attention output under the NAG-negative context; same shape, dtype and device.
        scale: extrapolation scale ``nag_scale``, >= 1 (1 = NAG off: returns ``z_pos``; typical 3-11).
        tau: clamp of the norm ratio ``||z_t|| / ||z_pos||`` (> 0; typical 2.5).
        alpha: blend weight in [0, 1] (typical 0.125-0.5).
            Each scalar is a Python number or a 0-dim real tensor on any device (read with ``.item()``). Under
            ``torch.compile`` they may change between calls: dynamo makes a number dynamic the first time it
            changes (one recompile, then none), a tensor never recompiles; the values are validated when the
            compiled graph runs.
        norm: ``"l1"`` (the paper's, default) or ``"l2"`` (the authors' diffusers Flux file); keyword-only.
        out: optional ``(..., C)`` output tensor of the same dtype and device, last dim contiguous, keyword-only.
            May be ``z_pos`` or ``z_neg`` itself (the same view: in place); overlapping them any other way is
            allowed too (computed into a temporary, then copied); its own elements must not overlap (no
            ``expand()``). Inference-only: refused when an input requires grad under grad mode.
        backend: ``"auto"`` (Triton on CUDA/ROCm and under ``TRITON_INTERPRET=1`` for float32/16/bf16, PyTorch
            otherwise, float64 included), ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., C)`` tensor in the input dtype (``out`` when given). Norms and arithmetic run in float32.
        Differentiable w.r.t. ``z_pos`` and ``z_neg`` (not the scalars) when ``out`` is not given.

    Example::

        >>> z_pos, z_neg = torch.randn(2, 1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
        >>> guided = nag_kernels.nag(z_pos, z_neg, scale=5.0, tau=2.5, alpha=0.25)
    """
    return NAG((z_pos, z_neg), (scale, tau, alpha), norm=norm, out=out, backend=backend)
