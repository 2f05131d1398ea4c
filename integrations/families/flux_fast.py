"""FLUX.1's fast-mode single block (docs/spec.md, "Fast mode"), and FLUX.1's RoPE split for the split attention.

The split image attention itself is ``split_attention.image_attention`` (shared by every family).

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
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .. import parallel
from ..split_attention import branch_join, heads, image_attention  # noqa: F401  (re-exported)


def qkv(attn, x: torch.Tensor):
    """Q, K, V projections ``[..., C]`` of ``x`` by ``attn`` (diffusers' own helper: fused ``to_qkv`` or not)."""
    return _get_qkv_projections(attn, x)[:3]


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


def fast_single_attention(attn, attend, image, text, image_rotary_emb, nag, *, parallel_config=None):
    """Fast-mode attention of a single block (``pre_only`` ``FluxAttention``, one set of projections for all tokens).

    Args:
        attn: the block's ``FluxAttention``.
        attend: ``(q, k, v) -> [B', S, H * D]`` attention through the user's diffusers attention backend.
        image: modulated image tokens ``[B, N, C]``; text: modulated text tokens ``[2B, T, C]``.
        image_rotary_emb: ``(cos, sin)``, each ``[T + N, D]``, for ``[text ; image]`` positions.
        parallel_config: the processor's ``ParallelConfig`` under context parallelism (``parallel.image_attention``).

    Returns:
        ``(image_out [B, N, C], text_out [2B, T, C])`` before ``proj_out``.
    """
    text_rope, image_rope = split_rope(image_rotary_emb, text.shape[1])
    q, k, v = heads(attn.head_dim, *qkv(attn, image), attn.norm_q, attn.norm_k)
    tq, tk, tv = heads(attn.head_dim, *qkv(attn, text), attn.norm_q, attn.norm_k)
    q, k = rope(q, image_rope), rope(k, image_rope)
    tq, tk = rope(tq, text_rope), rope(tk, text_rope)
    text_out = attend(tq, branch_join(tk, k), branch_join(tv, v))
    image_out = parallel.image_attention(
        q, k, v, tk, tv, nag, parallel_config=parallel_config, group=parallel.tp_group_of(attn)
    )
    return image_out, text_out


def fast_single_block(block, attend, image, text, temb, image_rotary_emb, nag, *, parallel_config=None):
    """One ``FluxSingleTransformerBlock`` in fast mode.

    Args:
        block: the ``FluxSingleTransformerBlock``.
        attend: see ``fast_single_attention``.
        image: ``[B, N, C]`` image tokens; text: ``[2B, T, C]`` text tokens (positive, then NAG-negative rows).
        temb: ``[2B, C]`` conditioning, rows matching ``text``; the image uses the first ``B`` (positive) rows.
        image_rotary_emb: ``(cos, sin)`` for ``[text ; image]`` positions.
        nag: the call's ``NAGForward``.
        parallel_config: see ``fast_single_attention``.

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
    image_attn, text_attn = fast_single_attention(
        block.attn, attend, image_n, text_n, image_rotary_emb, nag, parallel_config=parallel_config
    )

    def finish(x, x_norm, x_attn, gate):
        mlp = block.act_mlp(block.proj_mlp(x_norm))
        out = x + gate.unsqueeze(1) * block.proj_out(torch.cat([x_attn, mlp], dim=2))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)  # as the stock block
        return out

    return finish(text, text_n, text_attn, text_gate), finish(image, image_n, image_attn, image_gate)
