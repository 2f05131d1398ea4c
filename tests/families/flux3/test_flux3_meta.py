"""FLUX.3 on the meta device under FlopCounterMode: NAG's guided forward costs exactly the duplicated text (the context
embedder, the text modulation and every text mode and single-stream block's per-token layers for T more tokens, and
the attention of each branch, counted independently here); at 1024^2 on the full-size configuration (diffusers'
defaults) with a 480-token text window at most 1.15x a plain step.

``model_flux3.count`` counts a model with one block per stack and repeats its cost to the full depth;
``test_tiny_config_counts`` checks that against a full-depth count."""

from __future__ import annotations

import pytest

from meta_models import flux3 as model_flux3


def expected_extra(config, image_len: int, text_len: int, reference_len: int = 0) -> float:
    """FLOPs NAG adds to a plain step (TFLOP): ``T`` more text tokens through the context embedder, the two text
    modulations and every text mode and single-stream block's linears; per text mode block each branch's ``T^2``
    attention instead of one; per single-stream block text queries ``2T x (T + M)`` and content queries ``M x (M + 2T)``
    instead of ``(T + M)^2`` (``M`` image + reference tokens); ``4 C`` FLOPs per query-key pair."""
    t, m = text_len, image_len + reference_len
    c = config["num_attention_heads"] * config["attention_head_dim"]
    inner = int(c * config["mlp_ratio"])
    per_token = 2 * 4 * c * c + 6 * inner * c  # Q, K, V, out; SwiGLU in (2 x inner) and out
    embed = 2 * t * config["joint_attention_dim"] * c + 2 * 2 * t * c * 3 * c  # context embedder, 2 modulations
    text_blocks = config["num_layers"] * (t * per_token + 4 * c * t * t)
    single_blocks = config["num_single_layers"] * (t * per_token + 4 * c * (t * t + 2 * t * m))
    return (embed + text_blocks + single_blocks) / 1e12


TINY = {**model_flux3.CONFIGS["flux3"], "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16,
        "num_attention_heads": 4, "joint_attention_dim": 96, "timestep_channels": 32, "in_channels": 16,
        "cond_in_channels": 16, "axes_dims_rope": (4, 4, 4, 4)}


@pytest.mark.parametrize("references", [0, 1], ids=["text-to-image", "one-reference"])
def test_tiny_config_counts(monkeypatch, references):
    monkeypatch.setitem(model_flux3.CONFIGS, "tiny", TINY)
    full = model_flux3.build("tiny")
    counts = {}
    for variant in ("no_nag", "cfg", "nag"):
        deep = model_flux3.count("tiny", variant, 128, full, text_tokens=80, references=references)
        shallow = model_flux3.count("tiny", variant, 128, text_tokens=80, references=references)  # blocks repeated
        assert shallow == pytest.approx(deep, rel=1e-12)
        counts[variant] = deep
    plain, cfg, nag = counts["no_nag"], counts["cfg"], counts["nag"]
    assert cfg == pytest.approx(2 * plain, rel=1e-12)
    n = model_flux3.image_tokens(128)
    assert nag - plain == pytest.approx(expected_extra(TINY, n, 80, references * n), rel=1e-9)


def test_flops_inputs_of_the_suite():
    model = model_flux3.build("flux3", shallow=True)
    steps = model_flux3.flops_inputs(1024, 480, model)
    assert {v: len(calls) for v, calls in steps.items()} == {"no_nag": 1, "cfg": 2, "nag": 1}
    assert steps["nag"][0]["encoder_hidden_states"].shape == (2, 480, 20480)
    assert steps["nag"][0]["hidden_states"].shape == (1, 4096, 128)
    distilled = model_flux3.build("flux3-distilled", shallow=True)
    assert "target_timestep" in model_flux3.step_inputs(distilled, "nag")


@pytest.mark.slow
def test_full_size_flops_at_1024():
    config = model_flux3.CONFIGS["flux3"]
    plain = model_flux3.count("flux3", "no_nag", 1024)
    nag = model_flux3.count("flux3", "nag", 1024)
    assert nag - plain == pytest.approx(expected_extra(config, 4096, model_flux3.TEXT_TOKENS), rel=1e-9)
    assert nag / plain <= 1.15, f"NAG {nag:.2f} TFLOP is {nag / plain:.3f}x the plain {plain:.2f}"
