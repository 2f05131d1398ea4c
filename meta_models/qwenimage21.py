"""The full-size Qwen-Image 2.1 transformer on the meta device and one denoising step's inputs per variant, for FLOP
counts.

``build(name)`` returns the named model on the meta device in bfloat16 (no memory, no weights), made countable there
(below); ``step_inputs(model, variant, resolution)`` the keyword arguments of one step's transformer work:
``"no_nag"`` (one plain forward), ``"cfg"`` (``true_cfg_scale > 1`` with a negative prompt: the conditional and the
unconditional pass, two plain forwards; not one forward at batch 2, which differs by the shared ``t = 0`` modulation
row) or ``"nag"`` (one guided forward: 2 text rows and masks, 1 latent row; the model must be patched with
``apply_nag``). ``count(name, variant, resolution, cached=...)`` does all of it and returns TFLOP (by default on a
model with one block, its cost repeated to the full depth: exact, since the blocks are identical and share one
modulation, and quick). ``cached=True``
counts a KV-cached decoding step (``QwenImage21Pipeline``'s default ``use_kv_cache=True``: every step after the first
recomputes the target image's tokens only, attending to the cached prefix; under NAG the cache holds both branches'
prefixes). ``flops_inputs`` is the flops suite's step (``benchmarks/flops_models.py``): the full (prefill) step.

Config: ``qwen-image-2.1`` is ``QwenImage21Transformer2DModel``'s defaults in diffusers 0.42.1, which its docstring
gives as the model's (32 single-stream blocks of 32 heads x 128, SwiGLU 3x, Qwen3-VL text features of 4096, 64 latent
channels unpatched, RoPE axes (16, 56, 56), ``causal_condition``); diffusers' example loads ``Qwen/Qwen-Image-2.1``,
whose ``transformer/config.json`` could not be read here (offline) to compare. Qwen-Image 2.1 Turbo is the distilled
checkpoint of the same architecture. Text: ``TEXT_TOKENS`` positions of the prompt after the chat template (each
prompt has its own length; 256 as for Qwen-Image here); image: 1024^2 is (1024 / 16)^2 = 4096 latent tokens (the 16x
VAE, no patching), 1024 vision slots.

Meta device: the model reads ``img_mask`` on the host (``.tolist()``, ``nonzero``: it needs values). The inputs hold a
meta ``img_mask`` like every other tensor, and ``build`` gives the model a pre-hook (after NAG's) that replaces a meta
``img_mask`` by its text-to-image values on the host (the text positions, then the target's vision slots); the
per-token masks the model derives from it then live on the host while the activations are on meta, so each block and
``norm_out`` get a pre-hook moving ``target_token_mask`` to the activations' device (the only host tensor that meets
a meta one in an op).
"""

from __future__ import annotations

import torch

CONFIGS = {
    "qwen-image-2.1": dict(
        patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128, num_attention_heads=32,
        context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56), causal_condition=True,
    ),
}
TEXT_TOKENS = 256
VARIANTS = {"no_nag": (1, 1), "cfg": (1, 1), "nag": (1, 2)}  # (latent rows, text rows) of one forward
CALLS = {"no_nag": 1, "cfg": 2, "nag": 1}  # forwards per step


def _to_activations(module, args, kwargs):
    """Forward pre-hook (meta counting): ``target_token_mask`` on the device of the hidden states."""
    args = list(args)
    x = kwargs.get("hidden_states", args[0] if args else None)
    if "target_token_mask" in kwargs:
        if isinstance(kwargs["target_token_mask"], torch.Tensor):
            kwargs["target_token_mask"] = kwargs["target_token_mask"].to(x.device)
    elif len(args) > 2 and isinstance(args[2], torch.Tensor):  # norm_out(hidden_states, temb, target_token_mask)
        args[2] = args[2].to(x.device)
    return tuple(args), kwargs


def _host_layout(module, args, kwargs):
    """Model forward pre-hook (meta counting): a meta ``img_mask`` replaced by the text-to-image layout's values on
    the host (``False`` at the ``encoder_hidden_states`` positions, ``True`` at the target's slots after them)."""
    mask = kwargs.get("img_mask")
    if isinstance(mask, torch.Tensor) and mask.device.type == "meta":
        host = torch.zeros(mask.shape, dtype=torch.bool)
        host[:, kwargs["encoder_hidden_states"].shape[1]:] = True
        kwargs["img_mask"] = host
    return args, kwargs


def build(name: str = "qwen-image-2.1", shallow: bool = False, dtype: torch.dtype = torch.bfloat16, **overrides):
    """The model on meta, countable there; ``shallow``: one block (``count`` repeats its cost to the full depth)."""
    from diffusers import QwenImage21Transformer2DModel

    config = {**CONFIGS[name], **overrides, **({"num_layers": 1} if shallow else {})}
    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(**config).to(dtype).eval()
    model.register_forward_pre_hook(_host_layout, with_kwargs=True)
    for module in (*model.transformer_blocks, model.norm_out):
        module.register_forward_pre_hook(_to_activations, with_kwargs=True)
    return model


def image_tokens(resolution: int) -> int:
    """Latent tokens of a ``resolution``^2 image (VAE 16x, no patching)."""
    return (resolution // 16) ** 2


def step_inputs(model, variant: str, resolution: int = 1024, text_tokens: int = TEXT_TOKENS, batch: int = 1) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    meta, dtype, config = torch.device("meta"), model.dtype, model.config
    latents, texts = (n * batch for n in VARIANTS[variant])
    n, side = image_tokens(resolution), resolution // 16
    return dict(
        hidden_states=torch.empty(latents, n, config.in_channels, device=meta, dtype=dtype),
        encoder_hidden_states=torch.empty(texts, text_tokens, config.context_in_dim, device=meta, dtype=dtype),
        encoder_hidden_states_mask=torch.empty(texts, text_tokens, device=meta, dtype=torch.bool),
        timestep=torch.empty(latents, device=meta, dtype=dtype),
        img_shapes=[[(1, side, side)]] * latents,
        img_mask=torch.empty(latents, text_tokens + n // 4, device=meta, dtype=torch.bool),  # values: _host_layout
        return_dict=False,
    )


def flops_inputs(resolution: int, text_tokens: int, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step (a full, uncached step): no NAG, CFG (two plain forwards), the guided forward."""
    return {v: [step_inputs(model, v, resolution, text_tokens, batch) for _ in range(CALLS[v])] for v in CALLS}


def repeat(name: str, model: torch.nn.Module) -> dict[str, int]:
    """``meta_models.count.count``'s ``repeat`` for ``model`` standing for ``name``: its first block counted once
    more per block it lacks (nothing for a full-depth model)."""
    return {f"{type(model).__name__}.transformer_blocks.0": CONFIGS[name]["num_layers"] - model.config.num_layers}


def count(name: str, variant: str, resolution: int = 1024, model: torch.nn.Module | None = None,
          text_tokens: int = TEXT_TOKENS, cached: bool = False) -> float:
    """TFLOP of one step of ``name`` at ``resolution``^2 for ``variant`` (``meta_models.count.count``): on a shallow
    model of ``name``, its block counted ``num_layers`` times, or on ``model`` as it is when one is passed (a tiny or
    a full-depth one). ``cached``: a KV-cached decoding step (the cache filled by an uncounted extracting forward)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    from .count import count as count_flops
    from nag_kernels.integrations import apply_nag, remove_nag

    copies = model is None
    model = build(name, shallow=True) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = step_inputs(model, variant, resolution, text_tokens)
    if cached:
        cache = QwenImage21KVCache(len(model.transformer_blocks))
        with torch.no_grad():
            model(**kw, kv_cache=cache, kv_cache_mode="extract")
        kw.update(kv_cache=cache, kv_cache_mode="cached")
    counted = count_flops(lambda: model(**kw)[0], repeat(name, model) if copies else None)
    tokens = image_tokens(resolution) + (0 if cached else text_tokens)
    out = counted.value
    assert out.shape == (kw["hidden_states"].shape[0], tokens, model.config.out_channels)
    assert out.device.type == "meta" and not counted.uncounted_ops, counted.uncounted_ops
    return CALLS[variant] * counted.flops / 1e12
