"""Qwen-Image 2.1 on the meta device under FlopCounterMode: a tiny config counted by the flops suite's own code, the
FLOPs NAG adds equal to the formula (fast); the full-size model at 1024^2, NAG at most 1.15x a plain step, with and
without the KV cache (slow)."""

from __future__ import annotations

import pytest
import torch

import qwenimage21_toy  # noqa: F401  first: it skips this module on a diffusers without Qwen-Image 2.1
from meta_models import qwenimage21 as bench

TINY = dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            context_in_dim=32, axes_dims_rope=(4, 6, 6))


def added_flops(layers, width, context, text, image, cached=False):
    """The FLOPs a guided step adds to a plain one (text-to-image, no condition image; ``text`` = P positions,
    ``image`` = N target tokens). Per block: the negative prefix's tokens through the projections and the SwiGLU MLP
    (2 x (4 C^2 + 3 x 3 C^2) per token), its causal attention (one text segment: 4 P^2 C) and the target queries over
    its keys (4 N P C); before the blocks its text projection (2 x (context + C) x C per token, which the stock model
    runs on every step, cached or not). A KV-cached step: the target queries over the cached negative prefix only."""
    text_in = 2 * (context + width) * width * text
    if cached:
        return layers * 4 * image * text * width + text_in
    per_block = 2 * 13 * width * width * text + 4 * text * text * width + 4 * image * text * width
    return layers * per_block + text_in


@pytest.mark.parametrize("cached", [False, True], ids=["full", "kv-cached"])
def test_tiny_config_counts_the_added_flops_of_the_formula(cached):
    model = bench.build(**TINY)
    resolution, text = 128, 24  # 64 target tokens
    plain = bench.count("qwen-image-2.1", "no_nag", resolution, model=model, text_tokens=text, cached=cached)
    cfg = bench.count("qwen-image-2.1", "cfg", resolution, model=model, text_tokens=text, cached=cached)
    guided = bench.count("qwen-image-2.1", "nag", resolution, model=model, text_tokens=text, cached=cached)
    assert cfg == pytest.approx(2 * plain, rel=1e-12)
    expected = added_flops(2, 32, 32, text, bench.image_tokens(resolution), cached) / 1e12
    assert guided - plain == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow  # the full-size model (32 blocks) on the meta device
def test_full_size_nag_costs_at_most_1_15x_a_plain_step_at_1024():
    # Counted (bfloat16, 256 text positions, text mask given, 4096 target tokens):
    #   full step:      plain 70.150, NAG 74.325 TFLOP (1.0595x); true CFG 140.300 (2x)
    #   KV-cached step: plain 66.542, NAG 67.109 TFLOP (1.0085x)
    model = bench.build("qwen-image-2.1")
    for cached, (plain_ref, nag_ref) in ((False, (70.150, 74.325)), (True, (66.542, 67.109))):
        plain = bench.count("qwen-image-2.1", "no_nag", 1024, model=model, cached=cached)
        guided = bench.count("qwen-image-2.1", "nag", 1024, model=model, cached=cached)
        assert plain == pytest.approx(plain_ref, abs=0.001) and guided == pytest.approx(nag_ref, abs=0.001)
        assert guided <= 1.15 * plain
        assert guided - plain == pytest.approx(added_flops(32, 4096, 4096, 256, 4096, cached) / 1e12, rel=1e-2)
        # the default count: one block, its cost repeated to the full depth (meta_models.count's repeat)
        assert bench.count("qwen-image-2.1", "nag", 1024, cached=cached) == pytest.approx(guided, rel=1e-12)
    assert torch.device("meta") == next(model.parameters()).device
