"""Full-size Chroma transformer on the meta device and one call's inputs per variant, for FLOP counts.

``build()`` -> a ``ChromaTransformer2DModel`` with the public config (lodestones/Chroma1-HD) on the meta device
(bfloat16); ``step_inputs(model, variant, resolution, text_tokens)``: ``"plain"`` (one call, text mask given) or
``"nag"`` (the guided call: text and mask 2 rows, latents 1 row; the shared image stream, exact on Chroma). CFG is
two plain calls. A ``resolution``-pixel square image is ``(resolution / 16)^2`` image tokens (4096 at 1024^2).
"""

from __future__ import annotations

import torch

CONFIGS = {
    "chroma1-hd": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
        approximator_hidden_dim=5120, approximator_layers=5,
    ),
}
VARIANTS = {"plain": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of one call


def build(name: str = "chroma1-hd", dtype: torch.dtype = torch.bfloat16):
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        return ChromaTransformer2DModel(**CONFIGS[name]).to(dtype)


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = 512) -> dict:
    latents, text = VARIANTS[variant]
    meta, dtype = torch.device("meta"), model.dtype
    image_tokens = (resolution // 16) ** 2
    return dict(
        hidden_states=torch.empty(latents, image_tokens, model.config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(text, text_tokens, model.config.joint_attention_dim, device=meta,
                                          dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        img_ids=torch.empty(image_tokens, 3, device=meta),
        txt_ids=torch.empty(text_tokens, 3, device=meta),
        attention_mask=torch.empty(text, text_tokens + image_tokens, device=meta, dtype=dtype),
        return_dict=False,
    )
