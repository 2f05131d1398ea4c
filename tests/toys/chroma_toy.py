"""A tiny random-weight Chroma transformer and an independent float64 implementation of the authors' NAG layout on it
(FLUX.1's exact mode: image tokens tiled to 2B rows through the single blocks, the combined image attention written
into both halves), for the tests. docs/families/chroma.md: on Chroma this layout equals the shared image stream.

Linear layers, MLPs, the timestep approximator and the RoPE tables are called as modules (NAG patches none of them);
the modulation, norms, RoPE rotation, masked attention (SDPA's meaning: bool masks mask, float masks are added to the
scores) and the combine are written here. RMS norms take the mean square and RoPE rotates in float32, as diffusers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ChromaTransformer2DModel

TEXT_DIM = 32


def transformer(layers: int = 2, single_layers: int = 2, seed: int = 0) -> ChromaTransformer2DModel:
    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=2,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(norm, x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    c, s = cos[None, :, None, ::2].float(), sin[None, :, None, ::2].float()
    out = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _attention(q, k, v, pairs):  # [R, S, H, D]; pairs [R, S, S] (bool: keep; float: added) or None
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if pairs is not None:
        pairs = pairs[:, None]
        scores = scores + pairs if pairs.is_floating_point() else scores.masked_fill(~pairs, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)


def authors_combine(z_pos, z_neg, scale, tau, alpha):
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=1, dim=-1, keepdim=True) / torch.norm(z_pos, p=1, dim=-1, keepdim=True)
    return guided * torch.clamp(ratio, max=tau) / ratio * alpha + z_pos * (1 - alpha)


def chroma_forward(model, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, attention_mask=None,
                   nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25):
    """Chroma forward; with ``2B`` text (and mask) rows for ``B`` image rows, the authors' layout. ``[B, N, C]``."""
    batch, rows, text_len = hidden_states.shape[0], encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
    nag = rows == 2 * batch
    branch_of = [r % batch for r in range(rows)]
    pooled = model.distilled_guidance_layer(model.time_text_embed(timestep.to(hidden_states.dtype) * 1000))
    pooled = pooled[branch_of]  # timestep only: the same rows for both branches
    x = model.x_embedder(hidden_states)[branch_of]  # [rows, N, C]: the authors' 2B image rows (equal halves)
    c = model.context_embedder(encoder_hidden_states)
    cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]))
    pairs = None if attention_mask is None else attention_mask[:, :, None] * attention_mask[:, None, :]
    hd = model.config.attention_head_dim
    singles, doubles = len(model.single_transformer_blocks), len(model.transformer_blocks)

    def guided(out):  # [rows, S, C]: the combine of the image part, written into both halves
        if not nag:
            return out
        image = authors_combine(out[:batch, text_len:], out[batch:, text_len:], nag_scale, nag_tau, nag_alpha)
        return torch.cat([out[:, :text_len], torch.cat([image, image])], dim=1)

    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        img = pooled[:, 3 * singles + 6 * i : 3 * singles + 6 * i + 6].flatten(1).chunk(6, dim=1)
        txt = pooled[:, 3 * singles + 6 * doubles + 6 * i :][:, :6].flatten(1).chunk(6, dim=1)
        xn = _ln(x) * (1 + img[1][:, None]) + img[0][:, None]
        cn = _ln(c) * (1 + txt[1][:, None]) + txt[0][:, None]
        q = torch.cat([_rms(attn.norm_added_q, attn.add_q_proj(cn).unflatten(-1, (-1, hd))),
                       _rms(attn.norm_q, attn.to_q(xn).unflatten(-1, (-1, hd)))], 1)
        k = torch.cat([_rms(attn.norm_added_k, attn.add_k_proj(cn).unflatten(-1, (-1, hd))),
                       _rms(attn.norm_k, attn.to_k(xn).unflatten(-1, (-1, hd)))], 1)
        v = torch.cat([attn.add_v_proj(cn), attn.to_v(xn)], 1).unflatten(-1, (-1, hd))
        out = guided(_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, pairs))
        x = x + img[2][:, None] * attn.to_out[0](out[:, text_len:])
        x = x + img[5][:, None] * block.ff(_ln(x) * (1 + img[4][:, None]) + img[3][:, None])
        c = c + txt[2][:, None] * attn.to_add_out(out[:, :text_len])
        c = c + txt[5][:, None] * block.ff_context(_ln(c) * (1 + txt[4][:, None]) + txt[3][:, None])

    h = torch.cat([c, x], dim=1)
    for i, block in enumerate(model.single_transformer_blocks):
        attn = block.attn
        shift, scale, gate = pooled[:, 3 * i : 3 * i + 3].flatten(1).chunk(3, dim=1)
        hn = _ln(h) * (1 + scale[:, None]) + shift[:, None]
        q = _rope(_rms(attn.norm_q, attn.to_q(hn).unflatten(-1, (-1, hd))), cos, sin)
        k = _rope(_rms(attn.norm_k, attn.to_k(hn).unflatten(-1, (-1, hd))), cos, sin)
        out = guided(_attention(q, k, attn.to_v(hn).unflatten(-1, (-1, hd)), pairs))
        h = h + gate[:, None] * block.proj_out(torch.cat([out, F.gelu(block.proj_mlp(hn), approximate="tanh")], 2))

    x = h[:batch, text_len:]
    shift, scale = pooled[:batch, -2:].flatten(1).chunk(2, dim=1)
    return model.proj_out(_ln(x) * (1 + scale[:, None]) + shift[:, None])


def pipeline(cls, dtype: torch.dtype = torch.float64):
    """A tiny Chroma pipeline: FLUX.1's toy VAE and T5 (tests/toys/flux_toy.py) and the transformer above."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import flux_toy

    tok = flux_toy.t5_tokenizer()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux_toy.vae(), text_encoder=flux_toy.t5_encoder(len(tok)),
               tokenizer=tok, transformer=transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
