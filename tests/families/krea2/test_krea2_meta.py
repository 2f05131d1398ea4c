"""Krea 2 on the meta device under FlopCounterMode: NAG's guided forward costs exactly the duplicated text (the text
fusion and the per-token layers of every block for T more tokens, and the attention of the packed sequence, counted
independently here); at 1024^2 on the full-size configuration (diffusers' defaults) at most 1.15x a plain step.

``model_krea2.count`` counts a model with one main block and repeats its cost to the full depth;
``test_tiny_config_counts`` checks that against a full-depth count."""

from __future__ import annotations

import pytest

from meta_models import krea2 as model_krea2


def expected_extra(config, image_len: int, text_len: int) -> float:
    """FLOPs NAG adds to a plain step: the text fusion, ``txt_in`` and every block's per-token layers for ``T`` more
    text tokens, and per block attention over the two branches: text queries ``2T x (T + N)`` and image queries
    ``N x (N + 2T)`` instead of ``(T + N)^2``, ``4 C`` FLOPs per query-key pair (K/V repeated to the query heads)."""
    n, t = image_len, text_len
    d, layers, inter_t = config["text_hidden_dim"], config["num_text_layers"], config["text_intermediate_size"]
    d_kv = config["text_num_key_value_heads"] * d // config["text_num_attention_heads"]
    c = config["num_attention_heads"] * config["attention_head_dim"]
    c_kv = config["num_key_value_heads"] * config["attention_head_dim"]
    fusion_block = 2 * (3 * d * d + 2 * d * d_kv + 3 * d * inter_t)  # per token: Q, gate, out, K, V, SwiGLU
    fusion = (config["num_layerwise_text_blocks"] * (t * layers * fusion_block + 4 * d * t * layers * layers)
              + 2 * t * layers * d  # the projector over the layer axis
              + config["num_refiner_text_blocks"] * (t * fusion_block + 4 * d * t * t)
              + 2 * t * (d * c + c * c))  # txt_in
    block = 2 * t * (3 * c * c + 2 * c * c_kv + 3 * c * config["intermediate_size"]) + 4 * c * (t * t + 2 * n * t)
    return (fusion + config["num_layers"] * block) / 1e12


TINY = {**model_krea2.CONFIGS["krea2"], "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "text_hidden_dim": 32, "num_text_layers": 3,
        "text_num_attention_heads": 2, "text_num_key_value_heads": 1, "text_intermediate_size": 48,
        "axes_dims_rope": (4, 6, 6)}


def test_tiny_config_counts(monkeypatch):
    monkeypatch.setitem(model_krea2.CONFIGS, "tiny", TINY)
    full, shallow = model_krea2.build("tiny"), model_krea2.build("tiny", shallow=True)
    counts = {}
    for variant in ("no_nag", "cfg", "nag"):
        counts[variant] = [model_krea2.count("tiny", variant, 128, model, text_tokens=16) for model in (shallow, full)]
        assert counts[variant][0] == pytest.approx(counts[variant][1], rel=1e-12)  # one block repeated == full depth
    plain, cfg, nag = (counts[v][1] for v in ("no_nag", "cfg", "nag"))
    assert cfg == pytest.approx(2 * plain, rel=1e-12)
    assert nag - plain == pytest.approx(expected_extra(TINY, model_krea2.image_tokens(128), 16), rel=1e-9)


@pytest.mark.slow
def test_full_size_flops_at_1024():
    config = model_krea2.CONFIGS["krea2"]
    model = model_krea2.build("krea2", shallow=True)
    plain = model_krea2.count("krea2", "no_nag", 1024, model)
    nag = model_krea2.count("krea2", "nag", 1024, model)
    assert nag - plain == pytest.approx(expected_extra(config, 4096, model_krea2.TEXT_TOKENS), rel=1e-9)
    assert nag / plain <= 1.15, f"NAG {nag:.1f} TFLOP is {nag / plain:.3f}x the plain {plain:.1f}"
