"""Full-size Chroma on the meta device: the patched model runs without kernels, and NAG's cost is counted under
FlopCounterMode. Chroma's NAG is FLUX.1's fast-mode cost (the shared image stream), here exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import model_chroma
from nag_kernels.integrations import apply_nag

pytestmark = pytest.mark.slow  # a full-size model on the meta device: run by CI's slow stage


def tflops(model, variant: str) -> float:
    kw = model_chroma.step_inputs(model, variant)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**kw)[0]
    assert out.shape == (1, 4096, 64) and out.device.type == "meta"
    return counter.get_total_flops() / 1e12


def test_full_size_chroma_nag_costs_as_flux_fast_mode():
    # Counted (bfloat16, 1024^2, 4096 image + 512 text tokens, text mask given): plain 74.57 TFLOP, NAG 84.31 (1.13x;
    # FLUX.1's fast mode: 84.1 / 74.4); CFG is two plain calls, 149.14.
    model = apply_nag(model_chroma.build())  # backend "auto": the fake impl runs on meta
    plain, guided = tflops(model, "plain"), tflops(model, "nag")
    assert plain == pytest.approx(74.57, abs=0.01)
    assert guided == pytest.approx(84.31, abs=0.01)
    assert guided <= 1.15 * plain
