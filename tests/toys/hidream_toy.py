"""Tiny random-weight HiDream-I1 components built offline (no model hub), for the HiDream integration tests.

Transformer: 2 double + 2 single blocks, 2 heads x 16 (width 32), MoE feed-forward with 4 routed experts (top 2) and
a shared expert, RoPE axes (8, 4, 4) (the whole head), ``llama_layers = [0, 1, 1, 1]``. Text: two CLIP encoders with
projections of width 16 (pooled 16 + 16 = 32), a T5 of width 32, a 2-layer Llama of width 24; 8 tokens each
(``SEQ_LEN``). 32x32 images = 16x16 latents of 4 channels = 64 image tokens (patch 2); a HiDreamImagePipeline's
``default_sample_size`` is set to 16 so that it renders 32x32 (it rescales every request to that area).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import flux_toy
import sd3_toy

SEQ_LEN = flux_toy.SEQ_LEN  # max_sequence_length of the tests: tokens of T5, Llama (and CLIP)
SIZE = 32  # image side in pixels
LATENT_CHANNELS = 4
T5_DIM = flux_toy.TEXT_DIM  # 32
LLAMA_DIM = 24
POOLED_DIM = 2 * sd3_toy.CLIP_DIM  # 32
LLAMA_LAYERS = 2
CONFIG = dict(
    patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=2, caption_channels=[T5_DIM, LLAMA_DIM], text_emb_dim=POOLED_DIM,
    num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
    llama_layers=[0, 1, 1, 1],
)

_CHARS = list("abcdefghijklmnopqrstuvwxyz.,")


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Characters as tokens (a BPE without merges), ``<bos>`` in front, ``<eos>`` the pad token (as the pipeline
    sets it)."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{c: 3 + i for i, c in enumerate(_CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<eos>", model_max_length=SEQ_LEN)


def llama_encoder(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=LLAMA_DIM, intermediate_size=32, num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    config._attn_implementation = "eager"  # the pipeline asks for the attention weights
    return LlamaForCausalLM(config).eval()


def vae() -> AutoencoderKL:
    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=SIZE, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    ).eval()


def transformer(seed: int = 0, **overrides) -> HiDreamImageTransformer2DModel:
    torch.manual_seed(seed)
    model = HiDreamImageTransformer2DModel(**{**CONFIG, **overrides})
    # diffusers' init leaves the AdaLN gates and projections small; widen every weight so that NAG shows.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def components() -> dict:
    clip_tok, t5_tok, llama_tok = flux_toy.clip_tokenizer(), flux_toy.t5_tokenizer(), llama_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=sd3_toy.clip_encoder(len(clip_tok), 11),
        tokenizer=clip_tok,
        text_encoder_2=sd3_toy.clip_encoder(len(clip_tok), 12),
        tokenizer_2=flux_toy.clip_tokenizer(),
        text_encoder_3=flux_toy.t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
        text_encoder_4=llama_encoder(len(llama_tok)),
        tokenizer_4=llama_tok,
        transformer=transformer(),
    )


def pipeline(dtype: torch.dtype = torch.float64):
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline(**components())
    pipe.default_sample_size = SIZE // 2  # the pipeline renders every request at this area (x vae factor 2)^2
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def latents(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Initial latents ``[batch, 4, 16, 16]`` for a 32x32 image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=g, dtype=dtype)


def inputs(batch: int = 2, text_rows: int | None = None, height: int = SIZE // 2, width: int = SIZE // 2,
           seed: int = 0, t: float = 700.0, dtype: torch.dtype = torch.float64) -> dict:
    """Transformer inputs: ``batch`` latents, ``text_rows`` (default ``2 * batch``: positive then NAG-negative) rows of
    T5 / Llama / pooled states."""
    g = torch.Generator().manual_seed(seed)
    text_rows = 2 * batch if text_rows is None else text_rows
    f = dict(generator=g, dtype=dtype)
    return dict(
        hidden_states=torch.randn(batch, LATENT_CHANNELS, height, width, **f),
        timesteps=torch.full((batch,), t, dtype=dtype),
        encoder_hidden_states_t5=torch.randn(text_rows, SEQ_LEN, T5_DIM, **f),
        encoder_hidden_states_llama3=torch.randn(LLAMA_LAYERS, text_rows, SEQ_LEN, LLAMA_DIM, **f),
        pooled_embeds=torch.randn(text_rows, POOLED_DIM, **f),
    )


def rows_of(kw: dict, index) -> dict:
    """The text rows ``index`` (a slice or index list) of ``kw``'s per-text-row arguments, the rest as is."""
    return {**kw, "encoder_hidden_states_t5": kw["encoder_hidden_states_t5"][index],
            "encoder_hidden_states_llama3": kw["encoder_hidden_states_llama3"][:, index],
            "pooled_embeds": kw["pooled_embeds"][index]}


def positive(kw: dict) -> dict:
    return rows_of(kw, slice(0, kw["hidden_states"].shape[0]))
