"""Tiny random-weight Sana, Sana-Sprint, Sana ControlNet and Sana-Video components built offline (no model hub), for
the Sana integration tests.

Sana: 2 blocks, linear self-attention 2 heads x 8 (width 16), cross-attention 2 heads x 8, caption width 32, a tiny
Gemma2 text encoder of width 32 with the T5 tokenizer of flux_toy, a 3-level DC-AE of width 8 with 4 latent channels
(4x): a 32x32 image is 8x8 latents = 64 tokens. Sana-Video: 2 blocks of 2 heads x 12 (width 24), the Wan VAE of
wan_toy (8x spatial, 4x temporal, 16 channels): a 5-frame 32x32 video is 2 latent frames of 4x4 latents, 8 tokens
after the (1, 2, 2) patch. Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    SanaControlNetModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SCMScheduler,
)
from transformers import Gemma2Config, Gemma2Model

import flux_toy
import wan_toy

TEXT_DIM = 32  # Gemma2 width = caption_channels
SEQ_LEN = 8  # max_sequence_length used by the tests
SIZE = 32  # image height/width in pixels (the pipelines want multiples of 32): 8x8 latents
CHANNELS = 4  # DC-AE latent channels
VIDEO_SIZE, FRAMES = wan_toy.SIZE, wan_toy.FRAMES
VIDEO_LATENT = wan_toy.LATENT  # channels, frames, height, width


def _widen(model):
    """diffusers' init leaves the output projections and gates near zero; widen every weight so that NAG changes
    the output visibly."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def _sana_dims(qk_norm=None) -> dict:
    return dict(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM,
        mlp_ratio=2.5, sample_size=SIZE // 4, patch_size=1,
    ) | ({} if qk_norm is None else {"qk_norm": qk_norm})


def transformer(layers: int = 2, guidance: bool = False, qk_norm: str | None = None, seed: int = 0
                ) -> SanaTransformer2DModel:
    """Sana (``guidance=False``) or Sana-Sprint (``guidance=True``: the guidance embedding, and Sprint's QK norm)."""
    torch.manual_seed(seed)
    if guidance and qk_norm is None:
        qk_norm = "rms_norm_across_heads"
    return _widen(SanaTransformer2DModel(num_layers=layers, guidance_embeds=guidance, **_sana_dims(qk_norm)))


def controlnet(layers: int = 1, seed: int = 5) -> SanaControlNetModel:
    torch.manual_seed(seed)
    return _widen(SanaControlNetModel(num_layers=layers, **_sana_dims()))


def video_transformer(layers: int = 2, seed: int = 0):
    from diffusers import SanaVideoTransformer3DModel  # diffusers >= 0.36

    torch.manual_seed(seed)
    return _widen(SanaVideoTransformer3DModel(
        in_channels=VIDEO_LATENT[0], out_channels=VIDEO_LATENT[0], num_attention_heads=2, attention_head_dim=12,
        num_layers=layers, num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
        caption_channels=TEXT_DIM, mlp_ratio=2.5, patch_size=(1, 2, 2), rope_max_seq_len=32,
    ))


def text_encoder(vocab_size: int) -> Gemma2Model:
    torch.manual_seed(2)
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, sliding_window=4096,
    )
    config._attn_implementation = "eager"
    return Gemma2Model(config).eval()


def vae() -> AutoencoderDC:
    torch.manual_seed(3)
    return AutoencoderDC(
        in_channels=3, latent_channels=CHANNELS, attention_head_dim=4, encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()), scaling_factor=0.41,
    ).eval()


def scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


def components(sprint: bool = False, controlnet_model: bool = False) -> dict:
    tokenizer = flux_toy.t5_tokenizer()
    parts = dict(
        tokenizer=tokenizer, text_encoder=text_encoder(len(tokenizer)), vae=vae(),
        scheduler=SCMScheduler() if sprint else scheduler(), transformer=transformer(guidance=sprint),
    )
    if controlnet_model:
        parts["controlnet"] = controlnet()
    return parts


def video_components() -> dict:
    tokenizer = flux_toy.t5_tokenizer()
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder(len(tokenizer)), vae=wan_toy.vae(), scheduler=scheduler(),
        transformer=video_transformer(),
    )


def pipeline(cls=SanaPipeline, dtype: torch.dtype = torch.float64):
    name = cls.__name__
    if name.startswith("SanaVideo") or name == "SanaImageToVideoPipeline":
        parts = video_components()
    else:
        parts = components(sprint="Sprint" in name, controlnet_model="ControlNet" in name)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def image(size: int = SIZE, seed: int = 1) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
