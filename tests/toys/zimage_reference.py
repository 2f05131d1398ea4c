"""An independent float64 implementation of NAG on Z-Image in the authors'-style 2B layout (docs/families/zimage.md).

Re-derives a whole ``ZImageTransformer2DModel`` forward (basic mode) from the model's sub-modules (Linear layers
called as modules; patchify, padding to multiples of 32, positions, RoPE, RMSNorm, modulation, attention, SwiGLU,
the final layer and unpatchify written here), one sequence per sample and branch, so no batch padding or mask is
involved. With 2B captions (B positive, then B NAG-negative) the joined layers run each sample twice, as ``[image ;
caption_b]`` with the image at the prompt's positions; the image part of each layer's attention output is
NAG-combined over the two branches and written into both; the positive branch's image is decoded. Like diffusers it
computes the timestep features, the RMSNorm variance and the RoPE rotation in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flux_reference import authors_combine

MULTIPLE = 32


def _rms(norm, x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _freqs(model, ids):
    """Complex RoPE factors ``[S, D/2]`` for integer positions ``ids [S, 3]``."""
    parts = []
    for axis, dim in enumerate(model.config.axes_dims):
        inv = 1.0 / model.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = (ids[:, axis].double()[:, None] * inv[None]).float()
        parts.append(torch.polar(torch.ones_like(angle), angle))
    return torch.cat(parts, dim=-1)


def _rotate(x, freqs):  # x [S, H, D]
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[:, None]
    return torch.view_as_real(z).flatten(-2).to(x.dtype)


def _attention(layer, x, freqs):
    """Self-attention of one sequence ``x [S, C]`` -> ``[S, C]`` (before ``to_out``)."""
    attn = layer.attention
    q, k, v = (p(x).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = _rotate(_rms(attn.norm_q, q), freqs), _rotate(_rms(attn.norm_k, k), freqs)
    weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).flatten(1)


def _ffn(layer, x, scale=1.0):
    ff = layer.feed_forward
    h = _rms(layer.ffn_norm1, x) * scale
    return _rms(layer.ffn_norm2, ff.w2(F.silu(ff.w1(h)) * ff.w3(h)))


def _mods(layer, adaln):
    scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(adaln).chunk(4, dim=-1)
    return 1 + scale_msa, gate_msa.tanh(), 1 + scale_mlp, gate_mlp.tanh()


def _layer(layer, x, freqs, adaln=None, combine=None):
    """One block on one sequence, or on a branch pair ``x = (x_pos, x_neg)`` with ``combine`` (image part) given."""
    xs = x if isinstance(x, tuple) else (x,)
    scale_msa, gate_msa, scale_mlp, gate_mlp = _mods(layer, adaln) if adaln is not None else (1.0,) * 4
    outs = [_attention(layer, _rms(layer.attention_norm1, h) * scale_msa, f) for h, f in zip(xs, freqs)]
    if combine is not None:
        outs = combine(outs)
    res = []
    for h, out in zip(xs, outs):
        h = h + gate_msa * _rms(layer.attention_norm2, layer.attention.to_out[0](out))
        res.append(h + gate_mlp * _ffn(layer, h, scale_mlp))
    return tuple(res) if isinstance(x, tuple) else res[0]


def _pad(features, pad_token):
    extra = (-features.shape[0]) % MULTIPLE
    return torch.cat([features, pad_token.expand(extra, -1).to(features.dtype)])


def _caption(model, cap):
    """Embedded, padded caption ``[Lp, C]`` and its positions (1 .. Lp on the first axis)."""
    feats = _pad(model.cap_embedder(cap), model.cap_pad_token)
    ids = torch.zeros(feats.shape[0], 3, dtype=torch.long)
    ids[:, 0] = torch.arange(1, feats.shape[0] + 1)
    return feats, _freqs(model, ids)


def zimage_forward(model, x, t, cap_feats, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """``x`` B latents ``[C, F, H, W]``, ``t [B]``, ``cap_feats`` B or 2B captions ``[L, D]`` -> B outputs."""
    batch, p = len(x), model.config.all_patch_size[0]
    guided = len(cap_feats) == 2 * batch
    half = 128
    inv = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = (t * model.t_scale)[:, None].float() * inv[None]
    tfreq = torch.cat([angles.cos(), angles.sin()], dim=-1).to(model.t_embedder.mlp[0].weight.dtype)
    adaln = model.t_embedder.mlp(tfreq).to(x[0].dtype)  # [B, 256 or dim]
    key = f"{p}-{model.config.all_f_patch_size[0]}"
    outputs = []
    for i in range(batch):
        c, f, h, w = x[i].shape
        patches = x[i].view(c, f, h // p, p, w // p, p).permute(1, 2, 4, 3, 5, 0).reshape(-1, p * p * c)
        tokens = patches.shape[0]
        img = _pad(model.all_x_embedder[key](patches), model.x_pad_token)
        caps = [_caption(model, cap_feats[i])] + ([_caption(model, cap_feats[batch + i])] if guided else [])
        ids = torch.zeros(img.shape[0], 3, dtype=torch.long)  # padding tokens at (0, 0, 0)
        axes = (torch.arange(f), torch.arange(h // p), torch.arange(w // p))
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        ids[:tokens] = grid.reshape(-1, 3) + torch.tensor([caps[0][0].shape[0] + 1, 0, 0])
        img_freqs = _freqs(model, ids)
        for layer in model.noise_refiner:
            img = _layer(layer, img, [img_freqs], adaln[i])
        refined = []
        for feats, freqs in caps:
            for layer in model.context_refiner:
                feats = _layer(layer, feats, [freqs])
            refined.append((torch.cat([img, feats]), torch.cat([img_freqs, freqs])))
        n = img.shape[0]
        seqs, freqs = tuple(s for s, _ in refined), [fr for _, fr in refined]

        def combine(outs):  # the image part of both branches' attention outputs, combined, into both
            image = authors_combine(outs[0][:n], outs[1][:n], nag_scale, nag_tau, nag_alpha, norm)
            return [torch.cat([image, out[n:]]) for out in outs]

        for layer in model.layers:
            seqs = _layer(layer, seqs, freqs, adaln[i], combine if guided else None)
        final = model.all_final_layer[key]
        scale = 1 + final.adaLN_modulation(adaln[i])
        out = final.linear(F.layer_norm(seqs[0][:tokens], (seqs[0].shape[-1],), eps=1e-6) * scale)
        outputs.append(out.view(f, h // p, w // p, 1, p, p, c).permute(6, 0, 3, 1, 4, 2, 5).reshape(c, f, h, w))
    return outputs
