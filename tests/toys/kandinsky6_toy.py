"""Tiny random-weight Kandinsky 6 components built offline (no model hub), for the Kandinsky 6 integration tests.

The transformer has the released checkpoints' structure flags (``ca_rope``, ``cross_gates``, ``fix_modulation``,
``text_token_padding``, two visual token types) at toy widths: 1 text block per modality, 2 fused blocks, video width
24 (2 heads x 12), audio width 36 (3 heads x 12: cross-modal RoPE needs equal head dims), text width 32, pooled width
16, video time width 16, audio time width 12. A 5-frame 32x32 video is 2 latent frames of 4x4 latents, 2 x 2 x 2 = 8
video tokens after the (1, 2, 2) patch; at 24 fps with the MMAudio VAE's 44.1 kHz / 1024 it has 9 audio tokens.

The Qwen2.5-VL "processor" is a byte-level Qwen2 tokenizer (one token per byte) whose chat-template prefix is exactly
``_QWEN_CROP_START`` (129) tokens, as with the real processor, so that the pipeline's crop keeps the prompt's tokens.
Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import re

import diffusers
import pytest
import torch

if not hasattr(diffusers, "Kandinsky6TI2VAPipeline"):  # skips every test module that imports this one
    pytest.skip("this diffusers has no Kandinsky 6 (diffusers >= 0.42)", allow_module_level=True)

from diffusers import (  # noqa: E402
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    Kandinsky6TI2VAPipeline,
    Kandinsky6Transformer3DModel,
    MMAudioVAE,
    MMAudioVocoder,
)
from diffusers.pipelines.kandinsky6.pipeline_kandinsky6_ti2va import _PROMPT_TEMPLATE, _QWEN_CROP_START  # noqa: E402
from transformers import AddedToken, CLIPTextConfig, CLIPTextModel, Qwen2Tokenizer  # noqa: E402

import flux_toy  # noqa: E402

TEXT_DIM = 32  # Qwen2.5-VL width = in_text_dim
POOLED_DIM = 16  # CLIP width = in_text_dim2
SEQ_LEN = 8  # max_sequence_length used by the tests
SIZE, FRAMES = 32, 5
LATENT = (2, 4, 4, 4)  # frames, height, width, channels of one video's latents (the transformer's layout)
AUDIO_CHANNELS = 4
AUDIO_LEN = 9  # audio tokens of a 5-frame video at 24 fps (the pipeline's formula)

CONFIG = dict(
    in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=POOLED_DIM, time_dim=16,
    patch_size=(1, 2, 2), model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4),
    visual_cond=True, in_audio_dim=AUDIO_CHANNELS, out_audio_dim=AUDIO_CHANNELS, model_dim_a=36, time_dim_a=12,
    ff_dim_a=40, axes_dims_a=(4, 4, 4), audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0),
    text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2,
)
# diffusers' defaults for the three structure flags (no released checkpoint uses them): equal time widths then.
DEFAULT_FLAGS = dict(ca_rope=False, cross_gates=False, fix_modulation=False, time_dim_a=16)


def transformer(blocks: int = 2, seed: int = 0, **config) -> Kandinsky6Transformer3DModel:
    torch.manual_seed(seed)
    model = Kandinsky6Transformer3DModel(**{**CONFIG, "num_visual_blocks": blocks, **config})
    # widen every weight so that NAG changes the output visibly (and no gate starts near zero)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1)
    return model.eval()


def tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer; the chat template's prefix (before the prompt) is ``_QWEN_CROP_START`` tokens:
    its longest text run is split into added tokens so that the count matches the real processor's."""
    special = ("<|im_start|>", "<|im_end|>")
    prefix = _PROMPT_TEMPLATE.split("{}")[0]
    parts = [p for p in re.split(r"(<\|im_start\|>|<\|im_end\|>)", prefix) if p]
    texts = [p for p in parts if p not in special]
    longest = max(texts, key=len)
    pieces = []
    for part in parts:
        if part != longest:
            pieces.append(part)
            continue
        k = _QWEN_CROP_START - (len(parts) - 1)
        cuts = [round(i * len(part) / k) for i in range(k + 1)]
        pieces += [part[cuts[i]:cuts[i + 1]] for i in range(k)]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    for token in ("<|endoftext|>", *special):
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.add_tokens([AddedToken(p, normalized=False) for p in dict.fromkeys(pieces) if p not in special])
    ids = tok([_PROMPT_TEMPLATE.format("x")])["input_ids"][0]
    assert len(ids) == _QWEN_CROP_START + 2, "the toy template prefix must be _QWEN_CROP_START tokens"
    return tok


def text_encoder(vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(4)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048,
                         rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM),
        vocab_size=vocab_size,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def clip_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=POOLED_DIM, intermediate_size=24, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, projection_dim=POOLED_DIM, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(3)
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT[-1], block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        mid_block_add_attention=False,
    ).eval()


def audio_vae() -> MMAudioVAE:
    torch.manual_seed(5)
    return MMAudioVAE(mel_bins=8, latent_channels=AUDIO_CHANNELS, hidden_channels=8, channel_multipliers=(1,),
                      layers_per_block=1).eval()


def vocoder() -> MMAudioVocoder:
    torch.manual_seed(6)
    return MMAudioVocoder(num_mels=8, upsample_initial_channel=8, upsample_rates=(2,), upsample_kernel_sizes=(4,),
                          resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),)).eval()


def components(**config) -> dict:
    tok, clip_tok = tokenizer(), flux_toy.clip_tokenizer()
    return dict(
        transformer=transformer(**config), vae=vae(), text_encoder=text_encoder(len(tok)), tokenizer=tok,
        text_encoder_2=clip_encoder(len(clip_tok)), tokenizer_2=clip_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), audio_vae=audio_vae(), vocoder=vocoder(),
    )


def pipeline(dtype: torch.dtype = torch.float64, **config) -> Kandinsky6TI2VAPipeline:
    pipe = Kandinsky6TI2VAPipeline(**components(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def image(size: int = SIZE):
    import numpy as np
    import PIL.Image

    g = np.random.default_rng(0)
    return PIL.Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8))


def inputs(rows: int = 2, text_rows: int | None = None, seed: int = 0, timestep: float = 700.0, audio: bool = True,
           mask: bool = True, dtype: torch.dtype = torch.float64, pooled_rows: int | None = None,
           image_tail: bool = False) -> dict:
    """A transformer call's arguments: ``rows`` videos, ``text_rows`` text rows (default ``2 * rows``: guided), each
    text row with its own padding when ``mask``; ``image_tail`` appends the I2V reference frame (token type 1,
    temporal position 0), as the pipeline does."""
    text_rows = 2 * rows if text_rows is None else text_rows
    g = torch.Generator().manual_seed(seed)
    frames, height, width, channels = LATENT
    frames += int(image_tail)
    kw = dict(
        hidden_states=torch.randn(rows, frames, height, width, 2 * channels + 1, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(text_rows, SEQ_LEN, TEXT_DIM, generator=g, dtype=dtype),
        pooled_projections=torch.randn(pooled_rows or rows, POOLED_DIM, generator=g, dtype=dtype),
        timestep=torch.full((rows,), timestep, dtype=dtype),
    )
    if audio:
        kw["audio_hidden_states"] = torch.randn(rows, AUDIO_LEN, AUDIO_CHANNELS, generator=g, dtype=dtype)
    if mask:
        keep = torch.ones(text_rows, SEQ_LEN, dtype=torch.bool)
        keep[torch.arange(text_rows), SEQ_LEN - 1 - torch.arange(text_rows) % 3] = False
        keep[0, -3:] = False
        kw["encoder_attention_mask"] = keep
    if image_tail:
        kw["visual_token_type_ids"] = torch.zeros(rows, frames, dtype=torch.long)
        kw["visual_token_type_ids"][:, -1] = 1
        kw["visual_rope_pos"] = (torch.cat([torch.arange(frames - 1), torch.zeros(1, dtype=torch.long)]),
                                 torch.arange(height // 2), torch.arange(width // 2))
    return kw


def plain(kw: dict, rows: int | None = None) -> dict:
    """``kw`` with the first ``rows`` (default: the video rows) text rows only: the plain (positive) forward."""
    rows = kw["hidden_states"].shape[0] if rows is None else rows
    out = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:rows]}
    if kw.get("encoder_attention_mask") is not None:
        out["encoder_attention_mask"] = kw["encoder_attention_mask"][:rows]
    out["pooled_projections"] = kw["pooled_projections"][:rows]
    return out


def run(model, kw: dict):
    """The transformer's ``(video, audio)`` outputs (``audio`` None without audio latents), without grad."""
    with torch.no_grad():
        out = model(**kw, return_dict=False)
    return out if len(out) == 2 else (out[0], None)
