"""An independent implementation of HiDream-I1's forward and of NAG on it, for the tests (docs/families/hidream.md).

Written from the family document, not from the integration: it re-derives a whole ``HiDreamImageTransformer2DModel``
forward from the model's sub-modules (Linear layers and the caption projections are called as modules, so PEFT LoRA
layers apply; norms, modulation, RoPE, attention, the MoE routing and the timestep embedding are written here) and
never calls a module NAG patches (``x_embedder``, the blocks, their attention, ``final_layer``). It follows diffusers
in its float32 islands (the sinusoidal timestep features, and the RoPE tables and rotation, which diffusers computes in
float32 even for float64 models: text tokens, at position 0, are rounded through float32 too) so that float64 runs
agree to ~1e-12.

Layout of a call: ``L`` latent rows; ``R = L + g`` text rows (T5, Llama, pooled): one per latent row, then the
NAG-negative rows of the last ``g`` latent rows (``g = 0``: a plain forward; ``g = L``: the plain guided call; ``0 <
g < L``: batched CFG, its first ``L - g`` rows unguided). Text row ``r`` belongs to latent row ``src[r]`` (``r`` for
``r < L``, ``r - g`` after).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flux_reference import authors_combine


def _sinusoid(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos


def _mlp(embedder, x):
    return embedder.linear_2(F.silu(embedder.linear_1(x)))


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(norm, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _swiglu(ff, x):
    return ff.w2(F.silu(ff.w1(x)) * ff.w3(x))


def _moe(ff, x):
    """The MoE feed-forward: each token's top-k routed experts weighted by their gate scores, plus the shared expert
    (``num_routed_experts=0``: a plain SwiGLU)."""
    if not hasattr(ff, "gate"):
        return _swiglu(ff, x)
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(flat @ ff.gate.weight.T, dim=-1)
    weights, index = torch.topk(scores, k=ff.gate.top_k, dim=-1)
    every = torch.stack([_swiglu(expert, flat) for expert in ff.experts])  # [E, tokens, C]
    tokens = torch.arange(flat.shape[0])
    routed = sum(weights[:, j : j + 1] * every[index[:, j], tokens] for j in range(index.shape[1]))
    return routed.reshape(x.shape) + _swiglu(ff.shared_experts, x)


def _tables(ids, axes, theta=10000.0):
    """RoPE ``(cos, sin)`` ``[S, D/2]`` (float32) of positions ``ids [S, 3]``, the axes' frequencies side by side."""
    angles = []
    for i, d in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(ids[:, i].double()[:, None] * omega[None])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate(x, cos, sin):
    """``x [S, H, D]``: pairs ``(x[2j], x[2j+1])`` rotated by angle ``j`` in float32 (the first half of the head
    when the tables are half as wide)."""
    width = 2 * cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat([_rotate(x[..., :width], cos, sin), x[..., width:]], dim=-1)
    pairs = x.float().unflatten(-1, (-1, 2))
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([c * pairs[..., 0] + (-s) * pairs[..., 1], s * pairs[..., 0] + c * pairs[..., 1]], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _attention(q, k, v):
    """One sequence: ``[S, H, D]`` -> ``[Sq, H * D]``."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(0, 1).flatten(1)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1))


def patchify(model, hidden_states):
    """Latents ``[L, C, H, W]`` -> tokens ``[L, S, p*p*C]``, key mask ``[L, S]`` (None for square latents), image
    positions ``[S, 3]``, patch grid ``(pH, pW)``; non-square latents padded to the model's ``max_seq`` tokens."""
    p = model.config.patch_size
    rows, channels, height, width = hidden_states.shape
    ph, pw = height // p, width // p
    x = hidden_states.reshape(rows, channels, ph, p, pw, p).permute(0, 2, 4, 3, 5, 1).reshape(rows, ph * pw, -1)
    ids = torch.zeros(ph * pw, 3)
    ids[:, 1], ids[:, 2] = torch.arange(ph * pw) // pw, torch.arange(ph * pw) % pw
    if height == width:
        return x, None, ids, (ph, pw)
    seq = model.max_seq
    padded = x.new_zeros(rows, seq, x.shape[-1])
    padded[:, : ph * pw] = x
    mask = x.new_zeros(rows, seq)
    mask[:, : ph * pw] = 1
    padded_ids = torch.zeros(seq, 3)
    padded_ids[: ph * pw] = ids
    return padded, mask, padded_ids, (ph, pw)


def unpatchify(model, x, grid):
    p, (ph, pw) = model.config.patch_size, grid
    rows = x.shape[0]
    t = x[:, : ph * pw].reshape(rows, ph, pw, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return t.reshape(rows, -1, ph * p, pw * p)


def hidream_forward(model, hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3,
                    pooled_embeds, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1", mode="exact"):
    """HiDream-I1's forward; with NAG-negative text rows (``R > L``, module docstring) NAG: ``mode="exact"`` (the
    single blocks at ``R`` rows, the combine written into both rows) or ``"fast"`` (the image stream at ``L`` rows
    throughout), written as one full attention per text row (no LSE split). Returns ``[L, C, H, W]``."""
    config = model.config
    latent_rows, text_rows = hidden_states.shape[0], encoder_hidden_states_t5.shape[0]
    g = text_rows - latent_rows
    plain = latent_rows - g
    src = list(range(latent_rows)) + list(range(plain, latent_rows))  # latent row of each text row
    heads = config.num_attention_heads

    def guide(z):  # z [R, N, C] per text row -> [L, N, C]: unguided rows as they are, guided rows combined
        if not g:
            return z
        combined = authors_combine(z[plain:latent_rows], z[latent_rows:], nag_scale, nag_tau, nag_alpha, norm)
        return torch.cat([z[:plain], combined])

    dtype = hidden_states.dtype
    temb = _mlp(model.t_embedder.timestep_embedder, _sinusoid(timesteps[src]).to(dtype))
    temb = temb + _mlp(model.p_embedder.pooled_embedder, pooled_embeds)

    tokens, mask, ids, grid = patchify(model, hidden_states)
    x = model.x_embedder.proj(tokens)  # [L, N, C]
    n = x.shape[1]
    llama = [model.caption_projection[i](encoder_hidden_states_llama3[k]) for i, k in enumerate(config.llama_layers)]
    t5 = model.caption_projection[-1](encoder_hidden_states_t5)
    initial = torch.cat([t5, llama[-1]], dim=1)
    text_len = initial.shape[1] + llama[0].shape[1]
    cos, sin = _tables(torch.cat([ids, torch.zeros(text_len, 3)]), config.axes_dims_rope)

    def key_mask(k, rows_src):  # the stock processor scales the image keys by the mask
        return k if mask is None else k * mask[rows_src][:, :, None, None]

    def joint(q, k, v, tq, tk, tv):
        """Per text row r: attention of [image of src[r] ; text r] queries over the same keys -> [R, N + T, C]."""
        outs = []
        for r in range(text_rows):
            i = src[r]
            qq = _rotate(torch.cat([q[i], tq[r]]), cos, sin)
            kk = _rotate(torch.cat([k[i], tk[r]]), cos, sin)
            outs.append(_attention(qq, kk, torch.cat([v[i], tv[r]])))
        return torch.stack(outs)

    for index, wrapper in enumerate(model.double_stream_blocks):
        block, attn = wrapper.block, wrapper.block.attn1
        c = torch.cat([initial, llama[index]], dim=1)
        mod = block.adaLN_modulation[1](F.silu(temb))[:, None].chunk(12, dim=-1)
        sh_i, sc_i, gate_i, sh_mi, sc_mi, gate_mi = (m[:latent_rows] for m in mod[:6])  # image: positive rows
        sh_t, sc_t, gate_t, sh_mt, sc_mt, gate_mt = mod[6:]
        xn, cn = _ln(x) * (1 + sc_i) + sh_i, _ln(c) * (1 + sc_t) + sh_t
        q, k = _heads(_rms(attn.q_rms_norm, attn.to_q(xn)), heads), _heads(_rms(attn.k_rms_norm, attn.to_k(xn)), heads)
        v = _heads(attn.to_v(xn), heads)
        tq = _heads(_rms(attn.q_rms_norm_t, attn.to_q_t(cn)), heads)
        tk = _heads(_rms(attn.k_rms_norm_t, attn.to_k_t(cn)), heads)
        tv = _heads(attn.to_v_t(cn), heads)
        out = joint(q, key_mask(k, list(range(latent_rows))), v, tq, tk, tv)
        x = x + gate_i * attn.to_out(guide(out[:, :n]))
        c = c + gate_t * attn.to_out_t(out[:, n:])
        x = x + gate_mi * _moe(block.ff_i, _ln(x) * (1 + sc_mi) + sh_mi)
        c = c + gate_mt * _swiglu(block.ff_t, _ln(c) * (1 + sc_mt) + sh_mt)
        initial = c[:, : initial.shape[1]]

    offset = len(model.double_stream_blocks)
    if g and mode == "fast":
        for index, wrapper in enumerate(model.single_stream_blocks):
            block, attn = wrapper.block, wrapper.block.attn1
            c = torch.cat([initial, llama[offset + index]], dim=1)
            mod = block.adaLN_modulation[1](F.silu(temb))[:, None].chunk(6, dim=-1)
            sh, sc, gate, sh_m, sc_m, gate_m = mod
            sh_i, sc_i, gate_i, sh_mi, sc_mi, gate_mi = (m[:latent_rows] for m in mod)
            xn, cn = _ln(x) * (1 + sc_i) + sh_i, _ln(c) * (1 + sc) + sh
            proj = [(_heads(_rms(attn.q_rms_norm, attn.to_q(h)), heads), _heads(_rms(attn.k_rms_norm, attn.to_k(h)),
                     heads), _heads(attn.to_v(h), heads)) for h in (xn, cn)]
            (q, k, v), (tq, tk, tv) = proj
            out = joint(q, key_mask(k, list(range(latent_rows))), v, tq, tk, tv)
            x = x + gate_i * attn.to_out(guide(out[:, :n]))
            c = c + gate * attn.to_out(out[:, n:])
            x = x + gate_mi * _moe(block.ff_i, _ln(x) * (1 + sc_mi) + sh_mi)
            c = c + gate_m * _moe(block.ff_i, _ln(c) * (1 + sc_m) + sh_m)
            initial = c[:, : initial.shape[1]]
    else:
        h = torch.cat([x[src], initial], dim=1)  # the image rows tiled to one per text row
        keep = h.shape[1]
        for index, wrapper in enumerate(model.single_stream_blocks):
            block, attn = wrapper.block, wrapper.block.attn1
            h = torch.cat([h, llama[offset + index]], dim=1)
            sh, sc, gate, sh_m, sc_m, gate_m = block.adaLN_modulation[1](F.silu(temb))[:, None].chunk(6, dim=-1)
            hn = _ln(h) * (1 + sc) + sh
            q, k = _heads(_rms(attn.q_rms_norm, attn.to_q(hn)), heads), _heads(_rms(attn.k_rms_norm, attn.to_k(hn)),
                                                                                heads)
            v = _heads(attn.to_v(hn), heads)
            if mask is not None:
                k = torch.cat([key_mask(k[:, :n], src), k[:, n:]], dim=1)
            out = torch.stack([_attention(_rotate(q[r], cos, sin), _rotate(k[r], cos, sin), v[r])
                               for r in range(text_rows)])
            if g:  # the guided rows' image part combined, written into the positive and the NAG-negative row
                image = guide(out[:, :n])
                out = torch.cat([torch.cat([image, image[plain:]]), out[:, n:]], dim=1)
            h = h + gate * attn.to_out(out)
            h = h + gate_m * _moe(block.ff_i, _ln(h) * (1 + sc_m) + sh_m)
            h = h[:, :keep]
        x = h[:latent_rows, :n]

    shift, scale = model.final_layer.adaLN_modulation[1](F.silu(temb[:latent_rows])).chunk(2, dim=1)
    out = model.final_layer.linear(_ln(x) * (1 + scale[:, None]) + shift[:, None])
    return unpatchify(model, out, grid)
