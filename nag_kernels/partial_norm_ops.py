"""The split combine as registered ops, its PyTorch backend and the public functions (kernels: ``partial_norm.py``).

Declared through ``op_factory``, which registers (``torch.library``; fake impls for meta tensors and
``torch.compile(fullgraph=True)``)::

    nag_kernels::nag_partial_norms(z_pos, z_neg, float scale, str norm="l1", str backend="auto") -> Tensor
    nag_kernels::nag_with_norms(z_pos, z_neg, norms, float scale, float tau, float alpha, str norm="l1",
                                str backend="auto") -> Tensor
    nag_kernels::nag_with_norms_out(Tensor(a!) out, ...same...) -> ()

and their ``*_scalar_tensors`` twins (the scalars as 0-dim tensors), which the public functions call under
``torch.compile`` so that changing the scalars between calls does not recompile. Both non-mutating ops are
differentiable w.r.t. their tensors (PyTorch formulas, ``*_backward_torch``); ``out=`` is inference-only.
"""

from __future__ import annotations

import math

import torch

from .checks import check_pair
from .compute import compute_dtype
from .op_factory import OpSpec, define
from .partial_norm import _DTYPES, launch_partial_norms, launch_with_norms
from .reference import where_nag_off

# ----------------------------------------------------------------------------------------------------------------
# PyTorch backend and autograd formulas


def partial_norms_torch(z_pos, z_neg, scale, norm="l1") -> torch.Tensor:
    """``nag_partial_norms`` in PyTorch ops: ``[..., 2]`` float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(z_pos)
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
    """``nag_with_norms`` in PyTorch ops (float32 math, float64 for float64 inputs); ``z_pos`` exactly at
    ``scale == 1``. The scalars are Python numbers (the ops read tensors first)."""
    if scale == 1:  # NAG off (docs/spec.md, "The combine")
        return z_pos.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(z_pos)
    dtype = compute_dtype(z_pos)
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
    dtype = compute_dtype(z_pos)
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
    At ``scale == 1`` (output ``z_pos``): ``grad``, 0 and 0. The scalars are numbers or 0-dim tensors. float32
    (float64 for float64 inputs); the caller casts.
    """
    dtype = compute_dtype(z_pos)
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
    zero = torch.zeros_like(g)
    return (where_nag_off(scale, g, g_pos), where_nag_off(scale, zero, (1 - scale) * g_t),
            where_nag_off(scale, torch.zeros_like(g_n), g_n))


# ----------------------------------------------------------------------------------------------------------------
# Validation


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


def _check_with_norms(z_pos, z_neg, norms) -> None:
    check_pair(z_pos, z_neg, dtypes=_DTYPES)
    check_norms(norms, z_pos)


def _sums_like(z_pos: torch.Tensor) -> torch.Tensor:
    return z_pos.new_empty((*z_pos.shape[:-1], 2), dtype=compute_dtype(z_pos))


def _example() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 21, generator=g)[:, 1:], torch.randn(2, 3, 21, generator=g)


def _example_with_norms() -> tuple[torch.Tensor, ...]:
    z_pos, z_neg = _example()
    return z_pos, z_neg, partial_norms_torch(z_pos, z_neg, 5.0)


# ----------------------------------------------------------------------------------------------------------------
# The ops (op_factory generates the registered variants, fake impls, autograd and dispatch)


NAG_PARTIAL_NORMS = define(
    OpSpec(
        name="nag_partial_norms",
        tensors=("z_pos", "z_neg"),
        scalars=("scale",),
        main="z_pos",
        check=lambda z_pos, z_neg: check_pair(z_pos, z_neg, dtypes=_DTYPES),
        new_result=lambda z_pos, z_neg: _sums_like(z_pos),
        torch_impl=partial_norms_torch,
        triton_impl=launch_partial_norms,
        backward=partial_norms_backward_torch,
        has_out=False,
        example=_example,
    )
)

NAG_WITH_NORMS = define(
    OpSpec(
        name="nag_with_norms",
        tensors=("z_pos", "z_neg", "norms"),
        scalars=("scale", "tau", "alpha"),
        main="z_pos",
        check=_check_with_norms,
        new_result=lambda z_pos, z_neg, norms: z_pos.new_empty(z_pos.shape),
        torch_impl=with_norms_torch,
        triton_impl=launch_with_norms,
        backward=with_norms_backward_torch,
        has_out=True,
        example=_example_with_norms,
    )
)


# ----------------------------------------------------------------------------------------------------------------
# Public functions


@NAG_PARTIAL_NORMS.public(legacy_positional=("norm",))
def nag_partial_norms(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    norm: str = "l1",
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
        scale: ``nag_scale`` (>= 1), a number or a 0-dim real tensor (changing it under ``torch.compile`` does not
            recompile).
        norm: ``"l1"`` (default) or ``"l2"``; keyword-only (positional still works, with a DeprecationWarning).
        backend: ``"auto"`` (Triton on CUDA/ROCm or under ``TRITON_INTERPRET=1``, PyTorch otherwise and for float64),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``(..., 2)`` float32 tensor (float64 for float64 inputs), contiguous: the partial sums for ``z_pos`` and
        ``z_t``. Differentiable w.r.t. ``z_pos`` and ``z_neg``.
    """
    return NAG_PARTIAL_NORMS((z_pos, z_neg), (scale,), norm=norm, out=None, backend=backend)


@NAG_WITH_NORMS.public(legacy_positional=("norm", "out"))
def nag_with_norms(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    norms: torch.Tensor,
    scale: float | torch.Tensor,
    tau: float | torch.Tensor = 2.5,
    alpha: float | torch.Tensor = 0.25,
    *,
    norm: str = "l1",
    out: torch.Tensor | None = None,
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
        scale, tau, alpha: ``nag_scale`` (>= 1; 1 = off: returns ``z_pos``), ``nag_tau`` (> 0), ``nag_alpha`` (in
            [0, 1]); numbers or 0-dim real tensors (changing them under ``torch.compile`` does not recompile).
        norm: ``"l1"`` or ``"l2"``, as given to ``nag_partial_norms``.
        out: optional ``(..., C_local)`` output, same dtype and device, last dim contiguous; may be ``z_pos`` or
            ``z_neg`` (the same view: in place), or overlap the inputs otherwise (computed into a temporary, then
            copied); its own elements must not overlap. Inference-only: refused when an input requires grad under
            grad mode.
        ``norm`` and ``out`` are keyword-only (positional still works, with a DeprecationWarning).
        backend: as ``nag_partial_norms``.

    Returns:
        ``(..., C_local)`` in the input dtype (``out`` when given). Without ``out``, differentiable w.r.t. ``z_pos``,
        ``z_neg`` and ``norms``.
    """
    return NAG_WITH_NORMS((z_pos, z_neg, norms), (scale, tau, alpha), norm=norm, out=out, backend=backend)
