"""Full-size SD3 / SD3.5 transformers on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` -> an ``SD3Transformer2DModel`` with the public config of ``name`` on ``torch.device("meta")``
(bfloat16, no memory); ``step_inputs(model, variant, resolution)`` -> the forward's keyword arguments for one step:

- ``"plain"``: one image, no guidance;
- ``"cfg"``: CFG as the pipeline batches it (latents and text 2 rows);
- ``"nag"``: NAG without CFG (SD3.5 Turbo's use; latents 1 row, text 2 rows: positive, NAG negative);
- ``"nag_cfg"``: NAG with batched CFG (latents 2 rows, text 3 rows: uncond, cond, NAG negative of cond).

The text is 77 CLIP + 256 T5 tokens (the pipelines' defaults); a ``resolution``-pixel square image is
``(resolution / 16)^2`` image tokens (VAE factor 8, patch 2).
"""

from __future__ import annotations

import torch

# From the models' public transformer/config.json files.
CONFIGS = {
    "sd3.5-large": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
    ),
    "sd3.5-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    ),
    "sd3-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm=None, dual_attention_layers=(),
    ),
}
VARIANTS = {"plain": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}  # (latent rows, text rows)
TEXT_TOKENS = 77 + 256


def build(name: str, dtype: torch.dtype = torch.bfloat16):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**CONFIGS[name]).to(dtype)


def step_inputs(model, variant: str, resolution: int = 1024) -> dict:
    latents, text = VARIANTS[variant]
    meta, dtype = torch.device("meta"), model.dtype
    side = resolution // 8
    config = model.config
    return dict(
        hidden_states=torch.empty(latents, config.in_channels, side, side, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(text, TEXT_TOKENS, config.joint_attention_dim, device=meta, dtype=dtype),
        pooled_projections=torch.empty(text, config.pooled_projection_dim, device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        return_dict=False,
    )
