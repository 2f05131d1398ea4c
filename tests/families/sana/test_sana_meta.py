"""Sana and Sana-Video on the meta device: the patched models run without values or kernels (NAG only and batched
CFG) and their cost is counted under FlopCounterMode (``meta_models/sana.py``, ``meta_models/count.py``, as the flops
suite counts them); the full-size counts (targets: NAG at most 1.07x a plain step on Sana 1.6B at 1024^2, at most 1.02x on Sana-Video 2B at
832x480, 81 frames) run in CI's slow stage.

The counted difference is checked against the formula of what a guided step adds (docs/families/sana.md): per block,
the K/V projections of the extra text rows and the latent queries' attention over them; once, the caption projection
of the extra rows. Nothing else in the model runs at the text batch.
"""

from __future__ import annotations

import diffusers
import pytest

from meta_models import sana
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

TINY = {
    "sana-1600m": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                       cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32, in_channels=4,
                       out_channels=4),
    "sana-video-2b": dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, num_cross_attention_heads=2,
                          cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=32,
                          rope_max_seq_len=32),
}
TINY_SIZE = {"sana-1600m": 256, "sana-video-2b": (64, 64, 5)}


def _needs_video():
    if not hasattr(diffusers, "SanaVideoTransformer3DModel"):
        pytest.skip("this diffusers has no Sana-Video (diffusers >= 0.36)")


def tflops(model, variant: str, resolution, text_tokens: int = sana.TEXT_TOKENS) -> float:
    """One step of ``variant`` (NAG variants with ``apply_nag``, the others unpatched)."""
    (apply_nag if variant.startswith("nag") else remove_nag)(model)
    kw = sana.step_inputs(model, variant, resolution, text_tokens=text_tokens)
    counted = count(lambda: model(**kw)[0])
    assert counted.value.shape == kw["hidden_states"].shape and counted.value.device.type == "meta"
    return counted.tflop


def added(model, resolution, text_tokens) -> float:
    """TFLOP a guided step adds to a plain one: per block the K/V projections of the ``T`` extra text rows and the
    queries' attention (``Q K^T``, ``P V``) over them; once, the caption projection (two Linears) of those rows."""
    config = model.config
    width = config.num_attention_heads * config.attention_head_dim
    cross = config.num_cross_attention_heads * config.cross_attention_head_dim
    n, t = sana.tokens(config, resolution), text_tokens
    per_block = 2 * (2 * t * config.cross_attention_dim * cross) + 2 * (2 * n * t * cross)
    caption = 2 * t * (config.caption_channels * width + width * width)
    return (config.num_layers * per_block + caption) / 1e12


@pytest.mark.parametrize("name", ["sana-1600m", "sana-video-2b"])
def test_tiny_config_on_meta_counts_plain_cfg_and_nag(name):
    if name in sana.VIDEO:
        _needs_video()
    model = sana.build(name, **TINY[name])
    resolution, text = TINY_SIZE[name], 8
    flops = {v: tflops(model, v, resolution, text) for v in sana.VARIANTS}
    assert flops["cfg"] == pytest.approx(2 * flops["no_nag"])
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model, resolution, text), rel=1e-9)
    assert flops["nag_cfg"] - flops["cfg"] == pytest.approx(flops["nag"] - flops["no_nag"], rel=1e-9)
    assert tflops(model, "no_nag", resolution, text) == flops["no_nag"]  # removed again


@pytest.mark.slow  # the full-size models on the meta device: run by CI's slow stage
def test_sana_1600m_1024_nag_is_at_most_1_07x_a_plain_step():
    model = sana.build("sana-1600m")
    flops = {v: tflops(model, v, "1024") for v in ("no_nag", "nag")}
    assert sana.tokens(model.config, "1024") == 1024
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model, "1024", 300), rel=1e-9)
    assert flops["no_nag"] == pytest.approx(2.9667, abs=1e-4)
    assert flops["nag"] == pytest.approx(3.1482, abs=1e-4)
    assert flops["nag"] / flops["no_nag"] <= 1.07


@pytest.mark.slow
def test_sana_video_2b_480p_nag_is_at_most_1_02x_a_plain_step():
    _needs_video()
    model = sana.build("sana-video-2b")
    resolution = "832x480x81"
    flops = {v: tflops(model, v, resolution) for v in ("no_nag", "nag")}
    assert sana.tokens(model.config, resolution) == 21 * 30 * 52
    assert flops["nag"] - flops["no_nag"] == pytest.approx(added(model, resolution, 300), rel=1e-9)
    assert flops["no_nag"] == pytest.approx(121.0766, abs=1e-3)
    assert flops["nag"] == pytest.approx(122.9644, abs=1e-3)
    assert flops["nag"] / flops["no_nag"] <= 1.02
