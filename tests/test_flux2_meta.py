"""Full-size FLUX.2 [dev] and [klein] on the meta device under FlopCounterMode at 1024^2 (text 512): NAG's default
path costs exactly the duplicated text tokens (counted independently here) and at most 1.15x a plain step.

``model_flux2.count`` counts a model with one block of each kind and repeats the block costs to the full depth;
``test_one_block_per_stack_counts_the_full_depth`` checks that against a full-depth count on a narrow config."""

from __future__ import annotations

import pytest

from benchmarks import model_flux2

N, T = 4096, 512  # image tokens at 1024^2, text tokens


def expected_extra(config) -> float:
    """FLOPs NAG adds to a plain step: T more text tokens through every per-token layer (context embedder; per block
    13 C^2 multiply-adds: Q/K/V/out + SwiGLU MLP in both block kinds), and per block attention over 2 branches:
    text queries 2T x (T + N) and image queries N x (N + 2T) instead of (T + N)^2, 4 C FLOPs per query-key pair."""
    c = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    linear = 2 * T * (config["joint_attention_dim"] * c + 13 * c * c * blocks)
    attention = 4 * c * (2 * N * T + T * T) * blocks
    return (linear + attention) / 1e12


@pytest.mark.parametrize("name", ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_default_path_flops_at_1024(name):
    model = model_flux2.build(name, shallow=True)
    plain = model_flux2.count(name, "no_nag", 1024, model)
    nag = model_flux2.count(name, "nag", 1024, model)
    assert nag - plain == pytest.approx(expected_extra(model_flux2.CONFIGS[name]), rel=1e-9)
    assert nag / plain <= 1.15, f"{name}: NAG {nag:.1f} TFLOP is {nag / plain:.3f}x the plain {plain:.1f}"


def test_one_block_per_stack_counts_the_full_depth(monkeypatch):
    narrow = {**model_flux2.DEV, "num_attention_heads": 2, "joint_attention_dim": 64, "num_layers": 2,
              "num_single_layers": 3}
    monkeypatch.setitem(model_flux2.CONFIGS, "narrow", narrow)
    full, shallow = model_flux2.build("narrow"), model_flux2.build("narrow", shallow=True)
    for variant in ("nag", "nag_2b"):  # nag_2b counts the no_nag and cfg forwards
        counts = [model_flux2.count("narrow", variant, 128, model, 64) for model in (shallow, full)]
        assert counts[0] == counts[1]
