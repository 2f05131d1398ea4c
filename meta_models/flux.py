"""FLUX.1 (and a Flux-shaped toy) on the meta device and one denoising step's inputs per variant, for FLOP counting.

``CONFIGS``: ``"FLUX.1"`` (FLUX.1-dev / -schnell, about 12B parameters) and ``"flux-tiny"`` (the same block structure,
2 + 4 blocks, 4 heads x 32: for CPU runs and tests); the benchmarks' random-weight models take their configs from here.
``build(name)`` -> a ``FluxTransformer2DModel`` on ``torch.device("meta")`` (bfloat16); ``step_inputs(model, variant,
resolution, text_tokens, batch)`` -> one forward's arguments: ``"no_nag"`` (``batch`` images and text rows; true CFG
is two such calls) or ``"nag"`` (the guided forward: ``batch`` images, ``2 * batch`` text rows: positive, then NAG
negative; the model must be patched with ``apply_nag``). The per-row conditioning (pooled text, timestep, guidance)
has the text's rows, as in the benchmarks' flux suite.
"""

from __future__ import annotations

import torch

# black-forest-labs/FLUX.1-dev, transformer/config.json: num_attention_heads 24 x attention_head_dim 128 = 3072;
# 19 double-stream + 38 single-stream blocks; joint_attention_dim 4096 (T5-XXL), pooled_projection_dim 768 (CLIP-L);
# T5 max_sequence_length 512 (dev).
FLUX1 = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX1_TEXT_TOKENS = 512
# A Flux-shaped toy for CPU runs and CI: same block structure, 2 + 4 blocks, 4 heads x 32 (rope axes sum to 32).
FLUX_TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
)
FLUX_TINY_TEXT_TOKENS = 32
CONFIGS = {"FLUX.1": FLUX1, "flux-tiny": FLUX_TINY}
TEXT_TOKENS = {"FLUX.1": FLUX1_TEXT_TOKENS, "flux-tiny": FLUX_TINY_TEXT_TOKENS}
VARIANTS = {"no_nag": 1, "nag": 2}  # text rows per image row


def image_tokens(height: int, width: int | None = None) -> int:
    """FLUX.1: VAE downsamples by 8, then 2x2 patches are packed into one token -> (H/16) * (W/16)."""
    width = height if width is None else width
    return (height // 16) * (width // 16)


def build(name: str = "FLUX.1", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**CONFIGS[name]).to(dtype).eval()


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = FLUX1_TEXT_TOKENS,
                batch: int = 1) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    meta, dtype, config = torch.device("meta"), model.dtype, model.config
    n, texts = image_tokens(resolution), VARIANTS[variant] * batch
    return dict(
        hidden_states=torch.empty(batch, n, config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, config.joint_attention_dim, device=meta, dtype=dtype),
        pooled_projections=torch.empty(texts, config.pooled_projection_dim, device=meta, dtype=dtype),
        timestep=torch.empty(texts, device=meta, dtype=dtype),
        guidance=torch.empty(texts, device=meta, dtype=torch.float32) if config.guidance_embeds else None,
        img_ids=torch.zeros(n, 3, device=meta),
        txt_ids=torch.zeros(text_tokens, 3, device=meta),
        return_dict=False,
    )
