"""Gradients through ``attention_with_lse``'s log-sum-exp and the split image attention built on it.

PyTorch's SDPA kernel ops declare their LSE output non-differentiable; ``attention_with_lse`` supplies its gradient
w.r.t. q and k (``attention._KernelLSE``). Checked here with ``torch.autograd.gradcheck`` in float64 on the CPU paths,
through ``nag_merge`` against one attention over the joined keys, through the split image attention (with and without
a text mask) and the tensor-parallel merge, and on meta tensors for the CUDA paths.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nag_kernels
from nag_kernels.attention import attention_with_lse
from nag_kernels.integrations import parallel, split_attention


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


def gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_gradcheck_of_output_and_lse(backend):
    q, k, v = rand(2, 5, 2, 8, seed=0), rand(2, 7, 2, 8, seed=1), rand(2, 7, 2, 8, seed=2)
    gradcheck(lambda q, k, v: attention_with_lse(q, k, v, backend=backend), (q, k, v))
    gradcheck(lambda q, k: attention_with_lse(q, k, v.detach(), scale=0.3, backend=backend)[1], (q, k))


def test_float32_kernel_gradient_equals_the_math_path():
    q, k, v = (rand(1, 6, 3, 16, seed=s, dtype=torch.float32) for s in (3, 4, 5))
    weights = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(6))
    grads = []
    for backend in ("cpu_flash", "math"):
        out, lse = attention_with_lse(q, k, v, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum() + (lse * weights).sum(), (q, k, v)))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_split_and_merged_attention_has_the_gradient_of_one_attention():
    """The LSE merge of two key parts is one attention over all keys, gradients included."""
    q, k, v = rand(1, 4, 2, 8, seed=7), rand(1, 9, 2, 8, seed=8), rand(1, 9, 2, 8, seed=9)
    empty = torch.full((1, 4, 2), float("-inf"), dtype=torch.float64)

    def split(q, k, v):
        o_a, lse_a = attention_with_lse(q, k[:, :5], v[:, :5])
        o_b, lse_b = attention_with_lse(q, k[:, 5:], v[:, 5:])
        # nag_merge at scale 1 is the merge of the shared and the positive part (the negative one is left empty)
        return nag_kernels.nag_merge(o_a, lse_a, o_b, lse_b, torch.zeros_like(o_b), empty, 1.0)

    gradcheck(split, (q, k, v))
    w = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    got = torch.autograd.grad((split(q, k, v) * w).sum(), (q, k, v))
    expected = torch.autograd.grad((attention_with_lse(q, k, v)[0] * w).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


NAG = types.SimpleNamespace(scale=4.0, tau=1.2, alpha=0.5, norm="l2", backend="torch")


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_split_image_attention_gradcheck(mask):
    B, N, T, H, D = 1, 4, 3, 2, 8
    q, k, v = (rand(B, N, H, D, seed=s) for s in (10, 11, 12))
    text_k, text_v = rand(2 * B, T, H, D, seed=13), rand(2 * B, T, H, D, seed=14)
    text_mask = None
    if mask is not None:
        keep = torch.tensor([[True, True, False], [True, False, True]])
        text_mask = keep if mask == "bool" else torch.where(keep, 0.0, -3.0).double()
    gradcheck(lambda *t: split_attention.image_attention(*t, NAG, text_mask), (q, k, v, text_k, text_v))


def test_a_branch_whose_text_keys_are_all_masked_has_finite_gradients():
    """An all-masked text part (``lse = -inf``, the merge's empty part) adds nothing, in the gradient too: a float
    mask of ``-inf`` gives the gradients of the bool mask, finite."""
    B, N, T, H, D = 1, 4, 3, 2, 8
    inputs = [rand(B, N, H, D, seed=s) for s in (15, 16, 17)] + [rand(2 * B, T, H, D, seed=s) for s in (18, 19)]
    keep = torch.tensor([[True, True, False], [False, False, False]])
    grads = []
    for mask in (keep, torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))):
        out = split_attention.image_attention(*inputs, NAG, mask)
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for from_bool, from_float in zip(*grads):
        assert torch.isfinite(from_float).all()
        torch.testing.assert_close(from_float, from_bool, rtol=0, atol=1e-14)


def test_tensor_parallel_merge_and_combine_are_differentiable(monkeypatch):
    """``parallel.merge_combine_sharded`` with autograd on all-reduces through ``torch.distributed.nn`` (the
    differentiable all-reduce); on one rank (an identity all-reduce) it is ``nag_merge``, gradients included."""
    import torch.distributed.nn.functional as dist_nn

    groups = []
    monkeypatch.setattr(dist_nn, "all_reduce", lambda tensor, group=None: groups.append(group) or tensor)
    B, N, H, D = 1, 3, 2, 4
    parts = [rand(B, N, H, D, seed=20), rand(B, N, H, seed=21), rand(B, N, H, D, seed=22), rand(B, N, H, seed=23),
             rand(B, N, H, D, seed=24), rand(B, N, H, seed=25)]
    gradcheck(lambda *t: parallel.merge_combine_sharded(*t, NAG, "tp"), parts)
    assert groups and set(groups) == {"tp"}
    w = torch.randn(B, N, H, D, dtype=torch.float64)
    got = torch.autograd.grad((parallel.merge_combine_sharded(*parts, NAG, "tp") * w).sum(), parts)
    merged = nag_kernels.nag_merge(*parts, NAG.scale, NAG.tau, NAG.alpha, norm=NAG.norm, backend="torch")
    expected = torch.autograd.grad((merged * w).sum(), parts)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,dtype", [("flash", torch.bfloat16), ("efficient", torch.float32),
                                           ("cudnn", torch.bfloat16), ("cpu_flash", torch.float32)])
def test_meta_backward_through_the_lse(backend, dtype):
    """The kernel paths (the CUDA ones on meta tensors only, here) backpropagate through their LSE: gradients with
    the inputs' shapes and dtypes; the LSE's gradient costs one more forward and backward of the same kernel."""
    B, Nq, Nk, H, D = 2, 37, 11, 3, 64
    q, k, v = (torch.empty(B, n, H, D, device="meta", dtype=dtype, requires_grad=True) for n in (Nq, Nk, Nk))
    with FlopCounterMode(display=False) as counter:
        out, lse = attention_with_lse(q, k, v, backend=backend)
        assert lse.requires_grad
        forward = counter.get_total_flops()
        grads = torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.dtype == dtype for g in grads)
    assert forward == 4 * B * H * Nq * Nk * D
    assert counter.get_total_flops() == 7 * forward  # forward 1, backward 2.5, the LSE's forward and backward 3.5


def test_nothing_is_recorded_without_grad():
    q = torch.randn(1, 4, 2, 8)
    out, lse = attention_with_lse(q, q, q)
    assert lse.grad_fn is None and out.grad_fn is None
    q.requires_grad_()
    with torch.no_grad():
        out, lse = attention_with_lse(q, q, q)
    assert lse.grad_fn is None and out.grad_fn is None
