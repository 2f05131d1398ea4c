"""Tiny random-weight Krea2 components built offline (no model hub), for the Krea2 integration tests.

The transformer: 2 text-fusion layerwise + 2 refiner blocks (text width 16, 2 heads with 1 K/V head: GQA), 2 main
blocks of 4 query heads x 8 with 2 K/V heads (GQA), the text stacking 3 encoder layers. The pipeline: a 3-layer
Qwen3-VL text model of width 16 (36 layers for the modular blocks, whose tapped layers are fixed at 2, 5, ..., 35),
a word-level tokenizer whose Krea 2 template prefix is exactly the 34 tokens the pipeline drops and whose suffix is
the 5 it appends, and a tiny Qwen-Image VAE (8x, 4 latent channels; 2x2 patches: 16 channels per token).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

TEXT_HIDDEN = 16  # the Qwen3-VL width (the transformer's text_hidden_dim)
LAYERS = (1, 2, 3)  # text_encoder_select_layers of the 3-layer encoder
MODULAR_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)  # diffusers' fixed taps in the modular blocks
SEQ_LEN = 10  # max_sequence_length (5 prompt tokens, then the 5 suffix tokens)
LATENT_CHANNELS = 4
SIZE = 32  # pixels: a 4x4 latent, 2x2 patches: 4 image tokens
IMAGE_TOKENS = (SIZE // 16) ** 2

WORDS = (
    "system describe the image by detailing color shape size texture quantity text spatial relationships of objects "
    "and background user assistant a cat dog red blue sky blurry dark low quality on in snow fox bright sharp"
).split()


def transformer(layers: int = 2, num_text_layers: int = len(LAYERS), seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        in_channels=4 * LATENT_CHANNELS, num_layers=layers, attention_head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, timestep_embed_dim=32, text_hidden_dim=TEXT_HIDDEN,
        num_text_layers=num_text_layers, text_num_attention_heads=2, text_num_key_value_heads=1,
        text_intermediate_size=24, num_layerwise_text_blocks=2, num_refiner_text_blocks=2, axes_dims_rope=(2, 2, 4),
        rope_theta=1000.0,
    )
    model = Krea2Transformer2DModel(**{**config, **overrides})
    with torch.no_grad():  # widen diffusers' init (zero tables and norms) so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1)
    return model.eval()


def tokenizer():
    """A word-level tokenizer: words, punctuation and newlines are tokens, ``<|im_start|>`` / ``<|im_end|>`` special,
    so the Krea 2 template prefix is 34 tokens and its suffix 5, as with the Qwen3-VL tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {token: i for i, token in enumerate([*specials, "\n", ",", ":", ".", *WORDS])}
    vocab.update({word.capitalize(): len(vocab) + i for i, word in enumerate(["describe"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast


def text_encoder(vocab_size: int, layers: int = 3):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(1)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=24, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    return Qwen3VLModel(config).eval()


def vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(3)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True,
                                                                                                          True],
        latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS,
    ).eval()


def pipeline(dtype=torch.float64, distilled: bool = False, layers: int = 2, modular_taps: bool = False):
    """``Krea2Pipeline`` on the tiny components; ``modular_taps``: a 36-layer encoder tapped where diffusers' modular
    text-encoder step taps it (``MODULAR_LAYERS``: 12 layers stacked), so the modular blocks can share the components."""
    tok = tokenizer()
    taps = MODULAR_LAYERS if modular_taps else LAYERS
    pipe = Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=6400),
        vae=vae(), text_encoder=text_encoder(len(tok), layers=36 if modular_taps else 3), tokenizer=tok,
        transformer=transformer(layers=layers, num_text_layers=len(taps)), text_encoder_select_layers=taps,
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


@pytest.fixture
def float64_throughout(monkeypatch):
    """diffusers computes Krea 2's RMSNorm (``x.float()``) and the RoPE tables (``.float()``) in float32 even in a
    float64 model; for comparisons at 1e-10 those steps stay float64 here (``Tensor.float`` keeps float64 tensors
    as they are). The NAG code is untouched."""
    float32 = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else float32(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", keep_float64)
