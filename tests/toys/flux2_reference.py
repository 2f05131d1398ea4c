"""An independent float64 implementation of NAG on FLUX.2 in the authors'-style 2B layout (docs/families/flux2.md).

Re-derives a whole ``Flux2Transformer2DModel`` forward from the model's sub-modules (Linear layers called as modules,
so PEFT LoRA layers apply; norms, modulation, RoPE, attention, SwiGLU and the timestep embedding written here) and,
when the text batch is twice the image batch, runs the exact layout: double blocks share the image stream and combine
its two branches' attention outputs; before the single blocks the image tokens are tiled to 2B, each single block
attends per branch, combines the image part and writes it into both halves; the positive half is kept. It never calls
NAG's processors or the blocks' forwards. Like diffusers it computes the sinusoidal timestep features and the RoPE
rotation in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flux_reference import _attention, _layer_norm, _rms, _rope, _rope_tables, authors_combine


def _sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _embed(embedder, t, dim, dtype):
    return embedder.linear_2(F.silu(embedder.linear_1(_sinusoid(t, dim).to(dtype))))


def _mod(modulation, temb, sets):
    """Flux2Modulation: ``sets`` triples (shift, scale, gate), each ``[rows, 1, C]``."""
    chunks = modulation.linear(F.silu(temb)).unsqueeze(1).chunk(3 * sets, dim=-1)
    return [chunks[3 * i: 3 * i + 3] for i in range(sets)]


def _swiglu(ff, x):
    a, b = ff.linear_in(x).chunk(2, dim=-1)
    return ff.linear_out(F.silu(a) * b)


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim))


def _branch_attention(q, k, v, cos, sin):
    """Per-row attention over the whole joint sequence with RoPE tables ``[S, D/2]``: ``[rows, S, H * D]``."""
    return _attention(_rope(q, cos, sin), _rope(k, cos, sin), v)


def flux2_forward(model, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None,
                  nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``[B, N, C_in]`` latents, ``[B or 2B, T, D]`` text -> ``[B, N, C_out]``."""
    batch, text_len = hidden_states.shape[0], encoder_hidden_states.shape[1]
    rows = encoder_hidden_states.shape[0]
    guided = rows == 2 * batch
    dtype = hidden_states.dtype
    channels = model.time_guidance_embed.time_proj.num_channels
    temb = _embed(model.time_guidance_embed.timestep_embedder, timestep * 1000, channels, dtype)
    if guidance is not None and model.time_guidance_embed.guidance_embedder is not None:
        temb = temb + _embed(model.time_guidance_embed.guidance_embedder, guidance * 1000, channels, dtype)
    tile = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    head_dim = model.config.attention_head_dim
    ids = torch.cat([txt_ids[0] if txt_ids.dim() == 3 else txt_ids, img_ids[0] if img_ids.dim() == 3 else img_ids])
    cos, sin = _rope_tables(ids, model.config.axes_dims_rope, theta=float(model.config.rope_theta))

    def combine_image(out):  # out [rows, T + N, C]: combine the image part of the two branches
        if not guided:
            return out[:, text_len:]
        return authors_combine(out[:batch, text_len:], out[batch:, text_len:], nag_scale, nag_tau, nag_alpha, norm)

    x = model.x_embedder(hidden_states)  # [B, N, C]
    c = model.context_embedder(encoder_hidden_states)  # [rows, T, C]
    (sh, sc, g), (sh2, sc2, g2) = _mod(model.double_stream_modulation_img, temb, 2)
    (csh, csc, cg), (csh2, csc2, cg2) = (tuple(map(tile, s)) for s in _mod(model.double_stream_modulation_txt, temb, 2))
    for block in model.transformer_blocks:
        attn = block.attn
        xn = _layer_norm(x) * (1 + sc) + sh
        cn = _layer_norm(c) * (1 + csc) + csh
        q = _rms(attn.norm_q, _heads(attn.to_q(xn), head_dim))
        k = _rms(attn.norm_k, _heads(attn.to_k(xn), head_dim))
        v = _heads(attn.to_v(xn), head_dim)
        tq = _rms(attn.norm_added_q, _heads(attn.add_q_proj(cn), head_dim))
        tk = _rms(attn.norm_added_k, _heads(attn.add_k_proj(cn), head_dim))
        tv = _heads(attn.add_v_proj(cn), head_dim)
        out = _branch_attention(
            torch.cat([tq, tile(q)], 1), torch.cat([tk, tile(k)], 1), torch.cat([tv, tile(v)], 1), cos, sin
        )
        x = x + g * attn.to_out[0](combine_image(out))
        x = x + g2 * _swiglu(block.ff, _layer_norm(x) * (1 + sc2) + sh2)
        c = c + cg * attn.to_add_out(out[:, :text_len])
        c = c + cg2 * _swiglu(block.ff_context, _layer_norm(c) * (1 + csc2) + csh2)

    h = torch.cat([c, tile(x)], dim=1)  # [rows, T + N, C], the image tiled to both halves
    ((ssh, ssc, sg),) = _mod(model.single_stream_modulation, temb, 1)
    ssh, ssc, sg = tile(ssh), tile(ssc), tile(sg)
    for block in model.single_transformer_blocks:
        attn = block.attn
        hn = _layer_norm(h) * (1 + ssc) + ssh
        proj = attn.to_qkv_mlp_proj(hn)
        qkv, mlp = proj.split([3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (_heads(t, head_dim) for t in qkv.chunk(3, dim=-1))
        q, k = _rms(attn.norm_q, q), _rms(attn.norm_k, k)
        out = _branch_attention(q, k, v, cos, sin)
        image = combine_image(out)
        out = torch.cat([out[:, :text_len], tile(image)], dim=1)  # the combined image into both halves
        a, b = mlp.chunk(2, dim=-1)
        h = h + sg * attn.to_out(torch.cat([out, F.silu(a) * b], dim=-1))

    x = h[:batch, text_len:]  # the positive half's image tokens
    scale, shift = model.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
    x = _layer_norm(x) * (1 + scale)[:, None] + shift[:, None]
    return model.proj_out(x)
