"""Tiny random-weight Z-Image components built offline (no model hub), for the Z-Image integration tests.

Transformer: dim 32 (2 heads x 16), 1 noise-refiner + 1 context-refiner + 2 joined layers, caption width 16;
16x16 images = 8x8 latents = 16 patch tokens (padded to 32 by the model).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from flux2_toy import tokenizer  # a character tokenizer with a chat template

CAP_DIM = 16
LATENT_CHANNELS = 4
SIZE = 16  # pixels; the VAE halves it: 8x8 latents, 2x2 patches


def transformer(layers: int = 2, refiner_layers: int = 1, seed: int = 0) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=layers,
        n_refiner_layers=refiner_layers, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP_DIM, axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # widen the init (zero pad tokens, small gates) so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def text_encoder(vocab_size: int) -> Qwen3Model:
    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=CAP_DIM, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0,
    )
    return Qwen3Model(config).eval()


def vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=SIZE, shift_factor=0.1, scaling_factor=1.2,
    ).eval()


def pipeline(cls=ZImagePipeline, dtype=torch.float64):
    tok = tokenizer()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(len(tok)),
               tokenizer=tok, transformer=transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    """The transformer's ``x``: ``batch`` latents ``[C, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(batch, LATENT_CHANNELS, 1, SIZE // 2, SIZE // 2, generator=g, dtype=dtype).unbind(0))


def captions(lengths, seed: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CAP_DIM, generator=g, dtype=dtype) for n in lengths]
