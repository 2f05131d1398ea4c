"""The registered ``torch.library`` ops and the public ``nag`` function.

``torch.ops.nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto")`` returns a new tensor;
``torch.ops.nag_kernels.nag_out(out, z_pos, z_neg, scale, tau, alpha, norm, backend)`` writes into ``out`` (which may
alias ``z_pos``). Both have fake implementations, so they run on meta tensors (no kernel launch) and trace under
``torch.compile(fullgraph=True)``; Inductor treats them as opaque calls. Under ``torch.compile`` the public ``nag``
calls ``nag_scalar_tensors``/``nag_out_scalar_tensors`` instead, the same ops with the scalars as 0-dim tensors, so
that changing scale/tau/alpha between calls does not compile a graph per value. ``nag`` is differentiable w.r.t.
``z_pos`` and ``z_neg`` (an autograd formula in PyTorch ops, ``torch_backend.nag_backward_torch``, whichever backend
ran the forward); ``nag_out`` writes in place and is inference-only.

Backends: ``"triton"`` is the fused kernel of ``combine.py``: CUDA/ROCm tensors, or CPU
tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter, for tests); float32, float16 and bfloat16.
``"torch"`` is ``torch_backend.nag_torch``, fused PyTorch ops on any device and any float dtype. ``"auto"`` picks
Triton where it can run and the dtype is one it takes, PyTorch elsewhere (so float64 always runs on PyTorch).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .checks import (
    SCALARS,
    as_number,
    as_scalar_tensor,
    check_backend,
    check_last_dim_contiguous,
    check_like,
    check_norm,
    check_pair,
    check_params,
    check_scalar_tensor,
)
from .torch_backend import nag_backward_torch, nag_torch


@functools.cache
def triton_available() -> bool:
    """Whether triton imports; asked once per process (every call resolves its backend, and a failing import on a
    machine without triton is a slow search of the import path each time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` here (GPU, or CPU under the Triton interpreter)."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` or ``"torch"`` for ``device``; refuse ``"triton"`` where it cannot run."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    if backend == "triton" and not triton_runs_on(device):
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton (or use backend='torch')")
        raise ValueError(
            f"backend='triton' runs on CUDA/ROCm tensors (or CPU with TRITON_INTERPRET=1), got a tensor on {device}; "
            "use backend='auto' or 'torch'"
        )
    return backend


_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_all_but_scalars(z_pos, z_neg, norm, backend) -> None:
    check_pair(z_pos, z_neg, dtypes=_OP_DTYPES)
    check_norm(norm)
    check_backend(backend)


def _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend) -> None:
    """Device-independent checks, shared by the public function, the op and its fake impl."""
    _check_all_but_scalars(z_pos, z_neg, norm, backend)
    check_params(scale, tau, alpha, norm)


def validate_backend(name: str, tensor: torch.Tensor, backend: str) -> str:
    """``resolve_backend`` for ``tensor``'s device and dtype: ``"auto"`` takes PyTorch for float64 (argument ``name``),
    which the Triton kernels have no path for, and an explicit ``"triton"`` refuses it."""
    check_backend(backend)
    if backend == "auto" and tensor.dtype == torch.float64:
        return "torch"
    backend = resolve_backend(backend, tensor.device)
    if backend == "triton" and tensor.dtype == torch.float64:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='triton', got torch.float64")
    return backend


def check_out(out: torch.Tensor, z_pos: torch.Tensor) -> None:
    check_like("out", out, "z_pos", z_pos)
    check_last_dim_contiguous("out", out)


def _validate(z_pos, z_neg, scale, tau, alpha, norm, backend) -> str:
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    return validate_backend("z_pos", z_pos, backend)


def _run(z_pos, z_neg, scale, tau, alpha, norm, backend, out):
    """Run a validated call on its resolved backend."""
    if backend == "triton":
        from .combine import launch_nag

        return launch_nag(z_pos, z_neg, scale, tau, alpha, norm, out=out)
    return nag_torch(z_pos, z_neg, scale, tau, alpha, norm, out=out)


def _nag_impl(z_pos, z_neg, scale, tau, alpha, norm, backend, out=None) -> torch.Tensor:
    """The ops' real implementation: validate everything with the concrete values, then run."""
    backend = _validate(z_pos, z_neg, scale, tau, alpha, norm, backend)
    if out is not None:
        check_out(out, z_pos)
    return _run(z_pos, z_neg, scale, tau, alpha, norm, backend, out)


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call may skip the ``torch.library`` dispatcher and run the implementation directly.

    The dispatcher costs tens of microseconds of host time per call, which dominates at Flux sizes when the GPU is
    not ahead of the host: on an H200 machine a 27 us kernel took 157 us per call through the op, and a call that
    skips it costs 47 us of host time (benchmarks/results/h200-20261127-run1 and run3).
    The op is needed only where something must see it: ``torch.compile`` tracing, tensor subclasses (fake/functional
    tensors), meta tensors, an active ``TorchDispatchMode`` (e.g. ``FlopCounterMode``), and autograd (an input that
    requires grad while grad mode is on: the op carries the backward formula). Plain eager calls on real tensors
    compute the same thing either way.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.device.type == "meta" or (grad and t.requires_grad):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# The public ops: the scalars as floats (ComfyUI-NAG's signature)


@torch.library.custom_op("nag_kernels::nag", mutates_args=())
def nag_op(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> torch.Tensor:
    return _nag_impl(z_pos, z_neg, scale, tau, alpha, norm, backend)


@nag_op.register_fake
def _nag_fake(z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto"):
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    return z_pos.new_empty(z_pos.shape)


@torch.library.custom_op("nag_kernels::nag_out", mutates_args=("out",))
def nag_out_op(
    out: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> None:
    _nag_impl(z_pos, z_neg, scale, tau, alpha, norm, backend, out)


@nag_out_op.register_fake
def _nag_out_fake(out, z_pos, z_neg, scale, tau, alpha, norm="l1", backend="auto"):
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)
    check_out(out, z_pos)


# ----------------------------------------------------------------------------------------------------------------
# The ops ``nag`` calls under torch.compile: the scalars as 0-dim float64 CPU tensors (``checks.as_scalar_tensor``).
# A float passed to an op's ``float`` argument is specialized by dynamo and Inductor, one compiled graph per value;
# a tensor stays a dynamic graph input. The values are read and checked when the op runs.


def read_scalars(*scalars: torch.Tensor) -> tuple[float, ...]:
    """The values of 0-dim scalar tensors (CPU ones: no device sync)."""
    return tuple(t.item() for t in scalars)


def _check_scalar_tensors(scale, tau, alpha) -> None:
    for name, value in zip(SCALARS, (scale, tau, alpha)):
        check_scalar_tensor(name, value)


@torch.library.custom_op("nag_kernels::nag_scalar_tensors", mutates_args=())
def nag_scalar_tensors_op(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: torch.Tensor,
    tau: torch.Tensor,
    alpha: torch.Tensor,
    norm: str,
    backend: str,
) -> torch.Tensor:
    return _nag_impl(z_pos, z_neg, *read_scalars(scale, tau, alpha), norm, backend)


@nag_scalar_tensors_op.register_fake
def _nag_scalar_tensors_fake(z_pos, z_neg, scale, tau, alpha, norm, backend):
    _check_all_but_scalars(z_pos, z_neg, norm, backend)
    _check_scalar_tensors(scale, tau, alpha)
    return z_pos.new_empty(z_pos.shape)


@torch.library.custom_op("nag_kernels::nag_out_scalar_tensors", mutates_args=("out",))
def nag_out_scalar_tensors_op(
    out: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: torch.Tensor,
    tau: torch.Tensor,
    alpha: torch.Tensor,
    norm: str,
    backend: str,
) -> None:
    _nag_impl(z_pos, z_neg, *read_scalars(scale, tau, alpha), norm, backend, out)


@nag_out_scalar_tensors_op.register_fake
def _nag_out_scalar_tensors_fake(out, z_pos, z_neg, scale, tau, alpha, norm, backend):
    _check_all_but_scalars(z_pos, z_neg, norm, backend)
    _check_scalar_tensors(scale, tau, alpha)
    check_out(out, z_pos)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: gradients w.r.t. z_pos and z_neg, in PyTorch ops whichever backend ran the forward. The out= ops write
# in place and are inference-only (torch.library has no autograd formulas for mutating ops).


def _nag_setup_context(ctx, inputs, output) -> None:
    z_pos, z_neg, scale, tau, alpha, norm, _backend = inputs
    ctx.save_for_backward(z_pos, z_neg)
    ctx.params = (scale, tau, alpha, norm)  # floats, or 0-dim tensors for the scalar-tensor op


def _nag_backward(ctx, grad):
    z_pos, z_neg = ctx.saved_tensors
    g_pos, g_neg = nag_backward_torch(grad, z_pos, z_neg, *ctx.params)
    want_pos, want_neg = ctx.needs_input_grad[:2]
    no_grad = (None,) * 5  # scale, tau, alpha, norm, backend
    return (g_pos.to(z_pos.dtype) if want_pos else None, g_neg.to(z_neg.dtype) if want_neg else None, *no_grad)


nag_op.register_autograd(_nag_backward, setup_context=_nag_setup_context)
nag_scalar_tensors_op.register_autograd(_nag_backward, setup_context=_nag_setup_context)


def refuse_grad_in_place(fn_name: str, *tensors: torch.Tensor | None) -> None:
    """``out=`` runs an in-place op, which has no autograd formula: refuse it where a gradient would be needed rather
    than return a result silently cut from the graph."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{fn_name}(..., out=...) writes in place and is inference-only, but an input requires grad: "
            f"call {fn_name} without out= (differentiable), or under torch.no_grad()"
        )


# ----------------------------------------------------------------------------------------------------------------
# Public function


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

    with the factor 1 where ``||z_t|| = 0``; see ``nag_kernels.nag_reference`` for the exact semantics.

    Args:
        z_pos: ``(..., C)`` attention output under the positive context (heads merged, before the output
            projection). float32, float16 or bfloat16 (float64 on the ``"torch"`` backend). The last dim must be
            contiguous; leading dims may be strided (e.g. ``hidden[:, text_len:]``) and are not copied.
        z_neg: ``(..., C)`` attention output under the NAG-negative context; same shape, dtype and device.
        scale: extrapolation scale ``nag_scale`` (1 = NAG off; typical 3-11).
        tau: clamp of the norm ratio ``||z_t|| / ||z_pos||`` (> 0; typical 2.5).
        alpha: blend weight in [0, 1] (typical 0.125-0.5).
            Each scalar is a Python number or a 0-dim real tensor on any device (read with ``.item()``). Under
            ``torch.compile`` they may change between calls: dynamo makes a number dynamic the first time it
            changes (one recompile, then none), a tensor never recompiles; the values are validated when the
            compiled graph runs.
        norm: ``"l1"`` (the paper's, default) or ``"l2"`` (the authors' diffusers Flux file).
        out: optional ``(..., C)`` output tensor of the same dtype and device; may be ``z_pos`` itself (in place).
            Inference-only: refused when an input requires grad under grad mode.
        backend: ``"auto"`` (Triton on CUDA/ROCm and under ``TRITON_INTERPRET=1`` for float32/16/bf16, PyTorch
            otherwise, float64 included), ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., C)`` tensor in the input dtype (``out`` when given). Norms and arithmetic run in float32.
        Differentiable w.r.t. ``z_pos`` and ``z_neg`` (not the scalars) when ``out`` is not given.

    Example::

        >>> z_pos, z_neg = torch.randn(2, 1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
        >>> guided = nag_kernels.nag(z_pos, z_neg, scale=5.0, tau=2.5, alpha=0.25)
    """
    if torch.compiler.is_compiling():
        return _nag_compiling(z_pos, z_neg, scale, tau, alpha, norm, out, backend)
    scale, tau, alpha = (as_number(name, value) for name, value in zip(SCALARS, (scale, tau, alpha)))
    _check_inputs(z_pos, z_neg, scale, tau, alpha, norm, backend)  # before the op's own schema checks
    if out is not None:
        check_out(out, z_pos)
        refuse_grad_in_place("nag", z_pos, z_neg, out)
    if direct_call_ok(z_pos, z_neg, out):
        return _run(z_pos, z_neg, scale, tau, alpha, norm, validate_backend("z_pos", z_pos, backend), out)
    if out is None:
        return torch.ops.nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm, backend)
    torch.ops.nag_kernels.nag_out(out, z_pos, z_neg, scale, tau, alpha, norm, backend)
    return out


def _nag_compiling(z_pos, z_neg, scale, tau, alpha, norm, out, backend) -> torch.Tensor:
    """``nag`` while ``torch.compile`` traces: the scalar-tensor ops, so that changing scalars do not recompile.
    Everything but the scalar values is checked here; the values when the compiled graph runs."""
    _check_all_but_scalars(z_pos, z_neg, norm, backend)
    scalars = [as_scalar_tensor(name, value) for name, value in zip(SCALARS, (scale, tau, alpha))]
    if out is None:
        return torch.ops.nag_kernels.nag_scalar_tensors(z_pos, z_neg, *scalars, norm, backend)
    check_out(out, z_pos)
    refuse_grad_in_place("nag", z_pos, z_neg, out)
    torch.ops.nag_kernels.nag_out_scalar_tensors(out, z_pos, z_neg, *scalars, norm, backend)
    return out
