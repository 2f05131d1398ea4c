"""The full-size FLUX.3 transformer on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` returns the named model on the meta device in bfloat16 (no memory, no weights); ``step_inputs(model,
variant, resolution)`` the keyword arguments of one step's transformer work: ``"no_nag"`` (one plain forward),
``"cfg"`` (``Flux3AutoBlocks`` with its CFG guider: the conditional and the unconditional pass, two plain forwards) or
``"nag"`` (one guided forward: 2 text rows, 1 latent row; the model must be patched with ``apply_nag``).
``count(name, variant, resolution)`` does all of it and returns TFLOP (by default on a model with one block per
stack, each stack's block counted to its full depth: exact, since the blocks of a stack are identical, and quick).
``flops_inputs`` is the flops suite's step (``benchmarks/flops_models.py``). ``references`` adds reference images
(image-to-image: ``image_cond_hidden_states``, each at the generated image's size).

Config: ``flux3`` is ``Flux3Transformer2DModel``'s defaults in diffusers 0.42.1, which its docstring gives as the
model's (5 per-mode blocks per mode and 28 single-stream blocks of 24 heads x 128, MLP ratio 3, 128 latent channels
per token, text features of 20480 = 8 stacked Qwen3-VL layers of 2560); no ``transformer/config.json`` could be read
here (offline) to compare. ``flux3-distilled`` is the step-distilled flow map: the same with ``flow_map=True`` (one
more timestep embedder, negligible). Image: 1024^2 is (1024 / 16)^2 = 4096 tokens (the VAE's 8x, 2x2 packing).
Text: each prompt has its own window, its chat-templated length rounded up to a multiple of 80; ``TEXT_TOKENS`` = 480
is the window of a caption from the prompt upsampler at the long end of its typical 100 to 350 words (350 words,
about 460 tokens with the template; diffusers' ``Flux3AutoBlocks`` run every prompt through the upsampler first).
"""

from __future__ import annotations

import torch

from .count import count as count_flops

CONFIGS = {
    "flux3": dict(
        in_channels=128, cond_in_channels=128, num_layers=5, num_single_layers=28, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=20480, timestep_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=10000, flow_map=False,
    ),
}
CONFIGS["flux3-distilled"] = {**CONFIGS["flux3"], "flow_map": True}
TEXT_TOKENS = 480
PAD = 80  # the text-encoder step's window multiple
VARIANTS = {"no_nag": (1, 1), "cfg": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of one forward
CALLS = {"no_nag": 1, "cfg": 2, "nag": 1}  # forwards per step


def build(name: str = "flux3", shallow: bool = False, dtype: torch.dtype = torch.bfloat16, **overrides):
    """The model on meta; ``shallow``: one block per stack (``count`` repeats its cost to the full depth)."""
    from diffusers import Flux3Transformer2DModel

    config = {**CONFIGS[name], **overrides, **({"num_layers": 1, "num_single_layers": 1} if shallow else {})}
    with torch.device("meta"):
        return Flux3Transformer2DModel(**config).to(dtype).eval()


def image_tokens(resolution: int) -> int:
    """Latent tokens of a ``resolution``^2 image (VAE 8x, 2x2 packing)."""
    return (resolution // 16) ** 2


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = TEXT_TOKENS, batch: int = 1,
                references: int = 0) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    meta, dtype, config = torch.device("meta"), model.dtype, model.config
    latents, texts = (n * batch for n in VARIANTS[variant])
    n = image_tokens(resolution)
    kw = dict(
        hidden_states=torch.empty(latents, n, config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, config.joint_attention_dim, device=meta, dtype=dtype),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        img_ids=torch.zeros(n, 4, device=meta),
        txt_ids=torch.zeros(text_tokens, 4, device=meta),
        return_dict=False,
    )
    if config.flow_map:
        kw["target_timestep"] = torch.empty(latents, device=meta, dtype=dtype)
    if references:
        kw["image_cond_hidden_states"] = torch.empty(latents, references * n, config.cond_in_channels, device=meta,
                                                     dtype=dtype)
        kw["image_cond_ids"] = torch.zeros(references * n, 4, device=meta)
    return kw


def flops_inputs(resolution: int, text_tokens: int, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step: no NAG, CFG (two plain forwards), the guided forward."""
    return {v: [step_inputs(model, v, resolution, text_tokens, batch) for _ in range(CALLS[v])] for v in CALLS}


def repeat(name: str, model: torch.nn.Module, references: int = 0) -> dict[str, int]:
    """``meta_models.count.count``'s ``repeat`` for ``model`` standing for ``name``: each stack's first block counted
    once more per block it lacks (nothing for a full-depth model)."""
    prefix, config = type(model).__name__, CONFIGS[name]
    mode = config["num_layers"] - model.config.num_layers
    single = config["num_single_layers"] - model.config.num_single_layers
    out = {f"{prefix}.txt_mode_blocks.0": mode, f"{prefix}.mode_blocks.image.0": mode,
           f"{prefix}.single_transformer_blocks.0": single}
    if references:
        out[f"{prefix}.mode_blocks.image_cond.0"] = mode
    return out


def count(name: str, variant: str, resolution: int = 1024, model: torch.nn.Module | None = None,
          text_tokens: int = TEXT_TOKENS, references: int = 0) -> float:
    """TFLOP of one step of ``name`` at ``resolution``^2 for ``variant`` (``meta_models.count.count``): on a shallow
    model of ``name``, its blocks counted to the full depth, or on ``model`` as it is when one is passed (a tiny or a
    full-depth one)."""
    from nag_kernels.integrations import apply_nag, remove_nag


    copies = model is None
    model = build(name, shallow=True) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = step_inputs(model, variant, resolution, text_tokens, references=references)
    counted = count_flops(lambda: model(**kw)[0], repeat(name, model, references) if copies else None)
    out = counted.value
    assert out.shape == kw["hidden_states"].shape and out.device.type == "meta"
    assert not counted.uncounted_ops, counted.uncounted_ops
    return CALLS[variant] * counted.flops / 1e12
