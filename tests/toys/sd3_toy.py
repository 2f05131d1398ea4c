"""Tiny random-weight SD3 / SD3.5 components built offline (no model hub), for the SD3 integration tests.

3 joint blocks (the first with SD3.5's dual attention, RMS QK norms), 2 heads x 16, two CLIP encoders of width 16
(pooled 16 + 16 = 32) and a T5 of width 32; 32x32 images = 16x16 latents of 16 channels = 64 image tokens (patch 2);
8 CLIP + 8 T5 = 16 text tokens.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import flux_toy

SEQ_LEN = flux_toy.SEQ_LEN  # T5 tokens (max_sequence_length); CLIP gives as many (its model_max_length)
SIZE = 32
LATENT_CHANNELS = 16
CLIP_DIM = 16
TEXT_DIM = 32  # T5 width = joint_attention_dim; pooled width = 2 * CLIP_DIM


def clip_encoder(vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_DIM,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=3,
        max_position_embeddings=SEQ_LEN,
        projection_dim=CLIP_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.06,
        scaling_factor=1.5,
    ).eval()


def transformer(layers: int = 3, dual: tuple[int, ...] = (0,), qk_norm: str | None = "rms_norm", seed: int = 0):
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=dual,
        qk_norm=qk_norm,
    )
    # diffusers' init leaves the AdaLN-zero gates near zero; widen every weight so that NAG changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def components() -> dict:
    clip_tok, t5_tok = flux_toy.clip_tokenizer(), flux_toy.t5_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=clip_encoder(len(clip_tok), 11),
        tokenizer=clip_tok,
        text_encoder_2=clip_encoder(len(clip_tok), 12),
        tokenizer_2=flux_toy.clip_tokenizer(),
        text_encoder_3=flux_toy.t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
        transformer=transformer(),
    )


def pipeline(cls, dtype: torch.dtype = torch.float64):
    pipe = cls(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Initial latents ``[batch, 4, 16, 16]`` for a 32x32 image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=g, dtype=dtype)
