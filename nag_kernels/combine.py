"""The fused NAG combine in Triton: extrapolation, per-token norms, clamp at tau and alpha blend in one pass.

For every token (row of the last dim ``C``) the kernel reads ``z_pos`` and ``z_neg`` once, keeps the row in
registers, reduces both norms in float32 and writes the output once: 3 * C * itemsize bytes per row, the minimum
this operation can move. Semantics are ``reference.nag_reference`` (see its docstring); tests compare against it.

Two kernels, chosen by ``launch_config`` from the row length:

- ``_nag_rows_kernel`` (C <= MAX_BLOCK_C): a tile of ``ROWS`` whole rows per program; several rows per program for
  small C so each program still moves a few KiB.
- ``_nag_chunked_kernel`` (C > MAX_BLOCK_C): one row per program, walked in chunks of ``BLOCK_C``: a first loop
  accumulates the norms, a second re-reads the row (from L2; a row is at most a few hundred KiB) and writes it.
  No intermediate tensor ever goes to device memory.

Rows are addressed through (outer, inner) strides, so leading dims may be strided views such as
``hidden[:, text_len:]`` and are never copied; row offsets are int64, so tensors past 2**31 elements work.

``scale == 1`` (NAG off) is the ``NAG_OFF`` constexpr, set by the launcher from the launch's Python float: the kernel
stores ``z_pos`` as it was read (exactly, in any dtype) instead of the blend. ``out`` may be ``z_pos`` or ``z_neg``
(the same view); any other overlap with an input is the caller's to avoid (the ops and ``nag_triton`` compute into a
temporary then), since a program could overwrite a token another program has still to read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .checks import check_out, check_pair, check_params, overlaps_other_than_alias

# The widest row kept whole in registers; wider rows go through the chunked kernel.
MAX_BLOCK_C = 8192
# Chunk width of the chunked kernel.
CHUNK_C = 4096
# Elements a program of the row kernel aims to hold (rows x padded C): large enough that small C still issues
# wide loads, small enough to stay in registers next to three fp32 copies of the tile.
TILE_ELEMENTS = 4096


@triton.jit
def _row_offsets(rows, n_inner, stride_outer, stride_inner):
    """Element offset of each row for a [outer, inner, C] view with arbitrary outer/inner strides (int64)."""
    return (rows // n_inner) * stride_outer + (rows % n_inner) * stride_inner


@triton.jit
def _clamp_factor(norm_pos, norm_t, tau):
    """min(1, tau * |z_pos| / |z_t|), 1 where |z_t| = 0, NaN where either norm is NaN.

    ``tl.where(ratio < 1, ...)`` alone would turn a NaN ratio into 1 and hide the NaN of a token, so NaN is
    passed through explicitly. The division uses a safe denominator so no lane divides by zero.
    """
    zero_t = norm_t == 0.0
    ratio = tau * norm_pos / tl.where(zero_t, 1.0, norm_t)
    factor = tl.where(ratio < 1.0, ratio, 1.0)
    factor = tl.where(ratio != ratio, ratio, factor)
    return tl.where(zero_t, 1.0, factor)


@triton.jit
def _nag_rows_kernel(
    P, N, O,
    n_rows, n_inner, C,
    sp_outer, sp_inner, sn_outer, sn_inner, so_outer, so_inner,
    scale, tau, alpha,
    L2: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, NAG_OFF: tl.constexpr,
):
    # Inductor may pass Python floats as fp64: pin the arithmetic to fp32.
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    alpha = tl.cast(alpha, tl.float32)

    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
    p_off = _row_offsets(rows, n_inner, sp_outer, sp_inner)[:, None] + cols[None, :]
    n_off = _row_offsets(rows, n_inner, sn_outer, sn_inner)[:, None] + cols[None, :]
    o_off = _row_offsets(rows, n_inner, so_outer, so_inner)[:, None] + cols[None, :]

    zp = tl.load(P + p_off, mask=mask, other=0.0).to(tl.float32)
    zn = tl.load(N + n_off, mask=mask, other=0.0).to(tl.float32)
    zt = scale * zp - (scale - 1.0) * zn  # masked lanes stay 0 and add nothing to the norms
    if L2:
        norm_pos = tl.sqrt(tl.sum(zp * zp, axis=1))
        norm_t = tl.sqrt(tl.sum(zt * zt, axis=1))
    else:
        norm_pos = tl.sum(tl.abs(zp), axis=1)
        norm_t = tl.sum(tl.abs(zt), axis=1)
    weight = alpha * _clamp_factor(norm_pos, norm_t, tau)
    out = weight[:, None] * zt + (1.0 - alpha) * zp
    if NAG_OFF:  # scale == 1: z_pos exactly (the blend alone rounds, and gives min(1, tau) * z_pos for alpha = 1)
        out = zp
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _nag_chunked_kernel(
    P, N, O,
    n_inner, C,
    sp_outer, sp_inner, sn_outer, sn_inner, so_outer, so_inner,
    scale, tau, alpha,
    L2: tl.constexpr, BLOCK_C: tl.constexpr, NAG_OFF: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    tau = tl.cast(tau, tl.float32)
    alpha = tl.cast(alpha, tl.float32)

    row = tl.program_id(0).to(tl.int64)
    p_row = P + _row_offsets(row, n_inner, sp_outer, sp_inner)
    n_row = N + _row_offsets(row, n_inner, sn_outer, sn_inner)
    o_row = O + _row_offsets(row, n_inner, so_outer, so_inner)
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
    norm_pos = tl.sum(acc_pos, axis=0)
    norm_t = tl.sum(acc_t, axis=0)
    if L2:
        norm_pos = tl.sqrt(norm_pos)
        norm_t = tl.sqrt(norm_t)
    weight = alpha * _clamp_factor(norm_pos, norm_t, tau)

    for start in range(0, C, BLOCK_C):
        mask = start + cols < C
        zp = tl.load(p_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        zn = tl.load(n_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        zt = scale * zp - (scale - 1.0) * zn
        out = weight * zt + (1.0 - alpha) * zp
        if NAG_OFF:
            out = zp
        tl.store(o_row + start + cols, out.to(O.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def launch_config(C: int, n_rows: int) -> dict:
    """Launch settings from the row length ``C`` (and the row count, to not over-tile tiny inputs).

    - ``C <= MAX_BLOCK_C``: row kernel, ``BLOCK_C = next_power_of_2(C)``, ``ROWS = TILE_ELEMENTS // BLOCK_C`` rows per
      program (at least 1, at most 16 and no more than the rows there are), so a program holds about 4096 elements.
    - ``C > MAX_BLOCK_C``: chunked kernel, one row per program, ``BLOCK_C = CHUNK_C``.
    - ``num_warps``: one warp per 512 elements of the tile (16 values per thread per tensor), between 1 and 8.
      Measured on an H200 with ``python -m benchmarks sweep`` (every launch setting; docs/performance.md): 8 warps for
      a whole 8192-wide row ran 1.27x faster than 16; for 1024-4096-wide tiles 4 and 8 warps were within noise.

    The returned dict is cached: do not modify it.
    """
    if C <= MAX_BLOCK_C:
        block_c = triton.next_power_of_2(C)
        rows = max(1, min(16, TILE_ELEMENTS // block_c, triton.next_power_of_2(max(n_rows, 1))))
        chunked = False
    else:
        block_c, rows, chunked = CHUNK_C, 1, True
    num_warps = max(1, min(8, rows * block_c // 512))
    return {"chunked": chunked, "BLOCK_C": block_c, "ROWS": rows, "num_warps": num_warps}


def _row_layout(tensors: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
    """The leading dims of same-shaped tensors, with size-1 dims dropped and adjacent dims merged wherever every
    tensor's strides allow it. Returns ``[(size, [stride of each tensor]), ...]`` from outer to inner."""
    shape = tensors[0].shape[:-1]
    dims = [(shape[d], [t.stride(d) for t in tensors]) for d in range(len(shape)) if shape[d] != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, strides in reversed(dims):
        if merged:
            inner_size, inner_strides = merged[-1]
            if all(s == si * inner_size for s, si in zip(strides, inner_strides)):
                merged[-1] = (size * inner_size, inner_strides)
                continue
        merged.append((size, strides))
    return merged[::-1]


def _launch(z_pos, z_neg, out, scale, tau, alpha, norm, config=None):
    """Launch on validated tensors. ``config`` overrides ``launch_config`` (the tuning sweep uses it)."""
    layout = _row_layout([z_pos, z_neg, out])
    if len(layout) > 2:
        # Three or more leading dims that no strides let us merge (rare): one launch per index of dim 0, on views.
        for i in range(out.shape[0]):
            _launch(z_pos[i], z_neg[i], out[i], scale, tau, alpha, norm, config)
        return
    layout = [(1, [0, 0, 0])] * (2 - len(layout)) + layout
    (n_outer, outer), (n_inner, inner) = layout
    n_rows = n_outer * n_inner
    C = out.shape[-1]
    cfg = config or launch_config(C, n_rows)
    strides = (outer[0], inner[0], outer[1], inner[1], outer[2], inner[2])
    # NAG_OFF: a constexpr decided here on the launch's Python float, so that it agrees with the PyTorch backend's
    # `scale == 1` exactly (the kernel's fp32 copy of a scale just above 1 could round to 1.0).
    common = dict(L2=norm == "l2", BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], NAG_OFF=scale == 1)
    if cfg["chunked"]:
        _nag_chunked_kernel[(n_rows,)](z_pos, z_neg, out, n_inner, C, *strides, scale, tau, alpha, **common)
    else:
        grid = (triton.cdiv(n_rows, cfg["ROWS"]),)
        _nag_rows_kernel[grid](
            z_pos, z_neg, out, n_rows, n_inner, C, *strides, scale, tau, alpha, ROWS=cfg["ROWS"], **common
        )


def nag_triton(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: str = "l1",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on ``[..., C]`` tensors; returns ``out`` (a new contiguous tensor when not given).

    ``out`` may be ``z_pos`` or ``z_neg`` (the same view): each element is read before the same program writes it.
    An ``out`` that overlaps them otherwise is computed into a temporary and copied; one whose own elements overlap
    is refused.
    """
    check_pair(z_pos, z_neg)
    check_params(scale, tau, alpha, norm)
    if out is not None:
        check_out(out, z_pos)
        if overlaps_other_than_alias(out, (z_pos, z_neg)):
            return out.copy_(launch_nag(z_pos, z_neg, scale, tau, alpha, norm))
    return launch_nag(z_pos, z_neg, scale, tau, alpha, norm, out)


def launch_nag(z_pos, z_neg, scale, tau, alpha, norm="l1", out=None) -> torch.Tensor:
    """``nag_triton`` without the input checks, for callers that validated already (the ops)."""
    if out is None:
        out = torch.empty(z_pos.shape, dtype=z_pos.dtype, device=z_pos.device)
    if out.numel() == 0:
        return out
    device = z_pos.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _launch(z_pos, z_neg, out, float(scale), float(tau), float(alpha), norm)
    else:
        _launch(z_pos, z_neg, out, float(scale), float(tau), float(alpha), norm)
    return out
