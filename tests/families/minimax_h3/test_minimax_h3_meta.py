"""MiniMax-H3 on the meta device under FlopCounterMode: NAG's guided forward costs exactly the NAG negative's text
segment (counted independently here: ``expected_extra``), a one-block model counts the full depth exactly, and at the
common setting (the full-size config, 768 x 1344, 5 s, a 512-token prompt: ``meta_models.minimax_h3``) a guided step
is at most 1.10x a plain one (slow)."""

from __future__ import annotations

import pytest
from nag_kernels.integrations import apply_nag, remove_nag

from meta_models import minimax_h3
from meta_models.count import count

NARROW = dict(minimax_h3.CONFIGS["minimax-h3"], num_attention_heads=2, attention_head_dim=64, hidden_size=96,
              num_layers=3, ffn_dim=160, text_dim=48, time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=8)
SMALL = dict(height=64, width=96, frames=120)  # 2 x 3 rows per latent frame, 37 frames; 414 audio rows


def flops(name: str, variant: str, model, text_tokens: int, **size) -> int:
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = minimax_h3.step_inputs(model, variant, text_tokens=text_tokens, **size)
    counted = count(lambda: model(**kw), minimax_h3.repeat(name, model))
    assert not counted.uncounted_ops
    return counted.flops


def expected_extra(config, text: int, media: int) -> int:
    """FLOPs NAG adds: the negative's ``text`` rows through every per-row layer (context embedder; per refiner and
    transformer block Q/K/V/out ``4 C I`` and the SwiGLU ``3 C F`` multiply-adds; both output heads), the refiner's
    attention over the negative's text alone (``T^2`` query-key pairs), and per block ``2 M T + T^2`` more query-key
    pairs (the negative's text queries over ``T + M`` keys, the media queries over the negative's ``T`` keys), each
    pair ``4 I`` FLOPs (scores and values)."""
    c, f = config["hidden_size"], config["ffn_dim"]
    i = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["in_channels"] * 4
    per_row = 2 * text * (4 * c * i + 3 * c * f)
    linear = 2 * text * config["text_dim"] * c + per_row * (config["num_refiner_layers"] + config["num_layers"])
    heads = 2 * text * c * (patch + config["audio_in_channels"])
    attention = 4 * i * (text * text * config["num_refiner_layers"] + (2 * media * text + text * text) *
                         config["num_layers"])
    return linear + heads + attention


def test_nag_costs_exactly_the_negative_text_segment_and_one_block_counts_the_full_depth(monkeypatch):
    monkeypatch.setitem(minimax_h3.CONFIGS, "narrow", NARROW)
    full, shallow = minimax_h3.build("narrow"), minimax_h3.build("narrow", shallow=True)
    video, audio = minimax_h3.rows(**SMALL)
    for model in (shallow, full):
        plain = flops("narrow", "no_nag", model, 16, **SMALL)
        nag = flops("narrow", "nag", model, 16, **SMALL)
        assert nag - plain == expected_extra(NARROW, 16, video + audio)
    assert flops("narrow", "nag", shallow, 16, **SMALL) == flops("narrow", "nag", full, 16, **SMALL)


@pytest.mark.slow
def test_full_size_common_setting_within_1_10x():
    model = minimax_h3.build("minimax-h3", shallow=True)
    video, audio = minimax_h3.rows()
    plain = flops("minimax-h3", "no_nag", model, minimax_h3.TEXT_TOKENS)
    nag = flops("minimax-h3", "nag", model, minimax_h3.TEXT_TOKENS)
    assert nag - plain == expected_extra(minimax_h3.CONFIGS["minimax-h3"], minimax_h3.TEXT_TOKENS, video + audio)
    assert nag / plain <= 1.10, f"NAG {nag / 1e12:.1f} TFLOP is {nag / plain:.4f}x the plain {plain / 1e12:.1f}"
