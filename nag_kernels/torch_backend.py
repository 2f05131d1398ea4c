"""NAG in fused PyTorch ops: the backend for machines without Triton (CPU, Apple MPS).

Same math as ``reference.nag_reference`` with fewer passes over memory: the extrapolation is one ``lerp``
(``lerp(z_neg, z_pos, scale) = scale * z_pos - (scale - 1) * z_neg``), the norms are two reductions straight into
``[..., 1]`` tensors (no expanded full-size ratio tensors as in the authors' formula), and the blend runs in place on
the extrapolated tensor. Computes in float32 (float64 for float64 inputs). ``scale == 1`` (NAG off) returns ``z_pos``
exactly. The forward takes Python numbers: the ops read 0-dim tensor scalars with ``.item()`` before any backend runs.

``nag_backward_torch`` is the combine's gradient, used by the ops' autograd formulas whichever backend ran the forward.
"""

from __future__ import annotations

import torch

from .compute import compute_dtype
from .reference import token_norm, where_nag_off


def nag_torch(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if scale == 1:  # NAG off (docs/spec.md, "The combine"): z_pos exactly, z_neg unread
        return z_pos.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(z_pos)
    dtype = compute_dtype(z_pos)
    zp = z_pos.to(dtype)
    zt = torch.lerp(z_neg.to(dtype), zp, float(scale))
    norm_pos = token_norm(zp, norm)
    norm_t = token_norm(zt, norm)
    one = torch.ones_like(norm_t)
    # factor = min(1, tau * |zp| / |zt|), 1 where |zt| = 0; torch.minimum keeps a NaN norm NaN.
    factor = torch.where(norm_t == 0, one, torch.minimum(one, norm_pos.mul_(tau).div_(norm_t)))
    result = zt.mul_(factor.mul_(alpha)).add_(zp, alpha=1 - alpha)
    if out is None:
        return result.to(z_pos.dtype)
    return out.copy_(result)


def _norm_grad(x: torch.Tensor, n: torch.Tensor, norm: str) -> torch.Tensor:
    """Gradient of the per-token norm ``n = ||x||`` w.r.t. ``x``: ``sign(x)`` for L1, ``x / n`` for L2 (0 at x = 0)."""
    if norm == "l1":
        return torch.sign(x)
    return x / torch.where(n == 0, torch.ones_like(n), n)


def nag_backward_torch(
    grad: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``nag`` w.r.t. ``z_pos`` and ``z_neg`` for the output gradient ``grad``, all ``[..., C]``.

    Recomputes the forward (``z_t``, ``n_pos = ||z_pos||``, ``n_t = ||z_t||``, ``factor``) and applies, per token,
    with ``h = alpha * <grad, z_t>`` and ``d||x||`` the norm's gradient (``_norm_grad``)::

        g_t   = alpha * factor * grad - [clamped] * h * factor / n_t * d||z_t||
        g_pos = scale * g_t + (1 - alpha) * grad + [clamped] * h * tau / n_t * d||z_pos||
        g_neg = (1 - scale) * g_t

    ``[clamped]`` is 1 on the tokens whose clamp is active (``tau * n_pos < n_t``, so ``factor = tau * n_pos / n_t``)
    and 0 elsewhere, where ``factor`` is the constant 1 (at the tie the one-sided gradient of the unclamped side is
    used). A NaN in a token's inputs or gradient makes that token's gradients NaN. At ``scale == 1`` (NAG off, the
    output is ``z_pos``) the gradients are ``grad`` and 0. The scalars are numbers or 0-dim tensors. Returns float32 tensors (float64 for float64 inputs); the caller casts them to the input dtypes.
    """
    dtype = compute_dtype(z_pos)
    g = grad.to(dtype)
    zp = z_pos.to(dtype)
    zt = scale * zp - (scale - 1) * z_neg.to(dtype)  # not lerp: scale may be a 0-dim tensor of another dtype
    n_pos = token_norm(zp, norm)
    n_t = token_norm(zt, norm)
    one = torch.ones_like(n_t)
    n_t_safe = torch.where(n_t == 0, one, n_t)  # NaN stays NaN
    ratio = tau * n_pos / n_t_safe
    factor = torch.where(n_t == 0, one, torch.minimum(one, ratio))  # as the forward; NaN propagates
    clamped = (ratio < 1) & (n_t != 0)
    h = alpha * (g * zt).sum(dim=-1, keepdim=True)
    coef = torch.where(clamped, h / n_t_safe, torch.zeros_like(h))
    g_t = alpha * factor * g - coef * factor * _norm_grad(zt, n_t, norm)
    g_pos = scale * g_t + (1 - alpha) * g + coef * tau * _norm_grad(zp, n_pos, norm)
    return where_nag_off(scale, g, g_pos), where_nag_off(scale, torch.zeros_like(g), (1 - scale) * g_t)
