"""The registered ops, the PyTorch backend and the public functions of the split combine (kernels: ``partial_norm.py``).

Registered ops (``torch.library``; fake impls for meta tensors and ``torch.compile(fullgraph=True)``)::

    nag_kernels::nag_partial_norms(z_pos, z_neg, float scale, str norm="l1", str backend="auto") -> Tensor
    nag_kernels::nag_with_norms(z_pos, z_neg, norms, float scale, float tau, float alpha, str norm="l1",
                                str backend="auto") -> Tensor
    nag_kernels::nag_with_norms_out(Tensor(a!) out, ...same...) -> ()

and their ``*_scalar_tensors`` twins (the scalars as 0-dim tensors), which the public functions call under
``torch.compile`` so that changing the scalars between calls does not recompile (see ``ops.py``). Both non-mutating
ops are differentiable w.r.t. their tensors (PyTorch formulas, ``*_backward_torch``); ``out=`` is inference-only.
"""

from __future__ import annotations

import math

import torch

from .checks import (
    SCALARS,
    as_number,
    as_scalar_tensor,
    check_backend,
    check_norm,
    check_pair,
    check_params,
    check_real,
    check_scalar_tensor,
)
from .ops import check_out, direct_call_ok, read_scalars, refuse_grad_in_place, validate_backend
from .partial_norm import _DTYPES, launch_partial_norms, launch_with_norms


# ----------------------------------------------------------------------------------------------------------------
# PyTorch backend and autograd formulas


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def partial_norms_torch(z_pos, z_neg, scale, norm="l1") -> torch.Tensor:
    """``nag_partial_norms`` in PyTorch ops: ``[..., 2]`` float32 (float64 for float64 inputs)."""
    dtype = _compute_dtype(z_pos)
    zp = z_pos.to(dtype)
    zt = torch.lerp(z_neg.to(dtype), zp, float(scale))  # scale * zp - (scale - 1) * zn, as torch_backend.nag_torch
    if norm == "l2":
        return torch.stack([zp.square().sum(-1), zt.square_().sum(-1)], dim=-1)
    return torch.stack([zp.abs().sum(-1), zt.abs_().sum(-1)], dim=-1)


def _norms_and_factor(norms, tau, norm, dtype):
    """The full norms ``(n_pos, n_t)`` (``[..., 1]`` each) from the sums, and the clamp factor; NaN stays NaN."""
    n = norms.to(dtype)
    if norm == "l2":
        n = n.sqrt()
    n_pos, n_t = n[..., 0:1], n[..., 1:2]
    one = torch.ones_like(n_t)
    n_t_safe = torch.where(n_t == 0, one, n_t)
    ratio = tau * n_pos / n_t_safe
    factor = torch.where(n_t == 0, one, torch.minimum(one, ratio))  # torch.minimum propagates NaN
    return n, n_pos, n_t, n_t_safe, ratio, factor


def with_norms_torch(z_pos, z_neg, norms, scale, tau, alpha, norm="l1", out=None) -> torch.Tensor:
    """``nag_with_norms`` in PyTorch ops (float32 math, float64 for float64 inputs)."""
    dtype = _compute_dtype(z_pos)
    zp = z_pos.to(dtype)
    zt = torch.lerp(z_neg.to(dtype), zp, float(scale))
    factor = _norms_and_factor(norms, float(tau), norm, dtype)[-1]
    result = zt.mul_(factor * alpha).add_(zp, alpha=1 - alpha)
    if out is None:
        return result.to(z_pos.dtype)
    return out.copy_(result)


def partial_norms_backward_torch(grad, z_pos, z_neg, scale, norm="l1"):
    """Gradients of ``nag_partial_norms`` w.r.t. ``z_pos`` and ``z_neg`` for ``grad [..., 2]``: with ``d`` the
    derivative of each summand (``sign(x)`` for L1, ``2 x`` for L2)::

        g_pos = grad[..., 0] * d(z_pos) + scale * grad[..., 1] * d(z_t),   g_neg = (1 - scale) * grad[..., 1] * d(z_t)

    ``scale`` is a number or a 0-dim tensor. float32 (float64 for float64 inputs); the caller casts.
    """
    dtype = _compute_dtype(z_pos)
    g = grad.to(dtype)
    zp = z_pos.to(dtype)
    zt = scale * zp - (scale - 1) * z_neg.to(dtype)
    d_pos, d_t = (torch.sign(zp), torch.sign(zt)) if norm == "l1" else (2 * zp, 2 * zt)
    g_t = g[..., 1:2] * d_t
    return g[..., 0:1] * d_pos + scale * g_t, (1 - scale) * g_t


def with_norms_backward_torch(grad, z_pos, z_neg, norms, scale, tau, alpha, norm="l1"):
    """Gradients of ``nag_with_norms`` w.r.t. ``z_pos``, ``z_neg`` and ``norms``.

    With ``factor`` the clamp factor of the given norms and ``h = alpha * <grad, z_t>`` per token::

        g_t = alpha * factor * grad;  g_pos = scale * g_t + (1 - alpha) * grad;  g_neg = (1 - scale) * g_t
        g_n_pos = [clamped] * h * tau / n_t;  g_n_t = -[clamped] * h * factor / n_t

    (``[clamped]``: ``tau * n_pos < n_t``; elsewhere the factor is the constant 1), and for L2 the chain rule through
    ``n = sqrt(sum)``: ``g_sum = g_n / (2 n)``. A NaN in a token's norms or ``h`` makes its norms' gradient NaN.
    float32 (float64 for float64 inputs); the caller casts.
    """
    dtype = _compute_dtype(z_pos)
    g = grad.to(dtype)
    zp = z_pos.to(dtype)
    zt = scale * zp - (scale - 1) * z_neg.to(dtype)
    n, _n_pos, n_t, n_t_safe, ratio, factor = _norms_and_factor(norms, tau, norm, dtype)
    g_t = alpha * factor * g
    g_pos = scale * g_t + (1 - alpha) * g
    h = alpha * (g * zt).sum(dim=-1, keepdim=True)
    clamped = (ratio < 1) & (n_t != 0)
    zero = torch.zeros_like(h)
    g_n_pos = torch.where(clamped, h * tau / n_t_safe, zero)
    g_n_t = torch.where(clamped, -h * factor / n_t_safe, zero)
    g_n = torch.cat([g_n_pos, g_n_t], -1)
    if norm == "l2":
        g_n = torch.where(g_n == 0, g_n, g_n / (2 * n))
    nan = torch.isnan(h) | torch.isnan(ratio)
    g_n = torch.where(nan, torch.full_like(g_n, math.nan), g_n)
    return g_pos, (1 - scale) * g_t, g_n


# ----------------------------------------------------------------------------------------------------------------
# Validation


def check_scale(scale) -> None:
    """``scale``: a finite real number (the value is checked outside tracing only, as ``checks.check_params``)."""
    check_real("scale", scale)
    if torch.compiler.is_compiling() or isinstance(scale, (torch.SymInt, torch.SymFloat)):
        return
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_norms(norms, z_pos) -> None:
    """``norms``: ``[..., 2]`` with ``z_pos``'s leading dims, float32 (or float64 with float64 ``z_pos``), on
    ``z_pos``'s device, any strides."""
    if not isinstance(norms, torch.Tensor):
        raise TypeError(f"norms must be a torch.Tensor, got {type(norms).__name__}")
    dtypes = (torch.float32, torch.float64) if z_pos.dtype == torch.float64 else (torch.float32,)
    if norms.dtype not in dtypes:
        raise TypeError(
            f"norms must have dtype in {[str(d) for d in dtypes]} (nag_partial_norms' sums), got {norms.dtype}"
        )
    expected = (*z_pos.shape[:-1], 2)
    if tuple(norms.shape) != expected:
        raise ValueError(
            f"norms must have shape [..., 2] = {expected} (z_pos's leading dims, then the sums for z_pos and z_t), "
            f"got {tuple(norms.shape)}"
        )
    if norms.device != z_pos.device:
        raise ValueError(f"norms must be on the device of z_pos ({z_pos.device}), got {norms.device}")


def _check_partial(z_pos, z_neg, norm, backend) -> None:
    check_pair(z_pos, z_neg, dtypes=_DTYPES)
    check_norm(norm)
    check_backend(backend)


def _check_with_norms(z_pos, z_neg, norms, norm, backend, out=None) -> None:
    _check_partial(z_pos, z_neg, norm, backend)
    check_norms(norms, z_pos)
    if out is not None:
        check_out(out, z_pos)


def _partial_impl(z_pos, z_neg, scale, norm, backend) -> torch.Tensor:
    _check_partial(z_pos, z_neg, norm, backend)
    check_scale(scale)
    backend = validate_backend("z_pos", z_pos, backend)
    return _run_partial(z_pos, z_neg, scale, norm, backend)


def _run_partial(z_pos, z_neg, scale, norm, backend) -> torch.Tensor:
    if backend == "triton":
        return launch_partial_norms(z_pos, z_neg, scale, norm)
    return partial_norms_torch(z_pos, z_neg, scale, norm)


def _with_norms_impl(z_pos, z_neg, norms, scale, tau, alpha, norm, backend, out=None) -> torch.Tensor:
    _check_with_norms(z_pos, z_neg, norms, norm, backend, out)
    check_params(scale, tau, alpha, norm)
    backend = validate_backend("z_pos", z_pos, backend)
    return _run_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm, backend, out)


def _run_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm, backend, out) -> torch.Tensor:
    if backend == "triton":
        return launch_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm, out=out)
    return with_norms_torch(z_pos, z_neg, norms, scale, tau, alpha, norm, out=out)


def _sums_like(z_pos: torch.Tensor) -> torch.Tensor:
    return z_pos.new_empty((*z_pos.shape[:-1], 2), dtype=_compute_dtype(z_pos))


# ----------------------------------------------------------------------------------------------------------------
# Registered ops: the scalars as floats, and as 0-dim tensors (called under torch.compile; see ops.py)


@torch.library.custom_op("nag_kernels::nag_partial_norms", mutates_args=())
def nag_partial_norms_op(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, norm: str = "l1", backend: str = "auto"
) -> torch.Tensor:
    return _partial_impl(z_pos, z_neg, scale, norm, backend)


@nag_partial_norms_op.register_fake
def _nag_partial_norms_fake(z_pos, z_neg, scale, norm="l1", backend="auto"):
    _check_partial(z_pos, z_neg, norm, backend)
    check_scale(scale)
    return _sums_like(z_pos)


@torch.library.custom_op("nag_kernels::nag_partial_norms_scalar_tensors", mutates_args=())
def nag_partial_norms_scalar_tensors_op(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: torch.Tensor, norm: str, backend: str
) -> torch.Tensor:
    return _partial_impl(z_pos, z_neg, *read_scalars(scale), norm, backend)


@nag_partial_norms_scalar_tensors_op.register_fake
def _nag_partial_norms_scalar_tensors_fake(z_pos, z_neg, scale, norm, backend):
    _check_partial(z_pos, z_neg, norm, backend)
    check_scalar_tensor("scale", scale)
    return _sums_like(z_pos)


@torch.library.custom_op("nag_kernels::nag_with_norms", mutates_args=())
def nag_with_norms_op(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> torch.Tensor:
    return _with_norms_impl(z_pos, z_neg, norms, scale, tau, alpha, norm, backend)


@nag_with_norms_op.register_fake
def _nag_with_norms_fake(z_pos, z_neg, norms, scale, tau, alpha, norm="l1", backend="auto"):
    _check_with_norms(z_pos, z_neg, norms, norm, backend)
    check_params(scale, tau, alpha, norm)
    return z_pos.new_empty(z_pos.shape)


@torch.library.custom_op("nag_kernels::nag_with_norms_out", mutates_args=("out",))
def nag_with_norms_out_op(
    out: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    backend: str = "auto",
) -> None:
    _with_norms_impl(z_pos, z_neg, norms, scale, tau, alpha, norm, backend, out)


@nag_with_norms_out_op.register_fake
def _nag_with_norms_out_fake(out, z_pos, z_neg, norms, scale, tau, alpha, norm="l1", backend="auto"):
    _check_with_norms(z_pos, z_neg, norms, norm, backend, out)
    check_params(scale, tau, alpha, norm)


@torch.library.custom_op("nag_kernels::nag_with_norms_scalar_tensors", mutates_args=())
def nag_with_norms_scalar_tensors_op(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: torch.Tensor,
    tau: torch.Tensor,
    alpha: torch.Tensor,
    norm: str,
    backend: str,
) -> torch.Tensor:
    return _with_norms_impl(z_pos, z_neg, norms, *read_scalars(scale, tau, alpha), norm, backend)


@nag_with_norms_scalar_tensors_op.register_fake
def _nag_with_norms_scalar_tensors_fake(z_pos, z_neg, norms, scale, tau, alpha, norm, backend):
    _check_with_norms(z_pos, z_neg, norms, norm, backend)
    for name, value in zip(SCALARS, (scale, tau, alpha)):
        check_scalar_tensor(name, value)
    return z_pos.new_empty(z_pos.shape)


@torch.library.custom_op("nag_kernels::nag_with_norms_out_scalar_tensors", mutates_args=("out",))
def nag_with_norms_out_scalar_tensors_op(
    out: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: torch.Tensor,
    tau: torch.Tensor,
    alpha: torch.Tensor,
    norm: str,
    backend: str,
) -> None:
    _with_norms_impl(z_pos, z_neg, norms, *read_scalars(scale, tau, alpha), norm, backend, out)


@nag_with_norms_out_scalar_tensors_op.register_fake
def _nag_with_norms_out_scalar_tensors_fake(out, z_pos, z_neg, norms, scale, tau, alpha, norm, backend):
    _check_with_norms(z_pos, z_neg, norms, norm, backend, out)
    for name, value in zip(SCALARS, (scale, tau, alpha)):
        check_scalar_tensor(name, value)


# Autograd (PyTorch formulas whichever backend ran the forward); the out= ops are inference-only.


def _partial_setup_context(ctx, inputs, output) -> None:
    z_pos, z_neg, scale, norm, _backend = inputs
    ctx.save_for_backward(z_pos, z_neg)
    ctx.params = (scale, norm)  # a float, or a 0-dim tensor for the scalar-tensor op


def _partial_backward(ctx, grad):
    z_pos, z_neg = ctx.saved_tensors
    g_pos, g_neg = partial_norms_backward_torch(grad, z_pos, z_neg, *ctx.params)
    want_pos, want_neg = ctx.needs_input_grad[:2]
    return (g_pos.to(z_pos.dtype) if want_pos else None, g_neg.to(z_neg.dtype) if want_neg else None, None, None, None)


def _with_norms_setup_context(ctx, inputs, output) -> None:
    z_pos, z_neg, norms, scale, tau, alpha, norm, _backend = inputs
    ctx.save_for_backward(z_pos, z_neg, norms)
    ctx.params = (scale, tau, alpha, norm)


def _with_norms_backward(ctx, grad):
    tensors = ctx.saved_tensors
    grads = with_norms_backward_torch(grad, *tensors, *ctx.params)
    wanted = ctx.needs_input_grad[:3]
    tensor_grads = (g.to(t.dtype) if want else None for g, t, want in zip(grads, tensors, wanted))
    return (*tensor_grads, None, None, None, None, None)  # scale, tau, alpha, norm, backend


nag_partial_norms_op.register_autograd(_partial_backward, setup_context=_partial_setup_context)
nag_partial_norms_scalar_tensors_op.register_autograd(_partial_backward, setup_context=_partial_setup_context)
nag_with_norms_op.register_autograd(_with_norms_backward, setup_context=_with_norms_setup_context)
nag_with_norms_scalar_tensors_op.register_autograd(_with_norms_backward, setup_context=_with_norms_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions


def nag_partial_norms(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float | torch.Tensor,
    norm: str = "l1",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """This shard's share of NAG's per-token norms, for a combine whose channels are split over ranks (TP).

    For each token (row of the last dim, this rank's ``C_local`` channels), with
    ``z_t = scale * z_pos - (scale - 1) * z_neg``::

        sums[..., 0] = sum_c |z_pos[..., c]|     sums[..., 1] = sum_c |z_t[..., c]|      (norm="l1")
        sums[..., 0] = sum_c z_pos[..., c] ** 2  sums[..., 1] = sum_c z_t[..., c] ** 2   (norm="l2": squares)

    accumulated in float32 whatever the input dtype. The caller sums ``sums`` over the ranks that hold the other
    channels of the same tokens (``torch.distributed.all_reduce(sums, group=tp_group)``, the default SUM) and passes
    the result to ``nag_with_norms``, which takes the square root for L2 itself. A NaN in a token's local channels
    makes its sums NaN (and, once reduced, that token's output NaN on every rank).

    Args:
        z_pos: ``(..., C_local)`` positive attention output, this rank's heads (merged). float32, float16 or
            bfloat16 (float64 on the ``"torch"`` backend); last dim contiguous, leading dims may be strided.
        z_neg: ``(..., C_local)`` NAG-negative attention output; same shape, dtype and device.
        scale: ``nag_scale``, a number or a 0-dim real tensor (changing it under ``torch.compile`` does not
            recompile).
        norm: ``"l1"`` (default) or ``"l2"``.
        backend: ``"auto"`` (Triton on CUDA/ROCm or under ``TRITON_INTERPRET=1``, PyTorch otherwise and for float64),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., 2)`` float32 tensor (float64 for float64 inputs), contiguous: the partial sums for ``z_pos`` and
        ``z_t``. Differentiable w.r.t. ``z_pos`` and ``z_neg``.
    """
    if torch.compiler.is_compiling():
        _check_partial(z_pos, z_neg, norm, backend)
        return torch.ops.nag_kernels.nag_partial_norms_scalar_tensors(
            z_pos, z_neg, as_scalar_tensor("scale", scale), norm, backend
        )
    scale = as_number("scale", scale)
    _check_partial(z_pos, z_neg, norm, backend)
    check_scale(scale)
    if direct_call_ok(z_pos, z_neg):
        return _run_partial(z_pos, z_neg, scale, norm, validate_backend("z_pos", z_pos, backend))
    return torch.ops.nag_kernels.nag_partial_norms(z_pos, z_neg, scale, norm, backend)


def nag_with_norms(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: float | torch.Tensor,
    tau: float | torch.Tensor = 2.5,
    alpha: float | torch.Tensor = 0.25,
    norm: str = "l1",
    out: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The NAG combine of this shard's channels, with the token norms given (reduced over the ranks by the caller).

    ``norms`` are the full-row sums of ``nag_partial_norms`` after the caller's all-reduce over the ranks holding the
    token's other channels: ``(sum |z_pos|, sum |z_t|)`` (L1), or the sums of squares (L2; their square root is taken
    here). Then per token, on the local channels, with ``z_t = scale * z_pos - (scale - 1) * z_neg``::

        factor = min(1, tau * ||z_pos|| / ||z_t||)     (1 where ||z_t|| = 0; NaN norms -> NaN)
        out    = alpha * factor * z_t + (1 - alpha) * z_pos

    in float32 (float64 for float64 inputs), cast to the input dtype. ``sums`` from the same channels without a
    reduction give exactly ``nag_kernels.nag(z_pos, z_neg, scale, tau, alpha, norm=norm)`` (up to float rounding).

    Args:
        z_pos, z_neg: ``(..., C_local)`` as for ``nag_partial_norms``.
        norms: ``(..., 2)`` reduced sums, float32 (float64 also with float64 inputs), same device, any strides.
        scale, tau, alpha: ``nag_scale`` (1 = off), ``nag_tau`` (> 0), ``nag_alpha`` (in [0, 1]); numbers or 0-dim
            real tensors (changing them under ``torch.compile`` does not recompile).
        norm: ``"l1"`` or ``"l2"``, as given to ``nag_partial_norms``.
        out: optional ``(..., C_local)`` output, same dtype and device, last dim contiguous; may be ``z_pos``.
            Inference-only: refused when an input requires grad under grad mode.
        backend: as ``nag_partial_norms``.

    Returns:
        ``(..., C_local)`` in the input dtype (``out`` when given). Without ``out``, differentiable w.r.t. ``z_pos``,
        ``z_neg`` and ``norms``.
    """
    if torch.compiler.is_compiling():
        _check_with_norms(z_pos, z_neg, norms, norm, backend, out)
        scalars = [as_scalar_tensor(name, value) for name, value in zip(SCALARS, (scale, tau, alpha))]
        if out is None:
            return torch.ops.nag_kernels.nag_with_norms_scalar_tensors(z_pos, z_neg, norms, *scalars, norm, backend)
        refuse_grad_in_place("nag_with_norms", z_pos, z_neg, norms, out)
        torch.ops.nag_kernels.nag_with_norms_out_scalar_tensors(out, z_pos, z_neg, norms, *scalars, norm, backend)
        return out
    scale, tau, alpha = (as_number(name, value) for name, value in zip(SCALARS, (scale, tau, alpha)))
    _check_with_norms(z_pos, z_neg, norms, norm, backend, out)
    check_params(scale, tau, alpha, norm)
    if out is not None:
        refuse_grad_in_place("nag_with_norms", z_pos, z_neg, norms, out)
    if direct_call_ok(z_pos, z_neg, norms, out):
        backend = validate_backend("z_pos", z_pos, backend)
        return _run_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm, backend, out)
    if out is None:
        return torch.ops.nag_kernels.nag_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm, backend)
    torch.ops.nag_kernels.nag_with_norms_out(out, z_pos, z_neg, norms, scale, tau, alpha, norm, backend)
    return out
