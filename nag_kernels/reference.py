"""The specification of Normalized Attention Guidance in plain PyTorch.

Everything else in this package (the Triton kernels, the fast PyTorch backend, the diffusers integration) is tested
against the functions in this file. They favour readability over speed and compute in float32, or in float64 when
the inputs are float64, whatever the input dtype.

For one token with positive and NAG-negative attention outputs ``z_pos`` and ``z_neg`` (heads merged, shape
``[C]``, taken before the attention's output projection)::

    z_t    = scale * z_pos - (scale - 1) * z_neg                 # extrapolation
    factor = min(1, tau * ||z_pos|| / ||z_t||), 1 if ||z_t|| = 0  # clamp the norm ratio ||z_t|| / ||z_pos|| at tau
    out    = alpha * factor * z_t + (1 - alpha) * z_pos          # blend

with ``scale >= 1``; ``scale == 1`` turns NAG off and returns ``z_pos`` exactly, whatever ``tau``, ``alpha`` and
``z_neg`` (the formula alone would give ``(1 - alpha + alpha * min(1, tau)) * z_pos``). The norm is taken per token over the whole last dim (all heads together), L1 by default. Where both norms are
non-zero this equals the authors' ``z_t * min(r, tau) / r`` with ``r = ||z_t|| / ||z_pos||``; unlike theirs it is
finite for an all-zero token. A NaN anywhere in a token's inputs makes that token's output NaN, and only that token's.
The prose specification is docs/spec.md, The combine (``nag_reference``) and The LSE merge (``merge_attention_reference``,
``nag_merge_reference``).
"""

from __future__ import annotations

import torch

from .checks import NORMS, SCALARS, as_number, check_norm, check_params
from .compute import compute_dtype


def where_nag_off(scale, z_pos: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result``, or a copy of ``z_pos`` where ``scale == 1`` (NAG off: ``z_pos`` exactly, docs/spec.md "The
    combine"). A 0-dim tensor ``scale`` is not branched on in Python, whose value ``torch.compile`` may not know while
    it traces (and the autograd formulas of the ops are traced): ``torch.where`` picks ``z_pos`` element by element, so
    the math itself gives ``z_pos`` exactly. ``z_pos`` and ``result`` broadcast to ``result``'s shape."""
    if isinstance(scale, torch.Tensor):
        return torch.where(scale.to(result.device) == 1, z_pos, result)
    return torch.broadcast_to(z_pos, result.shape).clone() if scale == 1 else result


def check_reference_params(scale, tau, alpha, norm) -> None:
    """``checks.check_params`` for the reference functions, which also take 0-dim tensor scalars (read with
    ``.item()``). While ``torch.compile`` traces only ``norm`` is checked: the values may be symbolic."""
    if torch.compiler.is_compiling():
        check_norm(norm)
        return
    check_params(*(as_number(name, value) for name, value in zip(SCALARS, (scale, tau, alpha))), norm)


def token_norm(x: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Per-token norm over the last dim, kept as a size-1 dim, in the dtype of ``x``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return torch.linalg.vector_norm(x, ord=1 if norm == "l1" else 2, dim=-1, keepdim=True)


def nag_reference(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float = 2.5,
    alpha: float = 0.25,
    *,
    norm: str = "l1",
) -> torch.Tensor:
    """NAG combine of two attention outputs of shape ``[..., C]``; returns ``[..., C]`` in the input dtype.

    Args:
        z_pos: attention output under the positive context, ``[..., C]``.
        z_neg: attention output under the NAG-negative context, same shape and dtype.
        scale: extrapolation scale ("nag_scale"), ``>= 1``; 1 turns NAG off (returns ``z_pos``). The paper's phi is
            ``scale - 1``.
        tau: the largest allowed ratio ``||z_t|| / ||z_pos||`` ("nag_tau").
        alpha: blend weight of the guided output ("nag_alpha"); 0 returns ``z_pos``.
        norm: ``"l1"`` (the paper's) or ``"l2"`` (the authors' diffusers Flux file).

    The scalars are numbers or 0-dim tensors; ``ValueError`` for ``scale < 1``, ``tau <= 0``, ``alpha`` outside
    [0, 1] or a non-finite value, as every op.
    """
    check_reference_params(scale, tau, alpha, norm)
    dtype = compute_dtype(z_pos)
    zp = z_pos.to(dtype)
    zn = z_neg.to(dtype)
    zt = scale * zp - (scale - 1) * zn
    norm_pos = token_norm(zp, norm)
    norm_t = token_norm(zt, norm)
    # torch.minimum propagates NaN, so a NaN norm makes the whole token NaN (never hidden).
    factor = torch.where(norm_t == 0, torch.ones_like(norm_t), torch.minimum(torch.ones_like(norm_t), tau * norm_pos / norm_t))
    out = alpha * (factor * zt) + (1 - alpha) * zp
    return where_nag_off(scale, zp, out).to(z_pos.dtype)


def merge_attention_reference(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Merge two partial attention outputs over disjoint key sets into the attention over their union.

    ``o_*`` are ``[..., H, D]`` and ``lse_*`` the matching natural-log-sum-exp of the scores, ``[..., H]``. With
    ``m = max(lse_a, lse_b)``::

        o = (exp(lse_a - m) * o_a + exp(lse_b - m) * o_b) / (exp(lse_a - m) + exp(lse_b - m))

    An empty part has ``lse = -inf`` and weight 0; when both parts are empty the output is 0. Returns float32
    (float64 for float64 inputs).
    """
    dtype = compute_dtype(o_a)
    la = lse_a.to(dtype)
    lb = lse_b.to(dtype)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both empty: weights exp(-inf) = 0, output 0
    wa = torch.exp(la - m)
    wb = torch.exp(lb - m)
    denom = wa + wb
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    o = (wa[..., None] * o_a.to(dtype) + wb[..., None] * o_b.to(dtype)) / denom[..., None]
    return o


def nag_merge_reference(
    o_shared: torch.Tensor,
    lse_shared: torch.Tensor,
    o_pos: torch.Tensor,
    lse_pos: torch.Tensor,
    o_neg: torch.Tensor,
    lse_neg: torch.Tensor,
    scale: float,
    tau: float = 2.5,
    alpha: float = 0.25,
    *,
    norm: str = "l1",
) -> torch.Tensor:
    """Fast-mode epilogue: merge a shared partial attention with each branch's part, then NAG-combine.

    ``o_*`` are ``[..., H, D]`` partial attention outputs of the same queries over disjoint key sets (``o_shared``
    over the keys both branches share, ``o_pos``/``o_neg`` over each branch's own keys); ``lse_*`` are ``[..., H]``.
    The positive and negative full outputs are merged per head (``merge_attention_reference``), heads are joined
    to ``[..., H * D]`` and combined by ``nag_reference``. Returns ``[..., H, D]`` in the dtype of ``o_pos``.
    """
    z_pos = merge_attention_reference(o_shared, lse_shared, o_pos, lse_pos)
    z_neg = merge_attention_reference(o_shared, lse_shared, o_neg, lse_neg)
    out = nag_reference(z_pos.flatten(-2), z_neg.flatten(-2), scale, tau, alpha, norm=norm)
    return out.unflatten(-1, o_pos.shape[-2:]).to(o_pos.dtype)


def nag_authors_formula(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float = 2.5, alpha: float = 0.25, *, norm: str = "l1"
) -> torch.Tensor:
    """The authors' eager formula as they wrote it (their diffusers Flux file, with the norm made selectable).

    Kept as a baseline for benchmarks and as a second opinion in tests. It divides ``0 / 0`` for an all-zero token
    (NaN) and computes in the input dtype, so fp16 L1 norms over wide tokens overflow. Do not use it for real work.
    """
    p = 1 if norm == "l1" else 2
    guidance = z_pos * scale - z_neg * (scale - 1)
    norm_positive = torch.norm(z_pos, p=p, dim=-1, keepdim=True).expand(*z_pos.shape)
    norm_guidance = torch.norm(guidance, p=p, dim=-1, keepdim=True).expand(*guidance.shape)
    ratio = norm_guidance / norm_positive
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guidance * alpha + z_pos * (1 - alpha)
