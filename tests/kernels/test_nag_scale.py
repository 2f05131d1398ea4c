"""One meaning of ``scale`` (docs/spec.md, "The combine"): ``scale >= 1``, and ``scale == 1`` turns NAG off, returning
``z_pos`` exactly whatever ``tau``, ``alpha`` and ``z_neg``, on every backend, for numbers and 0-dim tensors, eager and
compiled; ``scale < 1`` is refused with the same ``ValueError`` by every function and op."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from nag_kernels import (
    nag,
    nag_merge,
    nag_merge_reference,
    nag_partial_norms,
    nag_reference,
    nag_with_norms,
)
from nag_kernels.checks import check_params
from nag_kernels.combine import MAX_BLOCK_C
from nag_kernels.op_factory import REGISTRY

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OFF_PARAMS = [(0.5, 0.25), (0.5, 1.0), (2.5, 0.3), (1e-3, 0.9)]  # (tau, alpha): tau < 1 is where it used to differ
SCALE_BELOW_ONE = r"scale must be >= 1 \(1 turns NAG off\), got 0.5"


def pair(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(dtype) for _ in range(2))


# --- scale == 1 returns z_pos exactly --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau, alpha", OFF_PARAMS)
@pytest.mark.parametrize("C", [77, MAX_BLOCK_C + 5], ids=["rows", "chunked"])
def test_nag_scale_one_is_z_pos(backend, dtype, tau, alpha, C):
    z_pos, z_neg = pair(3, C, dtype=dtype)
    assert torch.equal(nag(z_pos, z_neg, 1.0, tau, alpha, backend=backend), z_pos)
    assert torch.equal(nag(z_pos, z_neg, torch.tensor(1.0), torch.tensor(tau), alpha, backend=backend), z_pos)
    out = torch.empty_like(z_pos)
    nag(z_pos, z_neg, 1, tau, alpha, out=out, backend=backend)
    assert torch.equal(out, z_pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nag_scale_one_ignores_z_neg(backend):
    """NAG off does not read ``z_neg``: a NaN or inf there does not reach the output."""
    z_pos, z_neg = pair(4, 40)
    z_neg[1, 3] = math.nan
    z_neg[2, 0] = math.inf
    assert torch.equal(nag(z_pos, z_neg, 1.0, 0.5, 0.5, backend=backend), z_pos)


def test_reference_scale_one_is_z_pos():
    z_pos, z_neg = pair(3, 50, dtype=torch.float64)
    for tau, alpha in OFF_PARAMS:
        assert torch.equal(nag_reference(z_pos, z_neg, 1.0, tau, alpha), z_pos)
        assert torch.equal(nag_reference(z_pos, z_neg, torch.tensor(1.0), tau, alpha, norm="l2"), z_pos)
    # the formula without the rule would give (1 - alpha + alpha * tau) * z_pos here
    assert not torch.equal(nag_reference(z_pos, z_neg, 1.0 + 1e-9, 0.5, 0.25), z_pos)


def test_reference_scale_tensor_under_compile_is_z_pos():
    """A 0-dim tensor scale is not branched on in Python: the compiled reference selects z_pos with torch.where."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b, s: nag_reference(a, b, s, 0.5, 0.5), fullgraph=True, backend=counter)
    z_pos, z_neg = pair(3, 50)
    assert torch.equal(compiled(z_pos, z_neg, torch.tensor(1.0)), z_pos)
    torch.testing.assert_close(compiled(z_pos, z_neg, torch.tensor(5.0)), nag_reference(z_pos, z_neg, 5.0, 0.5, 0.5))
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_nag_scale_one_under_compile_with_tensor_scalars(backend):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda a, b, s: nag(a, b, s, 0.5, 0.75, backend=backend), fullgraph=True, backend=counter)
    z_pos, z_neg = pair(3, 5, 24)
    for scale in (5.0, 1.0, 3.0, 1.0):
        out = compiled(z_pos, z_neg, torch.tensor(scale, dtype=torch.float64))
        if scale == 1:
            assert torch.equal(out, z_pos)
        else:
            torch.testing.assert_close(out, nag_reference(z_pos, z_neg, scale, 0.5, 0.75))
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nag_merge_scale_one_is_the_merged_positive(backend, dtype):
    g = torch.Generator().manual_seed(1)
    o = [torch.randn(2, 5, 3, 20, generator=g).to(dtype) for _ in range(3)]
    lse = [torch.randn(2, 3, 5, generator=g).mul(3).transpose(1, 2) for _ in range(3)]
    args = [o[0], lse[0], o[1], lse[1], o[2], lse[2]]
    outs = [nag_merge(*args, 1.0, tau, alpha, backend=backend) for tau, alpha in OFF_PARAMS]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])  # tau and alpha play no part
    merged = nag_merge_reference(*[a.double() for a in args[:4]], *args[2:4], 1.0)  # merge(o_shared, o_pos)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(outs[0].double(), merged.double(), rtol=tol, atol=tol)
    # With an empty shared part, the merged positive is o_pos itself: the output is o_pos bit for bit.
    lse[0].fill_(-math.inf)
    o[2][0, 1, 2, 3] = math.nan  # and o_neg is not read
    assert torch.equal(nag_merge(*args, torch.tensor(1.0), 0.5, 0.5, backend=backend), o[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nag_with_norms_scale_one_is_z_pos(backend, dtype):
    z_pos, z_neg = pair(3, 4, 37, dtype=dtype)
    norms = nag_partial_norms(z_pos, z_neg, 1.0, backend=backend)
    for tau, alpha in OFF_PARAMS:
        assert torch.equal(nag_with_norms(z_pos, z_neg, norms, 1.0, tau, alpha, backend=backend), z_pos)
    assert torch.equal(nag_with_norms(z_pos, z_neg, norms.fill_(math.nan), torch.tensor(1.0), backend=backend), z_pos)


def test_gradients_at_scale_one():
    """Out = z_pos: the gradient passes to z_pos unchanged and none reaches z_neg (or the norms), eager (floats) and
    through the scalar-tensor op's formula under compile."""
    z_pos, z_neg = pair(3, 16, dtype=torch.float64)
    grad = torch.randn(3, 16, dtype=torch.float64)
    for scale in (1.0, torch.tensor(1.0, dtype=torch.float64)):
        a, b = z_pos.clone().requires_grad_(), z_neg.clone().requires_grad_()
        nag(a, b, scale, 0.5, 0.5).backward(grad)
        assert torch.equal(a.grad, grad) and torch.equal(b.grad, torch.zeros_like(grad))
    torch._dynamo.reset()
    step = torch.compile(lambda a, b, s: nag(a, b, s, 0.5, 0.5, backend="torch"), fullgraph=True, backend="aot_eager")
    a, b = z_pos.clone().requires_grad_(), z_neg.clone().requires_grad_()
    step(a, b, torch.tensor(1.0, dtype=torch.float64)).backward(grad)
    assert torch.equal(a.grad, grad) and torch.equal(b.grad, torch.zeros_like(grad))
    a, b = z_pos.clone().requires_grad_(), z_neg.clone().requires_grad_()
    norms = nag_partial_norms(a, b, 1.0).detach().requires_grad_()
    nag_with_norms(a, b, norms, 1.0, 0.5, 0.5).backward(grad)
    assert torch.equal(a.grad, grad) and not b.grad.any() and not norms.grad.any()
    assert torch.autograd.gradcheck(lambda x, y: nag(x, y, 1.0, 0.5, 0.5), (a.detach().requires_grad_(), b))


# --- scale < 1 is refused --------------------------------------------------------------------------------------


def test_check_params_refuses_scale_below_one():
    with pytest.raises(ValueError, match=SCALE_BELOW_ONE):
        check_params(0.5, 2.5, 0.25, "l1")
    check_params(1, 2.5, 0.25, "l1")


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("scale", [0.5, torch.tensor(0.5)], ids=["float", "tensor"])
def test_every_public_function_refuses_scale_below_one(name, scale):
    op = REGISTRY[name]
    with pytest.raises(ValueError, match=SCALE_BELOW_ONE):
        op.public_function(*op.spec.example(), scale)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_op_refuses_scale_below_one(name):
    op = REGISTRY[name]
    tensors = op.spec.example()
    rest = (2.5, 0.25)[: op.n_scalars - 1]
    for variant, registered in op.variants.items():
        args = [0.5, *rest]
        if variant.endswith("_scalar_tensors"):
            args = [torch.tensor(v, dtype=torch.float64) for v in args]
        out = [torch.empty_like(tensors[op.main_index])] if "_out" in variant else []
        with pytest.raises(ValueError, match=SCALE_BELOW_ONE):
            registered(*out, *tensors, *args, "l1", "auto")


def test_references_refuse_scale_below_one():
    z_pos, z_neg = pair(2, 8)
    o, lse = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2)
    for call in (
        lambda: nag_reference(z_pos, z_neg, 0.5),
        lambda: nag_reference(z_pos, z_neg, torch.tensor(0.5)),
        lambda: nag_merge_reference(o, lse, o, lse, o, lse, 0.5),
    ):
        with pytest.raises(ValueError, match=SCALE_BELOW_ONE):
            call()


def test_compiled_call_refuses_scale_below_one_when_it_runs():
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, s: nag(a, b, s), fullgraph=True, backend=CompileCounter())
    z_pos, z_neg = pair(2, 8)
    compiled(z_pos, z_neg, torch.tensor(5.0))
    with pytest.raises(ValueError, match=SCALE_BELOW_ONE):
        compiled(z_pos, z_neg, torch.tensor(0.5))
