"""The full-size Krea 2 transformer on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` returns the named model on the meta device in bfloat16 (no memory, no weights); ``step_inputs(model,
variant, resolution)`` the keyword arguments of one step's transformer work: ``"no_nag"`` (one plain forward), ``"cfg"``
(``Krea2Pipeline`` with ``guidance_scale > 0``: the conditional and the unconditional pass, two forwards; given here as
one forward at batch 2, the same FLOPs) or ``"nag"`` (one guided forward: 2 text rows and masks, 1 image row; the
model must be patched with ``apply_nag``). ``count(name, variant, resolution)`` does all of it and returns TFLOP (by
default on a model with one main block, its cost repeated to the full depth: exact, since the blocks are identical,
and quick). ``flops_inputs`` is the flops suite's step (``benchmarks/flops_models.py``).

Config: ``krea2`` is ``Krea2Transformer2DModel``'s defaults in diffusers 0.42.1 (the class documents them as Krea 2's:
28 blocks of 48 query heads x 128 with 12 K/V heads, SwiGLU 16384; text fusion over 12 tapped Qwen3-VL-4B layers of
width 2560, 2 layerwise + 2 refiner blocks of 20 heads, SwiGLU 6912). No public ``transformer/config.json`` was
available to compare with (diffusers' example loads a local conversion: "no hub repo yet"). The base and the distilled
turbo checkpoints share the architecture. Text: the pipeline's fixed ``max_sequence_length=512`` (the template pads
every prompt to it, with a mask); image: 1024^2 is (1024 / 16)^2 = 4096 tokens (the Qwen-Image VAE's 8x, 2x2 patches).
"""

from __future__ import annotations

import torch

from .count import count as count_flops

CONFIGS = {
    "krea2": dict(
        in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48, num_key_value_heads=12,
        intermediate_size=16384, timestep_embed_dim=256, text_hidden_dim=2560, num_text_layers=12,
        text_num_attention_heads=20, text_num_key_value_heads=20, text_intermediate_size=6912,
        num_layerwise_text_blocks=2, num_refiner_text_blocks=2, axes_dims_rope=(32, 48, 48), rope_theta=1000.0,
    ),
}
TEXT_TOKENS = 512
VARIANTS = {"no_nag": (1, 1), "cfg": (2, 2), "nag": (1, 2)}  # (latent rows, text rows)


def build(name: str = "krea2", shallow: bool = False, dtype: torch.dtype = torch.bfloat16, **overrides):
    """The model on meta; ``shallow``: one main block (``count`` repeats its cost to the full depth)."""
    from diffusers import Krea2Transformer2DModel

    config = {**CONFIGS[name], **overrides, **({"num_layers": 1} if shallow else {})}
    with torch.device("meta"):
        return Krea2Transformer2DModel(**config).to(dtype).eval()


def image_tokens(resolution: int) -> int:
    """Latent tokens of a ``resolution``^2 image (VAE 8x, 2x2 patches)."""
    return (resolution // 16) ** 2


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = TEXT_TOKENS, batch: int = 1) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    meta, dtype = torch.device("meta"), model.dtype
    latents, texts = (n * batch for n in VARIANTS[variant])
    n, config = image_tokens(resolution), model.config
    return dict(
        hidden_states=torch.empty(latents, n, config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, config.num_text_layers, config.text_hidden_dim,
                                          device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        position_ids=torch.zeros(text_tokens + n, 3, device=meta),
        encoder_attention_mask=torch.ones(texts, text_tokens, device=meta, dtype=torch.bool),
        return_dict=False,
    )


def flops_inputs(resolution: int, text_tokens: int, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step: no NAG, CFG (two forwards at ``batch`` rows), the guided forward."""
    one = step_inputs(model, "no_nag", resolution, text_tokens, batch)
    return {"no_nag": [one], "cfg": [one, dict(one)], "nag": [step_inputs(model, "nag", resolution, text_tokens, batch)]}


def count(name: str, variant: str, resolution: int = 1024, model: torch.nn.Module | None = None,
          text_tokens: int = TEXT_TOKENS) -> float:
    """TFLOP of one step of ``name`` at ``resolution``^2 for ``variant`` (a matching ``model`` may be passed in; the
    main blocks missing from a shallow one are counted as copies of its first)."""
    from nag_kernels.integrations import apply_nag, remove_nag

    model = build(name, shallow=True) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = step_inputs(model, variant, resolution, text_tokens)
    missing = CONFIGS[name]["num_layers"] - model.config.num_layers
    counted = count_flops(lambda: model(**kw)[0], repeat={"Krea2Transformer2DModel.transformer_blocks.0": missing})
    assert counted.value.shape == kw["hidden_states"].shape and counted.value.device.type == "meta"
    return counted.flops / 1e12
