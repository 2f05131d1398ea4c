"""torch.compile(fullgraph=True) with NAG scalars that change between calls: a bounded number of compiled graphs, the
right result for every value, and the same ValueError as in eager mode for a bad value."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from nag_kernels import nag, nag_merge, nag_merge_reference, nag_reference

# (scale, tau, alpha) per call: every value changes every time, and one call clamps harder than the others.
SCALARS = [(5.0, 2.5, 0.25), (3.0, 2.0, 0.5), (7.5, 1.5, 0.125), (11.0, 3.5, 1.0)]
TOL = dict(rtol=1e-5, atol=1e-5)


def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)


def merge_inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 4, 2, 8, generator=g) if i % 2 == 0 else torch.randn(1, 4, 2, generator=g) for i in range(6)]


def compiled_nag(counter, dynamic, backend="auto"):
    def step(z_pos, z_neg, scale, tau, alpha):
        return nag(z_pos, z_neg, scale, tau, alpha, backend=backend) * 2

    return torch.compile(step, fullgraph=True, dynamic=dynamic, backend=counter)


@pytest.mark.parametrize("dynamic, backend", [(None, "auto"), (True, "auto"), (None, "torch")])
def test_nag_changing_scalars_compile_at_most_twice(dynamic, backend):
    torch._dynamo.reset()
    counter = CompileCounter()
    step = compiled_nag(counter, dynamic, backend)
    z_pos, z_neg = pair()
    for scale, tau, alpha in SCALARS:
        expected = nag_reference(z_pos.double(), z_neg.double(), scale, tau, alpha) * 2
        torch.testing.assert_close(step(z_pos, z_neg, scale, tau, alpha).double(), expected, **TOL)
    assert counter.frame_count <= 2  # the first call, then at most one recompile with the scalars dynamic


def test_nag_changing_scalars_inductor():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    step = compiled_nag(counter, None)
    z_pos, z_neg = pair()
    with torch._inductor.config.patch(compile_threads=1):  # no compile worker pool: seconds faster on CPU
        for scale, tau, alpha in SCALARS[:3]:
            expected = nag_reference(z_pos.double(), z_neg.double(), scale, tau, alpha) * 2
            torch.testing.assert_close(step(z_pos, z_neg, scale, tau, alpha).double(), expected, **TOL)
    assert counter.frame_count <= 2


def test_nag_in_place_changing_scalars():
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def step(hidden, z_neg, scale):
        nag(hidden[:, 1:], z_neg, scale, out=hidden[:, 1:])
        return hidden

    z_pos, z_neg = pair()
    for scale, _, _ in SCALARS:
        hidden = torch.cat([torch.ones(3, 1, 24), z_pos], dim=1)
        result = step(hidden, z_neg, scale)
        torch.testing.assert_close(result[:, 1:].double(), nag_reference(z_pos.double(), z_neg.double(), scale), **TOL)
        assert torch.equal(result[:, 0], torch.ones(3, 24))
    assert counter.frame_count <= 2


@pytest.mark.parametrize("dynamic", [None, True])
def test_nag_merge_changing_scalars_compile_at_most_twice(dynamic):
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(fullgraph=True, dynamic=dynamic, backend=counter)
    def step(args, scale, tau, alpha):
        return nag_merge(*args, scale, tau, alpha) + 1

    args = merge_inputs()
    for scale, tau, alpha in SCALARS:
        expected = nag_merge_reference(*[a.double() for a in args], scale, tau, alpha) + 1
        torch.testing.assert_close(step(args, scale, tau, alpha).double(), expected, **TOL)
    assert counter.frame_count <= 2


def test_scalar_tensors_under_compile_do_not_recompile():
    torch._dynamo.reset()
    counter = CompileCounter()
    step = compiled_nag(counter, None)
    z_pos, z_neg = pair()
    for scale, tau, alpha in SCALARS:
        out = step(z_pos, z_neg, torch.tensor(scale), torch.tensor(tau, dtype=torch.float64), torch.tensor(alpha))
        expected = nag_reference(z_pos.double(), z_neg.double(), scale, tau, alpha) * 2
        torch.testing.assert_close(out.double(), expected, **TOL)
    assert counter.frame_count == 1  # tensors are graph inputs: their values never recompile


BAD = [
    ((5.0, 0.0, 0.25), "tau must be > 0, got 0.0"),
    ((5.0, 2.5, 1.5), r"alpha must be in \[0, 1\], got 1.5"),
    ((math.nan, 2.5, 0.25), "scale must be finite, got nan"),
    ((5.0, math.inf, 0.25), "tau must be finite, got inf"),
]


@pytest.mark.parametrize("dynamic", [None, True])
def test_bad_scalars_raise_the_eager_error_under_compile(dynamic):
    """The first bad call traces concrete values, the next ones (after a recompile) dynamic values: the same
    ValueError as in eager mode either way, and good values still work afterwards."""
    torch._dynamo.reset()
    counter = CompileCounter()
    step = compiled_nag(counter, dynamic)
    z_pos, z_neg = pair()
    for scalars, match in BAD:
        with pytest.raises(ValueError, match=match):
            step(z_pos, z_neg, *scalars)
    expected = nag_reference(z_pos.double(), z_neg.double(), *SCALARS[1]) * 2
    torch.testing.assert_close(step(z_pos, z_neg, *SCALARS[1]).double(), expected, **TOL)
    # dynamo makes each scalar dynamic the first time it changes; here they change one at a time (and NaN/inf are
    # specialized), so up to one graph per bad value, never one per call
    assert counter.frame_count <= len(BAD)


def test_merge_bad_scalar_raises_under_compile():
    torch._dynamo.reset()
    step = torch.compile(lambda args, tau: nag_merge(*args, 5.0, tau), fullgraph=True, backend=CompileCounter())
    args = merge_inputs()
    step(args, 2.5)
    step(args, 1.5)
    with pytest.raises(ValueError, match="tau must be > 0, got -1.0"):
        step(args, -1.0)

