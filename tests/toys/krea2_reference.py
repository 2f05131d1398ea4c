"""An independent float64 implementation of NAG on Krea 2 in the authors'-style 2B layout (docs/families/krea2.md).

Re-derives a whole ``Krea2Transformer2DModel`` forward from the model's sub-modules (Linear layers called as modules,
so PEFT LoRA layers apply; the zero-centred RMSNorm, modulation, RoPE, grouped-query attention with the text key mask,
the sigmoid output gate, SwiGLU, the text fusion and the timestep embedding written here). With ``2B`` text rows for
``B`` latent rows it runs the 2B layout: the text fusion on all ``2B`` rows, the image tokens and the timestep
conditioning tiled to ``2B``, each block attending per row over ``[text_b ; image]``; the image part of each block's
gated attention output (where it enters ``to_out``) is NAG-combined over the two branches and written into both
halves; the positive half's image tokens are decoded. It never calls NAG's code or the model's blocks, attention
modules or norms. Run it with the model in float64 under ``float64_throughout`` (``krea2_toy``) so that diffusers'
float32 steps (RMSNorm, RoPE tables) are float64 too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flux_reference import authors_combine


def _rms(norm, x):
    """Krea2RMSNorm: zero-centred scale ``1 + weight``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def _swiglu(ff, x):
    return ff.down(F.silu(ff.gate(x)) * ff.up(x))


def _rope_tables(ids, axes, theta):
    """``(cos, sin)``, each ``[S, D]`` (pairs interleaved), for positions ``ids [S, len(axes)]``."""
    cos, sin = [], []
    for axis, dim in enumerate(axes):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = ids[:, axis].double()[:, None] * inv[None]
        cos.append(torch.cos(angle).repeat_interleave(2, dim=-1))
        sin.append(torch.sin(angle).repeat_interleave(2, dim=-1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def _rotate(x, cos, sin):
    """``x [R, S, H, D]`` rotated pairwise ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _attention(attn, x, keep=None, rope=None):
    """Krea 2's gated attention of ``x [R, S, C]`` before ``to_out``: ``[R, S, C]``. ``keep [R, S]`` bool key mask."""
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = _rms(attn.norm_q, attn.to_q(x).unflatten(-1, (h, d)))
    k = _rms(attn.norm_k, attn.to_k(x).unflatten(-1, (kv, d)))
    v = attn.to_v(x).unflatten(-1, (kv, d))
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    k, v = (t.repeat_interleave(h // kv, dim=2) for t in (k, v))  # each query head reads its group's K/V head
    scores = torch.einsum("rqhd,rkhd->rhqk", q, k) / math.sqrt(d)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.einsum("rhqk,rkhd->rqhd", torch.softmax(scores, dim=-1), v).flatten(2)
    return out * torch.sigmoid(attn.to_gate(x))


def _fusion_block(block, x, keep=None):
    x = x + block.attn.to_out[0](_attention(block.attn, _rms(block.norm1, x), keep))
    return x + _swiglu(block.ff, _rms(block.norm2, x))


def text_fusion(fusion, text, mask):
    """``[R, T, layers, dim]`` -> ``[R, T, dim]``: layerwise blocks per token, the layer axis projected, refiner blocks
    over the tokens with the mask."""
    rows, text_len, layers, dim = text.shape
    x = text.reshape(rows * text_len, layers, dim)
    for block in fusion.layerwise_blocks:
        x = _fusion_block(block, x)
    x = fusion.projector(x.reshape(rows, text_len, layers, dim).permute(0, 1, 3, 2)).squeeze(-1)
    for block in fusion.refiner_blocks:
        x = _fusion_block(block, x, mask)
    return x


def _timestep(model, timestep, dtype):
    embed = model.time_embed
    half = embed.embed_dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float32) / half)  # a float32 table, as diffusers
    args = (timestep.double() * 1e3)[:, None] * freqs.double()[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
    return embed.linear_2(_gelu(embed.linear_1(emb)))[:, None]  # [rows, 1, C]


def krea2_forward(model, hidden_states, encoder_hidden_states, timestep, position_ids, encoder_attention_mask=None,
                  nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``[B, N, C_in]`` latents, ``[B or 2B, T, layers, dim]`` text (mask ``[B or 2B, T]`` bool) -> ``[B, N, C_out]``."""
    batch, image_len = hidden_states.shape[:2]
    rows, text_len = encoder_hidden_states.shape[:2]
    guided = rows == 2 * batch
    tile = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    dtype = hidden_states.dtype
    mask = encoder_attention_mask
    if mask is None:
        mask = torch.ones(rows, text_len, dtype=torch.bool)
    keep = torch.cat([mask, torch.ones(rows, image_len, dtype=torch.bool)], dim=1)  # [rows, T + N]

    temb = _timestep(model, timestep, dtype)  # [B, 1, C]
    mod = tile(model.time_mod_proj(_gelu(temb)))  # [rows, 1, 6C]
    c = text_fusion(model.text_fusion, encoder_hidden_states, None if encoder_attention_mask is None else mask)
    txt = model.txt_in
    c = txt.linear_2(_gelu(txt.linear_1(_rms(txt.norm, c))))
    x = torch.cat([c, tile(model.img_in(hidden_states))], dim=1)  # [rows, T + N, C]
    rope = _rope_tables(position_ids, model.config.axes_dims_rope, float(model.config.rope_theta))

    for block in model.transformer_blocks:
        params = mod.unflatten(-1, (6, -1)) + block.scale_shift_table
        prescale, preshift, pregate, postscale, postshift, postgate = params.unbind(-2)
        z = _attention(block.attn, (1 + prescale) * _rms(block.norm1, x) + preshift, keep, rope)
        if guided:  # the image part of the gated output, combined over the branches, into both halves
            image = authors_combine(z[:batch, text_len:], z[batch:, text_len:], nag_scale, nag_tau, nag_alpha, norm)
            z = torch.cat([z[:, :text_len], tile(image)], dim=1)
        x = x + pregate * block.attn.to_out[0](z)
        x = x + postgate * _swiglu(block.ff, (1 + postscale) * _rms(block.norm2, x) + postshift)

    x = x[:batch, text_len:]  # the positive half's image tokens
    final = model.final_layer
    scale, shift = (temb + final.scale_shift_table).chunk(2, dim=1)
    return final.linear((1 + scale) * _rms(final.norm, x) + shift)
