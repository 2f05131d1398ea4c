"""An independent float64 implementation of NAG on FLUX.3 in the authors'-style 2B layout (docs/families/flux3.md).

Re-derives a whole ``Flux3Transformer2DModel`` forward from the model's sub-modules (Linear layers called as modules,
so PEFT LoRA layers apply; the layer norms, QK RMSNorms, modulation, RoPE, attention, SwiGLU and the timestep
embedding written here). With ``2B`` text rows for ``B`` latent rows it runs the 2B layout: the text through the
context embedder and the text mode blocks on all ``2B`` rows, the image and reference tokens and every modulation
tiled to ``2B`` rows (the image and reference mode blocks on each row), each single-stream block attending per row
over ``[text_b ; image ; image_cond]``; the image and reference part of each single-stream block's attention output
(where it enters ``to_out``) is NAG-combined over the two branches and written into both halves; the positive half's
image tokens are decoded. It never calls NAG's code or the model's blocks, attention modules, norms or embedders'
forwards. Run it with the model in float64 under ``float64_throughout`` (``flux3_toy``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from flux_reference import authors_combine


def _layer_norm(x, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


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


def attention(attn, x, rope):
    """FLUX.3's attention of ``x [R, S, C]`` before ``to_out``: ``[R, S, C]``."""
    h = attn.heads
    q = _rms(attn.norm_q, attn.to_q(x).unflatten(-1, (h, -1)))
    k = _rms(attn.norm_k, attn.to_k(x).unflatten(-1, (h, -1)))
    v = attn.to_v(x).unflatten(-1, (h, -1))
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    scores = torch.einsum("rqhd,rkhd->rhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("rhqk,rkhd->rqhd", torch.softmax(scores, dim=-1), v).flatten(2)


def _ff(ff, x):
    h = ff.linear_in(x)
    half = h.shape[-1] // 2
    return ff.linear_out(F.silu(h[..., :half]) * h[..., half:])


def _modulate(x, mod, eps):
    shift, scale, gate = mod.chunk(3, dim=-1)
    return (1 + scale) * _layer_norm(x, eps) + shift, gate


def mode_block(block, x, mod, rope, eps):
    n, gate = _modulate(x, mod, eps)
    return x + gate * (block.attn.to_out[0](attention(block.attn, n, rope)) + _ff(block.ff, n))


def _sinusoid(t, channels):
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)  # float32, as diffusers
    args = t.double()[:, None] * freqs.double()[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos


def _embed(embedder, t, channels, dtype):
    x = _sinusoid(t, channels).to(dtype)
    return embedder.linear_2(F.silu(embedder.linear_1(x)))[:, None]  # [rows, 1, C]


def flux3_forward(model, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
                  image_cond_hidden_states=None, image_cond_ids=None, target_timestep=None, nag_scale=5.0,
                  nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``[B, N, C_in]`` latents, ``[B or 2B, T, joint_attention_dim]`` text -> ``[B, N, C_out]``."""
    config = model.config
    eps = config.eps
    batch, image_len = hidden_states.shape[:2]
    rows, text_len = encoder_hidden_states.shape[:2]
    guided = rows == 2 * batch
    tile = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    dtype = hidden_states.dtype
    channels = config.timestep_channels

    timestep = timestep.expand(batch)
    image_temb = _embed(model.timestep_embedder, timestep * 1000, channels, dtype)  # [B, 1, C]
    zero_temb = _embed(model.timestep_embedder, torch.zeros(batch, dtype=dtype), channels, dtype)
    if target_timestep is not None:
        target = _embed(model.target_timestep_embedder, target_timestep.expand(batch) * 1000, channels, dtype)
        image_temb, zero_temb = image_temb + target, zero_temb + target
    image_act, zero_act = tile(F.silu(image_temb)), tile(F.silu(zero_temb))  # [rows, 1, C]

    def mods(name, act):
        return (model.early_stream_modulations[name].linear(act), model.single_stream_modulations[name].linear(act))

    axes, theta = config.axes_dims_rope, float(config.rope_theta)
    txt_early, txt_single = mods("txt", zero_act)
    img_early, img_single = mods("image", image_act)
    txt_rope = _rope_tables(txt_ids, axes, theta)
    img_rope = _rope_tables(img_ids, axes, theta)

    c = model.context_embedder(encoder_hidden_states)  # [rows, T, C]
    for block in model.txt_mode_blocks:  # each text row over its own tokens
        c = mode_block(block, c, txt_early, txt_rope, eps)
    x = tile(model.x_embedders["image"](hidden_states))
    for block in model.mode_blocks["image"]:
        x = mode_block(block, x, img_early, img_rope, eps)
    content, content_mod, rope_parts = x, img_single, [txt_rope, img_rope]
    if image_cond_hidden_states is not None:
        cond_early, cond_single = mods("image_cond", zero_act)
        cond_rope = _rope_tables(image_cond_ids, axes, theta)
        r = tile(model.x_embedders["image_cond"](image_cond_hidden_states))
        for block in model.mode_blocks["image_cond"]:
            r = mode_block(block, r, cond_early, cond_rope, eps)
        content = torch.cat([x, r], dim=1)
        content_mod = torch.cat([img_single.expand(-1, image_len, -1),
                                 cond_single.expand(-1, r.shape[1], -1)], dim=1)
        rope_parts.append(cond_rope)
    rope = tuple(torch.cat([part[i] for part in rope_parts]) for i in range(2))

    for block in model.single_transformer_blocks:
        n_content, gate = _modulate(content, content_mod, eps)
        n_text, c_gate = _modulate(c, txt_single, eps)
        joint = torch.cat([n_text, n_content], dim=1)
        z = attention(block.attn, joint, rope)  # [rows, T + M, C]
        if guided:  # the content part, combined over the branches, into both halves
            combined = authors_combine(z[:batch, text_len:], z[batch:, text_len:], nag_scale, nag_tau, nag_alpha, norm)
            z = torch.cat([z[:, :text_len], tile(combined)], dim=1)
        out = block.attn.to_out[0](z) + _ff(block.ff, joint)
        c = c + c_gate * out[:, :text_len]
        content = content + gate * out[:, text_len:]

    x = content[:batch, :image_len]  # the positive half's image tokens
    final = model.norm_out
    scale, shift = final.linear(F.silu(image_temb)).chunk(2, dim=-1)
    return model.proj_out(_layer_norm(x, eps) * (1 + scale) + shift)
