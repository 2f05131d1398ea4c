"""Tiny random-weight Wan Animate 2 components built offline (no model hub), for the Wan Animate 2 tests.

The transformer: 2 blocks, 2 heads x 12 (width 24), FFN 32, UMT5 text of width 32 padded to ``text_len=8``, the CLIP
image branch (``img_emb`` takes diffusers' fixed 1280-wide CLIP features). A 5-frame 32x32 segment is 2 latent frames
of 4x4 latents: the reference pass runs 2 x 2 x 2 = 8 tokens, a denoising forward 3 frames (the reference image's
slot first) of 2 x 2 = 12 tokens over the 8 cached reference tokens. The modular pipeline adds a UMT5 encoder of
width 32, a one-layer CLIP vision tower of width 1280 (patch 32: 50 tokens), the 4-level Wan VAE of base width 3,
a flow-matching Euler scheduler and diffusers' video processors.

The generation pass's flex ``BlockMask`` is built once per model and (frames, area) by ``create_mask``, which asks
for a compiled ``create_block_mask`` (about 15 s of CPU for a first compile); ``prime`` builds the same mask eagerly
(``_compile=False``: the same mask, no compilation) and leaves it in the model's mask cache, as a first stock call
would. Everything is deterministic (fixed seeds).
"""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimate2Transformer3DModel
from diffusers.models.transformers import transformer_wan_animate_2 as stock
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
from transformers import CLIPVisionConfig, CLIPVisionModel

import wan_toy

TEXT_DIM = wan_toy.TEXT_DIM
TEXT_LEN = wan_toy.SEQ_LEN  # the transformer's text_len and the pipeline's max_sequence_length
SIZE, FRAMES = 32, 5  # one segment: segment_frame_length=5 frames of 32x32
LATENT = (16, 2, 4, 4)  # channels, frames, height, width of one segment's latents
GRID = (2, 2, 2)  # the reference grid after the (1, 2, 2) patch
CLIP_DIM, CLIP_TOKENS = 1280, 50
ORIGIN = dict(origin_len=FRAMES, origin_area=[SIZE, SIZE])  # the denoising pass's full-video geometry


def transformer(layers: int = 2, seed: int = 0, use_img_emb: bool = True, **config) -> WanAnimate2Transformer3DModel:
    torch.manual_seed(seed)
    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=36, dim=24, ffn_dim=32, freq_dim=16, text_dim=TEXT_DIM,
        out_dim=16, num_heads=2, num_layers=layers, use_img_emb=use_img_emb, **config,
    )
    with torch.no_grad():  # widen diffusers' init so that NAG changes the output visibly
        for p in model.parameters():
            p.normal_(0, 0.4 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.05)
    return prime(model.eval())


@contextlib.contextmanager
def _eager_block_masks():
    original = stock.create_block_mask
    def eager(*args, **kwargs):
        return original(*args, **{**kwargs, "_compile": False})  # the model passes _compile=True

    stock.create_block_mask = eager
    try:
        yield
    finally:
        stock.create_block_mask = original


def prime(model, frames: int = FRAMES, size: int = SIZE):
    """Build ``model``'s flex block mask for ``frames`` x ``size`` x ``size`` videos eagerly, into its cache (the
    stock ``create_mask``, run with ``create_block_mask(_compile=False)``); returns the model."""
    key = (frames // 4 + 1, size * size // 256)
    if key not in model.block_masks:
        with _eager_block_masks():
            model.block_masks[key] = model.create_mask(*key, torch.device("cpu"))
    return model


def _randn(shape, generator, dtype):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def text(batch: int, seed: int, dtype=torch.float64, lengths=None) -> list[torch.Tensor]:
    """``batch`` text rows (``[L, TEXT_DIM]`` each; ``lengths``: per-row ``L``, default ``TEXT_LEN``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [TEXT_LEN] * batch
    return [_randn((n, TEXT_DIM), g, dtype) for n in lengths]


def reference_pass(model, batch: int = 1, seed: int = 10, dtype=torch.float64, texts=None) -> WanAnimate2KVCache:
    """A ``kv_cache_mode="extract"`` forward over ``batch`` random driving segments (``texts``: its text rows, default
    ``batch`` random ones): the filled KV cache."""
    g = torch.Generator().manual_seed(seed)
    cache = WanAnimate2KVCache(model.config.num_layers)
    c, f, h, w = LATENT
    with torch.no_grad():
        model(
            [_randn((c, f, h, w), g, dtype) for _ in range(batch)],
            timestep=torch.tensor([999.0], dtype=dtype),
            encoder_hidden_states=texts if texts is not None else text(batch, seed + 1, dtype),
            condition_latents=[_randn((20, f, h, w), g, dtype) for _ in range(batch)],
            encoder_hidden_states_image=_randn((batch, CLIP_TOKENS, CLIP_DIM), g, dtype)
            if model.config.use_img_emb else None,
            kv_cache=cache, kv_cache_mode="extract", seq_len=f * h * w // 4, offset_grid_sizes=torch.tensor([GRID]),
        )
    return cache


def inputs(model, batch: int = 1, seed: int = 0, dtype=torch.float64, cache=None, lengths=None, t: float = 900.0):
    """One guided denoising forward's keyword arguments: ``batch`` latent rows (and condition latents, CLIP image
    tokens) and ``2 * batch`` text rows (positive, then NAG-negative), over a reference pass's KV cache."""
    g = torch.Generator().manual_seed(seed)
    c, f, h, w = LATENT
    cache = cache if cache is not None else reference_pass(model, batch, dtype=dtype)
    kw = dict(
        hidden_states=[_randn((c, f + 1, h, w), g, dtype) for _ in range(batch)],
        timestep=torch.tensor([t], dtype=dtype),
        encoder_hidden_states=text(2 * batch, seed + 1, dtype, lengths),
        condition_latents=[_randn((20, f + 1, h, w), g, dtype) for _ in range(batch)],
        kv_cache=cache, kv_cache_mode="cached", seq_len=(f + 1) * h * w // 4,
        reference_grid_sizes=torch.tensor([GRID] * batch), **ORIGIN,
    )
    if model.config.use_img_emb:
        kw["encoder_hidden_states_image"] = _randn((batch, CLIP_TOKENS, CLIP_DIM), g, dtype)
    return kw


def plain(kw: dict) -> dict:
    """``kw`` as a plain forward: the positive text rows only."""
    return {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][: len(kw["hidden_states"])]}


def same_negative(kw: dict) -> dict:
    """``kw`` with the NAG negative equal to the positive."""
    positive = plain(kw)["encoder_hidden_states"]
    return {**kw, "encoder_hidden_states": [*positive, *positive]}


def run(model, kw: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(**kw).sample


# --------------------------------------------------------------------------------------------------------------------
# The modular pipeline


def image_encoder() -> CLIPVisionModel:
    torch.manual_seed(4)
    config = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=224, patch_size=32)
    return CLIPVisionModel(config).eval()


def components(transformer_dtype=torch.float64, **config) -> dict:
    tokenizer = wan_toy.flux_toy.t5_tokenizer()
    return dict(
        tokenizer=tokenizer,
        text_encoder=wan_toy.text_encoder(len(tokenizer)),
        image_encoder=image_encoder(),
        vae=wan_toy.vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer(**config).to(transformer_dtype),
    )


def modular(blocks_cls, transformer_dtype=torch.float64, blocks=None, components_manager=None, **config):
    """A ``WanAnimate2ModularPipeline`` of ``blocks_cls`` (or ``blocks``) on the tiny components."""
    blocks = blocks if blocks is not None else blocks_cls()
    pipe = blocks.init_pipeline(components_manager=components_manager)
    import modular_toy

    with modular_toy.quiet():
        pipe.update_components(**components(transformer_dtype, **config))
    return pipe


def image(seed: int = 5) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def driving_video(frames: int = FRAMES, seed: int = 6) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(frames)]


def call_kwargs(frames: int = FRAMES, steps: int = 2) -> dict:
    """A pipeline call's inputs besides the prompts: one driving video of ``frames`` frames (5: one segment, 9: two)."""
    return dict(image=image(), driving_video=driving_video(frames), height=SIZE, width=SIZE,
                segment_frame_length=FRAMES, num_inference_steps=steps, max_sequence_length=TEXT_LEN,
                generator=torch.Generator().manual_seed(0))
