"""Full-size MiniMax-H3 transformer on the meta device and one denoising step's inputs, for FLOP counting.

``build(name)`` returns the named model on the meta device in bfloat16: ``"minimax-h3"``, the configuration of the
released checkpoint as diffusers 0.42.1 documents it (``MiniMaxH3Transformer3DModel``'s defaults: 50 blocks of 56
heads x 128 over a 5376-wide residual, SwiGLU 14336, 2 token-refiner blocks, Qwen3-VL text 5120).
``step_inputs(model, variant, ...)`` gives the keyword arguments of one step's transformer work: ``"no_nag"`` (the
stock call: the checkpoint is guidance-distilled, one call per step) or ``"nag"`` (one guided call, 2 text rows; the
model must be patched with ``apply_nag``). The packed layout is the t2va one (``MiniMaxH3PrepareLayoutStep``): text,
audio rows (2 channels x 40 latents/s), target video rows (1x2x2 patches of the 16x VAE's latents, ``5 n + 2`` latent
frames for ``17 n + 5`` frames at 24 fps).

The common setting: the default canvas (short edge 768, area cap 768 x 1344: 768 x 1344, 24 x 42 = 1008 rows per
latent frame) and the shortest duration, 5 s (120 frames, snapped to 124: 37 latent frames), with a 512-token prompt
(the packed sequence has no padding; the text's length is the prompt's).

``build(name, shallow=True)`` has one transformer block; ``repeat(name, model)`` is what ``meta_models.count.count``
needs to count it at the full depth (exact: the blocks are identical).
"""

from __future__ import annotations

import torch

CONFIGS = {
    "minimax-h3": dict(
        num_attention_heads=56, attention_head_dim=128, hidden_size=5376, num_layers=50, num_refiner_layers=2,
        ffn_dim=14336, in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=5120, freq_dim=256,
        time_embed_hidden_dim=5376, time_embed_dim=2688, rope_freq_dim=16, rope_theta=10000.0,
    ),
}
TEXT_TOKENS = 512
HEIGHT, WIDTH, FRAMES = 768, 1344, 120  # the default canvas, 5 s at 24 fps
VARIANTS = ("no_nag", "nag")


def build(name: str, shallow: bool = False) -> torch.nn.Module:
    """The model on meta; ``shallow``: one transformer block (``repeat`` counts it at the full depth)."""
    from diffusers import MiniMaxH3Transformer3DModel

    config = {**CONFIGS[name], **({"num_layers": 1} if shallow else {})}
    with torch.device("meta"):
        return MiniMaxH3Transformer3DModel(**config).to(torch.bfloat16).eval()


def rows(height: int = HEIGHT, width: int = WIDTH, frames: int = FRAMES) -> tuple[int, int]:
    """``(video rows, audio rows)`` of a t2va request (diffusers' own frame arithmetic)."""
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import (
        align_num_frames,
        audio_latent_num_frames,
        video_latent_num_frames,
    )

    frames = align_num_frames(frames, 17, 5)
    latent_frames = video_latent_num_frames(frames, 17, 5)
    audio = audio_latent_num_frames(frames, 24, 40)
    return latent_frames * (height // 32) * (width // 32), 2 * audio


def step_inputs(model: torch.nn.Module, variant: str, height: int = HEIGHT, width: int = WIDTH, frames: int = FRAMES,
                text_tokens: int = TEXT_TOKENS, batch: int = 1) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    video, audio = rows(height, width, frames)
    length = text_tokens + audio + video
    config = model.config
    patch = config.in_channels * config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    return dict(
        hidden_states=torch.empty(batch, video, patch, device=meta, dtype=dtype),
        audio_hidden_states=torch.empty(batch, audio, config.audio_in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty((2 if variant == "nag" else 1) * batch, text_tokens, config.text_dim,
                                          device=meta, dtype=dtype),
        timestep=torch.empty(2, device=meta),
        timestep_indices=torch.zeros(length, dtype=torch.long, device=meta),
        token_tags=torch.zeros(length, dtype=torch.long, device=meta),
        position_ids=torch.zeros(length, 3, device=meta),
        text_indices=torch.arange(text_tokens, device=meta),
        audio_indices=torch.arange(text_tokens, text_tokens + audio, device=meta),
        video_indices=torch.arange(text_tokens + audio, length, device=meta),
        return_dict=False,
    )


def flops_inputs(model: torch.nn.Module, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step at the common setting: no NAG (the stock call; the checkpoint is guidance-distilled,
    so there is no CFG pass to compare with) and the guided forward."""
    return {variant: [step_inputs(model, variant, batch=batch)] for variant in VARIANTS}


def repeat(name: str, model: torch.nn.Module) -> dict[str, int]:
    """``count``'s ``repeat`` for ``model`` standing for ``name``: the first block counted once more per block
    ``model`` lacks (nothing for the full-depth model)."""
    return {f"{type(model).__name__}.transformer_blocks.0": CONFIGS[name]["num_layers"] - model.config.num_layers}
