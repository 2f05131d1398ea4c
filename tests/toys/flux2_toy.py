"""Tiny random-weight FLUX.2 components built offline (no model hub), for the FLUX.2 integration tests.

2 double + 2 single blocks, 2 heads x 16, text width 3 x 16 (three stacked Qwen3 layers, as FLUX.2 [klein]),
32x32 images = 4x4 packed latent tokens of 4 * 8 channels... see ``latents``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import Qwen3Config, Qwen3ForCausalLM, T5Tokenizer

HIDDEN = 16  # Qwen3 width; FLUX.2's text features stack 3 of its hidden states
TEXT_DIM = 3 * HIDDEN
LAYERS = (1, 2, 3)  # text_encoder_out_layers for the tiny 3-layer Qwen3
SEQ_LEN = 8
LATENT_CHANNELS = 4  # packed latents have 4 * 4 = 16 channels
SIZE = 32

_CHARS = list("abcdefghijklmnopqrstuvwxyz.,")


def transformer(layers: int = 2, single_layers: int = 2, guidance: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=guidance,
    )
    with torch.no_grad():  # widen diffusers' near-zero init so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )
    return Qwen3ForCausalLM(config).eval()


def vae() -> AutoencoderKLFlux2:
    torch.manual_seed(3)
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def klein(cls=Flux2KleinPipeline, dtype=torch.float64, distilled: bool = True):
    tok = tokenizer()
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(len(tok)), tokenizer=tok,
        transformer=transformer(), is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
