"""A tiny random-weight Qwen-Image 2.1 transformer, pipeline and inputs built offline, for the tests.

``transformer()``: 2 single-stream blocks of 2 heads x 16, a 32-wide text projection, 16 latent channels, RoPE axes
(4, 6, 6). ``inputs(...)``: a guided forward's arguments (text and text mask ``2B`` rows, everything else ``B``) over
a layout with or without a condition image spliced into the prompt (``LAYOUTS``). ``pipeline()``: a
``QwenImage21Pipeline`` with a tiny Qwen3-VL text encoder (one vision block), the byte-level toy tokenizer with the
chat-template and vision special tokens and a ``Qwen3VLProcessor`` over the PIL image processor (no video processor:
it needs torchvision), and a tiny Qwen-Image 2.1 VAE (16x spatial, like the real one).
"""

from __future__ import annotations

import diffusers
import pytest
import torch

if not hasattr(diffusers, "QwenImage21Pipeline"):  # skips every test module that imports this one
    pytest.skip("this diffusers has no Qwen-Image 2.1 (diffusers >= 0.42)", allow_module_level=True)

from diffusers import QwenImage21Transformer2DModel  # noqa: E402

TEXT_DIM = 32
CHANNELS = 16
SIDE = 4  # target latent tokens per side: 16 tokens, 4 vision slots
COND = (1, 2, 4)  # a condition image of 8 latent tokens: 2 vision slots
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]

# The prompt layout of a guided forward's tests: text positions, the condition image's vision slots among them.
LAYOUTS = {
    "t2i": dict(text=10, slots=(), shapes=[(1, SIDE, SIDE)]),
    "cond": dict(text=12, slots=(3, 4), shapes=[COND, (1, SIDE, SIDE)]),
}


def transformer(layers: int = 2, seed: int = 0, causal_condition: bool = True) -> QwenImage21Transformer2DModel:
    torch.manual_seed(seed)
    model = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, context_in_dim=TEXT_DIM, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
        causal_condition=causal_condition,
    )
    with torch.no_grad():  # diffusers' init leaves the zero-centred norms at 0 and the outputs tiny: widen it
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1)
    return model.eval()


def inputs(batch: int = 2, layout: str = "cond", masked: bool = True, seed: int = 0, t: float = 0.6,
           dtype=torch.float64) -> dict:
    """A guided forward's arguments: ``2 * batch`` text rows (positive rows, then NAG-negative rows) with each row
    its own right padding when ``masked``, ``batch`` latent rows (condition tokens first, the target last)."""
    spec = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    text_len, shapes = spec["text"], spec["shapes"]
    target = SIDE * SIDE
    tokens = sum(f * h * w for f, h, w in shapes)
    img_mask = torch.zeros(batch, text_len + target // 4, dtype=torch.bool)
    img_mask[:, list(spec["slots"])] = True
    img_mask[:, text_len:] = True
    mask = None
    if masked:
        mask = torch.ones(2 * batch, text_len, dtype=torch.long)
        for row, length in enumerate((text_len, text_len - 1, text_len - 4, text_len - 2, text_len - 3, text_len)):
            if row < 2 * batch:
                mask[row, length:] = 0
    return dict(
        hidden_states=torch.randn(batch, tokens, CHANNELS, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(2 * batch, text_len, TEXT_DIM, generator=g, dtype=dtype),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), t, dtype=dtype),
        img_shapes=[list(shapes)] * batch,
        img_mask=img_mask,
    )


def positive(kw: dict) -> dict:
    """The plain forward of the same samples: the positive text rows only."""
    batch = kw["hidden_states"].shape[0]
    mask = kw.get("encoder_hidden_states_mask")
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:batch],
            "encoder_hidden_states_mask": None if mask is None else mask[:batch]}


def same_negative(kw: dict) -> dict:
    """The guided forward whose NAG negative is the prompt itself."""
    batch = kw["hidden_states"].shape[0]
    mask = kw.get("encoder_hidden_states_mask")
    return {**kw, "encoder_hidden_states": torch.cat([kw["encoder_hidden_states"][:batch]] * 2),
            "encoder_hidden_states_mask": None if mask is None else torch.cat([mask[:batch]] * 2)}


# --------------------------------------------------------------------------------------------------------------------
# The pipeline's components


def tokenizer():
    """A byte-level Qwen2 tokenizer without merges (one token per byte) and the chat-template and vision tokens."""
    from transformers import Qwen2Tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]})
    return tok


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
)


def processor():
    """A ``Qwen3VLProcessor`` over the toy tokenizer and the PIL Qwen2-VL image processor (patch 16, merge 2: one
    vision slot per 32 x 32 pixels, as one slot per 2 x 2 latent tokens of the 16x VAE), without a video processor."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnly(Qwen3VLProcessor):  # the processor checks every part's class, the missing video one included
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                      max_pixels=64 * 64)
    return ImageOnly(image_processor=images, tokenizer=tokenizer(), chat_template=CHAT_TEMPLATE)


def text_encoder(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids(VISION_TOKENS)
    torch.manual_seed(4)
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[]),
        **dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), ids)),
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def vae():
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(3)
    return AutoencoderKLQwenImage21(**VAE_CONFIG).eval()


# 16x spatial like the real VAE (five levels, four downsamplings), RGBA in and out, 16 latent channels.
VAE_CONFIG = dict(base_dim=4, decoder_base_dim=4, z_dim=CHANNELS, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False] * 4, latents_mean=[0.0] * CHANNELS, latents_std=[1.0] * CHANNELS)


def pipeline(dtype: torch.dtype = torch.float64, layers: int = 2, sample_sigmas=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    proc = processor()
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(proc.tokenizer),
        processor=proc, transformer=transformer(layers), sample_sigmas=sample_sigmas,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)
