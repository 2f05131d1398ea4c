"""An independent implementation of the authors' NAG algorithm on Flux, for the tests (docs/spec.md, "Exact mode on
FLUX.1").

Written from the specification, not from the integration: it re-derives a whole FLUX.1 forward from the model's
sub-modules (Linear layers are called as modules so that PEFT LoRA layers apply; norms, modulation, RoPE, attention,
MLPs and the timestep embedding are written here) and, when the text batch is twice the image batch, runs the authors'
layout with their combine formula. It follows diffusers in its two float32 islands (the sinusoidal timestep features
and the RoPE rotation, which diffusers computes in float32 even for float64 models) so that float64 runs agree to
~1e-12.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def authors_combine(z_pos, z_neg, scale, tau, alpha, norm):
    """The authors' Flux combine: extrapolate, clamp the norm ratio at tau, blend."""
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    guided = guided * torch.clamp(ratio, max=tau) / ratio
    return guided * alpha + z_pos * (1 - alpha)


def _sinusoid(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp(embedder, x):
    return embedder.linear_2(F.silu(embedder.linear_1(x)))


def _layer_norm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope_tables(ids, axes, theta=10000.0):
    angles = []
    for i, d in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[:, i].double()[:, None] * freqs[None])
    angles = torch.cat(angles, dim=-1)  # [S, D/2]
    return angles.cos().float(), angles.sin().float()


def _rope(x, cos, sin):
    # x [B, S, H, D]; pairs (x[2j], x[2j+1]) rotate by angle j (diffusers rotates in float32)
    pairs = x.float().unflatten(-1, (-1, 2))
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _attention(q, k, v):
    # [B, S, H, D] -> [B, S, H * D]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim))


def flux_forward(
    model,
    hidden_states,
    encoder_hidden_states,
    pooled_projections,
    timestep,
    img_ids,
    txt_ids,
    guidance=None,
    nag_scale=5.0,
    nag_tau=2.5,
    nag_alpha=0.25,
    norm="l1",
    mode="exact",
):
    """FLUX.1 forward; with ``2B`` text rows for ``B`` image rows, NAG: ``mode="exact"`` the authors' layout
    (docs/spec.md, "Exact mode on FLUX.1"), ``mode="fast"`` the shared-image-stream definition ("Fast mode"), written as one full attention per
    branch over ``[text_b ; image]`` (no LSE split). Returns ``[B, N, C]``."""
    batch, text_len = hidden_states.shape[0], encoder_hidden_states.shape[1]
    nag = encoder_hidden_states.shape[0] == 2 * batch
    rows = 2 * batch if nag else batch
    head_dim = model.config.attention_head_dim

    def per_row(x):
        if x is None or x.shape[0] == rows:
            return x
        return torch.cat([x, x])

    timestep, guidance = per_row(timestep), per_row(guidance)
    dtype = hidden_states.dtype
    embeds = model.time_text_embed
    temb = _mlp(embeds.timestep_embedder, _sinusoid(timestep * 1000).to(dtype))
    if guidance is not None:
        temb = temb + _mlp(embeds.guidance_embedder, _sinusoid(guidance * 1000).to(dtype))
    temb = temb + _mlp(embeds.text_embedder, pooled_projections)

    x = model.x_embedder(hidden_states)
    c = model.context_embedder(encoder_hidden_states)
    cos, sin = _rope_tables(torch.cat([txt_ids, img_ids]), model.config.axes_dims_rope)

    def combine(z):  # z [2B, N, C] -> [B, N, C]
        return authors_combine(z[:batch], z[batch:], nag_scale, nag_tau, nag_alpha, norm)

    for block in model.transformer_blocks:
        attn = block.attn
        e = block.norm1.linear(F.silu(temb[:batch])).chunk(6, dim=1)
        ec = block.norm1_context.linear(F.silu(temb)).chunk(6, dim=1)
        xn = _layer_norm(x) * (1 + e[1][:, None]) + e[0][:, None]
        cn = _layer_norm(c) * (1 + ec[1][:, None]) + ec[0][:, None]
        q = _rms(attn.norm_q, _heads(attn.to_q(xn), head_dim))
        k = _rms(attn.norm_k, _heads(attn.to_k(xn), head_dim))
        v = _heads(attn.to_v(xn), head_dim)
        tq = _rms(attn.norm_added_q, _heads(attn.add_q_proj(cn), head_dim))
        tk = _rms(attn.norm_added_k, _heads(attn.add_k_proj(cn), head_dim))
        tv = _heads(attn.add_v_proj(cn), head_dim)
        outs = []
        for branch in range(rows // batch):  # each branch: its own text, the shared image Q/K/V
            part = slice(branch * batch, (branch + 1) * batch)
            query = _rope(torch.cat([tq[part], q], dim=1), cos, sin)
            key = _rope(torch.cat([tk[part], k], dim=1), cos, sin)
            outs.append(_attention(query, key, torch.cat([tv[part], v], dim=1)))
        out = torch.cat(outs)
        image = combine(out[:, text_len:]) if nag else out[:, text_len:]
        x = x + e[2][:, None] * attn.to_out[0](image)
        c = c + ec[2][:, None] * attn.to_add_out(out[:, :text_len])
        x = x + e[5][:, None] * block.ff(_layer_norm(x) * (1 + e[4][:, None]) + e[3][:, None])
        c = c + ec[5][:, None] * block.ff_context(_layer_norm(c) * (1 + ec[4][:, None]) + ec[3][:, None])

    if nag and mode == "fast":
        for block in model.single_transformer_blocks:
            attn = block.attn
            shift, scale, gate = block.norm.linear(F.silu(temb)).chunk(3, dim=1)  # [2B] rows each
            xn = _layer_norm(x) * (1 + scale[:batch, None]) + shift[:batch, None]  # image: positive rows
            cn = _layer_norm(c) * (1 + scale[:, None]) + shift[:, None]  # text: its own rows
            outs = []
            for branch in range(2):
                hn = torch.cat([cn[branch * batch : (branch + 1) * batch], xn], dim=1)
                q = _rope(_rms(attn.norm_q, _heads(attn.to_q(hn), head_dim)), cos, sin)
                k = _rope(_rms(attn.norm_k, _heads(attn.to_k(hn), head_dim)), cos, sin)
                outs.append(_attention(q, k, _heads(attn.to_v(hn), head_dim)))
            out = torch.cat(outs)
            image = combine(out[:, text_len:])
            mlp_c = F.gelu(block.proj_mlp(cn), approximate="tanh")
            mlp_x = F.gelu(block.proj_mlp(xn), approximate="tanh")
            c = c + gate[:, None] * block.proj_out(torch.cat([out[:, :text_len], mlp_c], dim=2))
            x = x + gate[:batch, None] * block.proj_out(torch.cat([image, mlp_x], dim=2))
        scale, shift = model.norm_out.linear(F.silu(temb[:batch])).chunk(2, dim=1)
        return model.proj_out(_layer_norm(x) * (1 + scale[:, None]) + shift[:, None])

    h = torch.cat([c, torch.cat([x, x]) if nag else x], dim=1)
    for block in model.single_transformer_blocks:
        attn = block.attn
        shift, scale, gate = block.norm.linear(F.silu(temb)).chunk(3, dim=1)
        hn = _layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
        mlp = F.gelu(block.proj_mlp(hn), approximate="tanh")
        q = _rope(_rms(attn.norm_q, _heads(attn.to_q(hn), head_dim)), cos, sin)
        k = _rope(_rms(attn.norm_k, _heads(attn.to_k(hn), head_dim)), cos, sin)
        out = _attention(q, k, _heads(attn.to_v(hn), head_dim))
        if nag:
            guided = combine(out[:, text_len:])
            out = torch.cat([out[:, :text_len], torch.cat([guided, guided])], dim=1)
        h = h + gate[:, None] * block.proj_out(torch.cat([out, mlp], dim=2))

    x = h[:batch, text_len:]
    scale, shift = model.norm_out.linear(F.silu(temb[:batch])).chunk(2, dim=1)
    return model.proj_out(_layer_norm(x) * (1 + scale[:, None]) + shift[:, None])
