"""The split image-query attention (both modes' double blocks) and the fast-mode single block (NAG.md section 4).

For an image query, attention over ``[text_b ; image]`` is exactly the log-sum-exp merge of its attention over the
image keys (the same in both branches: computed once, batch ``B``) and over branch ``b``'s text keys (batch ``2B``,
``T`` keys). ``image_attention`` computes both parts with ``nag_kernels.attention_with_lse`` (PyTorch's SDPA kernels
that return the LSE) and merges + NAG-combines them in one ``nag_kernels.nag_merge`` call. At 4096 image and 512 text
tokens this is ``N^2 + 2NT`` instead of ``2N(N + T)`` query-key pairs for the image queries.

Why not diffusers' ``dispatch_attention_fn(..., return_lse=True)``: in diffusers 0.42 the native backends (the
default ``"native"``, ``"_native_math"``, ``"_native_efficient"``) raise on ``return_lse``, and the LSE-capable ones
(flash-attn, sage, xformers, flex) cannot run on the machines these tests run on, so their LSE layout is unverified
here. The split parts therefore always use ``attention_with_lse``; the text queries (``T`` of them per branch) go
through ``dispatch_attention_fn`` with the user's attention backend.

Fast single block (``fast_single_block``), with image ``x [B, N, C]``, text ``c [2B, T, C]`` (positive rows, then
NAG-negative rows) and ``temb [2B, C]``:

- ``AdaLayerNormZeroSingle``: ``x`` with ``temb[:B]``, ``c`` with all of ``temb``; MLP per token;
- attention: text queries of branch ``b`` over ``[text_b ; image]`` (image K/V shared); image queries: the NAG-combine
  of the two branches' merged attentions (``image_attention``), so the image stays at batch ``B``;
- ``proj_out`` on ``[attention ; mlp]`` per token, gated by the token's own rows of ``temb`` (``temb[:B]`` for image).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

import nag_kernels
from nag_kernels.attention import attention_with_lse


def qkv(attn, x: torch.Tensor):
    """Q, K, V projections ``[..., C]`` of ``x`` by ``attn`` (fused ``to_qkv`` when the model has fused them)."""
    if attn.fused_projections:
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def added_qkv(attn, x: torch.Tensor):
    """The text-stream (``add_*_proj``) Q, K, V projections of a double block's attention."""
    if attn.fused_projections and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(x).chunk(3, dim=-1)
    return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)


def heads(attn, q, k, v, norm_q, norm_k):
    """``[B, S, C]`` projections -> ``[B, S, H, D]`` with the QK RMS norms applied."""
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    return norm_q(q), norm_k(k), v


def split_rope(image_rotary_emb, text_len: int):
    """Flux's RoPE tables ``(cos, sin)``, each ``[T + N, D]`` for ``[text ; image]`` positions, split into the text
    part ``[T, D]`` and the image part ``[N, D]`` (``None`` stays ``None``)."""
    if image_rotary_emb is None:
        return None, None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        raise TypeError(
            "image_rotary_emb must be Flux's (cos, sin) tuple of [text + image tokens, head_dim] tables, got "
            f"{type(image_rotary_emb).__name__}"
        )
    cos, sin = image_rotary_emb
    return (cos[:text_len], sin[:text_len]), (cos[text_len:], sin[text_len:])


def rope(x: torch.Tensor, table) -> torch.Tensor:
    """Apply a ``(cos, sin)`` table ``[S, D]`` to ``x [B, S, H, D]`` (identity for ``None``)."""
    return x if table is None else apply_rotary_emb(x, table, sequence_dim=1)


def branch_join(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``[text_b ; image]`` along the sequence for both branches, with the image rows shared.

    ``text [2B, T, ...]`` (positive rows, then NAG-negative rows) and ``image [B, N, ...]`` -> ``[2B, T + N, ...]``,
    equal to ``torch.cat([text, torch.cat([image, image])], dim=1)`` but written once: the nested ``cat`` writes the
    image rows twice (``2B * N`` rows to a temporary, then again to the result).
    """
    batch, text_len = image.shape[0], text.shape[1]
    out = text.new_empty((text.shape[0], text_len + image.shape[1], *text.shape[2:]))
    out[:, :text_len] = text
    out[:, text_len:].unflatten(0, (2, batch)).copy_(image)  # broadcast over the two branches
    return out


def merge_backend(nag, dtype: torch.dtype) -> str:
    """The ``nag_merge`` backend for ``nag.backend``: the fused kernel has no float64 path, so "auto" means torch."""
    if nag.backend == "auto" and dtype == torch.float64:
        return "torch"
    return nag.backend


def image_attention(q, k, v, text_k, text_v, nag) -> torch.Tensor:
    """NAG-combined attention of the image queries over ``[text_b ; image]`` for both branches, split and merged.

    Args:
        q, k, v: image queries/keys/values ``[B, N, H, D]`` (RoPE applied), shared by both branches.
        text_k, text_v: text keys/values ``[2B, T, H, D]``, positive rows then NAG-negative rows (RoPE applied).
        nag: the call's ``NAGForward`` (scale, tau, alpha, norm, backend).

    Returns:
        ``[B, N, H * D]`` in q's dtype: ``nag(attn_pos, attn_neg)`` where ``attn_b`` is the attention of ``q`` over
        ``[text_b ; image]``, computed as the LSE merge of ``q`` over the image keys (once) and over ``text_b``.
    """
    batch = q.shape[0]
    o_image, lse_image = attention_with_lse(q, k, v)  # [B, N, H, D], [B, N, H]
    o_text, lse_text = attention_with_lse(torch.cat([q, q]), text_k, text_v)  # [2B, N, H, D]
    out = nag_kernels.nag_merge(
        o_image,
        lse_image,
        o_text[:batch],
        lse_text[:batch],
        o_text[batch:],
        lse_text[batch:],
        nag.scale,
        nag.tau,
        nag.alpha,
        norm=nag.norm,
        backend=merge_backend(nag, q.dtype),
    )
    return out.flatten(2, 3).to(q.dtype)


def fast_single_attention(attn, attend, image, text, image_rotary_emb, nag):
    """Fast-mode attention of a single block (``pre_only`` ``FluxAttention``, one set of projections for all tokens).

    Args:
        attn: the block's ``FluxAttention``.
        attend: ``(q, k, v) -> [B', S, H * D]`` attention through the user's diffusers attention backend.
        image: modulated image tokens ``[B, N, C]``; text: modulated text tokens ``[2B, T, C]``.
        image_rotary_emb: ``(cos, sin)``, each ``[T + N, D]``, for ``[text ; image]`` positions.

    Returns:
        ``(image_out [B, N, C], text_out [2B, T, C])`` before ``proj_out``.
    """
    text_rope, image_rope = split_rope(image_rotary_emb, text.shape[1])
    q, k, v = heads(attn, *qkv(attn, image), attn.norm_q, attn.norm_k)
    tq, tk, tv = heads(attn, *qkv(attn, text), attn.norm_q, attn.norm_k)
    q, k = rope(q, image_rope), rope(k, image_rope)
    tq, tk = rope(tq, text_rope), rope(tk, text_rope)
    text_out = attend(tq, branch_join(tk, k), branch_join(tv, v))
    return image_attention(q, k, v, tk, tv, nag), text_out


def fast_single_block(block, attend, image, text, temb, image_rotary_emb, nag):
    """One ``FluxSingleTransformerBlock`` in fast mode.

    Args:
        block: the ``FluxSingleTransformerBlock``.
        attend: see ``fast_single_attention``.
        image: ``[B, N, C]`` image tokens; text: ``[2B, T, C]`` text tokens (positive, then NAG-negative rows).
        temb: ``[2B, C]`` conditioning, rows matching ``text``; the image uses the first ``B`` (positive) rows.
        image_rotary_emb: ``(cos, sin)`` for ``[text ; image]`` positions.
        nag: the call's ``NAGForward``.

    Returns:
        ``(text [2B, T, C], image [B, N, C])``, the order of the stock block's outputs.
    """
    batch = image.shape[0]
    if text.shape[0] != 2 * batch or temb.shape[0] != 2 * batch:
        raise ValueError(
            f"fast-mode single block expects encoder_hidden_states and temb with {2 * batch} rows for {batch} image "
            f"rows, got {text.shape[0]} and {temb.shape[0]}"
        )
    image_n, image_gate = block.norm(image, emb=temb[:batch])
    text_n, text_gate = block.norm(text, emb=temb)
    image_attn, text_attn = fast_single_attention(block.attn, attend, image_n, text_n, image_rotary_emb, nag)

    def finish(x, x_norm, x_attn, gate):
        mlp = block.act_mlp(block.proj_mlp(x_norm))
        out = x + gate.unsqueeze(1) * block.proj_out(torch.cat([x_attn, mlp], dim=2))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)  # as the stock block
        return out

    return finish(text, text_n, text_attn, text_gate), finish(image, image_n, image_attn, image_gate)
