"""The full-size Wan 2.1 14B transformer on the meta device: NAG costs at most 1.02x a plain step at 720p, 81 frames.

The counted difference is checked against the formula of what a guided step adds (docs/families/wan.md): per block,
the K/V projections of the B extra text rows and the video queries' attention over them; once, the text embedder
on the extra rows. Nothing else in the model runs at the text batch.
"""

from __future__ import annotations

import pytest

from meta_models import wan
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.slow  # a full-size model on the meta device: run by CI's slow stage


def tflops(model, name: str, variant: str, resolution: str) -> float:
    (apply_nag if variant == "nag" else remove_nag)(model)
    kw = wan.step_inputs(model, variant, resolution, name)
    return count(lambda: model(**kw)).tflop


def test_wan21_14b_720p_nag_is_at_most_1_02x_a_plain_step():
    name, resolution = "wan2.1-t2v-14b", "720p"
    model = wan.build(name)
    flops = {variant: tflops(model, name, variant, resolution) for variant in ("no_nag", "nag")}
    width, layers, text = 5120, 40, wan.TEXT_TOKENS
    video = wan.video_tokens(name, resolution)
    assert video == 21 * 45 * 80 == 75600
    kv = 2 * (2 * text * width * width)  # to_k, to_v on the extra rows
    attention = 2 * (2 * video * text * width)  # Q K^T and P V of the second branch
    embedder = 2 * text * (4096 * width + width * width)  # the text embedder's two linears
    extra = (layers * (kv + attention) + embedder) / 1e12
    assert flops["nag"] - flops["no_nag"] == pytest.approx(extra, rel=1e-9)
    assert flops["nag"] / flops["no_nag"] <= 1.02
    assert 2 * flops["no_nag"] == pytest.approx(13046.87, abs=0.02)  # CFG: two plain passes (benchmarks count it)
    assert flops["no_nag"] == pytest.approx(6523.44, abs=0.01)
    assert flops["nag"] == pytest.approx(6557.34, abs=0.01)
