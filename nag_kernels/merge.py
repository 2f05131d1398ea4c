"""Fast-mode epilogue in Triton: log-sum-exp merge of partial attentions fused with the NAG combine.

In fast mode (docs/spec.md, Fast mode) the image queries attend once to the keys both branches share (``o_shared``,
``lse_shared``) and once per branch to that branch's own keys (``o_pos``/``lse_pos``, ``o_neg``/``lse_neg``). For
every token and head ``h`` the kernel merges each branch with the shared part::

    m = max(lse_shared, lse_b)                       # per head; m = 0 where both are -inf
    z_b = (exp(lse_shared - m) * o_shared + exp(lse_b - m) * o_b) / (exp(lse_shared - m) + exp(lse_b - m))

(a part with ``lse = -inf`` has weight 0; both parts empty give 0), joins the heads into one channel dim of
``C = H * D`` and applies NAG to ``z_pos``/``z_neg`` (``reference.nag_reference``): extrapolation, per-token norms
over all heads in float32, clamp at ``tau``, blend with ``alpha``. Nothing intermediate goes to memory: a token's
three ``[H, D]`` tiles are read once and the output is written once, ``4 * C * itemsize`` bytes per token plus
``3 * H`` LSE floats. Semantics are ``reference.nag_merge_reference``; the tests compare against it in float64.
``scale == 1`` (NAG off) is the ``NAG_OFF`` constexpr, set from the launch's Python float: the merged ``z_pos`` is
stored as it is, whatever ``tau`` and ``alpha``.

Layout: ``o_*`` and ``out`` are ``[B, N, H, D]`` (diffusers' ``dispatch_attention_fn`` layout), last dim contiguous,
B/N/H strides arbitrary; ``lse_*`` are ``[B, N, H]`` float32 with arbitrary strides (``lse.transpose(1, 2)`` of
SDPA's ``[B, H, N]`` is read in place, never copied). Offsets are int64.

Limits: float32/float16/bfloat16 outputs; ``BLOCK_H * BLOCK_D`` (``H`` and ``D`` each padded to a power of two)
at most ``MAX_BLOCK`` = 16384 elements, a ``RuntimeError`` past that (Flux: 24 x 128 -> 4096; Wan 14B: 40 x 128 ->
8192). A NaN in any input of a token makes that token's output NaN, and only that token's.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# The widest padded token (BLOCK_H * BLOCK_D) kept in registers: five fp32 copies of the tile are live at once.
MAX_BLOCK = 16384
# Elements a program aims to hold (tokens x padded H x padded D), so that small heads still issue wide loads.
TILE_ELEMENTS = 4096
# The most tokens one program handles.
MAX_TOKENS_PER_PROGRAM = 16


@triton.jit
def _merge_weights(lse_shared, lse_branch):
    """Normalized LSE-merge weights of the shared part and a branch part, per (token, head), in float32.

    Both -inf: ``m`` is set to 0 so both weights are exp(-inf) = 0, and the denominator to 1 (output 0). A NaN LSE
    gives NaN weights (``lse - m`` is NaN whatever ``tl.maximum`` returns for NaN), so the token turns NaN.
    """
    m = tl.maximum(lse_shared, lse_branch)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_shared = tl.exp(lse_shared - m)
    w_branch = tl.exp(lse_branch - m)
    denom = w_shared + w_branch
    inv = 1.0 / tl.where(denom == 0.0, 1.0, denom)
    return w_shared * inv, w_branch * inv


@triton.jit
def _nag_merge_kernel(
    OS, OP, ON, LS, LP, LN, OUT,
    n_tokens, n_seq, H, D,
    sos_b, sos_n, sos_h,
    sop_b, sop_n, sop_h,
    son_b, son_n, son_h,
    sout_b, sout_n, sout_h,
    sls_b, sls_n, sls_h,
    slp_b, slp_n, slp_h,
    sln_b, sln_n, sln_h,
    scale, tau, alpha,
    L2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, NAG_OFF: tl.constexpr,
):
    # Inductor may pass Python floats as fp64: pin the arithmetic to fp32.
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    alpha = tl.cast(alpha, tl.float32)

    # Tokens of this program, split into (batch, sequence) indices; int64 so offsets past 2**31 elements work.
    tok = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    b = tok // n_seq
    n = tok % n_seq
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_th = (tok < n_tokens)[:, None] & (h < H)[None, :]  # [TOKENS, BLOCK_H]
    mask = mask_th[:, :, None] & (d < D)[None, None, :]  # [TOKENS, BLOCK_H, BLOCK_D]

    # LSEs, [TOKENS, BLOCK_H]. Masked lanes read 0: finite weights, and their zero outputs add nothing to the norms.
    ls = tl.load(LS + (b * sls_b + n * sls_n)[:, None] + h[None, :] * sls_h, mask=mask_th, other=0.0).to(tl.float32)
    lp = tl.load(LP + (b * slp_b + n * slp_n)[:, None] + h[None, :] * slp_h, mask=mask_th, other=0.0).to(tl.float32)
    ln = tl.load(LN + (b * sln_b + n * sln_n)[:, None] + h[None, :] * sln_h, mask=mask_th, other=0.0).to(tl.float32)
    ws_pos, wp = _merge_weights(ls, lp)
    ws_neg, wn = _merge_weights(ls, ln)

    # Partial outputs, [TOKENS, BLOCK_H, BLOCK_D], loaded in storage dtype and merged in fp32.
    os_off = (b * sos_b + n * sos_n)[:, None, None] + (h * sos_h)[None, :, None] + d[None, None, :]
    op_off = (b * sop_b + n * sop_n)[:, None, None] + (h * sop_h)[None, :, None] + d[None, None, :]
    on_off = (b * son_b + n * son_n)[:, None, None] + (h * son_h)[None, :, None] + d[None, None, :]
    o_shared = tl.load(OS + os_off, mask=mask, other=0.0).to(tl.float32)
    zp = ws_pos[:, :, None] * o_shared + wp[:, :, None] * tl.load(OP + op_off, mask=mask, other=0.0).to(tl.float32)
    zn = ws_neg[:, :, None] * o_shared + wn[:, :, None] * tl.load(ON + on_off, mask=mask, other=0.0).to(tl.float32)

    # NAG over the whole token (all heads together).
    zt = scale * zp - (scale - 1.0) * zn
    if L2:
        norm_pos = tl.sqrt(tl.sum(tl.sum(zp * zp, axis=2), axis=1))
        norm_t = tl.sqrt(tl.sum(tl.sum(zt * zt, axis=2), axis=1))
    else:
        norm_pos = tl.sum(tl.sum(tl.abs(zp), axis=2), axis=1)
        norm_t = tl.sum(tl.sum(tl.abs(zt), axis=2), axis=1)
    # factor = min(1, tau * |zp| / |zt|), 1 where |zt| = 0. `ratio >= 1` is False for NaN, so a NaN ratio stays
    # NaN (a plain min() on GPU returns the non-NaN operand and would hide it).
    zero_t = norm_t == 0.0
    ratio = tau * norm_pos / tl.where(zero_t, 1.0, norm_t)
    factor = tl.where(zero_t, 1.0, tl.where(ratio >= 1.0, 1.0, ratio))
    out = (alpha * factor)[:, None, None] * zt + (1.0 - alpha) * zp
    if NAG_OFF:  # scale == 1: the merged z_pos exactly, whatever tau and alpha
        out = zp

    out_off = (b * sout_b + n * sout_n)[:, None, None] + (h * sout_h)[None, :, None] + d[None, None, :]
    tl.store(OUT + out_off, out.to(OUT.dtype.element_ty), mask=mask)


def launch_config(H: int, D: int, n_tokens: int) -> dict:
    """Launch settings from the token shape ``[H, D]`` (and the token count, to not over-tile tiny inputs).

    - ``BLOCK_H = next_power_of_2(H)``, ``BLOCK_D = next_power_of_2(D)``; a token is a ``[BLOCK_H, BLOCK_D]`` tile
      with masked padding (heads are kept as a tile dim so each head's merge weights broadcast over ``D``).
    - ``TOKENS = TILE_ELEMENTS // (BLOCK_H * BLOCK_D)`` tokens per program, between 1 and 16 and no more than the
      tokens there are (rounded up to a power of two): one token per program for Flux-sized tokens (4096 padded
      elements), several for small ``H * D`` so each program still moves a few KiB.
    - ``num_warps``: one warp per 512 tile elements (16 fp32 values per thread per tensor), between 1 and 16.
    - ``RuntimeError`` when ``BLOCK_H * BLOCK_D > MAX_BLOCK``.
    """
    block_h = triton.next_power_of_2(H)
    block_d = triton.next_power_of_2(D)
    block = block_h * block_d
    if block > MAX_BLOCK:
        raise RuntimeError(
            f"nag_merge's Triton kernel supports tokens of at most {MAX_BLOCK} elements after padding H and D to "
            f"powers of two, got H={H}, D={D} ({block_h} x {block_d}); use backend='torch'"
        )
    tokens = max(1, min(MAX_TOKENS_PER_PROGRAM, TILE_ELEMENTS // block, triton.next_power_of_2(max(n_tokens, 1))))
    num_warps = max(1, min(16, tokens * block // 512))
    return {"BLOCK_H": block_h, "BLOCK_D": block_d, "TOKENS": tokens, "num_warps": num_warps}


def nag_merge_triton(
    o_shared: torch.Tensor,
    lse_shared: torch.Tensor,
    o_pos: torch.Tensor,
    lse_pos: torch.Tensor,
    o_neg: torch.Tensor,
    lse_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on validated ``[B, N, H, D]`` / ``[B, N, H]`` inputs; returns ``out`` (a new
    contiguous tensor when not given). Inputs are checked by ``merge_ops``; this is the raw launcher.

    ``out`` may be ``o_shared``, ``o_pos`` or ``o_neg`` itself (the same view): each element is read before the same
    program writes it, and programs own disjoint tokens. Any other overlap of ``out`` with an input is the caller's
    to avoid (the ops compute into a temporary then).
    """
    B, N, H, D = o_pos.shape
    if out is None:
        out = torch.empty(o_pos.shape, dtype=o_pos.dtype, device=o_pos.device)
    if out.numel() == 0:
        return out
    n_tokens = B * N
    cfg = launch_config(H, D, n_tokens)
    strides = []
    for t in (o_shared, o_pos, o_neg, out):
        strides += [t.stride(0), t.stride(1), t.stride(2)]
    for t in (lse_shared, lse_pos, lse_neg):
        strides += [t.stride(0), t.stride(1), t.stride(2)]
    grid = (triton.cdiv(n_tokens, cfg["TOKENS"]),)
    device = torch.cuda.device(o_pos.device) if o_pos.device.type == "cuda" else contextlib.nullcontext()
    with device:
        _nag_merge_kernel[grid](
            o_shared, o_pos, o_neg, lse_shared, lse_pos, lse_neg, out,
            n_tokens, N, H, D,
            *strides,
            float(scale), float(tau), float(alpha),
            L2=norm == "l2", BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], TOKENS=cfg["TOKENS"],
            NAG_OFF=float(scale) == 1, num_warps=cfg["num_warps"],
        )
    return out
