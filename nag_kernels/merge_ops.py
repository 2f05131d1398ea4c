"""The fast-mode merge as a registered op, its PyTorch backend and the public ``nag_merge`` (through ``op_factory``).

Registered: ``torch.ops.nag_kernels.nag_merge(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, scale, tau, alpha,
norm="l1", backend="auto")`` returns a new ``[B, N, H, D]`` tensor, ``nag_merge_out(out, ...)`` writes into ``out``,
and their ``*_scalar_tensors`` twins take the scalars as 0-dim tensors (what ``nag_merge`` calls under
``torch.compile``); ``op_factory`` generates all four, their fake impls and the autograd formula w.r.t. the six
``o_*``/``lse_*`` tensors (``nag_merge_backward_torch``, PyTorch ops whichever backend ran the forward).

Backends, chosen as for ``nag`` (``op_factory.validate_backend``): ``"triton"`` is the fused kernel of ``merge.py``
(CUDA/ROCm, or CPU under ``TRITON_INTERPRET=1``); ``"torch"`` is ``nag_merge_torch`` below, PyTorch ops on any device
(and the only one that takes float64); ``"auto"`` picks Triton where it can run and the dtype is not float64.
"""

from __future__ import annotations

import torch

from .checks import check_float_tensor, check_last_dim_contiguous, check_like
from .compute import compute_dtype
from .op_factory import OpSpec, define
from .torch_backend import nag_backward_torch, nag_torch

O_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Validation (merge-specific; the scalar and tensor helpers come from checks.py)


def check_merge_inputs(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg) -> None:
    """``o_*``: ``[B, N, H, D]``, one float dtype and device, last dim contiguous. ``lse_*``: ``[B, N, H]`` on the same
    device, float32 (float32 or float64 when ``o_*`` are float64), any strides."""
    check_float_tensor("o_pos", o_pos, O_DTYPES)
    if o_pos.dim() != 4:
        raise ValueError(f"o_pos must be 4-D [B, N, H, D] (batch, tokens, heads, head_dim), got shape {tuple(o_pos.shape)}")
    check_like("o_shared", o_shared, "o_pos", o_pos)
    check_like("o_neg", o_neg, "o_pos", o_pos)
    for name, o in (("o_shared", o_shared), ("o_pos", o_pos), ("o_neg", o_neg)):
        check_last_dim_contiguous(name, o)
    lse_dtypes = (torch.float32, torch.float64) if o_pos.dtype == torch.float64 else (torch.float32,)
    lse_shape = tuple(o_pos.shape[:3])
    for name, lse in (("lse_shared", lse_shared), ("lse_pos", lse_pos), ("lse_neg", lse_neg)):
        if not isinstance(lse, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(lse).__name__}")
        if lse.dtype not in lse_dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in lse_dtypes]}, got {lse.dtype}")
        if tuple(lse.shape) != lse_shape:
            raise ValueError(
                f"{name} must have shape [B, N, H] = {lse_shape} (pass SDPA's [B, H, N] LSE as lse.transpose(1, 2)), "
                f"got {tuple(lse.shape)}"
            )
        if lse.device != o_pos.device:
            raise ValueError(f"{name} must be on the device of o_pos ({o_pos.device}), got {lse.device}")


# ----------------------------------------------------------------------------------------------------------------
# PyTorch backend


def _merge_weights(lse_a: torch.Tensor, lse_b: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized LSE-merge weights ``w_a + w_b = 1`` of two parts, ``[B, N, H]`` in ``dtype`` (both 0 where both
    parts are empty, NaN where an LSE is NaN)."""
    la, lb = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(la, lb)  # propagates NaN: a NaN LSE gives NaN weights
    m = m.masked_fill(torch.isneginf(m), 0.0)  # both empty: weights exp(-inf) = 0
    w_a = (la - m).exp_()
    w_b = (lb - m).exp_()
    denom = w_a + w_b
    denom.masked_fill_(denom == 0, 1.0)
    return w_a.div_(denom), w_b.div_(denom)


def _merge_torch(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, dtype) -> torch.Tensor:
    """LSE merge of two parts in ``dtype``: normalized weights on ``[B, N, H]``, then one multiply and one addcmul."""
    w_a, w_b = _merge_weights(lse_a, lse_b, dtype)
    return (o_a * w_a[..., None]).addcmul_(o_b.to(dtype), w_b[..., None])


def nag_merge_torch(
    o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, scale, tau, alpha, norm="l1", out=None
) -> torch.Tensor:
    """Merge + NAG in PyTorch ops (float32, or float64 for float64 inputs); same semantics as the kernel."""
    dtype = compute_dtype(o_pos)
    o_s = o_shared.to(dtype)
    z_pos = _merge_torch(o_s, lse_shared, o_pos, lse_pos, dtype)
    z_neg = _merge_torch(o_s, lse_shared, o_neg, lse_neg, dtype)
    result = nag_torch(z_pos.flatten(-2), z_neg.flatten(-2), scale, tau, alpha, norm).unflatten(-1, o_pos.shape[-2:])
    if out is None:
        return result.to(o_pos.dtype).contiguous()
    return out.copy_(result)


def nag_merge_backward_torch(
    grad, o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, scale, tau, alpha, norm="l1"
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``nag_merge`` w.r.t. ``(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg)`` for the output
    gradient ``grad``, in float32 (float64 for float64 ``o_*``); the caller casts them to the input dtypes.

    Recomputes the merged ``z_pos``/``z_neg`` and their weights, takes the combine's gradients ``g_z`` from
    ``nag_backward_torch`` and, for each branch ``z = w_s * o_shared + w_b * o_b`` (``w_s + w_b = 1``), applies::

        d o_shared += w_s * g_z     d o_b = w_b * g_z
        d lse_shared += w_s * w_b * <g_z, o_shared - o_b>     d lse_b = -w_s * w_b * <g_z, o_shared - o_b>

    with ``<,>`` the sum over ``head_dim``. An empty part (LSE ``-inf``) gets zero gradients; a NaN stays NaN.
    """
    dtype = compute_dtype(o_pos)
    o_s = o_shared.to(dtype)
    branches = []
    for o_b, lse_b in ((o_pos, lse_pos), (o_neg, lse_neg)):
        w_s, w_b = _merge_weights(lse_shared, lse_b, dtype)
        o_b = o_b.to(dtype)
        branches.append((o_b, w_s, w_b, o_s * w_s[..., None] + o_b * w_b[..., None]))
    (_, _, _, z_pos), (_, _, _, z_neg) = branches
    g_zs = nag_backward_torch(grad.flatten(-2), z_pos.flatten(-2), z_neg.flatten(-2), scale, tau, alpha, norm)
    g_o_s, g_lse_s, per_branch = 0, 0, []
    for (o_b, w_s, w_b, _), g_z in zip(branches, g_zs):
        g_z = g_z.unflatten(-1, o_pos.shape[-2:])
        g_lse = w_s * w_b * (g_z * (o_s - o_b)).sum(dim=-1)
        g_o_s = g_o_s + w_s[..., None] * g_z
        g_lse_s = g_lse_s + g_lse
        per_branch += [w_b[..., None] * g_z, -g_lse]
    return (g_o_s, g_lse_s, *per_branch)


def _nag_merge_triton(*args, out=None) -> torch.Tensor:
    # imports Triton: only when the Triton backend runs
    from .merge import nag_merge_triton

    return nag_merge_triton(*args, out=out)


def _example() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    o_shared = torch.randn(1, 5, 3, 20, generator=g)[:, 2:]  # strided leading dims
    o_pos, o_neg = (torch.randn(1, 3, 3, 20, generator=g) for _ in range(2))
    lse_shared, lse_pos, lse_neg = (torch.randn(1, 3, 3, generator=g).mul(3).transpose(1, 2) for _ in range(3))
    return o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg


NAG_MERGE = define(
    OpSpec(
        name="nag_merge",
        tensors=("o_shared", "lse_shared", "o_pos", "lse_pos", "o_neg", "lse_neg"),
        scalars=("scale", "tau", "alpha"),
        main="o_pos",
        check=check_merge_inputs,
        new_result=lambda o_shared, lse_shared, o_pos, *_: o_pos.new_empty(o_pos.shape),
        torch_impl=lambda *args, out=None: nag_merge_torch(*args, out=out),
        triton_impl=_nag_merge_triton,
        backward=nag_merge_backward_torch,
        has_out=True,
        example=_example,
    )
)


# ----------------------------------------------------------------------------------------------------------------
# Public function


@NAG_MERGE.public
def nag_merge(
    o_shared: torch.Tensor,
    lse_shared: torch.Tensor,
    o_pos: torch.Tensor,
    lse_pos: torch.Tensor,
    o_neg: torch.Tensor,
    lse_neg: torch.Tensor,
    scale: float | torch.Tensor,
    tau: float | torch.Tensor = 2.5,
    alpha: float | torch.Tensor = 0.25,
    *,
    norm: str = "l1",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fast-mode NAG epilogue, fused: merge a shared partial attention into each branch, then NAG-combine.

    Per token and head, each branch's output is the log-sum-exp merge of the shared part (keys both branches
    attend to) and the branch's own part::

        z_b = (exp(lse_shared - m) * o_shared + exp(lse_b - m) * o_b) / (exp(lse_shared - m) + exp(lse_b - m))

    with ``m = max(lse_shared, lse_b)`` (a part with LSE ``-inf`` has weight 0, both empty give 0); then with heads
    joined (``C = H * D``) ``out = nag(z_pos, z_neg, scale, tau, alpha)``. Exact semantics:
    ``nag_kernels.nag_merge_reference``.

    Args:
        o_shared: ``(batch, seqlen, heads, head_dim)`` attention of the queries over the shared keys (the layout
            diffusers' ``dispatch_attention_fn`` returns). float32, float16 or bfloat16 (float64 on ``"torch"``).
            Last dim contiguous; other dims may be strided (not copied).
        lse_shared: ``(batch, seqlen, heads)`` float32 natural-log-sum-exp of the scores of ``o_shared``, any strides:
            pass SDPA's ``(batch, heads, seqlen)`` LSE as ``lse.transpose(1, 2)``.
        o_pos, lse_pos: the same for the positive branch's own keys (e.g. its text tokens).
        o_neg, lse_neg: the same for the NAG-negative branch's own keys.
        scale: NAG scale, >= 1 (1 = off: the merged positive branch, exactly; typical 3-11). tau: norm-ratio clamp (> 0, typical 2.5). alpha: blend in [0, 1].
            Python numbers or 0-dim real tensors, as for ``nag`` (they may change between calls under
            ``torch.compile`` without recompiling each time).
        norm: ``"l1"`` (default, the paper's) or ``"l2"``.
        out: optional ``(batch, seqlen, heads, head_dim)`` output with o_pos's dtype and device, last dim
            contiguous, keyword-only; may be one of the ``o_*`` inputs itself (the same view: in place), or overlap
            the inputs otherwise (computed into a temporary, then copied); its own elements must not overlap.
            Inference-only: refused when an input requires grad under grad mode.
        backend: ``"auto"`` (Triton on CUDA/ROCm and under ``TRITON_INTERPRET=1`` for float32/16/bf16, PyTorch
            otherwise, float64 included), ``"triton"`` or ``"torch"``.

    Returns:
        ``(batch, seqlen, heads, head_dim)`` in o_pos's dtype (``out`` when given). Merge and norms run in float32.
        Differentiable w.r.t. the ``o_*`` and ``lse_*`` tensors (not the scalars) when ``out`` is not given.

    Example::

        >>> from nag_kernels.attention import attention_with_lse
        >>> o_img, lse_img = attention_with_lse(q_img, k_img, v_img)       # shared: image keys
        >>> o_p, lse_p = attention_with_lse(q_img, k_txt_pos, v_txt_pos)   # positive text keys
        >>> o_n, lse_n = attention_with_lse(q_img, k_txt_neg, v_txt_neg)   # NAG-negative text keys
        >>> guided = nag_kernels.nag_merge(o_img, lse_img, o_p, lse_p, o_n, lse_n, scale=5.0)
    """
    tensors = (o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg)
    return NAG_MERGE(tensors, (scale, tau, alpha), norm=norm, out=out, backend=backend)
