"""Tiny random-weight SDXL components built offline (no model hub), for the SDXL integration tests.

A 2-level UNet (32 and 64 channels; cross-attention in the second level and the mid block, text width 64 = two CLIP
encoders of width 32 concatenated; pooled width 32 + 6 time ids x 8 = 80), the 2-level VAE of flux_toy (16x16
images = 8x8 latents). Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import flux_toy

TEXT_DIM = 64  # prompt_embeds width (32 + 32)
POOLED_DIM = 32
SEQ_LEN = flux_toy.SEQ_LEN
SIZE = 16
LATENT = (4, 8, 8)


def unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=TEXT_DIM, norm_num_groups=4,
    )
    with torch.no_grad():  # widen diffusers' init so that the cross-attention visibly matters
        for name, p in model.named_parameters():
            if "attn2" in name and p.dim() > 1:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model.eval()


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=SEQ_LEN, projection_dim=POOLED_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def components() -> dict:
    tokenizer = flux_toy.clip_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer))).eval()
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer))).eval()
    return dict(
        vae=flux_toy.vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=flux_toy.clip_tokenizer(), unet=unet(), scheduler=EulerDiscreteScheduler(),
        image_encoder=None, feature_extractor=None,
    )


def pipeline(cls=StableDiffusionXLPipeline, dtype: torch.dtype = torch.float64):
    pipe = cls(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *LATENT, generator=g, dtype=dtype)
