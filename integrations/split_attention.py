"""The split attention of image queries over a joint sequence, merged by log-sum-exp with the NAG combine fused.

For an image query, attention over one branch's joint sequence (``[text_b ; image]`` or ``[image ; text_b]``: the
order of the keys does not change attention) is exactly the log-sum-exp merge of its attention over the image keys
(the same in both branches: computed once, batch ``B``) and over branch ``b``'s text keys (batch ``2B``, ``T`` keys).
``image_attention`` computes both parts with ``nag_kernels.attention.attention_with_lse`` (PyTorch's SDPA kernels
that return the LSE) and merges + NAG-combines them in one ``nag_kernels.nag_merge`` call (docs/spec.md, "The LSE
merge"). With 4096 image and 512 text tokens that is ``N^2 + 2NT`` instead of ``2N(N + T)`` query-key pairs.

Why not diffusers' ``dispatch_attention_fn(..., return_lse=True)``: in diffusers 0.42 the native backends (the
default ``"native"``, ``"_native_math"``, ``"_native_efficient"``) raise on ``return_lse``, and the LSE-capable ones
(flash-attn, sage, xformers, flex) cannot run on the machines these tests run on. The text queries, ``T`` per
branch, go through ``dispatch_attention_fn`` with the user's attention backend.

``branch_join`` builds each branch's joint key/value sequence with the image rows written once per branch, in either
token order, for the attention of the text queries.

Everything here is differentiable (NAG-guided fine-tuning and distillation backpropagate through it): the LSEs of
``attention_with_lse`` carry their gradient, and the merge and combine ops have autograd formulas. The in-place
``combine(..., out=...)`` is inference-only: callers pass ``out`` only where ``nag_kernels.compute.records_grad`` is
false.
"""

from __future__ import annotations

import torch

import nag_kernels
from nag_kernels.attention import attention_with_lse
from nag_kernels.compute import compute_dtype


def heads(head_dim: int, q, k, v, norm_q=None, norm_k=None):
    """``[B, S, C]`` projections -> ``[B, S, H, D]``, with the QK norms applied when given."""
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def branch_join(text: torch.Tensor, image: torch.Tensor, text_first: bool = True) -> torch.Tensor:
    """Each branch's joint sequence, the image rows shared: ``[text_b ; image]`` (``text_first``) or
    ``[image ; text_b]``.

    ``text [2B, T, ...]`` (positive rows, then NAG-negative rows) and ``image [B, N, ...]`` -> ``[2B, T + N, ...]``,
    equal to ``torch.cat([text, torch.cat([image, image])], dim=1)`` (in the given order) but written once: the nested
    ``cat`` writes the image rows twice.
    """
    batch, text_len, image_len = image.shape[0], text.shape[1], image.shape[1]
    out = text.new_empty((text.shape[0], text_len + image_len, *text.shape[2:]))
    text_part, image_part = (slice(0, text_len), slice(text_len, None)) if text_first else (
        slice(image_len, None), slice(0, image_len))
    out[:, text_part] = text
    out[:, image_part].unflatten(0, (2, batch)).copy_(image)  # broadcast over the two branches
    return out


def masked_attention_with_lse(q, k, v, key_mask: torch.Tensor):
    """Attention with a key mask, and its log-sum-exp, in plain PyTorch ops (for the small image-to-text part).

    ``q [B, Nq, H, D]``, ``k, v [B, Nk, H, D]``, ``key_mask [B, Nk]`` with SDPA's meaning: bool or integer (True /
    nonzero = attend) or floating (added to the scores) -> ``(out [B, Nq, H, D], lse [B, Nq, H])`` like
    ``attention_with_lse``: float32 math (float64 for float64), a query whose keys are all masked gets ``out = 0``
    and ``lse = -inf`` (the LSE merge's empty part).
    """
    compute = compute_dtype(q)
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # [B, H, S, D]
    scores = (qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, Nq, Nk]
    if key_mask.is_floating_point():
        bias = key_mask.to(compute)[:, None, None, :]
        blocked = torch.isneginf(bias)  # as masked keys: masked_fill keeps an all-masked row's NaN out of the gradient
        scores = (scores + bias.masked_fill(blocked, 0.0)).masked_fill(blocked, float("-inf"))
    else:
        scores = scores.masked_fill(~key_mask.to(torch.bool)[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Nq]; -inf where every key is masked
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(nan=0.0)  # all-masked rows: 0 instead of NaN
    out = (weights @ vh).transpose(1, 2).to(q.dtype)
    return out, lse.transpose(1, 2)


def merge_combine(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, nag) -> torch.Tensor:
    """``nag_kernels.nag_merge`` of the parts with the call's settings: ``[B, N, H, D]``."""
    return nag_kernels.nag_merge(
        o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, nag.scale, nag.tau, nag.alpha, norm=nag.norm,
        backend=nag.backend,
    )


def image_attention(
    q, k, v, text_k, text_v, nag, text_mask: torch.Tensor | None = None, *, attention=attention_with_lse,
    merge=merge_combine,
) -> torch.Tensor:
    """NAG-combined attention of the image queries over each branch's joint sequence, split and merged.

    Args:
        q, k, v: image queries/keys/values ``[B, N, H, D]`` (positions applied), shared by both branches.
        text_k, text_v: text keys/values ``[2B, T, H, D]``, positive rows then NAG-negative rows.
        nag: the call's ``guided.NAGForward`` (scale, tau, alpha, norm, backend).
        text_mask: optional key mask of each branch's text ``[2B, T]`` (bool: True = attend; floating: added to the
            scores, as SDPA's ``attn_mask``), e.g. the
            padding of Chroma's and Qwen-Image's prompts; only the image-to-text part has text keys, so only it is
            masked (``masked_attention_with_lse``). ``None``: every text key counts.
        attention: ``(q, k, v) -> (out [B', Nq, H, D], lse [B', Nq, H])``, the attention of the unmasked parts;
            ``attention_with_lse`` by default (context parallelism passes its CP attention: ``parallel``).
        merge: ``(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg, nag) -> [B, N, H, D]``, the two LSE merges
            and the combine; ``merge_combine`` (``nag_merge``) by default (tensor parallelism passes its sharded one).

    Returns:
        ``[B, N, H * D]`` in q's dtype: ``nag(attn_pos, attn_neg)`` where ``attn_b`` is the attention of ``q`` over
        the image keys and branch ``b``'s (unmasked) text keys, computed as the LSE merge of ``q`` over the image
        keys (once) and over ``text_b``.
    """
    batch = q.shape[0]
    o_image, lse_image = attention(q, k, v)  # [B, N, H, D], [B, N, H]
    if text_mask is None:
        o_text, lse_text = attention(torch.cat([q, q]), text_k, text_v)  # [2B, N, H, D]
    else:
        if text_mask.shape != text_k.shape[:2]:
            raise ValueError(f"text_mask must have shape {tuple(text_k.shape[:2])} (text rows, text tokens), got "
                             f"{tuple(text_mask.shape)}")
        o_text, lse_text = masked_attention_with_lse(torch.cat([q, q]), text_k, text_v, text_mask)
    out = merge(o_image, lse_image, o_text[:batch], lse_text[:batch], o_text[batch:], lse_text[batch:], nag)
    return out.flatten(2, 3).to(q.dtype)


def combine(z_pos: torch.Tensor, z_neg: torch.Tensor, nag, out: torch.Tensor | None = None) -> torch.Tensor:
    """``nag_kernels.nag`` with the call's settings (``"auto"`` picks a backend that takes the dtype). ``out``
    (in place) only where autograd records nothing (``nag_kernels.compute.records_grad``)."""
    return nag_kernels.nag(
        z_pos, z_neg, nag.scale, nag.tau, nag.alpha, norm=nag.norm, out=out, backend=nag.backend
    )
