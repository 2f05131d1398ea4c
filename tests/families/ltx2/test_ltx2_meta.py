"""LTX-2 on the meta device: what a guided forward adds to a plain one, counted with ``meta_models.count``.

The counted difference equals what the guided layout adds and nothing else (``meta_models.ltx2.nag_added_flops``):
per block and stream the K/V projections of the NAG-negative text and the queries' attention over it; once, the
caption projections of the NAG-negative rows (LTX-2.0). The combine and the 2.3 text modulation of the extra rows are
elementwise. The full-size targets (LTX-2 19B and LTX-2.3 22B, 121 frames, 1024 text tokens): NAG at most 1.05x a
plain step at 768x512 and 1.025x at 1920x1088.
"""

from __future__ import annotations

import pytest

from meta_models import ltx2
from meta_models.count import count
from nag_kernels.integrations import apply_nag, remove_nag


def counted(model, variant, resolution, text_tokens):
    (apply_nag if variant.startswith("nag") else remove_nag)(model)
    kw = ltx2.step_inputs(model, variant, resolution, text_tokens)
    return count(lambda: model(**kw))


def test_tiny_config_adds_exactly_the_negative_branchs_cross_attention():
    model = ltx2.build("tiny")
    result = {v: counted(model, v, "64x64x9", 16) for v in ("no_nag", "cfg", "nag", "nag_cfg")}
    assert not any(c.uncounted_ops for c in result.values())
    added = ltx2.nag_added_flops(model, "64x64x9", 16)
    assert result["nag"].flops - result["no_nag"].flops == added
    assert result["nag_cfg"].flops - result["cfg"].flops == added  # batched CFG: NAG on the conditional row only
    assert result["cfg"].flops == 2 * result["no_nag"].flops
    assert result["nag"].elementwise_nag_ops  # the combine ran


@pytest.mark.slow  # full-size models on the meta device: run by CI's slow stage (about a minute each)
@pytest.mark.parametrize("name", ["ltx-2-19b", "ltx-2.3-22b"])
@pytest.mark.parametrize("resolution, target", [("768x512x121", 1.05), ("1920x1088x121", 1.025)])
def test_full_size_targets(name, resolution, target):
    model = ltx2.build(name)
    plain = counted(model, "no_nag", resolution, ltx2.TEXT_TOKENS)
    nag = counted(model, "nag", resolution, ltx2.TEXT_TOKENS)
    assert not plain.uncounted_ops and not nag.uncounted_ops
    assert nag.flops - plain.flops == ltx2.nag_added_flops(model, resolution)
    assert nag.flops / plain.flops <= target, (name, resolution, nag.tflop, plain.tflop)
