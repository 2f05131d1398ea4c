"""An independent float64 implementation of Kandinsky 6's forward with NAG: the computation of
docs/families/kandinsky6.md, for the tests.

It reads the model's parameters (and config) only: every Linear is ``F.linear`` on the weights cast to float64, and
the sinusoidal timestep embedding, the RoPE tables and rotation, the norms, the modulation, the masked attention, the
patching and the NAG combine (docs/spec.md, "The combine", L1, factor form) are written here, all in float64. The
model itself computes its norms, modulation affines, gates and rotations in float32 whatever its dtype, so the two
agree to ~1e-5, where NAG moves the output by ~1e-2.

Definition (a guided call: ``B`` video/audio rows, ``2B`` text rows, positive then NAG-negative):

- ``temb`` of each modality = time embedding + pooled embedding of the **positive** pooled vector (``B`` rows);
- each modality's text blocks run on all ``2B`` text rows, text row ``r`` modulated with ``temb[r mod B]`` and
  attending over its own unmasked tokens;
- in every fused block the text cross-attention of the video (and of the audio) runs its ``B`` query rows against
  each branch's text (with that branch's mask) and combines the two outputs per token before ``out_layer``; the rest
  of the block runs at ``B`` rows as in a plain call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def _p(t):
    return None if t is None else t.detach().to(F64)


def lin(layer, x):
    """``layer`` (an ``nn.Linear``, or PEFT's LoRA wrapper of one: the active adapters' deltas added) on ``x``."""
    base = getattr(layer, "base_layer", layer)
    weight = _p(base.weight)
    if base is not layer and not layer.merged and not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + _p(layer.get_delta_weight(name))
    return F.linear(x, weight, _p(base.bias))


def ln(x, eps=1e-5):  # LayerNorm without affine (every norm of the blocks and heads)
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def ln_affine(norm, x):
    return F.layer_norm(x, x.shape[-1:], _p(norm.weight), _p(norm.bias), norm.eps)


def rms(norm, x, dtype):
    eps = norm.eps if norm.eps is not None else torch.finfo(dtype).eps  # nn.RMSNorm(eps=None): the input's eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * _p(norm.weight)


def ffn(ff, x):
    return lin(ff.net[2], F.gelu(lin(ff.net[0].proj, x)))


def modulation(mod, t):
    return lin(mod.out_layer, F.silu(t))


def affine(x, shift, scale):  # x [R, S, C]; shift, scale [R, C]
    return ln(x) * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim):
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``, in float64."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)
    args = t.to(F64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def time_embedding(module, t, dim):
    emb = module.timestep_embedder
    return lin(emb.linear_2, F.silu(lin(emb.linear_1, timestep_embedding(t, dim))))


def inv_freqs(n, max_period=10000.0):
    return torch.exp(-math.log(max_period) * torch.arange(n, dtype=F64) / n)


def rope_1d(length, head_dim, scaling=1.0):
    """Angles ``[S, D / 2]`` of positions ``0 .. length - 1``."""
    return torch.arange(length, dtype=F64)[:, None] * (inv_freqs(head_dim // 2) * scaling)[None]


def rope_3d(pos, axes_dims, scale_factor):
    """Angles ``[T * H * W, D / 2]`` of the video grid (positions per axis, (t, h, w) order, row-major tokens)."""
    sizes = [len(p) for p in pos]
    parts = []
    for axis, (p, dim, factor) in enumerate(zip(pos, axes_dims, scale_factor)):
        angles = p.to(F64)[:, None] * inv_freqs(dim // 2)[None] / factor
        shape = [1, 1, 1, dim // 2]
        shape[axis] = sizes[axis]
        parts.append(angles.view(shape).expand(*sizes, dim // 2))
    return torch.cat(parts, dim=-1).reshape(-1, sum(axes_dims) // 2)


def rotate(x, angles):
    """Rotate consecutive channel pairs of ``x [R, S, H, D]`` by ``angles [S, D / 2]``."""
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


def attend(q, k, v, keep=None):
    """``[R, S, H, D]`` queries over ``[R, T, H, D]`` keys (``keep [R, T]``: the keys that count) ->
    ``[R, S, H * D]``."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :].bool(), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)


def heads(attn, x, ctx, rope_q, rope_k, dtype):
    h = attn.num_heads
    q = rms(attn.query_norm, lin(attn.to_query, x).unflatten(-1, (h, -1)), dtype)
    k = rms(attn.key_norm, lin(attn.to_key, ctx).unflatten(-1, (h, -1)), dtype)
    v = lin(attn.to_value, ctx).unflatten(-1, (h, -1))
    if rope_q is not None:
        q = rotate(q, rope_q)
    if rope_k is not None:
        k = rotate(k, rope_k)
    return q, k, v


def attention(attn, x, ctx, rope_q=None, rope_k=None, keep=None, dtype=torch.float32):
    q, k, v = heads(attn, x, ctx, rope_q, rope_k, dtype)
    return lin(attn.out_layer, attend(q, k, v, keep))


def combine(z_pos, z_neg, scale, tau, alpha):
    """docs/spec.md, "The combine" (L1; ``scale = 1`` returns ``z_pos``)."""
    if scale == 1:
        return z_pos
    g = scale * z_pos - (scale - 1) * z_neg
    n_pos, n_g = z_pos.abs().sum(-1, keepdim=True), g.abs().sum(-1, keepdim=True)
    factor = torch.where(n_g > 0, torch.clamp(tau * n_pos / n_g, max=1.0), torch.ones_like(n_g))
    return alpha * factor * g + (1 - alpha) * z_pos


def text_cross_attention(attn, x, text, keep, nag, dtype):
    """The text cross-attention: ``x [B, N, C]`` over ``text [B or 2B, T, C]``; with ``2B`` rows one attention per
    branch (each with its mask rows) and the combine before ``out_layer``."""
    batch = x.shape[0]
    q, k, v = heads(attn, x, text, None, None, dtype)
    rows = slice(0, batch)
    z = attend(q, k[rows], v[rows], None if keep is None else keep[rows])
    if text.shape[0] == 2 * batch:
        rows = slice(batch, 2 * batch)
        z_neg = attend(q, k[rows], v[rows], None if keep is None else keep[rows])
        z = combine(z, z_neg, *nag)
    return lin(attn.out_layer, z)


def text_block(block, x, temb, rope, keep, dtype):
    sa, ff = modulation(block.text_modulation, temb).chunk(2, dim=-1)
    shift, scale, gate = sa.chunk(3, dim=-1)
    h = affine(x, shift, scale)
    x = x + gate[:, None] * attention(block.attn, h, h, rope, rope, keep, dtype)
    shift, scale, gate = ff.chunk(3, dim=-1)
    return x + gate[:, None] * ffn(block.feed_forward, affine(x, shift, scale))


def fused_block(block, vis, aud, text_v, text_a, t_v, t_a, vis_rope, aud_rope, keep, nag, dtype):
    vb, ab = block.video_dec_block, block.audio_dec_block
    sa, ca, ff_v = modulation(vb.visual_modulation, t_v).chunk(3, dim=-1)
    shift, scale, gate = sa.chunk(3, dim=-1)
    h = affine(vis, shift, scale)
    vis = vis + gate[:, None] * attention(vb.self_attention, h, h, vis_rope, vis_rope, dtype=dtype)
    shift, scale, gate_v = ca.chunk(3, dim=-1)
    vis_pre = affine(vis, shift, scale)
    vis_text = text_cross_attention(vb.cross_attention, vis_pre, text_v, keep, nag, dtype)
    if aud is not None:
        sa, ca, ff_a = modulation(ab.visual_modulation, t_a).chunk(3, dim=-1)
        shift, scale, gate = sa.chunk(3, dim=-1)
        h = affine(aud, shift, scale)
        aud = aud + gate[:, None] * attention(ab.self_attention, h, h, aud_rope, aud_rope, dtype=dtype)
        shift, scale, gate_a = ca.chunk(3, dim=-1)
        aud_pre = affine(aud, shift, scale)
        aud = aud + gate_a[:, None] * text_cross_attention(ab.cross_attention, aud_pre, text_a, keep, nag, dtype)
        va = modulation(block.va_modulation, t_v if block.fix_modulation else t_a)
        av = modulation(block.av_modulation, t_a if block.fix_modulation else t_v)
        if block.cross_gates:
            md, md_a = block.model_dim, block.model_dim_a
            va_shift, va_scale, va_gate = va.split([md, md, md_a], dim=-1)
            av_shift, av_scale, av_gate = av.split([md_a, md_a, md], dim=-1)
            gate_vis, gate_aud = av_gate, va_gate  # the video stream takes the gate of width md (av's), and back
        else:
            va_shift, va_scale, va_gate = va.chunk(3, dim=-1)
            av_shift, av_scale, av_gate = av.chunk(3, dim=-1)
            gate_vis, gate_aud = va_gate, av_gate
        vis = vis + gate_v[:, None] * vis_text
        rq, rk = (vis_rope, aud_rope) if block.ca_rope else (None, None)
        vis_from_aud = attention(block.va_cross_attention, affine(vis, va_shift, va_scale), aud_pre, rq, rk,
                                 dtype=dtype)
        aud_from_vis = attention(block.av_cross_attention, affine(aud, av_shift, av_scale), vis_pre, rk, rq,
                                 dtype=dtype)
        vis = vis + gate_vis[:, None] * vis_from_aud
        aud = aud + gate_aud[:, None] * aud_from_vis
        shift, scale, gate = ff_a.chunk(3, dim=-1)
        aud = aud + gate[:, None] * ffn(ab.feed_forward, affine(aud, shift, scale))
    else:
        vis = vis + gate_v[:, None] * vis_text
    shift, scale, gate = ff_v.chunk(3, dim=-1)
    vis = vis + gate[:, None] * ffn(vb.feed_forward, affine(vis, shift, scale))
    return vis, aud


@torch.no_grad()
def forward(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, audio_hidden_states=None,
            visual_rope_pos=None, encoder_attention_mask=None, visual_token_type_ids=None, scale=9.0, tau=3.5,
            alpha=0.25):
    """Kandinsky 6's forward; with ``2B`` text rows for ``B`` video rows, NAG as in the module docstring. Returns
    ``(video [B, T, H, W, out], audio [B, L, out] or None)`` in float64."""
    config, dtype = model.config, model.dtype
    batch = hidden_states.shape[0]
    text = encoder_hidden_states.to(F64)
    rows = text.shape[0]
    branch_of = torch.arange(rows) % batch  # the video row of each text row
    keep = encoder_attention_mask
    pooled = pooled_projections.to(F64)[:batch]  # the positive rows
    nag = (scale, tau, alpha)
    head_dim, head_dim_a = sum(config.axes_dims), sum(config.axes_dims_a or config.axes_dims)
    md, md_a = config.model_dim, config.model_dim_a or config.model_dim

    t_v = time_embedding(model.video_time_embeddings, timestep, md) + ln_affine(
        model.video_pooled_text_embeddings.norm, lin(model.video_pooled_text_embeddings.in_layer, pooled))
    t_a = time_embedding(model.audio_time_embeddings, timestep, md_a) + ln_affine(
        model.audio_pooled_text_embeddings.norm, lin(model.audio_pooled_text_embeddings.in_layer, pooled))

    streams = {}
    for name, temb, hd in (("video", t_v, head_dim), ("audio", t_a, head_dim_a)):
        embed = getattr(model, f"{name}_text_embeddings")
        x = ln_affine(embed.norm, lin(embed.in_layer, text))
        rope = rope_1d(text.shape[1], hd)
        for block in getattr(model, f"{name}_text_transformer_blocks"):
            x = text_block(block, x, temb[branch_of], rope, keep, dtype)
        streams[name] = x

    p_t, p_h, p_w = config.patch_size
    x = hidden_states.to(F64)
    b, frames, height, width, channels = x.shape
    grid = (frames // p_t, height // p_h, width // p_w)
    x = x.view(b, grid[0], p_t, grid[1], p_h, grid[2], p_w, channels).permute(0, 1, 3, 5, 2, 4, 6, 7)
    vis = lin(model.visual_embeddings.in_layer, x.reshape(b, *grid, -1))
    if visual_token_type_ids is not None:
        vis = vis + _p(model.visual_token_type_embeddings.weight)[visual_token_type_ids][:, :, None, None]
    vis = vis.reshape(b, -1, md)
    pos = visual_rope_pos if visual_rope_pos is not None else tuple(torch.arange(n) for n in grid)
    vis_rope = rope_3d(pos, config.axes_dims, config.scale_factor)

    aud = aud_rope = None
    if audio_hidden_states is not None:
        embed = model.audio_embeddings
        aud = ln_affine(embed.norm, lin(embed.in_layer, audio_hidden_states.to(F64)))
        aud_rope = rope_1d(aud.shape[1], head_dim_a, config.audio_freqs_scaling)

    for block in model.visual_transformer_blocks:
        vis, aud = fused_block(block, vis, aud, streams["video"], streams["audio"], t_v, t_a, vis_rope, aud_rope,
                               keep, nag, dtype)

    shift, scale_ = modulation(model.out_layer.modulation, t_v).chunk(2, dim=-1)
    y = lin(model.out_layer.out_layer, affine(vis, shift, scale_)).view(b, *grid, -1, p_t, p_h, p_w)
    video = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, grid[0] * p_t, grid[1] * p_h, grid[2] * p_w, -1)
    audio = None
    if aud is not None:
        shift, scale_ = modulation(model.audio_out_layer.modulation, t_a).chunk(2, dim=-1)
        audio = lin(model.audio_out_layer.out_layer, ln(affine(aud, shift, scale_)))
    return video, audio
