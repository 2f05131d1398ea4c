"""Tiny random-weight LTX-Video components built offline (no model hub), for the LTX integration tests.

One or two blocks of 4 heads x 8 (width 32), caption width 32, the T5 encoder and tokenizer of flux_toy, a 4-level
LTX VAE of width 8 with 8 latent channels. A 9-frame 32x32 video is 2 latent frames of 4x4 latents (32 tokens).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

import flux_toy

TEXT_DIM = 32
SEQ_LEN = 8
SIZE, FRAMES = 32, 9
LATENT = (2, 4, 4)  # latent frames, height, width
CHANNELS = 8


def transformer(layers: int = 2, seed: int = 0) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=layers, caption_channels=TEXT_DIM,
    )
    with torch.no_grad():  # widen diffusers' init so that the cross-attention visibly matters
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def vae() -> AutoencoderKLLTXVideo:
    torch.manual_seed(3)
    return AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=CHANNELS, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()


def components() -> dict:
    tokenizer = flux_toy.t5_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=flux_toy.t5_encoder(len(tokenizer)),
        tokenizer=tokenizer, transformer=transformer(),
    )


def pipeline(cls=LTXPipeline, dtype: torch.dtype = torch.float64):
    pipe = cls(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
