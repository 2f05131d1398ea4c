"""An independent float64 implementation of NAG on Sana, Sana-Sprint, the Sana ControlNet and Sana-Video, for the
tests: docs/families/sana.md.

It re-derives the whole forward of ``SanaTransformer2DModel``, ``SanaControlNetModel`` and
``SanaVideoTransformer3DModel`` from the models' sub-modules: the patch embeddings, the timestep (and guidance)
embedders, RoPE's frequency table, Linear layers and the GLUMBConv feed-forwards are called as modules (PEFT LoRA
layers then apply; NAG patches none of them); the caption projection, RMS / layer norms, the modulation, the linear
self-attention, the masked softmax cross-attention, the NAG combine and the unpatchify are written here. Every text
row gets its own queries (the latent row it belongs to), so each branch attends exactly as a plain forward would, and
the NAG-negative rows' outputs are combined with their latent row's positive output before ``to_out``: the
definition, without the shared-query shortcut the integration takes.

The models compute a few things in float32 whatever their dtype (the linear attention's products, the RMSNorm
variance); so does this file, at the same places (``f32=True``, the default), in its own order of operations: a float64
model agrees to ~1e-8 (Sana) and ~1e-9 (Sana-Video), the rounding of those float32 parts.

Each function accepts the batched-CFG layout: ``L`` latent rows and ``L + g`` text rows (the last ``g`` are the
NAG-negative rows of the last ``g`` latent rows); ``g = 0`` is a plain forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def combine(z_pos, z_neg, scale, tau, alpha):
    """docs/spec.md, "The combine" (L1): ``g = scale z+ - (scale - 1) z-``, clamp ``|g|`` at ``tau |z+|``, blend."""
    g = scale * z_pos - (scale - 1) * z_neg
    n_pos, n_g = z_pos.abs().sum(-1, keepdim=True), g.abs().sum(-1, keepdim=True)
    factor = torch.where(n_g > 0, torch.clamp(tau * n_pos / n_g, max=1.0), torch.ones_like(n_g))
    return alpha * factor * g + (1 - alpha) * z_pos


def _ln(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _rms(norm, x, f32):
    """diffusers' RMSNorm (its variance in float32)."""
    if norm is None:
        return x
    variance = (x.float() if f32 else x).pow(2).mean(-1, keepdim=True)
    out = x * torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight
        if getattr(norm, "bias", None) is not None:
            out = out + norm.bias
    return out


def _caption(model, text, f32):
    """The caption projection (Linear, tanh-GELU, Linear) and the caption RMSNorm, per text row: ``[R, T, C]``."""
    proj = model.caption_projection
    c = proj.linear_2(F.gelu(proj.linear_1(text), approximate="tanh"))
    return _rms(model.caption_norm, c, f32)


def _mask_bias(mask, dtype):
    """A ``[R, T]`` 1/0 mask -> the model's additive bias ``[R, 1, 1, T]`` (0 / -10000)."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


def _text_rows(rows, text_rows):
    """The latent row of each text row: ``0..L-1``, then the last ``g`` latent rows again (their NAG negatives)."""
    g = text_rows - rows
    return list(range(rows)) + list(range(rows - g, rows))


def cross_attention(attn, x, c, bias, nag):
    """NAG cross-attention (``attn2``): every text row attends with its latent row's queries; the last ``g``
    latent rows combine their positive and NAG-negative outputs. ``x [L, N, C]``, ``c [R, T, C]``."""
    rows, text_rows = x.shape[0], c.shape[0]
    g = text_rows - rows
    q = attn.to_q(x)[_text_rows(rows, text_rows)]
    k, v = attn.to_k(c), attn.to_v(c)
    f32 = nag.get("f32", True)
    q, k = _rms(attn.norm_q, q, f32), _rms(attn.norm_k, k, f32)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [R, H, S, D]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    z = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)  # [R, N, C]
    if g:
        guided = combine(z[rows - g: rows], z[rows:], nag["scale"], nag["tau"], nag["alpha"])
        z = torch.cat([z[: rows - g], guided])
    return attn.to_out[0](z) / attn.rescale_output_factor


def _linear_attention_2d(attn, h, f32):
    """Sana's ReLU linear attention (``SanaLinearAttnProcessor2_0``): ``out_n = sum_m v_m (k_m . q_n) /
    (sum_m k_m . q_n)`` per head."""
    q = _rms(attn.norm_q, attn.to_q(h), f32)
    k = _rms(attn.norm_k, attn.to_k(h), f32)
    v = attn.to_v(h)
    q, k, v = (F.relu(t) if t is not v else t for t in (q, k, v))
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))  # [B, N, H, D]
    if f32:
        q, k, v = q.float(), k.float(), v.float()
    kv = torch.einsum("bmhd,bmhe->bhde", v, k)  # sum_m v_m k_m^T
    num = torch.einsum("bhde,bnhe->bnhd", kv, q)
    den = torch.einsum("bmhe,bnhe->bnh", k, q)[..., None]
    out = (num / (den + 1e-15)).flatten(2).to(h.dtype)
    return attn.to_out[0](out)


def _blocks_2d(blocks, x, c, bias, temb, height, width, nag, samples=None, collect=False):
    rows = x.shape[0]
    f32 = nag.get("f32", True)
    outputs = []
    for index, block in enumerate(blocks):
        e = (block.scale_shift_table[None] + temb.reshape(rows, 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e
        x = x + gate_msa * _linear_attention_2d(block.attn1, _ln(x) * (1 + scale_msa) + shift_msa, f32)
        x = x + cross_attention(block.attn2, x, c, bias, nag)
        h = (_ln(x) * (1 + scale_mlp) + shift_mlp).unflatten(1, (height, width)).permute(0, 3, 1, 2)
        x = x + gate_mlp * block.ff(h).flatten(2, 3).permute(0, 2, 1)
        if samples is not None and 0 < index <= len(samples):
            x = x + samples[index - 1]
        outputs.append(x)
    return outputs if collect else x


def _nag(scale, tau, alpha, f32):
    return {"scale": scale, "tau": tau, "alpha": alpha, "f32": f32}


def sana_forward(model, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None,
                 controlnet_block_samples=None, scale=5.0, tau=2.5, alpha=0.25, f32=True):
    """``SanaTransformer2DModel`` with NAG on the last ``g = text rows - latent rows`` latent rows: ``[L, C, H, W]``."""
    rows, _, height, width = hidden_states.shape
    p = model.config.patch_size
    x = model.patch_embed(hidden_states)
    if guidance is not None:
        temb, embedded = model.time_embed(timestep, guidance=guidance, hidden_dtype=x.dtype)
    else:
        temb, embedded = model.time_embed(timestep, batch_size=rows, hidden_dtype=x.dtype)
    c = _caption(model, encoder_hidden_states, f32)
    bias = _mask_bias(encoder_attention_mask, x.dtype)
    x = _blocks_2d(model.transformer_blocks, x, c, bias, temb, height // p, width // p, _nag(scale, tau, alpha, f32),
                   controlnet_block_samples)
    shift, scale_out = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    x = model.proj_out(_ln(x) * (1 + scale_out) + shift)
    x = x.reshape(rows, height // p, width // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(rows, -1, height, width)


def sana_controlnet_forward(controlnet, hidden_states, encoder_hidden_states, timestep, controlnet_cond,
                            conditioning_scale=1.0, encoder_attention_mask=None, scale=5.0, tau=2.5, alpha=0.25,
                            f32=True):
    """``SanaControlNetModel`` with NAG: the block residuals ``[L, N, C]`` (one per block)."""
    rows, _, height, width = hidden_states.shape
    p = controlnet.config.patch_size
    x = controlnet.patch_embed(hidden_states)
    x = x + controlnet.input_block(controlnet.patch_embed(controlnet_cond.to(x.dtype)))
    temb, _ = controlnet.time_embed(timestep, batch_size=rows, hidden_dtype=x.dtype)
    c = _caption(controlnet, encoder_hidden_states, f32)
    bias = _mask_bias(encoder_attention_mask, x.dtype)
    outs = _blocks_2d(controlnet.transformer_blocks, x, c, bias, temb, height // p, width // p,
                      _nag(scale, tau, alpha, f32), collect=True)
    return [block(out) * conditioning_scale for out, block in zip(outs, controlnet.controlnet_blocks)]


def _rope(x, cos, sin):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def _linear_attention_3d(attn, h, rotary, f32):
    """Sana-Video's ReLU linear attention (``SanaLinearAttnProcessor3_0``): RoPE on the queries and keys of the
    numerator only; the normalizer from the unrotated ones."""
    q = _rms(attn.norm_q, attn.to_q(h), f32)
    k = _rms(attn.norm_k, attn.to_k(h), f32)
    v = attn.to_v(h)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))  # [B, N, H, D]
    q, k = F.relu(q), F.relu(k)
    q_rot, k_rot = _rope(q, *rotary), _rope(k, *rotary)
    if f32:
        q_rot, k_rot, v = q_rot.float(), k_rot.float(), v.float()
    kv = torch.einsum("bmhd,bmhe->bhde", v, k_rot)
    num = torch.einsum("bhde,bnhe->bnhd", kv, q_rot)
    den = torch.einsum("bmhe,bnhe->bnh", k, q)[..., None]
    out = (num * (1 / (den + 1e-15))).flatten(2).to(h.dtype)
    return attn.to_out[0](out)


def sana_video_forward(model, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None,
                       scale=9.0, tau=3.5, alpha=0.25, f32=True):
    """``SanaVideoTransformer3DModel`` with NAG on the last ``g`` latent rows: ``[L, C, F, H, W]``. ``timestep``:
    ``[L]`` or per token (``[L, 1, F', H', W']``, I2V)."""
    rows, _, frames, height, width = hidden_states.shape
    pt, ph, pw = model.config.patch_size
    f, h, w = frames // pt, height // ph, width // pw
    rotary = model.rope(hidden_states)
    x = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    temb, embedded = model.time_embed(timestep.flatten(), batch_size=rows, hidden_dtype=x.dtype)
    temb, embedded = temb.view(rows, -1, temb.shape[-1]), embedded.view(rows, -1, embedded.shape[-1])
    c = _caption(model, encoder_hidden_states, f32)
    bias = _mask_bias(encoder_attention_mask, x.dtype)
    nag = _nag(scale, tau, alpha, f32)
    for block in model.transformer_blocks:
        e = (block.scale_shift_table[None, None] + temb.reshape(rows, temb.shape[1], 6, -1)).unbind(dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e
        x = x + gate_msa * _linear_attention_3d(block.attn1, _ln(x) * (1 + scale_msa) + shift_msa, rotary, f32)
        x = x + cross_attention(block.attn2, x, c, bias, nag)
        hm = (_ln(x) * (1 + scale_mlp) + shift_mlp).unflatten(1, (f, h, w))
        x = x + gate_mlp * block.ff(hm).flatten(1, 3)
    shift, scale_out = (model.scale_shift_table[None, None] + embedded[:, :, None]).unbind(dim=2)
    x = model.proj_out(_ln(x) * (1 + scale_out) + shift)
    x = x.reshape(rows, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
