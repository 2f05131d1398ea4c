"""An independent float64 implementation of Wan Animate 2's denoising forward (``kv_cache_mode="cached"``) with NAG:
the computation of docs/families/wananimate2.md, for the tests.

It reads the model's parameters (and config) only: every Linear is ``F.linear`` on the weights cast to float64
(PEFT LoRA deltas included), and the patch embedding, the sinusoidal timestep embedding, the RoPE tables and
rotation (with the reference stream's offsets), the norms, the modulation, the in-context attention mask (written
densely here, not as a flex ``BlockMask``), the text and image cross-attention and the NAG combine (docs/spec.md,
"The combine", L1, factor form) are written here, all in float64. The reference tokens' keys and values are the
pre-RoPE ones a plain reference pass stored in the KV cache (an input, like the latents).

The model computes its norms, modulation affines, gates and the RoPE rotation (rounded to float32 by ``rope_apply``)
in float32 whatever its dtype, and its output is float32: the two agree to ~1e-5, where NAG moves the output by
~1e-2.

Definition (a guided call: ``B`` latent rows, ``2B`` text rows, positive then NAG-negative):

- the self-attention of every block runs on the ``B`` latent rows over the generation tokens and the cached
  reference tokens (a query in generation frame ``f >= 1`` also sees reference frame ``f - 1``), as in a plain call;
- the text cross-attention runs the ``B`` query rows against each branch's text (``2B`` text rows, each padded with
  zeros to ``text_len`` and embedded) and combines the two outputs per token; the CLIP image branch (``B`` rows) is
  added after the combine, before ``to_out``;
- everything else (modulation from the timestep only, FFN, head) runs at ``B`` rows as in a plain call.
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


def ln(x, eps):  # LayerNorm without affine
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def ln_affine(norm, x):
    return F.layer_norm(x, x.shape[-1:], _p(norm.weight), _p(norm.bias), norm.eps)


def rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * _p(norm.weight)


def timestep_embedding(t, dim, max_period=10000.0):
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=F64) / half)
    angles = t.to(F64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def axis_angles(positions, dim, theta=10000.0):
    """Rotation angles ``[len(positions), dim // 2]`` of one RoPE axis of ``dim`` channels."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=F64) / dim)
    return positions.to(F64)[:, None] * inv[None]


def rope_angles(grid, head_dim, offsets=(0, 0, 0), time_stride=1):
    """Angles ``[f * h * w, head_dim // 2]`` of the (t, h, w) grid, tokens in (t, h, w) order: the time axis takes
    ``head_dim - 4 * (head_dim // 6)`` channels, height and width ``2 * (head_dim // 6)`` each; the axes start at
    ``offsets`` and time advances by ``time_stride``."""
    f, h, w = grid
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    t_pos = offsets[0] + time_stride * torch.arange(f)
    parts = [axis_angles(t_pos, dims[0]), axis_angles(offsets[1] + torch.arange(h), dims[1]),
             axis_angles(offsets[2] + torch.arange(w), dims[2])]
    t_a, h_a, w_a = parts
    grid_angles = torch.cat([
        t_a[:, None, None].expand(f, h, w, -1), h_a[None, :, None].expand(f, h, w, -1),
        w_a[None, None, :].expand(f, h, w, -1),
    ], dim=-1)
    return grid_angles.reshape(f * h * w, -1)


def rotate(x, angles):
    """``x [N, H, D]`` rotated pairwise (channels ``2i, 2i + 1``) by ``angles [N, D / 2]``."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack([real, imag], dim=-1).flatten(-2)


def attend(q, k, v, keep=None):
    """Softmax attention per head: ``q [N, H, D]``, ``k, v [M, H, D]``, ``keep [N, M]`` (True: attended)."""
    scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep[None], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v).flatten(-2)


def in_context_mask(frames, hw, ref_frames):
    """``[frames * hw, frames * hw + ref_frames * hw]``: every generation token sees every generation token; a query
    in generation frame ``f >= 1`` also sees the reference tokens of frame ``f - 1``."""
    q_frame = torch.arange(frames * hw) // hw
    ref_frame = torch.arange(ref_frames * hw) // hw
    generation = torch.ones(frames * hw, frames * hw, dtype=torch.bool)
    return torch.cat([generation, q_frame[:, None] == ref_frame[None] + 1], dim=1)


def combine(z_pos, z_neg, scale, tau, alpha):
    """The NAG combine per token (last dim), L1, factor form (docs/spec.md, "The combine")."""
    if scale == 1:
        return z_pos
    g = scale * z_pos - (scale - 1) * z_neg
    norm_g = g.abs().sum(-1, keepdim=True)
    ratio = tau * z_pos.abs().sum(-1, keepdim=True) / norm_g
    factor = torch.where(norm_g == 0, torch.ones_like(ratio), ratio.clamp(max=1))
    return alpha * factor * g + (1 - alpha) * z_pos


def heads(x, n):
    return x.reshape(*x.shape[:-1], n, -1)


def self_attention(attn, x, cache_k, cache_v, gen_angles, ref_angles, keep):
    n = attn.heads
    q, k = heads(rms(attn.norm_q, lin(attn.to_q, x)), n), heads(rms(attn.norm_k, lin(attn.to_k, x)), n)
    v = heads(lin(attn.to_v, x), n)
    q, k = rotate(q, gen_angles), rotate(k, gen_angles)
    k = torch.cat([k, rotate(cache_k, ref_angles)])
    v = torch.cat([v, cache_v])
    return lin(attn.to_out[0], attend(q, k, v, keep))


def cross_attention(attn, x, texts, image, nag):
    """``x [N, C]`` of one video; ``texts``: its positive embedded text and, in a guided call, its NAG-negative one;
    ``image``: its embedded CLIP tokens or None."""
    n = attn.heads
    q = heads(rms(attn.norm_q, lin(attn.to_q, x)), n)

    def over(text):
        k, v = heads(rms(attn.norm_k, lin(attn.to_k, text)), n), heads(lin(attn.to_v, text), n)
        return attend(q, k, v)

    out = over(texts[0])
    if len(texts) == 2:
        out = combine(out, over(texts[1]), *nag)
    if image is not None:
        k = heads(rms(attn.norm_added_k, lin(attn.add_k_proj, image)), n)
        out = out + attend(q, k, heads(lin(attn.add_v_proj, image), n))
    return lin(attn.to_out[0], out)


def forward(model, hidden_states, encoder_hidden_states, condition_latents, kv_cache, timestep,
            reference_grid_sizes, encoder_hidden_states_image=None, scale=9.0, tau=3.5, alpha=0.25, is_uncondtion=False,
            **_):
    """The denoising forward of ``model`` on float64 copies of its inputs: a list of ``B`` outputs ``[C, F, H, W]``.
    ``encoder_hidden_states`` has ``B`` (plain) or ``2B`` (guided: positive, then NAG-negative) rows."""
    cfg = model.config
    batch = len(hidden_states)
    guided = len(encoder_hidden_states) == 2 * batch
    if not guided and len(encoder_hidden_states) != batch:
        raise ValueError("encoder_hidden_states must have B or 2B rows")
    nag = (scale, tau, alpha)
    eps, dim, n_heads = cfg.eps, cfg.dim, cfg.num_heads
    head_dim = dim // n_heads
    pt, ph, pw = cfg.patch_size

    t = torch.as_tensor(timestep).reshape(-1)
    temb = lin(model.time_embedding[2], F.silu(lin(model.time_embedding[0], timestep_embedding(t, cfg.freq_dim))))
    e6 = lin(model.time_projection[1], F.silu(temb)).unflatten(1, (6, dim))  # [1 or B, 6, C]

    def padded(u):
        u = _p(u)
        return torch.cat([u, u.new_zeros(cfg.text_len - u.shape[0], u.shape[1])])

    texts = [lin(model.text_embedding[2], F.gelu(lin(model.text_embedding[0], padded(u)), approximate="tanh"))
             for u in encoder_hidden_states]
    images = None
    if cfg.use_img_emb and encoder_hidden_states_image is not None:
        proj = model.img_emb.proj
        x = ln_affine(proj[0], _p(encoder_hidden_states_image))
        images = ln_affine(proj[4], lin(proj[3], F.gelu(lin(proj[1], x))))

    ref_grid = [int(v) for v in reference_grid_sizes[0]]
    offsets = tuple(o if o >= 0 else ref_grid[axis]
                    for axis, o in enumerate((cfg.refer_offset_t, cfg.refer_offset_h, cfg.refer_offset_w)))
    ref_angles = rope_angles(ref_grid, head_dim, offsets, cfg.refer_stride)

    outputs = []
    for b in range(batch):
        x = torch.cat([_p(hidden_states[b]), _p(condition_latents[b])])
        weight, bias = _p(model.patch_embedding.weight), _p(model.patch_embedding.bias)
        x = F.conv3d(x[None], weight, bias, stride=(pt, ph, pw))[0]  # [C, f, h, w]
        grid = tuple(x.shape[1:])
        x = x.flatten(1).T  # [N, C], tokens in (f, h, w) order
        gen_angles = rope_angles(grid, head_dim)
        hw = grid[1] * grid[2]
        if ref_grid[1] * ref_grid[2] != hw:
            raise ValueError("the reference grid must have the generation grid's area (as in the pipeline)")
        keep = in_context_mask(grid[0], hw, ref_grid[0])
        e = e6[b if e6.shape[0] > 1 else 0]  # [6, C]
        for index, block in enumerate(model.blocks):
            if is_uncondtion and index == 9:
                continue
            shift, scale_, gate, c_shift, c_scale, c_gate = (_p(block.modulation)[0] + e).unbind(0)
            cache = kv_cache.get(index)
            n = ln(x, eps) * (1 + scale_) + shift
            x = x + gate * self_attention(block.self_attn, n, _p(cache.key[b]), _p(cache.value[b]), gen_angles,
                                          ref_angles, keep)
            n = ln_affine(block.norm3, x) if cfg.cross_attn_norm else x
            branch = [texts[b], texts[batch + b]] if guided else [texts[b]]
            x = x + cross_attention(block.cross_attn, n, branch, None if images is None else images[b], nag)
            n = ln(x, eps) * (1 + c_scale) + c_shift
            x = x + c_gate * lin(block.ffn[2], F.gelu(lin(block.ffn[0], n), approximate="tanh"))
        shift, scale_ = (_p(model.head.modulation)[0] + temb[b if temb.shape[0] > 1 else 0]).unbind(0)
        x = lin(model.head.head, ln(x, model.head.eps) * (1 + scale_) + shift)  # [N, pt * ph * pw * out]
        f, h, w = grid
        x = x.reshape(f, h, w, pt, ph, pw, cfg.out_dim).permute(6, 0, 3, 1, 4, 2, 5)
        outputs.append(x.reshape(cfg.out_dim, f * pt, h * ph, w * pw))
    return outputs
