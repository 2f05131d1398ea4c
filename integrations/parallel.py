"""What NAG needs under diffusers' context parallelism (CP) and tensor parallelism (TP); model-agnostic.

A family's processor calls ``image_attention`` / ``combine`` here instead of ``split_attention``'s, passing its
``_parallel_config`` (set by diffusers' ``enable_parallelism`` under context parallelism) and ``tp_group_of(attn)``;
without parallelism they are ``split_attention``'s functions, unchanged. docs/parallelism.md explains the costs.

- **Context parallelism** (Ulysses, ring, unified, the "anything" variants; diffusers' ``_cp_plan`` splits the text
  and image tokens along the sequence after NAG's pre-hook has seen them): every rank holds its own slice of the
  queries with all heads, so the NAG combine, a per-token operation, runs locally. Exact mode attends per branch
  through the user's backend (which runs the CP attention). The split image attention of fast mode
  (``split_attention.image_attention``) runs each of its two parts, image queries over the image keys and over each
  branch's text keys, through diffusers' CP templates (Ulysses all-to-all, ring K/V rotation) around NAG's own
  LSE-returning PyTorch kernel (``cp_attention_with_lse``): each rank gets its queries' outputs and log-sum-exps over
  all keys, and merges and combines them locally.
- **Tensor parallelism**: each rank holds ``heads / tp`` heads of every attention (``to_q/k/v`` column-sharded), so
  the per-token norms of the combine, taken over all heads, are sums over the ranks: ``combine_sharded`` all-reduces
  the two per-token partial sums (``[..., 2]``, float32) over the TP group before the clamp; the attention output is
  never gathered.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

import nag_kernels
from nag_kernels.attention import attention_with_lse
from nag_kernels.compute import records_grad
from nag_kernels.reference import merge_attention_reference


def tp_group_of(attn: torch.nn.Module):
    """The process group over which ``attn``'s heads are sharded by tensor parallelism (its query projection's weight
    is a ``DTensor`` sharded on a mesh of more than one rank), else ``None``. ``attn`` is a diffusers attention module
    (``to_q``, the fused ``to_qkv``, or FLUX.2's single-block ``to_qkv_mlp_proj``)."""
    linear = getattr(attn, "to_q", None) or getattr(attn, "to_qkv", None) or getattr(attn, "to_qkv_mlp_proj", None)
    weight = getattr(linear, "weight", None)
    mesh = getattr(weight, "device_mesh", None)  # only DTensors have one
    if mesh is None or mesh.size() == 1:
        return None
    return mesh.get_group()


def image_attention(q, k, v, text_k, text_v, nag, *, parallel_config=None, group=None, text_mask=None):
    """``split_attention.image_attention`` under parallelism: same arguments and result (this rank's queries, and
    under tensor parallelism this rank's heads ``[B, N, H / tp * D]``).

    One split path for all three cases; this only chooses its attention and merge functions. ``parallel_config``:
    the processor's ``ParallelConfig`` (context parallelism: both parts run through ``cp_attention_with_lse``, the
    merge and combine locally); ``group``: the TP group (``tp_group_of``: the merge per head, the combine with
    all-reduced norms, ``merge_combine_sharded``). Neither: ``split_attention.image_attention`` as it is.
    """
    from .split_attention import image_attention as split

    cp = parallel_config if getattr(parallel_config, "context_parallel_config", None) is not None else None
    if cp is None and group is None:
        return split(q, k, v, text_k, text_v, nag, text_mask)
    if text_mask is not None:
        raise ValueError("NAG's split image attention takes no text_mask under context or tensor parallelism")
    functions = {}
    if cp is not None:
        functions["attention"] = functools.partial(cp_attention_with_lse, config=cp)
    if group is not None:
        functions["merge"] = functools.partial(merge_combine_sharded, group=group)
    return split(q, k, v, text_k, text_v, nag, **functions)


def combine(z_pos, z_neg, nag, group=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``split_attention.combine``, or ``combine_sharded`` over ``group`` (tensor parallelism) when given."""
    if group is None:
        from .split_attention import combine as plain

        return plain(z_pos, z_neg, nag, out=out)
    return combine_sharded(z_pos, z_neg, nag, group, out=out)


def _forward_op(
    ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    return_lse=False, _save_ctx=True, _parallel_config=None,
):
    """diffusers' templated-attention forward op on ``nag_kernels.attention_with_lse`` (PyTorch's SDPA kernels):
    ``[B, S, H, D]`` in, ``(out [B, S, H, D], lse [B, S, H] float32)`` out; inference only (saves nothing)."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("NAG's context-parallel split attention takes no mask, dropout, causal or GQA arguments")
    out, lse = attention_with_lse(query, key, value, scale=scale)
    out, lse = out.contiguous(), lse.contiguous()
    return (out, lse) if return_lse else out


def _backward_op(ctx, grad_out, *args, **kwargs):
    # diffusers' CP templates pass a backward op no gradient of the LSE, which the split attention's merge needs.
    raise NotImplementedError(
        "NAG's context-parallel split attention is inference-only (no backward): run it under torch.no_grad(), or "
        "backpropagate without context parallelism"
    )


def cp_attention_with_lse(q, k, v, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local queries ``q [B, Sq, H, D]`` over the keys/values of **all** ranks of the CP mesh
    (``k, v [B, Sk, H, D]`` are this rank's slice), with its log-sum-exp: ``(out [B, Sq, H, D], lse [B, Sq, H])``,
    like ``nag_kernels.attention_with_lse`` on the gathered keys. Runs diffusers' own CP templates."""
    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
    except ImportError as err:  # pragma: no cover - diffusers < 0.36 has no context parallelism
        raise RuntimeError(f"context parallelism needs diffusers' templated CP attention: {err}") from err
    return _templated_context_parallel_attention(
        q, k, v, None, 0.0, False, None, False, True, forward_op=_forward_op, backward_op=_backward_op,
        _parallel_config=config,
    )


def combine_sharded(z_pos, z_neg, nag, group, out: torch.Tensor | None = None) -> torch.Tensor:
    """The NAG combine (docs/spec.md, "The combine") of tokens whose channels ``[..., C / tp]`` are spread over the
    ranks of ``group``: the partial norms are all-reduced (a ``[..., 2]`` float32 tensor) before the clamp. Same
    arguments and result as ``split_attention.combine``, for this rank's channels.

    Fused: ``nag_kernels.nag_partial_norms`` (this rank's sums of ``|z+|`` and ``|g|``, squares for L2) ->
    ``dist.all_reduce`` (SUM) over ``group`` -> ``nag_kernels.nag_with_norms`` (clamp and blend with the full-token
    norms), on ``nag.backend`` ("auto": Triton on GPU, PyTorch on CPU and for float64)."""
    if z_neg.dtype != z_pos.dtype:  # the ops take one dtype; the combine computes in float32 (float64) anyway
        z_neg = z_neg.to(z_pos.dtype)
    # The ops want the channel dim contiguous (leading dims may be strided); copy only where it is not.
    z_pos, z_neg = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (z_pos, z_neg))
    sums = nag_kernels.nag_partial_norms(z_pos, z_neg, nag.scale, norm=nag.norm, backend=nag.backend)
    if records_grad(sums):  # differentiable: the gradient of an all-reduced sum is the all-reduced gradient
        from torch.distributed.nn.functional import all_reduce

        sums = all_reduce(sums, group=group)
    else:
        dist.all_reduce(sums, group=group)
    direct = out is None or (out.dtype == z_pos.dtype and (out.shape[-1] <= 1 or out.stride(-1) == 1))
    result = nag_kernels.nag_with_norms(
        z_pos, z_neg, sums, nag.scale, nag.tau, nag.alpha, norm=nag.norm, out=out if direct else None,
        backend=nag.backend,
    )
    if out is None or result is out:
        return result
    return out.copy_(result)


def merge_combine_sharded(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, nag, group) -> torch.Tensor:
    """``nag_merge`` for heads spread over ``group`` (tensor parallelism): the two LSE merges per head, then
    ``combine_sharded`` over the token's heads on all ranks. ``o_* [B, S, H / tp, D]`` -> ``[B, S, H / tp, D]``."""
    z_pos = merge_attention_reference(o_shared, lse_shared, o_pos, lse_pos)  # docs/spec.md, "The LSE merge"
    z_neg = merge_attention_reference(o_shared, lse_shared, o_neg, lse_neg)
    out = combine_sharded(z_pos.flatten(-2), z_neg.flatten(-2), nag, group)
    return out.unflatten(-1, o_pos.shape[-2:]).to(o_pos.dtype)


def refuse_without_plan(config, where: str = "this call", *, model: type, family: str) -> None:
    """Refuse a guided call under diffusers' parallelism (``config``: a model's or a processor's ``_parallel_config``,
    ``None`` when there is none) for a family whose NAG runs on one process only: ``model`` has no context-parallel
    plan in diffusers, or one NAG does not implement. Calls without NAG never get here."""
    if config is None:
        return
    why = (f"diffusers has no context-parallel plan (_cp_plan) for {model.__name__}"
           if getattr(model, "_cp_plan", None) is None else f"NAG does not implement {family}'s context-parallel plan")
    raise NotImplementedError(
        f"NAG cannot guide {where} under diffusers' parallelism (a parallel config is set): {why}, and NAG's {family} "
        "integration runs on one process only. Call without NAG arguments, or run NAG without enable_parallelism / "
        "parallel_config"
    )
