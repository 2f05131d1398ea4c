"""The full-size HiDream-I1 transformer on the meta device and one denoising step's inputs per variant, for FLOP counts.

``build(name)`` -> a ``HiDreamImageTransformer2DModel`` on ``torch.device("meta")`` (bfloat16, no memory) with the
config of ``HiDream-ai/HiDream-I1-Full``'s ``transformer/config.json`` as known here (HiDream-I1 Full, Dev and Fast
share it; diffusers' class defaults cannot be built: ``caption_channels`` and ``llama_layers`` default to None);
``step_inputs(model, variant, resolution)`` -> the forward's keyword arguments for one step:

- ``"plain"``: one image, no guidance (HiDream-I1-Dev / -Fast: no CFG);
- ``"cfg"``: CFG as ``HiDreamImagePipeline`` batches it (latents and text 2 rows);
- ``"nag"``: NAG without CFG (latents 1 row, text 2 rows: positive, NAG negative);
- ``"nag_cfg"``: NAG with batched CFG (latents 2 rows, text 3 rows: uncond, cond, NAG negative of cond).

The text is the pipeline's default ``max_sequence_length=128`` for T5 (4096 wide) and for Llama 3.1 8B (its 32 hidden
layers of 4096, all passed, as ``encode_prompt`` stacks them; ``llama_layers`` picks one per block); the pooled vector
is CLIP-L + CLIP-G (768 + 1280 = 2048). A ``resolution``-pixel square image is ``(resolution / 16)^2`` image tokens
(VAE factor 8, patch 2).

diffusers' MoE inference (``MOEFeedForwardSwiGLU.moe_infer``) reads the routing counts on the CPU (``bincount().cpu()``)
and meta tensors hold no values, so ``build`` gives each MoE of the meta model a routing-independent ``moe_infer``: the
``top_k`` expert passes of every token, spread evenly over the experts (the experts have one size, so any routing costs
these FLOPs); its output is zeros (meta tensors hold none anyway). Likewise ``unpatchify`` slices the output with the
image sizes' values, so the meta model's ``patchify`` returns them as Python ints.
"""

from __future__ import annotations

import types

import torch

# HiDream-ai/HiDream-I1-Full, transformer/config.json (Full, Dev and Fast share the transformer config).
CONFIGS = {
    "hidream-i1": dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
        num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
        llama_layers=[*range(32), *[31] * 16],
    ),
}
VARIANTS = {"plain": (1, 1), "cfg": (2, 2), "nag": (1, 2), "nag_cfg": (2, 3)}  # (latent rows, text rows)
T5_TOKENS = LLAMA_TOKENS = 128  # HiDreamImagePipeline's max_sequence_length
TEXT_TOKENS = T5_TOKENS + 2 * LLAMA_TOKENS  # in every block: T5, the last Llama layer's, the block's Llama layer's


def _moe_infer_counted(self, x, flat_expert_indices, flat_expert_weights):
    """``moe_infer`` for the meta device: ``flat_expert_indices.numel()`` (tokens x top_k) expert rows, spread evenly
    over the experts."""
    total, experts = flat_expert_indices.numel(), len(self.experts)
    for i, expert in enumerate(self.experts):
        rows = total // experts + (1 if i < total % experts else 0)
        if rows:
            expert(x.new_empty((rows, x.shape[-1])))
    return torch.zeros_like(x)


def _patchify_counted(self, hidden_states):
    """``patchify`` for the meta device: the image sizes as Python ints (``unpatchify`` slices with them; a meta
    tensor holds no values)."""
    tokens, masks, _, ids = type(self).patchify(self, hidden_states)
    p = self.config.patch_size
    grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
    return tokens, masks, [grid] * hidden_states.shape[0], ids


def build(name: str = "hidream-i1", dtype: torch.dtype = torch.bfloat16, **overrides):
    """The model of ``CONFIGS[name]`` (``overrides``: config fields replaced, e.g. a tiny one for tests) on meta."""
    from diffusers import HiDreamImageTransformer2DModel
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**{**CONFIGS[name], **overrides}).to(dtype).eval()
    for module in model.modules():
        if isinstance(module, MOEFeedForwardSwiGLU):
            module.moe_infer = types.MethodType(_moe_infer_counted, module)
    model.patchify = types.MethodType(_patchify_counted, model)
    return model


def step_inputs(model, variant: str, resolution: int = 1024, batch: int = 1, t5_tokens: int = T5_TOKENS,
                llama_tokens: int = LLAMA_TOKENS) -> dict:
    """One step's forward arguments (``batch`` images: every row count times ``batch``; widths from the model's
    config). The Llama states are a tuple of per-layer ``[rows, T, D]`` tensors (the model indexes them by layer, like
    the pipeline's stacked ``[layers, rows, T, D]`` tensor), so that every tensor argument has its rows first."""
    latents, text = (n * batch for n in VARIANTS[variant])
    meta, dtype, config = torch.device("meta"), model.dtype, model.config
    t5_dim, llama_dim = config.caption_channels
    side = resolution // 8
    return dict(
        hidden_states=torch.empty(latents, config.in_channels, side, side, device=meta, dtype=dtype),
        timesteps=torch.empty(latents, device=meta, dtype=dtype),
        encoder_hidden_states_t5=torch.empty(text, t5_tokens, t5_dim, device=meta, dtype=dtype),
        encoder_hidden_states_llama3=tuple(
            torch.empty(text, llama_tokens, llama_dim, device=meta, dtype=dtype)
            for _ in range(max(config.llama_layers) + 1)
        ),
        pooled_embeds=torch.empty(text, config.text_emb_dim, device=meta, dtype=dtype),
        return_dict=False,
    )


def flops_inputs(model, batch: int = 1, resolution: int = 1024) -> dict[str, list[dict]]:
    """The flops suite's step (``benchmarks/flops_models.py``): no NAG, CFG (one forward at 2 rows, as the pipeline
    batches it) and the guided forward."""
    return {v: [step_inputs(model, name, resolution, batch)] for v, name in
            (("no_nag", "plain"), ("cfg", "cfg"), ("nag", "nag"))}
