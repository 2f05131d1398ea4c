"""Full-size FLUX.2 [dev] and [klein] on the meta device under FlopCounterMode at 1024^2 (text 512): NAG's default
path costs exactly the duplicated text tokens (counted independently here) and at most 1.15x a plain step.

The counts are of a model with one block of each kind, the block costs repeated to the full depth
(``meta_models.flux2.repeat``); ``test_one_block_per_stack_counts_the_full_depth`` checks that against a full-depth
count on a narrow config."""

from __future__ import annotations

import pytest

from meta_models import flux2
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

N, T = 4096, 512  # image tokens at 1024^2, text tokens


def tflops(name: str, variant: str, resolution: int, model, text_tokens: int = flux2.TEXT_TOKENS) -> float:
    """One step of ``variant`` (``nag`` with ``apply_nag``; ``nag_2b`` derived from the cfg and no_nag counts)."""
    (apply_nag if variant == "nag" else remove_nag)(model)

    def counted(v):
        kw = flux2.step_inputs(model, v, resolution, text_tokens)
        return count(lambda: model(**kw), flux2.repeat(name, model))

    if variant == "nag_2b":
        return flux2.nag_2b(name, model, counted("cfg"), counted("no_nag")) / 1e12
    return counted(variant).tflop


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
    model = flux2.build(name, shallow=True)
    plain = tflops(name, "no_nag", 1024, model)
    nag = tflops(name, "nag", 1024, model)
    assert nag - plain == pytest.approx(expected_extra(flux2.CONFIGS[name]), rel=1e-9)
    assert nag / plain <= 1.15, f"{name}: NAG {nag:.1f} TFLOP is {nag / plain:.3f}x the plain {plain:.1f}"


def test_one_block_per_stack_counts_the_full_depth(monkeypatch):
    narrow = {**flux2.DEV, "num_attention_heads": 2, "joint_attention_dim": 64, "num_layers": 2,
              "num_single_layers": 3}
    monkeypatch.setitem(flux2.CONFIGS, "narrow", narrow)
    full, shallow = flux2.build("narrow"), flux2.build("narrow", shallow=True)
    for variant in ("nag", "nag_2b"):  # nag_2b counts the no_nag and cfg forwards
        counts = [tflops("narrow", variant, 128, model, 64) for model in (shallow, full)]
        assert counts[0] == counts[1]
