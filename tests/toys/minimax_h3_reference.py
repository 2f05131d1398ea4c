"""An independent float64 implementation of NAG on MiniMax-H3 (docs/families/minimax_h3.md, "What a guided forward
computes").

Re-derives a whole ``MiniMaxH3Transformer3DModel`` forward from the model's sub-modules (Linear layers called as
modules, so PEFT LoRA layers apply; RMS norms, per-row modulation, RoPE, attention, SwiGLU and the timestep MLP
written here) over the packed sequence, with the NAG negative's text as an extra segment: each text row of a branch
attends to its own branch's text and the media rows; a media row's attention is computed over each branch's keys
(its text and every media row), both whole, and NAG-combined. It never calls NAG's processors nor the modules'
forwards. Like diffusers it computes the sinusoidal timestep features and the RoPE angles in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding


def combine(z_pos, z_neg, scale, tau, alpha, norm="l1"):
    """NAG's combine per token over all its channels: extrapolate, clamp the norm ratio at tau, blend."""
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    guided = guided * torch.clamp(ratio, max=tau) / ratio
    return guided * alpha + z_pos * (1 - alpha)


def _rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope_tables(model, positions):
    """cos / sin ``[S, 6 * f]`` as the model computes them (frequencies in float32)."""
    f = model.config.rope_freq_dim
    inv = 1.0 / (model.config.rope_theta ** (torch.arange(0, 2 * f, 2, dtype=torch.float32) / (2 * f)))
    angles = positions.float()[:, :, None] * inv.to(model.rope.inv_freq.dtype)  # the buffer's dtype (float64: .to)
    angles = torch.cat([angles[:, 0], angles[:, 1], angles[:, 2]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rope(x, cos, sin):
    """rotate_half on the leading ``cos.shape[-1]`` channels of ``x [B, S, H, D]``."""
    d = cos.shape[-1]
    c, s = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([rot * c + torch.cat([-x2, x1], dim=-1) * s, rest], dim=-1)


def _softmax_attention(q, k, v):
    """``[B, Sq, H, D]``, ``[B, Sk, H, D]`` -> ``[B, Sq, H * D]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def _qkv(attn, x):
    q, k, v = (layer(x).unflatten(-1, (attn.heads, -1)) for layer in (attn.to_q, attn.to_k, attn.to_v))
    return _rms(attn.norm_q, q), _rms(attn.norm_k, k), v


def _swiglu(ff, x):
    a, b = ff.net[0].proj(x).chunk(2, dim=-1)
    return ff.net[2](a * F.silu(b))  # diffusers SwiGLU: the second half gates


def _refine(model, text):
    for block in model.token_refiner.refiner_blocks:
        q, k, v = _qkv(block.attn, _rms(block.norm1, text))
        text = text + block.attn.to_out[0](_softmax_attention(q, k, v))
        text = text + _swiglu(block.ff, _rms(block.norm2, text))
    return _rms(model.token_refiner.final_norm, text)


def minimax_h3_forward(model, hidden_states, audio_hidden_states, encoder_hidden_states, timestep, timestep_indices,
                       token_tags, position_ids, video_indices, audio_indices, text_indices, nag_scale=5.0,
                       nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``B`` latent rows, ``[B or 2B, T, D]`` text -> ``(video [B, Nv, C], audio [B, Na, C])``."""
    batch = hidden_states.shape[0]
    guided = encoder_hidden_states.shape[0] == 2 * batch
    length = position_ids.shape[0]
    media = torch.cat([video_indices, audio_indices])

    hidden_states = hidden_states.to(model.proj_in.weight.dtype)  # as the model: inputs at their projection's dtype
    audio_hidden_states = audio_hidden_states.to(model.audio_proj_in.weight.dtype)
    encoder_hidden_states = encoder_hidden_states.to(model.context_embedder.weight.dtype)
    text = _refine(model, model.context_embedder(encoder_hidden_states))  # [R, T, C]
    x = text.new_zeros(batch, length, text.shape[-1])
    x[:, text_indices] = text[:batch]
    x[:, video_indices] = model.proj_in(hidden_states)
    x[:, audio_indices] = model.audio_proj_in(audio_hidden_states)
    neg = text[batch:]  # the NAG negative's text rows [B, T, C] (empty when plain)

    cos, sin = _rope_tables(model, position_ids)
    cos_t, sin_t = cos[text_indices], sin[text_indices]  # the negative's rows sit at their positive twins' positions
    features = get_timestep_embedding(timestep, model.config.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    emb = model.time_embedder
    temb = emb.linear_2(F.silu(emb.linear_1(features.to(x.dtype))))
    rows = timestep_indices * 3 + token_tags
    rows_t = rows[text_indices]

    for block in model.transformer_blocks:
        table = block.adaln_proj.linear(F.silu(temb)).view(-1, 6 * x.shape[-1]).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = table
        attn = block.attn

        def project(h, r, c, s, attn=attn, norm=block.norm1, scale=scale1, shift=shift1):
            q, k, v = _qkv(attn, _rms(norm, h) * (1 + scale[r]) + shift[r])
            return _rope(q, c, s), _rope(k, c, s), v

        q, k, v = project(x, rows, cos, sin)
        out = torch.empty(batch, length, q.shape[2] * q.shape[3], dtype=x.dtype)
        out[:, text_indices] = _softmax_attention(q[:, text_indices], k, v)  # positive text: the stock sequence
        z_pos = _softmax_attention(q[:, media], k, v)
        if guided:
            nq, nk, nv = project(neg, rows_t, cos_t, sin_t)
            keys = torch.cat([nk, k[:, media]], dim=1)
            values = torch.cat([nv, v[:, media]], dim=1)
            neg_out = _softmax_attention(nq, keys, values)
            z_neg = _softmax_attention(q[:, media], keys, values)
            out[:, media] = combine(z_pos, z_neg, nag_scale, nag_tau, nag_alpha, norm)
            neg = neg + gate1[rows_t] * attn.to_out[0](neg_out)
            neg = neg + gate2[rows_t] * _swiglu(block.ff, _rms(block.norm2, neg) * (1 + scale2[rows_t]) + shift2[rows_t])
        else:
            out[:, media] = z_pos
        x = x + gate1[rows] * attn.to_out[0](out)
        x = x + gate2[rows] * _swiglu(block.ff, _rms(block.norm2, x) * (1 + scale2[rows]) + shift2[rows])

    shift, scale = model.norm_out.linear(F.silu(temb)).chunk(2, dim=-1)
    x = _rms(model.norm_out.norm, x) * (1 + scale[timestep_indices]) + shift[timestep_indices]
    return model.proj_out(x)[:, video_indices], model.audio_proj_out(x)[:, audio_indices]
