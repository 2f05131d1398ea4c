"""Tiny random-weight MiniMax-H3 transformer and packed layouts built offline, for the MiniMax-H3 integration tests.

The transformer: 2 blocks and 1 token-refiner block of 2 heads x 16 (residual width 24, so ``heads * head_dim``
differs from ``hidden_size`` as in the real model), RoPE over 3 axes of 2 frequencies (12 of the 16 head channels
rotated), 4 latent channels in 1x2x2 patches, 3 audio channels, text width 12. ``layout`` builds a packed sequence the
way the modular ``MiniMaxH3PrepareLayoutStep`` does (text, conditioning video rows, audio rows, target video rows),
or with its rows permuted (the model reads only the index tensors).
"""

from __future__ import annotations

import torch
from diffusers import MiniMaxH3Transformer3DModel

TEXT_DIM = 12
PATCH_DIM = 16  # in_channels 4 x 1 x 2 x 2
AUDIO = 3
CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1, ffn_dim=32,
    in_channels=4, audio_in_channels=AUDIO, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=16,
    time_embed_hidden_dim=16, time_embed_dim=8, rope_freq_dim=2, rope_theta=1000.0,
)


def transformer(seed: int = 0, dtype=torch.float64, **overrides) -> MiniMaxH3Transformer3DModel:
    torch.manual_seed(seed)
    model = MiniMaxH3Transformer3DModel(**{**CONFIG, **overrides})
    with torch.no_grad():  # widen the init so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.6 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1)
    return model.to(dtype).eval()


def layout(text=5, condition=4, audio=3, video=8, permute=False, seed=0, vision=1):
    """The structural arguments of one packed sequence: ``position_ids``, ``token_tags``, the three index tensors
    (and ``timestep`` / ``timestep_indices``: target video at 0.3, audio at 0.4, conditioning at 0.9, text at the
    video's). ``vision``: that many text rows tagged as video (a vision block in the presentation)."""
    g = torch.Generator().manual_seed(seed)
    length = text + condition + audio + video
    order = torch.randperm(length, generator=g) if permute else torch.arange(length)
    text_indices = order[:text]
    audio_indices = order[text + condition: text + condition + audio]
    video_indices = torch.cat([order[text: text + condition], order[text + condition + audio:]])
    positions = torch.zeros(length, 3, dtype=torch.float64)
    positions[text_indices, 0] = torch.arange(text, dtype=torch.float64)
    media = torch.cat([video_indices, audio_indices])
    positions[media] = torch.randint(0, 6, (media.numel(), 3), generator=g).double() + float(text)
    tags = torch.empty(length, dtype=torch.long)
    tags[text_indices] = 1
    tags[text_indices[:vision]] = 0
    tags[video_indices], tags[audio_indices] = 0, 2
    timestep = torch.tensor([0.3, 0.4, 0.9])
    indices = torch.zeros(length, dtype=torch.long)
    indices[audio_indices] = 1
    indices[video_indices[:condition]] = 2
    return dict(position_ids=positions, token_tags=tags, video_indices=video_indices, audio_indices=audio_indices,
                text_indices=text_indices, timestep=timestep, timestep_indices=indices)


def inputs(batch=1, text=5, condition=4, audio=3, video=8, permute=False, seed=0, dtype=torch.float64, rows=None):
    """A guided call's arguments: ``encoder_hidden_states`` with ``rows`` rows (default ``2 * batch``)."""
    g = torch.Generator().manual_seed(seed + 1)
    kw = layout(text, condition, audio, video, permute, seed)
    kw.update(
        hidden_states=torch.randn(batch, condition + video, PATCH_DIM, generator=g, dtype=dtype),
        audio_hidden_states=torch.randn(batch, audio, AUDIO, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(rows or 2 * batch, text, TEXT_DIM, generator=g, dtype=dtype),
    )
    return kw


def positive(kw):
    """The call with the positive text only (a plain forward)."""
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: kw["hidden_states"].shape[0]]}


# --------------------------------------------------------------------------------------------------------------------
# The modular blocks' components (MiniMaxH3Blocks, t2va): no VAEs (the tests compare the denoised latents).

QWEN_HIDDEN = 16
QWEN_LAYERS = 51  # MiniMax-H3 reads hidden_states[50] (components.text_encoder_layer)
WORDS = ["a", "cat", "dog", "red", "blue", "sky", "fox", "runs", "in", "snow", "birds", "sing", "blurry", "dark", "low", "quality", "noisy", "distorted", "audio"]


class Processor:
    """What the MiniMax-H3 text-encoder step uses of the ``Qwen3VLProcessor``: ``create_mm_token_type_ids`` (every
    token text here: no vision blocks in a t2va presentation)."""

    def create_mm_token_type_ids(self, token_ids):
        return [[0] * len(ids) for ids in token_ids]


def tokenizer():
    """A word-level tokenizer (one token per word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "[UNK]", ",", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>")


def text_encoder(vocab_size: int, dtype=torch.float64):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(1)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=QWEN_HIDDEN, intermediate_size=16, num_hidden_layers=QWEN_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_HIDDEN,
                           patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    return Qwen3VLForConditionalGeneration(config).to(dtype).eval()


def modular_components(dtype=torch.float64, seed: int = 0) -> dict:
    from diffusers import MiniMaxH3Scheduler

    tok = tokenizer()
    return dict(
        transformer=transformer(seed=seed, dtype=dtype, in_channels=24, audio_in_channels=32, text_dim=QWEN_HIDDEN),
        text_encoder=text_encoder(len(tok), dtype),
        tokenizer=tok,
        processor=Processor(),
        scheduler=MiniMaxH3Scheduler(),
        audio_scheduler=MiniMaxH3Scheduler(),
    )
