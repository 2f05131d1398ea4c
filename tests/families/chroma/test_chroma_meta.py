"""Full-size Chroma on the meta device: the patched model runs without kernels, and NAG's cost is counted under
FlopCounterMode. Chroma's NAG is FLUX.1's fast-mode cost (the shared image stream), here exact."""

from __future__ import annotations

import pytest

from meta_models import chroma
from meta_models.count import count
from nag_kernels.integrations import apply_nag

pytestmark = pytest.mark.slow  # a full-size model on the meta device: run by CI's slow stage


def tflops(model, variant: str) -> float:
    kw = chroma.step_inputs(model, variant)
    counted = count(lambda: model(**kw)[0])
    assert counted.value.shape == (1, 4096, 64) and counted.value.device.type == "meta"
    return counted.tflop


def test_full_size_chroma_nag_costs_as_flux_fast_mode():
    # Counted (bfloat16, 1024^2, 4096 image + 512 text tokens, text mask given): plain 74.57 TFLOP, NAG 84.31 (1.13x;
    # FLUX.1's fast mode: 84.1 / 74.4); CFG is two plain calls, 149.14.
    model = apply_nag(chroma.build())  # backend "auto": the fake impl runs on meta
    plain, guided = tflops(model, "plain"), tflops(model, "nag")
    assert plain == pytest.approx(74.57, abs=0.01)
    assert guided == pytest.approx(84.31, abs=0.01)
    assert guided <= 1.15 * plain
