"""Full-size Wan Animate 2 on the meta device and one denoising step's inputs per variant, for FLOP counting.

``build(name)`` -> the named ``WanAnimate2Transformer3DModel`` on ``torch.device("meta")`` (bfloat16, no memory;
``overrides`` replace config fields, e.g. a tiny config for tests); ``step_inputs(model, variant, resolution)`` ->
the keyword arguments of each forward of one denoising step (``kv_cache_mode="cached"``, over a KV cache of meta
tensors standing for the segment's reference pass):

- ``"no_nag"``: one plain forward (latents 1 row, text 1 row);
- ``"cfg"``: CFG's two forwards as ``WanAnimate2SegmentDenoiseInner`` calls them (the unconditional one with
  ``is_uncondtion=True``, which skips block 9);
- ``"nag"``: the guided forward (latents 1 row, text 2 rows: positive, NAG negative; needs ``apply_nag``).

``count(name, variant, resolution)`` does all of it and returns TFLOP; ``reference_pass`` counts the per-segment
reference pass (``"extract"``, plain with or without NAG).

Flex attention on meta: torch 2.13's ``flex_attention`` refuses meta tensors (it accepts CUDA, CPU, HPU and MPS), and
the generation pass's self-attention runs on flex only. ``build`` therefore gives the meta model forward hooks that,
for the duration of each of its forwards, route diffusers' flex backend on meta tensors to a dense SDPA over the same
packed buffers: FlopCounterMode counts flex attention densely anyway (``sdpa_flop_count`` on the query and key
shapes; the block mask's sparsity is not seen), so the count is the one torch gives flex. ``flex_block_sparse_tflop``
gives what the flex kernel skips (128 x 128 blocks the mask fully excludes) for the block-sparse figure.

Config (``transformer/config.json`` of ``Wan-AI/Wan2.2-Animate-2-14B-Diffusers``, the checkpoint of diffusers'
Wan-Animate-2 docs, and of its distilled sibling ``Wan-AI/Wan2.2-Animate-2-14B-Distilled-Diffusers``; both equal
``WanAnimate2Transformer3DModel``'s defaults: 40 blocks of width 5120 (40 heads x 128), FFN 13824, UMT5-XXL text of
4096 padded to 512 tokens, CLIP ViT-H image features of 1280, 257 tokens; not downloaded here).

Resolution: the modular blocks' defaults, ``height=800, width=640`` (the target area; a 4:5 reference image keeps it
as is) and ``segment_frame_length=81``: 21 latent frames of 100 x 80 per segment, so a denoising forward runs 22
frames (the reference image's slot first) of 50 x 40 = 2000 tokens (44000) over 21 x 2000 = 42000 cached reference
tokens; ``1280x720x81`` (720p) is the larger setting.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .count import count as count_flops

CONFIGS = {"wan-animate-2-14b": {}}  # diffusers' defaults (module docstring)
# (width, height, frames per segment) in pixels
RESOLUTIONS = {"800x640x81": (640, 800, 81), "1280x720x81": (1280, 720, 81)}
TEXT_TOKENS = 512  # the blocks' max_sequence_length (the text encoder pads every prompt to it)
IMAGE_TOKENS, IMAGE_DIM = 257, 1280  # CLIP ViT-H/14 penultimate features of the reference image
VARIANTS = ("no_nag", "cfg", "nag")
SPATIAL, TEMPORAL = 8, 4  # the Wan VAE


def build(name: str = "wan-animate-2-14b", dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    from diffusers import WanAnimate2Transformer3DModel

    with torch.device("meta"):
        model = WanAnimate2Transformer3DModel(**{**CONFIGS[name], **overrides}).to(dtype).eval()
    _flex_on_meta(model)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Flex attention on meta tensors (module docstring)


def _dense_flex(stock):
    def flex(query, key, value, attn_mask=None, scale=None, **kwargs):
        if query.device.type != "meta":
            return stock(query=query, key=key, value=value, attn_mask=attn_mask, scale=scale, **kwargs)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, S, H, D] -> [B, H, S, D]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)

    return flex


@contextlib.contextmanager
def eager_block_masks():
    """The model's ``create_mask`` builds its flex ``BlockMask`` with ``create_block_mask(_compile=True)``: Inductor
    on meta tensors, which fails for some shapes on torch 2.13. Within this context it builds the same mask eagerly."""
    from diffusers.models.transformers import transformer_wan_animate_2 as stock

    original = stock.create_block_mask
    def eager(*args, **kwargs):
        return original(*args, **{**kwargs, "_compile": False})  # the model passes _compile=True

    stock.create_block_mask = eager
    try:
        yield
    finally:
        stock.create_block_mask = original


def _flex_on_meta(model) -> None:
    """Forward hooks of the meta ``model``: for the duration of each forward, diffusers' flex backend takes meta
    tensors (``_dense_flex``) and the block mask is built eagerly (``eager_block_masks``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backends, name = _AttentionBackendRegistry._backends, AttentionBackendName.FLEX
    saved = []

    def enter(module, args, kwargs):
        masks = eager_block_masks()
        masks.__enter__()
        saved.append((backends[name], masks))
        backends[name] = _dense_flex(backends[name])

    def leave(module, args, kwargs, output):
        if saved:  # empty when a pre-hook before ``enter`` (NAG's) refused the call
            backends[name], masks = saved.pop()
            masks.__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def latent_grid(resolution) -> tuple[int, int, int]:
    """``(frames, height, width)`` of one segment's latents (``resolution``: a ``RESOLUTIONS`` key or a tuple
    ``(width, height, frames)``)."""
    width, height, frames = RESOLUTIONS.get(resolution, resolution)
    return (frames - 1) // TEMPORAL + 1, height // SPATIAL, width // SPATIAL


def video_tokens(resolution) -> int:
    """Tokens of a denoising forward: the segment's latent frames plus the reference image's slot."""
    frames, height, width = latent_grid(resolution)
    return (frames + 1) * (height // 2) * (width // 2)


def reference_tokens(resolution) -> int:
    frames, height, width = latent_grid(resolution)
    return frames * (height // 2) * (width // 2)


def _kv_cache(model, resolution, batch: int):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    config, meta = model.config, torch.device("meta")
    cache = WanAnimate2KVCache(config.num_layers)
    shape = (batch, reference_tokens(resolution), config.num_heads, config.dim // config.num_heads)
    for index in range(config.num_layers):
        cache.get(index).store(torch.empty(shape, device=meta, dtype=model.dtype),
                               torch.empty(shape, device=meta, dtype=model.dtype))
    return cache


def step_inputs(model, variant: str, resolution="800x640x81", batch: int = 1, text_tokens: int | None = None,
                cache=None) -> list[dict]:
    """The keyword arguments of every forward of one denoising step (``batch`` videos; ``text_tokens``: default
    ``TEXT_TOKENS``, at most the model's ``text_len``; ``cache``: a KV cache from ``_kv_cache``, made when not
    given)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config, meta, dtype = model.config, torch.device("meta"), model.dtype
    frames, height, width = latent_grid(resolution)
    cache = cache if cache is not None else _kv_cache(model, resolution, batch)
    text_tokens = text_tokens or min(TEXT_TOKENS, config.text_len)
    grid = (frames + 1, height, width)
    texts = 2 * batch if variant == "nag" else batch
    pixel_width, pixel_height, pixel_frames = RESOLUTIONS.get(resolution, resolution)
    kw = dict(
        hidden_states=[torch.empty(config.out_dim, *grid, device=meta, dtype=dtype) for _ in range(batch)],
        timestep=torch.empty(1, device=meta, dtype=dtype),
        encoder_hidden_states=[torch.empty(text_tokens, config.text_dim, device=meta, dtype=dtype)
                               for _ in range(texts)],
        condition_latents=[torch.empty(config.in_dim - config.out_dim, *grid, device=meta, dtype=dtype)
                           for _ in range(batch)],
        kv_cache=cache, kv_cache_mode="cached", seq_len=video_tokens(resolution),
        reference_grid_sizes=torch.tensor([[frames, height // 2, width // 2]] * batch),
        origin_len=pixel_frames, origin_area=[pixel_height, pixel_width], return_dict=False,
    )
    if config.use_img_emb:
        kw["encoder_hidden_states_image"] = torch.empty(batch, IMAGE_TOKENS, IMAGE_DIM, device=meta, dtype=dtype)
    if variant == "cfg":
        return [kw, {**kw, "is_uncondtion": True}]
    return [kw]


def flops_inputs(resolution: str, model, batch: int = 1) -> dict[str, list[dict]]:
    """The flops suite's step (``flops_models``): no NAG, CFG (two forwards, as the blocks call them) and the guided
    forward, over one KV cache."""
    cache = _kv_cache(model, resolution, batch)
    return {v: step_inputs(model, v, resolution, batch, cache=cache) for v in VARIANTS}


def count(name: str, variant: str, resolution="800x640x81", model: torch.nn.Module | None = None,
          text_tokens: int | None = None) -> float:
    """TFLOP of one denoising step of ``variant`` (``nag`` with ``apply_nag``, the others unpatched)."""
    from nag_kernels.integrations import apply_nag, remove_nag

    model = build(name) if model is None else model
    (apply_nag if variant == "nag" else remove_nag)(model)
    calls = step_inputs(model, variant, resolution, text_tokens=text_tokens)
    counted = count_flops(lambda: [model(**kw) for kw in calls][-1])
    out, kw = counted.value, calls[-1]
    assert out[0][0].shape[1:] == kw["hidden_states"][0].shape[1:] and out[0][0].device.type == "meta"
    return counted.flops / 1e12


def reference_pass(name: str, resolution="800x640x81", model: torch.nn.Module | None = None,
                   text_tokens: int = TEXT_TOKENS) -> float:
    """TFLOP of the segment's reference pass (``kv_cache_mode="extract"``, dense attention over the reference
    tokens); NAG leaves it plain."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    model = build(name) if model is None else model
    config, meta, dtype = model.config, torch.device("meta"), model.dtype
    frames, height, width = latent_grid(resolution)
    kw = dict(
        hidden_states=[torch.empty(config.out_dim, frames, height, width, device=meta, dtype=dtype)],
        timestep=torch.empty(1, device=meta, dtype=dtype),
        encoder_hidden_states=[torch.empty(text_tokens, config.text_dim, device=meta, dtype=dtype)],
        condition_latents=[torch.empty(config.in_dim - config.out_dim, frames, height, width, device=meta,
                                       dtype=dtype)],
        kv_cache=WanAnimate2KVCache(config.num_layers), kv_cache_mode="extract", seq_len=reference_tokens(resolution),
        offset_grid_sizes=torch.tensor([[frames, height // 2, width // 2]]), return_dict=False,
    )
    if config.use_img_emb:
        kw["encoder_hidden_states_image"] = torch.empty(1, IMAGE_TOKENS, IMAGE_DIM, device=meta, dtype=dtype)
    return count_flops(lambda: model(**kw)).flops / 1e12


# --------------------------------------------------------------------------------------------------------------------
# What the flex kernel skips


def flex_blocks(resolution, block: int = 128) -> tuple[int, int]:
    """``(active, total)`` 128 x 128 blocks of the generation pass's mask (``create_mask``: queries of the packed
    ``[generation]`` buffer, keys of ``[generation | reference]``, each padded to a multiple of 128; a query in
    generation frame ``f`` sees every generation token and the reference tokens of frame ``f - 1``)."""
    frames, height, width = latent_grid(resolution)
    hw = (height // 2) * (width // 2)
    q_len, k_len = (frames + 1) * hw, frames * hw
    q_total, k_total = math.ceil(q_len / block) * block, math.ceil(k_len / block) * block
    q_blocks, gen_blocks, ref_blocks = q_total // block, q_total // block, k_total // block
    active = 0
    for qb in range(q_blocks):
        first, last = qb * block, min((qb + 1) * block, q_len) - 1
        if first >= q_len:
            continue
        active += gen_blocks  # every generation key block holds valid generation keys
        q_frames = range(first // hw, last // hw + 1)
        for rb in range(ref_blocks):
            r_first, r_last = rb * block, min((rb + 1) * block, k_len) - 1
            if r_first < k_len and any(r_first // hw + 1 <= f <= r_last // hw + 1 for f in q_frames):
                active += 1
    return active, q_blocks * (gen_blocks + ref_blocks)


def flex_block_sparse_tflop(config, resolution, block: int = 128) -> float:
    """TFLOP of one forward's flex self-attention that the block-sparse kernel skips (fully masked blocks), over all
    blocks of the model: subtract it from a count for the block-sparse figure."""
    active, total = flex_blocks(resolution, block)
    return config.num_layers * 4 * block * block * config.dim * (total - active) / 1e12
