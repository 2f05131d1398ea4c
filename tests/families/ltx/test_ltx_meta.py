"""The full-size LTX-Video 2B transformer on the meta device (704x480, 161 frames): a NAG step costs 1.01x a plain one.

The counted difference equals what a guided step adds: per block the K/V projections of the 128 extra text rows and
the video queries' attention over them; once, the caption projection of the extra rows.
"""

from __future__ import annotations

import pytest

from meta_models import ltx
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.slow  # a full-size model on the meta device: run by CI's slow stage


def tflops(model, variant: str, resolution: str) -> float:
    (apply_nag if variant.startswith("nag") else remove_nag)(model)
    kw = ltx.step_inputs(model, variant, resolution)
    return count(lambda: model(**kw)).tflop


def test_ltx_nag_adds_only_the_second_branchs_cross_attention():
    model = ltx.build()
    resolution = "704x480x161"
    flops = {variant: tflops(model, variant, resolution) for variant in ("no_nag", "nag")}
    frames, height, width = ltx.latent_grid(resolution)
    video, text, dim = frames * height * width, ltx.TEXT_TOKENS, 2048
    assert video == 21 * 15 * 22
    per_block = 2 * (2 * text * dim * dim) + 2 * (2 * video * text * dim)
    caption = 2 * text * (4096 * dim + dim * dim)
    assert flops["nag"] - flops["no_nag"] == pytest.approx((28 * per_block + caption) / 1e12, rel=1e-9)
    assert flops["no_nag"] == pytest.approx(34.078, abs=0.001)
    assert flops["nag"] / flops["no_nag"] <= 1.02
