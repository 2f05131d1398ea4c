"""The full-size LTX-Video transformer on the meta device and one denoising step's inputs per variant.

``build(name)`` returns the named transformer (configs as in the public ``transformer/config.json``) on the meta
device in bfloat16; ``step_inputs(model, variant, resolution)`` one step's keyword arguments: ``"no_nag"``,
``"cfg"`` (the pipeline's batched CFG call), ``"nag"`` (positive + NAG-negative text rows and masks for 1 video row)
or ``"nag_cfg"`` (2 video rows, text ``[uncond; cond; NAG-negative]``); NAG variants need ``apply_nag``.
"""

from __future__ import annotations

import torch

CONFIGS = {
    "ltx-video-2b": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
    ),
}
# (width, height, frames): the pipeline's default and a 768x512 clip; the VAE compresses 32x spatially, 8x in time
RESOLUTIONS = {"704x480x161": (704, 480, 161), "768x512x121": (768, 512, 121)}
TEXT_TOKENS = 128  # LTX pipelines' max_sequence_length
VARIANTS = ("no_nag", "cfg", "nag", "nag_cfg")
_ROWS = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}


def build(name: str = "ltx-video-2b") -> torch.nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    with torch.device("meta"):
        return LTXVideoTransformer3DModel(**CONFIGS[name]).to(torch.bfloat16).eval()


def latent_grid(resolution: str) -> tuple[int, int, int]:
    width, height, frames = RESOLUTIONS[resolution]
    return (frames - 1) // 8 + 1, height // 32, width // 32


def step_inputs(model: torch.nn.Module, variant: str, resolution: str = "704x480x161") -> dict:
    if variant not in _ROWS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    videos, texts = _ROWS[variant]
    frames, height, width = latent_grid(resolution)
    return dict(
        hidden_states=torch.empty(videos, frames * height * width, model.config.in_channels, device=meta,
                                  dtype=dtype),
        encoder_hidden_states=torch.empty(texts, TEXT_TOKENS, model.config.caption_channels, device=meta,
                                          dtype=dtype),
        timestep=torch.empty(videos, device=meta, dtype=dtype),
        encoder_attention_mask=torch.empty(texts, TEXT_TOKENS, device=meta, dtype=dtype),
        num_frames=frames, height=height, width=width, return_dict=False,
    )
