"""Autograd through nag and nag_merge: torch.autograd.gradcheck in float64 (finite differences, independent of the
backward formula), gradients of low-precision calls against autograd through the float64 reference, and the
inference-only out= paths refusing clearly."""

import pytest
import torch

from nag_kernels import nag, nag_merge, nag_merge_reference, nag_reference
from nag_kernels.ops import direct_call_ok


def clamp_mixed_pair(C=12, seed=0):
    """Two tokens in float64: row 0 with z_neg close to z_pos (||z_t|| ~ ||z_pos||: the clamp is inactive) and row 1
    with z_neg = -z_pos + noise (||z_t|| ~ (2 scale - 1) ||z_pos||: the clamp at tau is active)."""
    g = torch.Generator().manual_seed(seed)
    z_pos = torch.randn(2, C, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(2, C, generator=g, dtype=torch.float64)
    z_neg = torch.stack([z_pos[0] + noise[0], -z_pos[1] + noise[1]])
    return z_pos, z_neg


def clamped_rows(z_pos, z_neg, scale, tau, norm):
    """Which tokens the clamp acts on, from the formula: tau * ||z_pos|| < ||z_t||."""
    p = 1 if norm == "l1" else 2
    z_t = scale * z_pos - (scale - 1) * z_neg
    return (tau * torch.linalg.vector_norm(z_pos, p, dim=-1) < torch.linalg.vector_norm(z_t, p, dim=-1)).tolist()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_nag_gradcheck(backend, norm):
    scale, tau, alpha = 5.0, 2.5, 0.25
    z_pos, z_neg = clamp_mixed_pair()
    assert clamped_rows(z_pos, z_neg, scale, tau, norm) == [False, True]
    z_pos.requires_grad_()
    z_neg.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: nag(a, b, scale, tau, alpha, norm=norm, backend=backend), (z_pos, z_neg), eps=1e-6, atol=1e-7
    )


def test_nag_gradcheck_one_input_and_strided_leading_dims():
    hidden = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)  # hidden[:, 1:] is a strided view
    z_neg = torch.randn(2, 2, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: nag(h[:, 1:], z_neg, 3.0, 1.5, 0.5), (hidden,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradients_match_the_float64_reference(dtype):
    """backend="auto" runs the Triton kernel here (the interpreter); the gradient is that of the specification."""
    z_pos, z_neg = clamp_mixed_pair(C=40, seed=3)
    zp, zn = z_pos.to(dtype).requires_grad_(), z_neg.to(dtype).requires_grad_()
    weights = torch.randn(2, 40, dtype=torch.float64)
    (nag(zp, zn, 5.0) * weights.to(dtype)).sum().backward()
    zp64, zn64 = zp.detach().double().requires_grad_(), zn.detach().double().requires_grad_()
    (nag_reference(zp64, zn64, 5.0) * weights).sum().backward()
    assert zp.grad.dtype == dtype and zn.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(zp.grad.double(), zp64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(zn.grad.double(), zn64.grad, rtol=tol, atol=tol)


def test_zero_token_has_finite_gradients_and_nan_stays_in_its_token():
    z_pos = torch.randn(3, 8, dtype=torch.float64)
    z_neg = torch.randn(3, 8, dtype=torch.float64)
    z_pos[0] = z_neg[0] = 0.0  # ||z_t|| = 0: factor 1, a linear map of the inputs there
    z_neg[2, 3] = float("nan")
    z_pos.requires_grad_()
    nag(z_pos, z_neg, 5.0).sum().backward()
    g = z_pos.grad
    # at an all-zero token the output is alpha * z_t + (1 - alpha) * z_pos: d/dz_pos = alpha * scale + 1 - alpha
    torch.testing.assert_close(g[0], torch.full((8,), 0.25 * 5.0 + 0.75, dtype=torch.float64))
    assert torch.isfinite(g[1]).all()
    assert torch.isnan(g[2]).all()


def test_requires_grad_goes_through_the_op():
    z_pos, z_neg = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    assert not direct_call_ok(z_pos, z_neg)
    out = nag(z_pos, z_neg, 5.0)
    assert "nag_kernels_nag" in type(out.grad_fn).__name__  # the op's registered backward, not a traced formula
    with torch.no_grad():
        assert direct_call_ok(z_pos, z_neg)
        assert nag(z_pos, z_neg, 5.0).grad_fn is None


def test_gradients_under_compile():
    torch._dynamo.reset()
    z_pos, z_neg = clamp_mixed_pair(C=16, seed=5)
    step = torch.compile(lambda a, b, s: (nag(a, b, s, backend="torch") ** 2).sum(), fullgraph=True, backend="aot_eager")
    for scale in (5.0, 3.0):
        a, b = z_pos.clone().requires_grad_(), z_neg.clone().requires_grad_()
        step(a, b, scale).backward()
        a64, b64 = z_pos.clone().requires_grad_(), z_neg.clone().requires_grad_()
        (nag_reference(a64, b64, scale) ** 2).sum().backward()
        torch.testing.assert_close(a.grad, a64.grad)
        torch.testing.assert_close(b.grad, b64.grad)


@pytest.mark.parametrize("fn", ["nag", "nag_merge"])
def test_out_is_inference_only(fn):
    z_pos = torch.randn(1, 3, 2, 4, requires_grad=True)
    lse = torch.randn(1, 3, 2)
    with pytest.raises(RuntimeError, match=rf"{fn}\(\.\.\., out=\.\.\.\) writes in place and is inference-only"):
        if fn == "nag":
            nag(z_pos, torch.randn(1, 3, 2, 4), 5.0, out=torch.empty(1, 3, 2, 4))
        else:
            nag_merge(z_pos, lse, z_pos, lse, z_pos, lse, 5.0, out=torch.empty(1, 3, 2, 4))
    with torch.no_grad():  # inference with tensors that happen to require grad is fine
        out = torch.empty(1, 3, 2, 4)
        assert nag(z_pos, z_pos, 5.0, out=out) is out


def merge_inputs(seed=0):
    """float64 (o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg), [1, 3, 2, 4]: token 0 with o_neg close to
    o_pos (clamp inactive), token 1 with o_neg opposite (active), token 2 with an empty negative part (LSE -inf)."""
    g = torch.Generator().manual_seed(seed)
    o_s, o_p = (torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    o_n = o_p + 0.1 * torch.randn(1, 3, 2, 4, generator=g, dtype=torch.float64)
    o_n[:, 1] = -3 * o_p[:, 1]
    lse_s, lse_p = (torch.randn(1, 3, 2, generator=g, dtype=torch.float64) for _ in range(2))
    lse_n = lse_p + 0.1 * torch.randn(1, 3, 2, generator=g, dtype=torch.float64)
    lse_n[:, 2] = -float("inf")
    return [o_s, lse_s, o_p, lse_p, o_n, lse_n]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_nag_merge_gradcheck(backend):
    args = merge_inputs()
    scale, tau, alpha = 5.0, 2.5, 0.25
    z_pos = nag_merge_reference(args[0], args[1], args[2], args[3], args[2], args[3], 1.0, tau, 1.0).flatten(-2)[0]
    z_neg = nag_merge_reference(args[0], args[1], args[4], args[5], args[4], args[5], 1.0, tau, 1.0).flatten(-2)[0]
    assert clamped_rows(z_pos, z_neg, scale, tau, "l1")[:2] == [False, True]
    inputs = [a.clone().requires_grad_(not torch.isinf(a).any()) for a in args]  # no finite differences at -inf
    assert torch.autograd.gradcheck(
        lambda *xs: nag_merge(*xs, scale, tau, alpha, backend=backend), inputs, eps=1e-6, atol=1e-7
    )


def test_nag_merge_float32_gradients_match_the_float64_reference():
    args = [a.float() for a in merge_inputs(seed=2)]
    leaves = [a.clone().requires_grad_() for a in args]
    nag_merge(*leaves, 5.0).square().sum().backward()  # auto: the Triton kernel under the interpreter
    leaves64 = [a.double().requires_grad_() for a in args]
    nag_merge_reference(*leaves64, 5.0).square().sum().backward()
    for got, want in zip(leaves, leaves64):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
