"""Attention that also returns the log-sum-exp of the scores, from PyTorch's own SDPA kernels.

Fast mode (docs/spec.md, "Fast mode") splits the attention of the image queries into a part over the shared keys and a part
per branch, and merges them with ``nag_merge``; each part must come with its LSE. ``attention_with_lse`` returns
both for ``[B, S, H, D]`` inputs (diffusers' layout)::

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h]              # [B, Nq, H, D]
    lse[b, i, h] = log sum_j exp(scale * q[b, i, h] . k[b, j, h])   (natural log)          # [B, Nq, H]

``lse`` is a strided view of the kernel's ``[B, H, Nq]`` LSE (``nag_merge`` reads it in place), float32, or float64
for float64 inputs on the CPU kernels. Zero keys give ``out = 0`` and ``lse = -inf`` (the math path), the merge's
"empty part".

Backends (the ``backend`` argument), all maintained PyTorch ops, none home-made; ``"auto"`` takes the first that
supports the inputs, in this order:

========== =================================================================== =======================================
device     order for ``"auto"``                                                 constraints checked here
========== =================================================================== =======================================
CUDA/ROCm  ``"cudnn"`` first on Hopper (sm90) only: see below                    fp16/bf16, D % 8 == 0, D <= 128
           ``"flash"``: ``aten._scaled_dot_product_flash_attention``           fp16/bf16, D % 8 == 0, D <= 256, sm80+
           ``"efficient"``: ``aten._scaled_dot_product_efficient_attention``   fp16/fp32 (bf16 on sm80+), D % 8 == 0
           (``compute_log_sumexp=True``; its LSE is padded to a multiple of 32 queries and sliced back here)
           ``"math"``
CPU        ``"cpu_flash"``: ``aten._scaled_dot_product_flash_attention_for_cpu``  fp32/fp64/fp16/bf16
           ``"math"``
meta       as CUDA (meta tensors stand in for a GPU run: shapes and FLOP counts), without the compute-capability check
other      ``"math"``
========== =================================================================== =======================================

``"cudnn"`` (``aten._scaled_dot_product_cudnn_attention``, fp16/bf16, D % 8 == 0, D <= 128, sm80+; LSE
``[B, H, Nq, 1]``) comes first on Hopper GPUs, as it does in PyTorch's own SDPA choice there: on an H200 (torch 2.11,
the step profile in docs/performance.md) FLUX.1's plain attention ran in cuDNN's Hopper kernel at 23.3 ms per step
while fast mode's split parts, about the same FLOPs, took 44.3 ms in the ``"flash"`` kernel. Its LSE output and the
merge were verified on that H200 (``tests/kernels/test_merge_cuda.py``); elsewhere it is used only when asked for, since
what it accepts depends on the installed cuDNN version.
``"math"`` is two ``matmul``s and an explicit ``logsumexp`` in float32 (float64 for float64), any device and dtype;
it materializes the ``[B, H, Nq, Nk]`` scores, so it is a fallback, not a fast path. All paths need ``q``, ``k``,
``v`` with the same head count and head dim and a contiguous last dim, and one non-empty query (``Nq``/``Nk`` of 0
go to ``"math"``). No dropout, mask or causal option: fast mode needs none.

Autograd: ``out`` and ``lse`` are both differentiable w.r.t. ``q``, ``k``, ``v`` on every path. ``out`` through the
kernel op's own backward; ``lse``, which the kernel ops return detached, through ``_KernelLSE`` (its backward runs one
more attention forward and backward of the same kernel); the ``"math"`` path through its ``logsumexp``.

Verification: the CPU paths run in the CPU test suite (compared with one attention over concatenated keys). The CUDA
paths are written against the op schemas of torch 2.11-2.13; the CPU suite checks them on meta tensors (output shapes,
dtypes, strides, the LSE slicing, FLOP counts) and ``tests/kernels/test_merge_cuda.py`` runs them on a GPU.

FLOP counting: every path is visible to ``torch.utils.flop_counter.FlopCounterMode`` with ``4 * B * H * Nq * Nk * D``
FLOPs (two matmuls). torch 2.11-2.13 have no formula for the CPU flash op, so it counts 0 there (pytorch issue
#195460, fixed upstream by PR #195801); importing this module registers torch's own SDPA formulas for the CPU
forward and backward ops when, and only when, the installed torch lacks them. ``FlopCounterMode`` copies the
registry when constructed, so modes created after this import count them.
"""

from __future__ import annotations

import math

import torch
from torch.utils import flop_counter

from .compute import compute_dtype, records_grad

aten = torch.ops.aten

BACKENDS = ("auto", "flash", "efficient", "cudnn", "cpu_flash", "math")
_AUTO_ORDER = {
    "cuda": ("flash", "efficient", "math"),
    "meta": ("flash", "efficient", "math"),
    "cpu": ("cpu_flash", "math"),
}
_DEVICES = {
    "flash": ("cuda", "meta"),
    "efficient": ("cuda", "meta"),
    "cudnn": ("cuda", "meta"),
    "cpu_flash": ("cpu", "meta"),
}


# ----------------------------------------------------------------------------------------------------------------
# FLOP formulas for the CPU flash op (torch 2.11-2.13 lack them; see the module docstring)


def _register_cpu_flash_flops() -> None:
    registry = flop_counter.flop_registry
    if aten._scaled_dot_product_flash_attention_for_cpu not in registry:

        @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in registry:

        @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_flash_backward_flop(
            grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
        ) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_flash_flops()


# ----------------------------------------------------------------------------------------------------------------
# Backend choice


def _check_inputs(q, k, v, scale) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D] (batch, seqlen, heads, head_dim), got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got stride {x.stride(-1)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k must be [B, Nk, H, D] with the B, H, D of q {tuple(q.shape)}, got {tuple(k.shape)} "
            "(grouped-query attention is not supported)"
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device)  # constant-folded by torch.compile
    return props.major, props.minor


def unsupported_reason(backend: str, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why ``backend`` cannot take these inputs, or None when it can (the checks of the module docstring's table)."""
    if backend == "math":
        return None
    device = q.device.type
    if device not in _DEVICES[backend]:
        return f"it runs on {' / '.join(_DEVICES[backend])} tensors, got a tensor on {q.device}"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "it needs at least one query and one key"
    dtype, D = q.dtype, q.shape[-1]
    if backend == "cpu_flash":
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"it takes float32/float64/float16/bfloat16, got {dtype}"
        return None
    if D % 8 != 0:
        return f"it needs a head dim divisible by 8, got {D}"
    sm80 = device == "meta" or _cuda_capability(q.device) >= (8, 0)
    if backend == "efficient":
        if dtype not in (torch.float16, torch.float32, torch.bfloat16):
            return f"it takes float16/float32/bfloat16, got {dtype}"
        if dtype == torch.bfloat16 and not sm80:
            return "bfloat16 needs compute capability 8.0+"
        return None
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16/bfloat16, got {dtype}"
    if not sm80:
        return "it needs compute capability 8.0+"
    max_d = 256 if backend == "flash" else 128
    if D > max_d:
        return f"it takes head dims up to {max_d}, got {D}"
    return None


def choose_backend(q: torch.Tensor, k: torch.Tensor, backend: str = "auto") -> str:
    """Resolve ``"auto"`` to the first backend of the device's order that supports ``q``/``k``; check an explicit
    choice and raise a ``ValueError`` saying why it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = _AUTO_ORDER.get(q.device.type, ("math",))
        if q.device.type == "cuda" and torch.version.hip is None and _cuda_capability(q.device)[0] == 9:
            order = ("cudnn",) + order  # Hopper: cuDNN's attention is the fast one there (module docstring)
        for candidate in order:
            if unsupported_reason(candidate, q, k) is None:
                return candidate
        return "math"
    reason = unsupported_reason(backend, q, k)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}; use backend='auto'")
    return backend


# ----------------------------------------------------------------------------------------------------------------
# The paths. Inputs arrive as [B, H, N, D] views of the caller's [B, N, H, D] tensors (no copy); outputs are
# [B, H, Nq, D] and an LSE [B, H, Nq].


def _math(q, k, v, scale):
    dtype = compute_dtype(q)
    scores = torch.matmul(q.to(dtype) * scale, k.to(dtype).transpose(-1, -2))  # [B, H, Nq, Nk]
    lse = torch.logsumexp(scores, dim=-1)  # -inf for zero keys
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, v.to(dtype))  # zeros for zero keys
    return out.to(q.dtype), lse


def _run(backend, q, k, v, scale):
    if backend == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    if backend == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        return out, lse[:, :, : q.shape[2]]  # padded to a multiple of 32 queries on CUDA
    if backend == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        return out, (lse[..., 0] if lse.dim() == 4 else lse)  # [B, H, Nq, 1]
    if backend == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None, scale=scale)
    return _math(q, k, v, scale)


# ----------------------------------------------------------------------------------------------------------------
# Autograd through the LSE. The kernels' ops differentiate ``out`` only: their LSE output is declared
# non-differentiable (``output_differentiability`` in PyTorch's derivatives.yaml), so it comes back detached, and a
# loss that reaches q or k through the LSE (every LSE merge does) would silently lose that part of its gradient.
# ``_KernelLSE`` puts it back. With P = softmax(scale * q k^T), the gradient of lse_i = log sum_j exp(scale q_i . k_j)
# for an incoming gradient g is
#
#     d q_i = scale * g_i * (P k)_i        d k_j = scale * (P^T (g * q))_j
#
# that is, the output of one more attention of q over the keys with the keys as values, and the value-gradient of
# that attention for the output gradient ``scale * g * q``: one forward and one backward of the same kernel, run in
# the backward pass only (and only when the LSE receives a gradient).


class _KernelLSE(torch.autograd.Function):
    """``lse`` (a kernel's detached LSE of ``q`` over ``k``, ``[B, H, Nq]``) returned as is, with its gradient
    w.r.t. ``q`` and ``k`` (``[B, H, N, D]``) computed by ``backend``'s kernel (see above)."""

    @staticmethod
    def forward(ctx, q, k, lse, backend: str, scale: float):
        ctx.save_for_backward(q, k)
        ctx.backend, ctx.scale = backend, scale
        return lse.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse):
        q, k = ctx.saved_tensors
        weight = (grad_lse * ctx.scale).unsqueeze(-1)  # [B, H, Nq, 1], the LSE's dtype (float32 or float64)
        with torch.enable_grad():
            values = k.detach().requires_grad_()
            p_k = _run(ctx.backend, q.detach(), k.detach(), values, ctx.scale)[0]  # P k: [B, H, Nq, D]
            (grad_k,) = torch.autograd.grad(p_k, values, (weight * q).to(p_k.dtype))  # P^T (scale * g * q)
        grad_q = (weight * p_k.detach()).to(q.dtype)
        return grad_q, grad_k.to(k.dtype), None, None, None


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention that also returns the log-sum-exp of the scores.

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)`` queries (diffusers' layout); last dim contiguous.
        k: ``(batch, seqlen_k, heads, head_dim)`` keys, same dtype and device.
        v: ``(batch, seqlen_k, heads, head_dim)`` values.
        scale: score scale; ``None`` means ``1 / sqrt(head_dim)``.
        backend: ``"auto"`` (see the module docstring for the order per device), or one of ``"flash"``,
            ``"efficient"``, ``"cudnn"``, ``"cpu_flash"``, ``"math"`` (a ``ValueError`` says why one cannot run).

    Returns:
        ``out``: ``(batch, seqlen_q, heads, head_dim)`` in q's dtype (last dim contiguous, other dims possibly
        strided); ``lse``: ``(batch, seqlen_q, heads)`` natural-log-sum-exp of the scaled scores, float32 (float64
        for float64 inputs on the CPU paths), a strided view of the kernel's ``(batch, heads, seqlen_q)`` LSE, ready
        for ``nag_kernels.nag_merge``.

    Example::

        >>> o_img, lse_img = attention_with_lse(q_img, k_img, v_img)  # image queries over image keys
        >>> o_txt, lse_txt = attention_with_lse(q_img, k_txt, v_txt)  # ... over one branch's text keys
    """
    _check_inputs(q, k, v, scale)
    backend = choose_backend(q, k, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = _run(backend, qh, kh, vh, scale)
    if backend != "math" and records_grad(q, k):  # the math path differentiates its LSE itself
        lse = _KernelLSE.apply(qh, kh, lse, backend, scale)
    out = out.transpose(1, 2)
    if out.shape[-1] > 1 and out.stride(-1) != 1:  # every kernel above returns a contiguous last dim; keep it a promise
        out = out.contiguous()
    return out, lse.transpose(1, 2)
