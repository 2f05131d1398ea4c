"""An independent float64 implementation of HunyuanVideo 1.5 with NAG (docs/families/hunyuanvideo15.md), for the
tests: never calls a module NAG patches, and runs the authors'-style computation per text row.

The text stream of each text row is built from that row's **valid** tokens only (its Qwen2.5-VL tokens through the
token refiner over those tokens alone, its ByT5 tokens, the image tokens when image-to-video) and has no padding, so
the reference checks that the model's padding, masks and per-row reordering play no part; the video stream is
computed once per latent sample and, in a guided forward, each branch's attention runs over ``[video ; text_b]``
(one softmax, no split), with the authors' form of the combine on the video outputs.

It calls the model's Linear layers, MLPs, timestep / text / image embedders and RoPE tables as modules (NAG patches
none of them) and writes the modulation, norms, RoPE rotation, attention and combine itself. Like diffusers it
rotates in float32 and takes RMS norms' mean square in float32 even in a float64 model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(norm, x):  # diffusers' RMSNorm: the mean square in float32 even for float64 inputs
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, cos, sin):  # x [S, H, D]; cos, sin [S, D]; diffusers rotates in float32
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(2)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


def _attention(q, k, v):  # [Sq, H, D], [Sk, H, D] -> [Sq, H * D]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).flatten(1)


def authors_combine(z_pos, z_neg, scale, tau, alpha, norm="l1"):
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    return guided * torch.clamp(ratio, max=tau) / ratio * alpha + z_pos * (1 - alpha)


def _refine(refiner, text, timestep):
    """The token refiner on one row's valid tokens ``[T, D]`` (pooled: their mean)."""
    temb = refiner.time_text_embed(timestep[None], text.mean(0, keepdim=True))  # [1, C]
    h = refiner.proj_in(text)
    for block in refiner.token_refiner.refiner_blocks:
        attn = block.attn
        hn = F.layer_norm(h, h.shape[-1:], block.norm1.weight, block.norm1.bias, block.norm1.eps)
        hd = attn.inner_dim // attn.heads
        q, k, v = (proj(hn).unflatten(-1, (-1, hd)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = attn.to_out[0](_attention(q, k, v))
        gate_msa, gate_mlp = block.norm_out.linear(F.silu(temb)).chunk(2, dim=-1)
        h = h + out * gate_msa
        hn = F.layer_norm(h, h.shape[-1:], block.norm2.weight, block.norm2.bias, block.norm2.eps)
        h = h + block.ff(hn) * gate_mlp
    return h


def text_stream(model, timestep, text, mask, text_2, mask_2, image_embeds):
    """One text row's tokens ``[T_valid, C]``: valid image tokens, valid ByT5 tokens, valid Qwen tokens."""
    cond = model.cond_type_embed.weight
    qwen = _refine(model.context_embedder, text[mask.bool()], timestep) + cond[0]
    byt5 = model.context_embedder_2(text_2[mask_2.bool()]) + cond[1]
    parts = [byt5, qwen]
    if image_embeds is not None:
        parts.insert(0, model.image_embedder(image_embeds) + cond[2])
    return torch.cat(parts)


def forward(model, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2,
            encoder_attention_mask_2, image_embeds, timestep_r=None, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25,
            norm="l1"):
    """The model's output ``[B, C, F, H, W]``; with ``2B`` text rows for ``B`` latent rows, NAG on every block's
    video attention output (each branch over ``[video ; text_b]``)."""
    batch, _, frames, height, width = hidden_states.shape
    text_rows = encoder_hidden_states.shape[0]
    guided = text_rows == 2 * batch
    p_t, p = model.config.patch_size_t, model.config.patch_size
    t2v = bool(torch.all(image_embeds == 0))
    temb = model.time_embed(timestep, timestep_r=timestep_r)  # [B, C]: the timestep only
    cos, sin = model.rope(hidden_states)  # [N, D]
    video = model.x_embedder.proj(hidden_states).flatten(2).transpose(1, 2)  # [B, N, C]
    out = []
    for b in range(batch):
        rows_b = [b, b + batch] if guided else [b]
        x = video[b]
        texts = [
            text_stream(model, timestep[b], encoder_hidden_states[r], encoder_attention_mask[r],
                        encoder_hidden_states_2[r], encoder_attention_mask_2[r], None if t2v else image_embeds[b])
            for r in rows_b
        ]
        e = temb[b : b + 1]
        for block in model.transformer_blocks:
            attn = block.attn
            hd = attn.inner_dim // attn.heads
            shift, scale, gate, shift2, scale2, gate2 = block.norm1.linear(F.silu(e)).chunk(6, dim=-1)
            tshift, tscale, tgate, tshift2, tscale2, tgate2 = block.norm1_context.linear(F.silu(e)).chunk(6, dim=-1)
            xn = _ln(x) * (1 + scale) + shift
            q = _rope(_rms(attn.norm_q, attn.to_q(xn).unflatten(-1, (-1, hd))), cos, sin)
            k = _rope(_rms(attn.norm_k, attn.to_k(xn).unflatten(-1, (-1, hd))), cos, sin)
            v = attn.to_v(xn).unflatten(-1, (-1, hd))
            video_outs, new_texts = [], []
            for c in texts:
                cn = _ln(c) * (1 + tscale) + tshift
                tq = _rms(attn.norm_added_q, attn.add_q_proj(cn).unflatten(-1, (-1, hd)))
                tk = _rms(attn.norm_added_k, attn.add_k_proj(cn).unflatten(-1, (-1, hd)))
                tv = attn.add_v_proj(cn).unflatten(-1, (-1, hd))
                o = _attention(torch.cat([q, tq]), torch.cat([k, tk]), torch.cat([v, tv]))
                video_outs.append(o[: x.shape[0]])
                c = c + tgate * attn.to_add_out(o[x.shape[0] :])
                c = c + tgate2 * block.ff_context(_ln(c) * (1 + tscale2) + tshift2)
                new_texts.append(c)
            texts = new_texts
            o = video_outs[0]
            if guided:
                o = authors_combine(video_outs[0], video_outs[1], nag_scale, nag_tau, nag_alpha, norm)
            x = x + gate * attn.to_out[0](o)
            x = x + gate2 * block.ff(_ln(x) * (1 + scale2) + shift2)
        scale, shift = model.norm_out.linear(F.silu(e)).chunk(2, dim=-1)
        out.append(model.proj_out(_ln(x) * (1 + scale) + shift))
    x = torch.stack(out)  # [B, N, p_t * p * p * C]
    x = x.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)
