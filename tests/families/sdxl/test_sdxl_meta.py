"""The full-size SDXL UNet on the meta device at 1024x1024: a NAG step costs 1.01x a plain one (CFG: 2x).

The counted difference equals what a guided step adds: in each of the 70 transformer blocks' cross-attention, the
K/V projections of the 77 extra text rows and the queries' attention over them (10 blocks of width 640 on 64x64
tokens, 60 of width 1280 on 32x32).
"""

from __future__ import annotations

import pytest

from meta_models import sdxl
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag

pytestmark = pytest.mark.slow  # a full-size model on the meta device: run by CI's slow stage


def tflops(model, variant: str, resolution: str = "1024") -> float:
    (apply_nag if variant.startswith("nag") else remove_nag)(model)
    kw = sdxl.step_inputs(model, variant, resolution)
    return count(lambda: model(**kw)).tflop


def test_sdxl_1024_nag_adds_only_the_second_branchs_cross_attention():
    model = sdxl.build()
    flops = {variant: tflops(model, variant) for variant in ("no_nag", "nag")}
    text = sdxl.TEXT_TOKENS

    def blocks(count, width, tokens):
        return count * (2 * (2 * text * 2048 * width) + 2 * (2 * tokens * text * width))

    extra = (blocks(10, 640, 64 * 64) + blocks(60, 1280, 32 * 32)) / 1e12
    assert flops["nag"] - flops["no_nag"] == pytest.approx(extra, rel=1e-9)
    assert flops["no_nag"] == pytest.approx(6.761, abs=0.001)
    assert flops["nag"] / flops["no_nag"] <= 1.02
