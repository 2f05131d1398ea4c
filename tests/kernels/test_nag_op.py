"""The registered ops: meta/fake tensors, torch.compile, and property tests over shapes and strides (opcheck of every
op: tests/kernels/test_op_factory.py)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from nag_kernels import nag, nag_reference

from test_nag import assert_matches


def test_op_positional_order_matches_comfyui():
    # ComfyUI-NAG calls nag(z_positive, z_negative, scale, tau, alpha): the op takes the same positional order.
    z_pos, z_neg = torch.randn(3, 32), torch.randn(3, 32)
    out = torch.ops.nag_kernels.nag(z_pos, z_neg, 5.0, 2.5, 0.25)
    assert_matches(out, nag_reference(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25), torch.float32)


def test_integer_scalars_are_accepted():
    z_pos, z_neg = torch.randn(3, 32), torch.randn(3, 32)
    assert_matches(nag(z_pos, z_neg, 5, 2, 1), nag_reference(z_pos.double(), z_neg.double(), 5, 2, 1), torch.float32)


def test_meta_tensors_run_without_kernel():
    z_pos = torch.empty(2, 4096, 3072, device="meta", dtype=torch.bfloat16)
    out = nag(z_pos, z_pos, 5.0)
    assert out.device.type == "meta" and out.shape == z_pos.shape and out.dtype == torch.bfloat16
    assert nag(z_pos, z_pos, 5.0, out=z_pos) is z_pos


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z_pos = torch.empty(1, 8, 64)[:, 2:]
        out = nag(z_pos, torch.empty(1, 6, 64), 5.0)
        assert out.shape == (1, 6, 64) and out.is_contiguous()
        with pytest.raises(ValueError, match="z_neg must have the shape of z_pos"):
            nag(z_pos, torch.empty(1, 5, 64), 5.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(hidden, z_neg, scale):
        # a typical use: combine the image part of an attention output in a larger graph
        z = nag(hidden[:, 2:], z_neg, scale, 2.5, 0.25, backend=backend)
        return torch.nn.functional.gelu(z) * 2

    compiled = torch.compile(step, fullgraph=True)
    hidden, z_neg = torch.randn(2, 10, 48), torch.randn(2, 8, 48)
    expected = torch.nn.functional.gelu(nag_reference(hidden[:, 2:].double(), z_neg.double(), 5.0)) * 2
    assert_matches(compiled(hidden, z_neg, 5.0), expected, torch.float32)


def test_torch_compile_in_place():
    torch._dynamo.reset()

    def step(hidden, z_neg):
        nag(hidden[:, 2:], z_neg, 5.0, out=hidden[:, 2:])
        return hidden * 1

    hidden, z_neg = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    expected = hidden.clone().double()
    expected[:, 2:] = nag_reference(hidden[:, 2:].double(), z_neg.double(), 5.0)
    assert_matches(torch.compile(step, fullgraph=True)(hidden.clone(), z_neg), expected, torch.float32)


def test_gradients_flow_and_in_place_is_refused_clearly():
    # gradient values: tests/kernels/test_op_autograd.py (gradcheck)
    z_pos = torch.randn(2, 8, requires_grad=True)
    nag(z_pos, torch.randn(2, 8), 5.0).sum().backward()
    assert z_pos.grad is not None and z_pos.grad.shape == (2, 8)
    with pytest.raises(RuntimeError, match="inference-only"):
        nag(z_pos, torch.randn(2, 8), 5.0, out=torch.empty(2, 8))


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    C = draw(st.sampled_from([1, 2, 7, 64, 100, 257, 640, 1000]))
    # optional strided rows: z_pos is x[..., :C] of a wider tensor, so its row stride is C + pad
    pad = draw(st.integers(0, 3))
    scale = draw(st.floats(1.0, 12.0))
    tau = draw(st.floats(0.5, 5.0))
    alpha = draw(st.floats(0.0, 1.0))
    norm = draw(st.sampled_from(["l1", "l2"]))
    backend = draw(st.sampled_from(["triton", "torch"]))
    seed = draw(st.integers(0, 2**16))
    return dtype, lead, C, pad, scale, tau, alpha, norm, backend, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_property_matches_reference(case):
    dtype, lead, C, pad, scale, tau, alpha, norm, backend, seed = case
    g = torch.Generator().manual_seed(seed)
    z_pos = torch.randn(*lead, C + pad, generator=g).to(dtype)[..., :C]
    z_neg = torch.randn(*lead, C, generator=g).to(dtype)
    out = nag(z_pos, z_neg, scale, tau, alpha, norm=norm, backend=backend)
    expected = nag_reference(z_pos.double(), z_neg.double(), scale, tau, alpha, norm=norm)
    assert_matches(out, expected, dtype)


def test_eager_calls_skip_the_dispatcher_but_modes_and_meta_see_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    from nag_kernels.ops import direct_call_ok

    z_pos, z_neg = torch.randn(2, 8), torch.randn(2, 8)
    assert direct_call_ok(z_pos, z_neg, None)
    assert not direct_call_ok(z_pos.to("meta"), z_neg.to("meta"))
    assert not direct_call_ok(z_pos.requires_grad_(), z_neg)
    z_pos.requires_grad_(False)

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        assert not direct_call_ok(z_pos, z_neg)
        out = nag(z_pos, z_neg, 5.0)
    assert "nag_kernels.nag.default" in seen
    assert_matches(out, nag_reference(z_pos.double(), z_neg.double(), 5.0), torch.float32)
