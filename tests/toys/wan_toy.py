"""Tiny random-weight Wan components built offline (no model hub), for the Wan integration tests.

2 blocks, 2 heads x 12 (width 24), text width 32, UMT5 text encoder of width 32, a 4-level Wan VAE of base width 3
(z 16). A 5-frame 32x32 video is 2 latent frames of 4x4 latents, 2 x 2 x 2 = 8 video tokens after the (1, 2, 2)
patch. Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

import flux_toy

TEXT_DIM = 32
SEQ_LEN = 8  # max_sequence_length used by the tests
SIZE, FRAMES = 32, 5
LATENT = (16, 2, 4, 4)  # channels, frames, height, width of one video's latents


def transformer(layers: int = 2, seed: int = 0, **config) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=config.pop("in_channels", 16),
        out_channels=config.pop("out_channels", 16),
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=layers,
        cross_attn_norm=True,
        rope_max_seq_len=32,
        **config,
    )
    # diffusers' init leaves the output projections near zero; widen every weight so that NAG changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def text_encoder(vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(2)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def vae() -> AutoencoderKLWan:
    torch.manual_seed(3)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def components(two_experts: bool = False) -> dict:
    tokenizer = flux_toy.t5_tokenizer()
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder(len(tokenizer)),
        vae=vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer(),
    )
    if two_experts:  # Wan 2.2 A14B: a high-noise and a low-noise expert
        parts.update(transformer_2=transformer(seed=1), boundary_ratio=0.5)
    return parts


def pipeline(cls=WanPipeline, dtype: torch.dtype = torch.float64, **kw):
    pipe = cls(**components(**kw))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *LATENT, generator=g, dtype=dtype)
