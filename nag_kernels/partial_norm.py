"""The NAG combine split in two around a reduction, for tokens whose channels are spread over several ranks.

Under tensor parallelism each rank holds ``heads / tp`` heads of every token, ``C_local = C / tp`` channels, but the
norms of the combine (docs/spec.md, "The combine") are taken over the whole token. The combine is then::

    sums = nag_partial_norms(z_pos, z_neg, scale, norm)      # [..., 2] float32: this rank's share of the norms
    dist.all_reduce(sums, group=tp_group)                   # full-row sums (the caller's collective)
    out = nag_with_norms(z_pos, z_neg, sums, scale, tau, alpha, norm)   # this rank's channels of the combine

``nag_partial_norms`` returns, per token, ``(sum |z_pos|, sum |z_t|)`` over the local channels (L2: the sums of
squares; sums of squares, not norms, are what add up over the ranks), ``z_t = scale * z_pos - (scale - 1) * z_neg``.
``nag_with_norms`` takes the reduced sums (and the square root of them for L2) instead of reducing its own channels.
With one rank (``sums`` from the same channels, no reduction) the two equal ``nag_kernels.nag``.

Triton kernels (``"triton"`` backend: CUDA/ROCm, or CPU under ``TRITON_INTERPRET=1``; float32, float16, bfloat16):

- ``_partial_norms_rows`` (C <= ``combine.MAX_BLOCK_C``): ``ROWS`` whole rows per program (a constexpr), both sums
  reduced in float32 from one read of the row; ``_partial_norms_chunked`` (wider rows): one row per program, walked
  in ``CHUNK_C`` chunks. Tile sizes and warps are ``combine.launch_config``'s, so on a single rank the sums are the
  ones the fused combine computes.
- ``_with_norms``: elementwise once the sums are known, so one kernel for every ``C``: a 2-D grid of (``ROWS`` rows)
  x (``BLOCK_C`` channels) tiles; each program loads its rows' two sums, forms the clamp factor and writes its tile.

Leading dims may be strided views (addressed through merged (outer, inner) strides, ``combine._row_layout``); the
last dim must be contiguous. The ``"torch"`` backend runs the same math in PyTorch ops on any device, float64 too.

The kernels are wrapped with ``triton.jit`` on first use (``_kernels``), not at import: ``import nag_kernels`` works
without Triton, does not pay for importing it, and ``TRITON_INTERPRET`` is read when a kernel first runs.

The registered ops, the PyTorch backend and the public functions are in ``partial_norm_ops.py``.
"""

from __future__ import annotations

import functools

import torch


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Bound by ``_kernels`` on first use: triton.language and the jit helpers shared with combine.py.
tl = None
_row_offsets = None
_clamp_factor = None


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions here; ``_kernels`` wraps them with triton.jit)


def _partial_norms_rows(
    P, N, S,
    n_rows, n_inner, C,
    sp_outer, sp_inner, sn_outer, sn_inner, ss_outer, ss_inner, ss_last,
    scale,
    L2: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor may pass Python floats as fp64
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    mask = row_ok[:, None] & (cols < C)[None, :]
    p_off = _row_offsets(rows, n_inner, sp_outer, sp_inner)[:, None] + cols[None, :]
    n_off = _row_offsets(rows, n_inner, sn_outer, sn_inner)[:, None] + cols[None, :]
    zp = tl.load(P + p_off, mask=mask, other=0.0).to(tl.float32)
    zn = tl.load(N + n_off, mask=mask, other=0.0).to(tl.float32)
    zt = scale * zp - (scale - 1.0) * zn  # masked lanes stay 0 and add nothing
    if L2:
        sum_pos = tl.sum(zp * zp, axis=1)
        sum_t = tl.sum(zt * zt, axis=1)
    else:
        sum_pos = tl.sum(tl.abs(zp), axis=1)
        sum_t = tl.sum(tl.abs(zt), axis=1)
    s_off = _row_offsets(rows, n_inner, ss_outer, ss_inner)
    tl.store(S + s_off, sum_pos, mask=row_ok)
    tl.store(S + s_off + ss_last, sum_t, mask=row_ok)


def _partial_norms_chunked(
    P, N, S,
    n_inner, C,
    sp_outer, sp_inner, sn_outer, sn_inner, ss_outer, ss_inner, ss_last,
    scale,
    L2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    p_row = P + _row_offsets(row, n_inner, sp_outer, sp_inner)
    n_row = N + _row_offsets(row, n_inner, sn_outer, sn_inner)
    cols = tl.arange(0, BLOCK_C)
    acc_pos = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        mask = start + cols < C
        zp = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        zn = tl.load(n_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        zt = scale * zp - (scale - 1.0) * zn
        if L2:
            acc_pos += zp * zp
            acc_t += zt * zt
        else:
            acc_pos += tl.abs(zp)
            acc_t += tl.abs(zt)
    s_row = S + _row_offsets(row, n_inner, ss_outer, ss_inner)
    tl.store(s_row, tl.sum(acc_pos, axis=0))
    tl.store(s_row + ss_last, tl.sum(acc_t, axis=0))


def _with_norms(
    P, N, S, O,
    n_rows, n_inner, C,
    sp_outer, sp_inner, sn_outer, sn_inner, ss_outer, ss_inner, ss_last, so_outer, so_inner,
    scale, tau, alpha,
    L2: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, NAG_OFF: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = row_ok[:, None] & (cols < C)[None, :]

    s_off = _row_offsets(rows, n_inner, ss_outer, ss_inner)
    norm_pos = tl.load(S + s_off, mask=row_ok, other=0.0).to(tl.float32)
    norm_t = tl.load(S + s_off + ss_last, mask=row_ok, other=0.0).to(tl.float32)
    if L2:
        norm_pos = tl.sqrt(norm_pos)
        norm_t = tl.sqrt(norm_t)
    weight = alpha * _clamp_factor(norm_pos, norm_t, tau)  # NaN sums -> NaN weight -> the whole token NaN

    p_off = _row_offsets(rows, n_inner, sp_outer, sp_inner)[:, None] + cols[None, :]
    n_off = _row_offsets(rows, n_inner, sn_outer, sn_inner)[:, None] + cols[None, :]
    o_off = _row_offsets(rows, n_inner, so_outer, so_inner)[:, None] + cols[None, :]
    zp = tl.load(P + p_off, mask=mask, other=0.0).to(tl.float32)
    zn = tl.load(N + n_off, mask=mask, other=0.0).to(tl.float32)
    zt = scale * zp - (scale - 1.0) * zn
    out = weight[:, None] * zt + (1.0 - alpha) * zp
    if NAG_OFF:  # scale == 1: z_pos exactly, whatever tau, alpha and the norms
        out = zp
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=mask)


@functools.cache
def _kernels():
    """``(partial_norms_rows, partial_norms_chunked, with_norms)`` wrapped with ``triton.jit``; imports Triton and
    binds the names the kernels use (``tl``, combine's jit helpers) as this module's globals first."""
    import triton
    import triton.language

    from . import combine

    module = globals()
    module["tl"] = triton.language
    module["_row_offsets"] = combine._row_offsets
    module["_clamp_factor"] = combine._clamp_factor
    return triton.jit(_partial_norms_rows), triton.jit(_partial_norms_chunked), triton.jit(_with_norms)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (on validated tensors)


def _on_device(device: torch.device, fn, *args) -> None:
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            fn(*args)
    else:
        fn(*args)


def _launch_partial_norms(z_pos, z_neg, sums, scale, norm) -> None:
    from .combine import _row_layout, launch_config

    layout = _row_layout([z_pos, z_neg, sums])
    if len(layout) > 2:  # leading dims that no strides let us merge: one launch per index of dim 0
        for i in range(z_pos.shape[0]):
            _launch_partial_norms(z_pos[i], z_neg[i], sums[i], scale, norm)
        return
    layout = [(1, [0, 0, 0])] * (2 - len(layout)) + layout
    (n_outer, outer), (n_inner, inner) = layout
    n_rows, C = n_outer * n_inner, z_pos.shape[-1]
    cfg = launch_config(C, n_rows)
    strides = (outer[0], inner[0], outer[1], inner[1], outer[2], inner[2], sums.stride(-1))
    common = dict(L2=norm == "l2", BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    rows_kernel, chunked_kernel, _ = _kernels()
    if cfg["chunked"]:
        chunked_kernel[(n_rows,)](z_pos, z_neg, sums, n_inner, C, *strides, scale, **common)
    else:
        grid = (_cdiv(n_rows, cfg["ROWS"]),)
        rows_kernel[grid](z_pos, z_neg, sums, n_rows, n_inner, C, *strides, scale, ROWS=cfg["ROWS"], **common)


def _launch_with_norms(z_pos, z_neg, norms, out, scale, tau, alpha, norm) -> None:
    from .combine import CHUNK_C, _row_layout, launch_config

    layout = _row_layout([z_pos, z_neg, norms, out])
    if len(layout) > 2:
        for i in range(out.shape[0]):
            _launch_with_norms(z_pos[i], z_neg[i], norms[i], out[i], scale, tau, alpha, norm)
        return
    layout = [(1, [0, 0, 0, 0])] * (2 - len(layout)) + layout
    (n_outer, outer), (n_inner, inner) = layout
    n_rows, C = n_outer * n_inner, out.shape[-1]
    cfg = launch_config(C, n_rows)
    block_c, rows = (CHUNK_C, 1) if cfg["chunked"] else (cfg["BLOCK_C"], cfg["ROWS"])
    strides = (outer[0], inner[0], outer[1], inner[1], outer[2], inner[2], norms.stride(-1), outer[3], inner[3])
    grid = (_cdiv(n_rows, rows), _cdiv(C, block_c))
    _kernels()[2][grid](
        z_pos, z_neg, norms, out, n_rows, n_inner, C, *strides, scale, tau, alpha,
        L2=norm == "l2", BLOCK_C=block_c, ROWS=rows, NAG_OFF=scale == 1, num_warps=cfg["num_warps"],
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_partial_norms(z_pos, z_neg, scale, norm="l1") -> torch.Tensor:
    """The Triton partial sums of validated ``[..., C]`` tensors: a new ``[..., 2]`` float32 tensor."""
    sums = torch.empty((*z_pos.shape[:-1], 2), dtype=torch.float32, device=z_pos.device)
    if sums.numel() == 0:
        return sums
    if z_pos.shape[-1] == 0:
        return sums.zero_()
    _on_device(z_pos.device, _launch_partial_norms, z_pos, z_neg, sums, float(scale), norm)
    return sums


def launch_with_norms(z_pos, z_neg, norms, scale, tau, alpha, norm="l1", out=None) -> torch.Tensor:
    """The Triton combine of validated tensors with the given sums; returns ``out`` (new when not given)."""
    if out is None:
        out = torch.empty(z_pos.shape, dtype=z_pos.dtype, device=z_pos.device)
    if out.numel() == 0:
        return out
    _on_device(z_pos.device, _launch_with_norms, z_pos, z_neg, norms, out, float(scale), float(tau), float(alpha), norm)
    return out
