"""HunyuanVideo 1.5 on the meta device: the patched model runs without values or kernels, and its cost is counted
under FlopCounterMode by the flops suite's code (``meta_models/hunyuanvideo15.py``). A tiny config is counted
fast, its added FLOPs checked against what a guided call adds (docs/families/hunyuanvideo15.md, "Cost"); the
full-size counts (target: NAG at most 1.05x a plain call at 720p, 121 frames) run in CI's slow stage.

The meta builder's forward (the stock forward with the data-dependent text-to-video test and token reordering
replaced, see the builder) is checked against the stock forward on real tensors where the reordering is the
identity.
"""

from __future__ import annotations

import types

import hunyuanvideo15_toy as toy
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from meta_models import hunyuanvideo15 as builder

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, num_refiner_layers=1, mlp_ratio=2.0,
            text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(4, 6, 6))
TINY_SIZE, TOKENS = (64, 32, 5), dict(mllm_tokens=10, byt5_tokens=6, image_tokens=4)


def flops(module, *args, **kwargs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def added(model, resolution, mllm_tokens, byt5_tokens, image_tokens) -> float:
    """TFLOP a guided call adds to a plain one (one video): the text stream's per-row work for one more row (the
    token refiner, the ByT5 and image-token projections, the timestep embedding, per block the text AdaLN, Q/K/V and
    output projections and MLP), the attention's extra query-key pairs (per block ``2 N T + T^2`` of them, two
    products each: text queries per branch over ``N + T`` keys, video queries over the second branch's ``T``), and
    the output projection over the ``2B`` rows the stock unpatchify takes."""
    config = model.config
    c = config.num_attention_heads * config.attention_head_dim
    n, t = builder.video_tokens(resolution, config), mllm_tokens + byt5_tokens + image_tokens
    one = builder.step_inputs(model, "plain", resolution, mllm_tokens=mllm_tokens, byt5_tokens=byt5_tokens,
                              image_tokens=image_tokens)
    text_rows = flops(model.context_embedder, one["encoder_hidden_states"], one["timestep"],
                      one["encoder_attention_mask"])
    text_rows += flops(model.context_embedder_2, one["encoder_hidden_states_2"])
    text_rows += flops(model.image_embedder, one["image_embeds"])
    text_rows += flops(model.time_embed, one["timestep"])
    mlp = config.mlp_ratio * c
    per_block = 2 * 6 * c * c + 2 * t * 4 * c * c + 2 * t * 2 * c * mlp + 2 * 2 * c * (2 * n * t + t * t)
    out = config.patch_size_t * config.patch_size**2 * config.out_channels
    projection = 2 * n * c * out
    return (text_rows + config.num_layers * per_block + projection) / 1e12


@pytest.mark.parametrize("t2v", [True, False], ids=["t2v", "i2v"])
def test_tiny_config_on_meta_counts_plain_cfg_and_nag(t2v):
    model = builder.build(t2v=t2v, **TINY)
    counted = {v: builder.count(v, TINY_SIZE, model, **TOKENS) for v in builder.CALLS}
    assert counted["cfg"] == pytest.approx(2 * counted["no_nag"])
    assert counted["nag"] - counted["no_nag"] == pytest.approx(added(model, TINY_SIZE, **TOKENS), rel=1e-12)
    assert counted["nag_cfg"] - counted["cfg"] == pytest.approx(counted["nag"] - counted["no_nag"], rel=1e-12)
    assert builder.count("no_nag", TINY_SIZE, model, **TOKENS) == counted["no_nag"]  # NAG removed again


@pytest.mark.parametrize("t2v", [True, False], ids=["t2v", "i2v"])
def test_the_meta_forward_is_the_stock_forward_where_the_reordering_is_the_identity(t2v):
    model = toy.transformer().double()
    g = torch.Generator().manual_seed(0)
    kw = dict(
        hidden_states=torch.randn(1, 2 * toy.LATENT_CHANNELS + 1, 2, 2, 3, generator=g, dtype=torch.float64),
        timestep=torch.tensor([700.0], dtype=torch.float64),
        encoder_hidden_states=torch.randn(1, 7, toy.TEXT_DIM, generator=g, dtype=torch.float64),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.float64),
        encoder_hidden_states_2=torch.randn(1, 3, toy.BYT5_DIM, generator=g, dtype=torch.float64),
        encoder_attention_mask_2=torch.ones(1, 3, dtype=torch.float64),
        image_embeds=torch.randn(1, toy.IMAGE_TOKENS, toy.VISION_DIM, generator=g, dtype=torch.float64) * (not t2v),
        return_dict=False,
    )
    with torch.no_grad():
        stock = model(**kw)[0]
        model._nag_meta_t2v = t2v
        model.forward = types.MethodType(builder._forward_counted, model)
        counted = model(**kw)[0]
    torch.testing.assert_close(counted, stock, rtol=0, atol=1e-12)


@pytest.mark.slow  # the full-size model on the meta device (~12 s per resolution): CI's slow stage
def test_full_size_720p_nag_is_at_most_1_05x_a_plain_call():
    model = builder.build()
    counted = {v: builder.count(v, "720p", model) for v in ("no_nag", "nag")}
    assert builder.video_tokens("720p") == 111600
    assert counted["nag"] - counted["no_nag"] == pytest.approx(added(model, "720p", 1000, 256, 729), rel=1e-9)
    assert counted["no_nag"] == pytest.approx(6324.955, abs=1e-3)
    assert counted["nag"] == pytest.approx(6533.741, abs=1e-3)
    assert counted["nag"] / counted["no_nag"] <= 1.05


@pytest.mark.slow
def test_full_size_480p_count():
    # no target at 480p: the text stream (1985 tokens) is 4% of the 51275-token sequence there, NAG 1.069x
    model = builder.build()
    counted = {v: builder.count(v, "480p", model) for v in ("no_nag", "nag")}
    assert counted["nag"] - counted["no_nag"] == pytest.approx(added(model, "480p", 1000, 256, 729), rel=1e-9)
    assert counted["no_nag"] == pytest.approx(1442.031, abs=1e-3)
    assert counted["nag"] == pytest.approx(1541.380, abs=1e-3)
