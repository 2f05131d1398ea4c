"""A tiny random-weight Qwen-Image transformer and an independent float64 implementation of NAG on it (the
computation of docs/families/qwenimage.md), for the tests.

The reference calls the model's Linear layers, MLPs, timestep embedding and RoPE tables as modules (NAG patches none
of them) and writes the modulation, norms, RoPE rotation, masked attention and the NAG combine itself. Like diffusers
it rotates in float32 (complex64 tables) and takes RMS norms' mean square in float32 even in a float64 model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel

TEXT_DIM = 32
SIDE = 8  # latent tokens per side after packing: 64 image tokens


def transformer(layers: int = 2, seed: int = 0, zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )
    with torch.no_grad():  # widen diffusers' init so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(norm, x):  # diffusers' RMSNorm takes the mean square in float32 even for float64 inputs
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, freqs):  # x [R, S, H, D]; freqs complex [S, D / 2]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).to(x.dtype)


def _attention(q, k, v, keep):  # [R, S, H, D]; keep [R, S_k] bool
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2)


def authors_combine(z_pos, z_neg, scale, tau, alpha, norm="l1"):
    p = 1 if norm == "l1" else 2
    guided = z_pos * scale - z_neg * (scale - 1)
    ratio = torch.norm(guided, p=p, dim=-1, keepdim=True) / torch.norm(z_pos, p=p, dim=-1, keepdim=True)
    return guided * torch.clamp(ratio, max=tau) / ratio * alpha + z_pos * (1 - alpha)


def qwen_forward(model, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
                 nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, norm="l1"):
    """Qwen-Image forward; with ``2B`` text rows for ``B`` image rows, NAG on every block's image attention output
    (one masked attention per branch over ``[text_b ; image]``). Returns ``[B, N, out]``."""
    batch, rows, text_len = hidden_states.shape[0], encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
    mask = encoder_hidden_states_mask
    mask = torch.ones(rows, text_len, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    x = model.img_in(hidden_states)
    temb = model.time_text_embed(timestep.to(x.dtype), x)  # [B, C]: timestep only
    c = model.txt_in(_rms(model.txt_norm, encoder_hidden_states))
    image_freqs, text_freqs = model.pos_embed(img_shapes, max_txt_seq_len=text_len, device=x.device)
    keep = torch.cat([mask, torch.ones(rows, x.shape[1], dtype=torch.bool)], dim=1)
    branch_of = [r % batch for r in range(rows)]  # the image row of each text row

    for block in model.transformer_blocks:
        attn = block.attn
        im1, im2 = block.img_mod(temb).chunk(2, dim=-1)
        tm1, tm2 = block.txt_mod(temb)[branch_of].chunk(2, dim=-1)

        def modulate(h, params):
            shift, scale, gate = params.chunk(3, dim=-1)
            return _ln(h) * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        xn, gate = modulate(x, im1)
        cn, text_gate = modulate(c, tm1)
        hd = attn.inner_dim // attn.heads
        q = _rope(_rms(attn.norm_q, attn.to_q(xn).unflatten(-1, (-1, hd))), image_freqs)[branch_of]
        k = _rope(_rms(attn.norm_k, attn.to_k(xn).unflatten(-1, (-1, hd))), image_freqs)[branch_of]
        v = attn.to_v(xn).unflatten(-1, (-1, hd))[branch_of]
        tq = _rope(_rms(attn.norm_added_q, attn.add_q_proj(cn).unflatten(-1, (-1, hd))), text_freqs)
        tk = _rope(_rms(attn.norm_added_k, attn.add_k_proj(cn).unflatten(-1, (-1, hd))), text_freqs)
        tv = attn.add_v_proj(cn).unflatten(-1, (-1, hd))
        out = _attention(torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1), keep)
        image = out[:, text_len:]
        if rows == 2 * batch:
            image = authors_combine(image[:batch], image[batch:], nag_scale, nag_tau, nag_alpha, norm)
        x = x + gate * attn.to_out[0](image)
        c = c + text_gate * attn.to_add_out(out[:, :text_len])
        xn, gate = modulate(x, im2)
        x = x + gate * block.img_mlp(xn)
        cn, text_gate = modulate(c, tm2)
        c = c + text_gate * block.txt_mlp(cn)

    scale, shift = model.norm_out.linear(F.silu(temb)).chunk(2, dim=1)
    return model.proj_out(_ln(x) * (1 + scale[:, None]) + shift[:, None])


def tokenizer():
    """A byte-level Qwen2 tokenizer without merges (one token per byte) and the chat-template special tokens."""
    from transformers import Qwen2Tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def text_encoder(vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(4)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM),
        vocab_size=vocab_size,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


def pipeline(cls, dtype: torch.dtype = torch.float64):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tok = tokenizer()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(len(tok)),
               tokenizer=tok, transformer=transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
