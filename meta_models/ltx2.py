"""The full-size LTX-2 transformers on the meta device and one denoising step's inputs per variant.

``CONFIGS``: LTX-2 19B (``Lightricks/LTX-2``'s ``transformer/config.json``: diffusers' class defaults, 48 blocks,
video 32 x 128 heads, audio 32 x 64, caption projections from Gemma3's 3840 channels) and LTX-2.3 22B (the same
widths with gated attention, the text K/V modulated from sigma, STG-capable processors, split RoPE and no caption
projection: the connectors give 4096 / 2048-wide text, as in diffusers' conversion script); ``"tiny"`` is a
two-block stand-in of the 2.3 layout for fast tests. ``build(name)`` returns the transformer on the meta device in
bfloat16; ``step_inputs(model, variant, resolution, text_tokens)`` one step's keyword arguments: ``"no_nag"`` (one
latent row), ``"cfg"`` (the pipelines' batched CFG call: 2 latent and 2 text rows), ``"nag"`` (1 latent row, the
positive and NAG-negative text rows of both streams with their masks) or ``"nag_cfg"`` (2 latent rows, text
``[uncond; cond; NAG-negative]``); NAG variants need ``apply_nag``. ``flops_inputs`` adapts them to the flops suite.
"""

from __future__ import annotations

import torch

_BASE = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32,
    audio_attention_head_dim=64, audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840,
)
_V23 = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
            use_prompt_embeddings=False, perturbed_attn=True, rope_type="split")
CONFIGS = {
    "ltx-2-19b": dict(_BASE),
    "ltx-2.3-22b": dict(_BASE, **_V23),
    "tiny": dict(_BASE, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                 audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
                 caption_channels=24, in_channels=8, out_channels=8, audio_in_channels=8, audio_out_channels=8, **_V23),
}
LABELS = {"ltx-2-19b": "LTX-2 19B", "ltx-2.3-22b": "LTX-2.3 22B", "tiny": "LTX-2 tiny"}
# (width, height, frames): the VAE compresses 32x in space and 8x in time; the pipelines' default frame rate is 24
RESOLUTIONS = {"768x512x121": (768, 512, 121), "1920x1088x121": (1920, 1088, 121), "64x64x9": (64, 64, 9)}
FPS = 24.0
AUDIO_LATENTS_PER_SECOND = 16000 / 160 / 4  # sample rate / mel hop / the audio VAE's temporal compression
TEXT_TOKENS = 1024  # the pipelines' max_sequence_length
VARIANTS = ("no_nag", "cfg", "nag", "nag_cfg")
_ROWS = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}


def build(name: str = "ltx-2-19b", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        return LTX2VideoTransformer3DModel(**CONFIGS[name]).to(dtype).eval()


def latent_grid(resolution: str) -> tuple[int, int, int]:
    width, height, frames = RESOLUTIONS[resolution]
    return (frames - 1) // 8 + 1, height // 32, width // 32


def video_tokens(resolution: str) -> int:
    frames, height, width = latent_grid(resolution)
    return frames * height * width


def audio_tokens(resolution: str) -> int:
    return round(RESOLUTIONS[resolution][2] / FPS * AUDIO_LATENTS_PER_SECOND)


def text_widths(model) -> tuple[int, int]:
    """The widths of ``encoder_hidden_states`` / ``audio_encoder_hidden_states`` (the connectors' outputs)."""
    config = model.config
    if config.use_prompt_embeddings:
        return config.caption_channels, config.caption_channels
    return config.cross_attention_dim, config.audio_cross_attention_dim


def step_inputs(model: torch.nn.Module, variant: str, resolution: str = "768x512x121",
                text_tokens: int = TEXT_TOKENS) -> dict:
    if variant not in _ROWS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    meta, dtype = torch.device("meta"), next(model.parameters()).dtype
    latents, texts = _ROWS[variant]
    frames, height, width = latent_grid(resolution)
    video_width, audio_width = text_widths(model)
    config = model.config

    def empty(*shape):
        return torch.empty(*shape, device=meta, dtype=dtype)

    return dict(
        hidden_states=empty(latents, frames * height * width, config.in_channels),
        audio_hidden_states=empty(latents, audio_tokens(resolution), config.audio_in_channels),
        encoder_hidden_states=empty(texts, text_tokens, video_width),
        audio_encoder_hidden_states=empty(texts, text_tokens, audio_width),
        encoder_attention_mask=empty(texts, text_tokens),
        audio_encoder_attention_mask=empty(texts, text_tokens),
        timestep=empty(latents), sigma=empty(latents),
        num_frames=frames, height=height, width=width, fps=FPS, audio_num_frames=audio_tokens(resolution),
        return_dict=False,
    )


def nag_added_flops(model, resolution: str, text_tokens: int = TEXT_TOKENS) -> int:
    """What a guided forward adds to a plain one (one latent row): per block and stream, the K/V projections of the
    NAG-negative text and the queries' attention over it; once, the caption projections of its rows (LTX-2.0)."""
    config = model.config
    video, audio, text = video_tokens(resolution), audio_tokens(resolution), text_tokens
    inner = config.num_attention_heads * config.attention_head_dim
    audio_inner = config.audio_num_attention_heads * config.audio_attention_head_dim
    kv_in, audio_kv_in = config.cross_attention_dim, config.audio_cross_attention_dim
    per_block = (2 * 2 * text * kv_in * inner + 4 * video * text * inner
                 + 2 * 2 * text * audio_kv_in * audio_inner + 4 * audio * text * audio_inner)
    caption = 0
    if config.use_prompt_embeddings:  # PixArtAlphaTextProjection: caption -> width -> width, per stream
        caption = 2 * text * (config.caption_channels * inner + inner * inner)
        caption += 2 * text * (config.caption_channels * audio_inner + audio_inner * audio_inner)
    return config.num_layers * per_block + caption


def flops_inputs(name: str, resolution: str, model, batch: int) -> dict[str, list]:
    """The flops suite's ``step_inputs``: one forward per variant (the pipelines batch CFG), ``batch`` rows each
    (``[pos x B, neg x B]``)."""

    def rows(kw):
        return {k: (v.repeat_interleave(batch, dim=0) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    return {v: [rows(step_inputs(model, v, resolution))] for v in ("no_nag", "cfg", "nag")}
