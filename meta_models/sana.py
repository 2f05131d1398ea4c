"""The full-size Sana and Sana-Video transformers on the meta device and one denoising step's inputs per variant, for
FLOP counts.

``build(name)`` -> the named transformer on ``torch.device("meta")`` (bfloat16, no memory; ``overrides`` replace config
fields, e.g. a tiny config for tests); ``step_inputs(model, variant, resolution)`` -> one step's keyword arguments:

- ``"no_nag"``: one latent row, one text row;
- ``"cfg"``: CFG as the pipelines batch it (latents and text 2 rows);
- ``"nag"``: NAG without CFG (latents 1 row, text and mask 2 rows: positive, NAG negative); Sana-Sprint's only mode;
- ``"nag_cfg"``: NAG with batched CFG (latents 2 rows, text 3 rows: uncond, cond, NAG negative of cond).

NAG variants need ``apply_nag``.

Configs: ``sana-1600m`` is ``Efficient-Large-Model/Sana_1600M_1024px_diffusers`` (diffusers' class defaults: 20 blocks
of width 2240, linear self-attention 70 x 32, cross-attention 20 x 112, Gemma2-2B captions of 2304, DC-AE 32x with 32
channels); ``sana-video-2b`` is ``Efficient-Large-Model/SANA-Video_2B_480p_diffusers`` (20 blocks of 20 x 112, MLP
ratio 3, patch (1, 2, 2), the Wan VAE: 8x spatial, 4x temporal, 16 channels). The text is the pipelines' default
``max_sequence_length=300`` (the complex human instruction is cut off by the pipelines' token selection).
"""

from __future__ import annotations

import torch

CONFIGS = {
    "sana-1600m": dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
    ),
    "sana-video-2b": dict(
        in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=3.0, attention_bias=False, sample_size=30, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ),
}
VIDEO = {"sana-video-2b"}
# Image: the side in pixels (DC-AE 32x, patch 1: (side / 32)^2 tokens). Video: (width, height, frames) with the Wan
# VAE (8x, 4x) and the (1, 2, 2) patch: the pipelines' default 832x480, 81 frames = 21 x 30 x 52 tokens.
RESOLUTIONS = {"1024": 1024, "512": 512, "832x480x81": (832, 480, 81), "1280x704x81": (1280, 704, 81)}
TEXT_TOKENS = 300  # the Sana pipelines' max_sequence_length
VARIANTS = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}  # (latent rows, text rows)


def build(name: str = "sana-1600m", dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel, SanaVideoTransformer3DModel

    cls = SanaVideoTransformer3DModel if name in VIDEO else SanaTransformer2DModel
    with torch.device("meta"):
        return cls(**{**CONFIGS[name], **overrides}).to(dtype).eval()


def latent_shape(config, resolution) -> tuple[int, ...]:
    """The latents of one image ``[C, H, W]`` or video ``[C, F, H, W]``. ``config``: a model's config or a ``CONFIGS``
    entry; ``resolution``: a ``RESOLUTIONS`` key, an image side in pixels or a (width, height, frames) tuple."""
    size = RESOLUTIONS.get(resolution, resolution)
    channels = config["in_channels"]
    if isinstance(size, tuple):
        width, height, frames = size
        return channels, (frames - 1) // 4 + 1, height // 8, width // 8
    return channels, size // 32, size // 32


def tokens(config, resolution) -> int:
    """Image / video tokens of one latent (``config`` as in ``latent_shape``)."""
    shape, patch = latent_shape(config, resolution), config["patch_size"]
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    frames = shape[1] // patch[0] if len(shape) == 4 else 1
    return frames * (shape[-2] // patch[-2]) * (shape[-1] // patch[-1])


def step_inputs(model, variant: str, resolution="1024", batch: int = 1, text_tokens: int = TEXT_TOKENS) -> dict:
    """One step's forward arguments (``batch`` images or videos: every row count times ``batch``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    latents, texts = (n * batch for n in VARIANTS[variant])
    meta, dtype = torch.device("meta"), model.dtype
    return dict(
        hidden_states=torch.empty(latents, *latent_shape(model.config, resolution), device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, model.config.caption_channels, device=meta,
                                          dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        encoder_attention_mask=torch.empty(texts, text_tokens, device=meta, dtype=dtype),
        return_dict=False,
    )


def flops_inputs(resolution: str, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step (``benchmarks/flops_models.py``): no NAG, CFG (one forward at 2 rows, as the pipelines
    batch it) and the guided forward."""
    return {v: [step_inputs(model, v, resolution, batch)] for v in ("no_nag", "cfg", "nag")}
