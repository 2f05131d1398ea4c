"""An independent float64 implementation of NAG on Qwen-Image 2.1 in the 2B layout (docs/families/qwenimage21.md).

Re-derives a whole ``QwenImage21Transformer2DModel`` forward, one joint sequence per sample and branch, from the
model's sub-modules (Linear layers, the SwiGLU MLPs, the timestep embedding and the shared ``modulation`` called as
modules; the zero-centred text norm, the layer and RMS norms, the joint-sequence layout, the RoPE positions and
rotation, the block-causal mask, the attention and the NAG combine written here). It never calls NAG's processor, the
blocks' or the attention modules' forwards, ``pos_embed`` or ``norm_out``.

With ``2B`` text rows (``B`` positive, then ``B`` NAG-negative) every sample runs twice, as ``[prefix_b ; target]``:
each branch's prefix is its own text with the condition latents at the prompt's vision slots (one layout: the first
row of ``img_mask``), the target starts from the same latents in both. In every block each branch attends over its
whole sequence with the block-causal mask (a query sees the keys at or before it, or in its own image block; masked
text keys never); the target tokens' attention outputs of the two branches are NAG-combined and the result written into
both branches before the output projection. The positive branch's sequence is returned. Like diffusers it computes
the RMS norms' mean square, the zero-centred norm and the RoPE rotation in float32 (complex64 tables).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def authors_combine(z_pos, z_neg, scale, tau, alpha, norm="l1"):
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    return guided * torch.clamp(ratio, max=tau) / ratio * alpha + z_pos * (1 - alpha)


def _layer_norm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(norm, x):  # diffusers' RMSNorm: the mean square in float32, the product in x's dtype
    return x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _zero_centred_rms(norm, x):  # QwenImage21ZeroCenterRMSNorm: all in float32, weight + 1
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * (norm.weight.float() + 1)).to(x.dtype)


def _text_in(model, text):
    proj = model.txt_in
    return proj.out_layer(F.gelu(proj.in_layer(_zero_centred_rms(proj.text_norm, text)), approximate="tanh"))


def _angles(positions, dim, theta=10000):  # complex64 [S, dim / 2], as QwenImage21Rope.rope_params
    inverse = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    freqs = torch.outer(torch.tensor(positions), inverse)
    return torch.polar(torch.ones_like(freqs), freqs)


def joint_layout(img_mask_row, text_len, shapes):
    """The joint sequence of one sample: per position ``("text", i)`` (text position ``i``) or ``("image", j)``
    (latent token ``j``, condition tokens first), the image block of each position (``-1`` for text) and the RoPE
    positions ``(frame, height, width)``."""
    slots = [bool(s) for s in img_mask_row.tolist()]
    source, latent = [], 0
    for i, is_image in enumerate(slots):
        if is_image:
            source += [("image", latent + n) for n in range(4)]
            latent += 4
        else:
            source.append(("text", i))
    assert latent == sum(math.prod(s) for s in shapes), "img_mask and img_shapes disagree"
    bounds, start = [], 0
    for shape in shapes:
        bounds.append((start, start + math.prod(shape)))
        start += math.prod(shape)
    block = [-1 if kind == "text" else next(b for b, (lo, hi) in enumerate(bounds) if lo <= j < hi)
             for kind, j in source]
    frame, height, width = [], [], []
    position, index = 0, 0
    for b, (_, h, w) in enumerate(shapes):
        while block[index] != b:  # text before this image block
            frame.append(position)
            height.append(position)
            width.append(position)
            position, index = position + 1, index + 1
        for row in range(-(h - h // 2), h // 2):
            for col in range(-(w - w // 2), w // 2):
                frame.append(position)
                height.append(row)
                width.append(col)
        index += h * w
        position += max(h, w)
    while index < len(source):
        frame.append(position)
        height.append(position)
        width.append(position)
        position, index = position + 1, index + 1
    return source, block, (frame, height, width)


def _rope(x, freqs):  # x [S, H, D]; freqs complex [S, D / 2]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, None, :]).flatten(2).type_as(x)


def _attention(q, k, v, allowed):  # [S, H, D]; allowed [S, S] bool
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).flatten(1)


def qwenimage21_forward(model, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                        encoder_hidden_states_mask=None, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``[B, tokens, C_in]`` latents, ``[B or 2B, T, D]`` text -> ``[B, P + N, C_out]`` (the positive sequence)."""
    batch, rows, text_len = hidden_states.shape[0], encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
    branches = rows // batch
    assert rows in (batch, 2 * batch)
    shapes = [tuple(s) for s in img_shapes[0]]
    source, block, (frame, height, width) = joint_layout(img_mask[0], text_len, shapes)
    length = len(source)
    target = math.prod(shapes[-1])
    is_target = torch.tensor([b == len(shapes) - 1 for b in block])
    axes = model.pos_embed.axes_dim
    freqs = torch.cat([_angles(frame, axes[0]), _angles(height, axes[1]), _angles(width, axes[2])], dim=-1)
    pos = torch.arange(length)
    block_t = torch.tensor(block)
    same_block = (block_t[:, None] == block_t[None, :]) & (block_t[:, None] >= 0)
    causal = (pos[:, None] >= pos[None, :]) | same_block

    text = _text_in(model, encoder_hidden_states)  # [rows, T, C]
    latents = model.img_in(hidden_states)  # [B, tokens, C]
    mask = encoder_hidden_states_mask
    mask = torch.ones(rows, text_len, dtype=torch.bool) if mask is None else mask.to(torch.bool)

    t = timestep.to(hidden_states.dtype)
    if model.config.causal_condition:
        t = torch.cat([t, t.new_zeros(1)])
    temb = model.time_text_embed(t, latents)
    modulation = model.modulation(temb)  # [B (+1), 4C]

    # One sequence per (branch, sample): x[branch][sample] [S, C]; its key validity and modulation rows.
    xs, keys, mods, out_mods = [], [], [], []
    for branch in range(branches):
        xs.append([]), keys.append([])
        for b in range(batch):
            row = branch * batch + b
            xs[branch].append(torch.stack([text[row, j] if kind == "text" else latents[b, j] for kind, j in source]))
            keys[branch].append(torch.tensor([bool(mask[row, j]) if kind == "text" else True for kind, j in source]))
    for b in range(batch):
        own = modulation[b]
        shared = modulation[-1] if model.config.causal_condition else own
        mods.append(torch.where(is_target[:, None], own[None], shared[None]))  # [S, 4C]
        scale_rows = model.norm_out.linear(F.silu(temb)).to(hidden_states.dtype)
        own_s, shared_s = scale_rows[b], scale_rows[-1] if model.config.causal_condition else scale_rows[b]
        out_mods.append(torch.where(is_target[:, None], own_s[None], shared_s[None]))

    for blk in model.transformer_blocks:
        attn = blk.attn
        hd = attn.inner_dim // attn.heads
        outs = [[None] * batch for _ in range(branches)]
        for branch in range(branches):
            for b in range(batch):
                x = xs[branch][b]
                scale1, gate1, _, _ = mods[b].chunk(4, dim=-1)
                h = _layer_norm(x) * (1 + scale1)
                v = attn.to_v(h).unflatten(-1, (-1, hd))
                q = _rope(_rms(attn.norm_q, attn.to_q(h).unflatten(-1, (-1, hd))).to(v.dtype), freqs)
                k = _rope(_rms(attn.norm_k, attn.to_k(h).unflatten(-1, (-1, hd))).to(v.dtype), freqs)
                outs[branch][b] = _attention(q, k, v, causal & keys[branch][b][None, :])  # [S, C]
        for b in range(batch):
            if branches == 2:
                guided = authors_combine(outs[0][b][-target:], outs[1][b][-target:], nag_scale, nag_tau, nag_alpha,
                                         norm)
                for branch in range(2):
                    outs[branch][b] = torch.cat([outs[branch][b][:-target], guided])
            for branch in range(branches):
                x = xs[branch][b]
                _, gate1, scale2, gate2 = mods[b].chunk(4, dim=-1)
                x = x + gate1.tanh() * attn.to_out[0](outs[branch][b])
                x = x + gate2.tanh() * blk.img_mlp(_layer_norm(x) * (1 + scale2))
                xs[branch][b] = x
    out = [model.proj_out(_layer_norm(xs[0][b]) * (1 + out_mods[b])) for b in range(batch)]
    return torch.stack(out)
