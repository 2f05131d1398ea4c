"""An independent float64 implementation of the authors' NAG on SD3 / SD3.5 (``NAGJointAttnProcessor2_0``), for
the tests: docs/families/sd3.md.

It re-derives a whole ``SD3Transformer2DModel`` forward from the model's sub-modules: the patch embedding, the
timestep/pooled embedding, Linear layers and feed-forwards are called as modules (PEFT LoRA layers then apply; none of
them is patched by NAG); AdaLN modulation, layer/RMS norms, attention and the NAG combine are written here. It
accepts the batched-CFG layout: ``L`` latent rows and ``L + g`` text rows (the last ``g`` are the NAG-negative rows of
the last ``g`` latent rows); ``g = 0`` is a plain forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def authors_combine(z_pos, z_neg, scale, tau, alpha, norm="l1", eps=0.0):
    """The authors' combine; their SD3 file adds ``eps = 1e-7`` to both norms."""
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = (torch.norm(guided, p=p, dim=-1, keepdim=True) + eps) / (torch.norm(z_pos, p=p, dim=-1, keepdim=True) + eps)
    guided = guided * torch.clamp(ratio, max=tau) / ratio
    return guided * alpha + z_pos * (1 - alpha)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(norm, x):
    if norm is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _attention(q, k, v):
    """``[R, S, H, D]`` each -> ``[R, S, H * D]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def _heads(x, attn):
    return x.unflatten(-1, (attn.heads, -1))


def sd3_forward(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, nag_scale=5.0,
                nag_tau=2.5, nag_alpha=0.125, norm="l1", eps=0.0):
    """SD3 forward with NAG on the last ``g = text rows - latent rows`` latent rows. Returns ``[L, C, H, W]``."""
    rows, text_rows = hidden_states.shape[0], encoder_hidden_states.shape[0]
    g = text_rows - rows
    height, width = hidden_states.shape[-2:]
    x = model.pos_embed(hidden_states)  # [L, N, C]
    n = x.shape[1]
    temb = model.time_text_embed(timestep, pooled_projections[:rows])  # the NAG negative's pooled rows unused
    temb_text = torch.cat([temb, temb[rows - g:]])  # NAG-negative text rows: their latent row's (positive) temb
    image_row = list(range(rows)) + list(range(rows - g, rows))  # the latent row of each text row
    c = model.context_embedder(encoder_hidden_states)

    def combine(z):  # z [text_rows, N, C] per text row -> [rows, N, C]
        if g == 0:
            return z
        guided = authors_combine(z[rows - g : rows], z[rows:], nag_scale, nag_tau, nag_alpha, norm, eps)
        return torch.cat([z[: rows - g], guided])

    for block in model.transformer_blocks:
        attn = block.attn
        dual = block.attn2 is not None
        e = block.norm1.linear(F.silu(temb)).chunk(9 if dual else 6, dim=1)
        base = _ln(x)
        xn = base * (1 + e[1][:, None]) + e[0][:, None]
        if block.context_pre_only:
            c_scale, c_shift = block.norm1_context.linear(F.silu(temb_text)).chunk(2, dim=1)
            cn = _ln(c) * (1 + c_scale[:, None]) + c_shift[:, None]
        else:
            ec = block.norm1_context.linear(F.silu(temb_text)).chunk(6, dim=1)
            cn = _ln(c) * (1 + ec[1][:, None]) + ec[0][:, None]
        q = _rms(attn.norm_q, _heads(attn.to_q(xn), attn))[image_row]
        k = _rms(attn.norm_k, _heads(attn.to_k(xn), attn))[image_row]
        v = _heads(attn.to_v(xn), attn)[image_row]
        tq = _rms(attn.norm_added_q, _heads(attn.add_q_proj(cn), attn))
        tk = _rms(attn.norm_added_k, _heads(attn.add_k_proj(cn), attn))
        tv = _heads(attn.add_v_proj(cn), attn)
        out = _attention(torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1))  # [image ; text]
        x = x + e[2][:, None] * attn.to_out[0](combine(out[:, :n]))
        if dual:
            attn2 = block.attn2
            xn2 = base * (1 + e[7][:, None]) + e[6][:, None]
            q2 = _rms(attn2.norm_q, _heads(attn2.to_q(xn2), attn2))
            k2 = _rms(attn2.norm_k, _heads(attn2.to_k(xn2), attn2))
            x = x + e[8][:, None] * attn2.to_out[0](_attention(q2, k2, _heads(attn2.to_v(xn2), attn2)))
        x = x + e[5][:, None] * block.ff(_ln(x) * (1 + e[4][:, None]) + e[3][:, None])
        if not block.context_pre_only:
            c = c + ec[2][:, None] * attn.to_add_out(out[:, n:])
            c = c + ec[5][:, None] * block.ff_context(_ln(c) * (1 + ec[4][:, None]) + ec[3][:, None])

    scale, shift = model.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
    x = model.proj_out(_ln(x) * (1 + scale[:, None]) + shift[:, None])
    p, ch = model.config.patch_size, model.out_channels
    x = x.reshape(rows, height // p, width // p, p, p, ch)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(rows, ch, height, width)
