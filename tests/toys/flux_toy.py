"""Tiny random-weight Flux components built offline (no model hub), for the integration tests.

Everything is deterministic (fixed seeds) and small: 2 double + 2 single blocks, 2 heads x 16, text width 32,
32x32 images = 16x16 latents = 64 image tokens, 8 text tokens.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

TEXT_DIM = 32  # T5 width = joint_attention_dim; CLIP width = pooled_projection_dim
SEQ_LEN = 8  # max_sequence_length used by the tests
SIZE = 32  # image height/width in pixels
LATENT_CHANNELS = 4

_CHARS = list("abcdefghijklmnopqrstuvwxyz.,")


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=SEQ_LEN)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=SEQ_LEN,
        projection_dim=TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def t5_encoder(vocab_size: int) -> T5EncoderModel:
    torch.manual_seed(2)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


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


def transformer(
    guidance: bool = False,
    in_channels: int = 4 * LATENT_CHANNELS,
    out_channels: int | None = None,
    layers: int = 2,
    single_layers: int = 2,
    seed: int = 0,
) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    # Random init leaves the AdaLN-zero gates and output projections near zero in diffusers' init; widen them so
    # that NAG changes the output visibly.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


# transformer in/out channels per pipeline (packed latents are 4 * LATENT_CHANNELS wide)
_CHANNELS = {
    "FluxFillPipeline": (4 * LATENT_CHANNELS * 3, 4 * LATENT_CHANNELS),  # latents, masked image, 2x2 mask
    "FluxControlPipeline": (4 * LATENT_CHANNELS * 2, 4 * LATENT_CHANNELS),
}


def components(pipeline_name: str = "FluxPipeline", guidance: bool = False) -> dict:
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    in_channels, out_channels = _CHANNELS.get(pipeline_name, (4 * LATENT_CHANNELS, None))
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(),
        text_encoder=clip_encoder(len(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=transformer(guidance, in_channels, out_channels),
    )


def pipeline(cls, guidance: bool = False, dtype: torch.dtype = torch.float64):
    pipe = cls(**components(cls.__name__, guidance))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Packed initial latents ``[batch, 64, 16]`` for a 32x32 image."""
    g = torch.Generator().manual_seed(seed)
    tokens = (SIZE // 4) ** 2
    return torch.randn(batch, tokens, 4 * LATENT_CHANNELS, generator=g, dtype=dtype)

