"""Full-size Qwen-Image transformer on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` -> a ``QwenImageTransformer2DModel`` with the public config on ``torch.device("meta")`` (bfloat16);
``step_inputs(model, variant, resolution, text_tokens)`` -> the forward's keyword arguments for one call:

- ``"plain"``: one image, no guidance (the pipelines' true CFG is a second plain call: ``"cfg"`` counts 2 calls);
- ``"nag"``: the guided call (text and text mask 2 rows, latents 1 row).

A ``resolution``-pixel square image is ``(resolution / 16)^2`` image tokens (VAE factor 8, 2x2 packing): 4096 at
1024^2, 6889 at 1328^2. ``text_tokens`` is the prompt's length after the template (its own length per prompt; 256 by
default here).
"""

from __future__ import annotations

import torch

# From the model's public transformer/config.json (Qwen/Qwen-Image; the edit models share it).
CONFIGS = {
    "qwen-image": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ),
}
VARIANTS = {"plain": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of one call
CALLS = {"plain": 1, "cfg": 2, "nag": 1, "nag_cfg": 2}  # true CFG: two calls (nag_cfg: one guided + one plain)


def build(name: str = "qwen-image", dtype: torch.dtype = torch.bfloat16):
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**CONFIGS[name]).to(dtype)


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = 256) -> dict:
    latents, text = VARIANTS[variant]
    meta, dtype = torch.device("meta"), model.dtype
    side = resolution // 16
    return dict(
        hidden_states=torch.empty(latents, side * side, model.config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(text, text_tokens, model.config.joint_attention_dim, device=meta,
                                          dtype=dtype),
        encoder_hidden_states_mask=torch.empty(text, text_tokens, device=meta, dtype=torch.bool),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        img_shapes=[[(1, side, side)]] * latents,
        return_dict=False,
    )
