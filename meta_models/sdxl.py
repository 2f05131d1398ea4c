"""The full-size SDXL UNet on the meta device and one denoising step's inputs per variant, for FLOP counting.

``build(name)`` returns the UNet of the named config (as in the public ``unet/config.json``) on the meta device in
bfloat16; ``step_inputs(model, variant, resolution)`` one step's keyword arguments: ``"no_nag"`` (1 latent row, 1
text row), ``"cfg"`` (the pipeline's batched CFG call: 2 and 2), ``"nag"`` (1 latent row, positive + NAG-negative
text rows) or ``"nag_cfg"`` (2 latent rows, text ``[uncond; cond; NAG-negative]``); NAG variants need ``apply_nag``.
"""

from __future__ import annotations

import torch

CONFIGS = {
    "sdxl-base-1.0": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    ),
}
RESOLUTIONS = {"1024": 1024, "768": 768}
TEXT_TOKENS = 77
POOLED = 1280
VARIANTS = ("no_nag", "cfg", "nag", "nag_cfg")
_ROWS = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}  # latent rows, text rows


def build(name: str = "sdxl-base-1.0") -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[name]).to(torch.bfloat16).eval()


def step_inputs(model: torch.nn.Module, variant: str, resolution: str = "1024") -> dict:
    if variant not in _ROWS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    meta, dtype = torch.device("meta"), torch.bfloat16
    latents, texts = _ROWS[variant]
    side = RESOLUTIONS[resolution] // 8
    return dict(
        sample=torch.empty(latents, 4, side, side, device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, TEXT_TOKENS, model.config.cross_attention_dim, device=meta,
                                          dtype=dtype),
        added_cond_kwargs=dict(text_embeds=torch.empty(latents, POOLED, device=meta, dtype=dtype),
                               time_ids=torch.empty(latents, 6, device=meta, dtype=dtype)),
        return_dict=False,
    )
