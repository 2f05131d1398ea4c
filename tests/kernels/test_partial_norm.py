"""nag_partial_norms + nag_with_norms: the combine split around a reduction over ranks (tensor parallelism).

Checked against ``nag_kernels.nag`` on one shard (no reduction), against a plain-PyTorch combine written here from
docs/spec.md ("The combine") with the channels split over simulated ranks, on both backends (Triton through the
interpreter on CPU); plus meta tensors, torch.compile with changing scalars, autograd, errors, and
``integrations.parallel.combine_sharded`` with the all-reduce simulated in one process (opcheck:
test_op_factory.py).
"""

import importlib.util
import math
import os
import sys
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from nag_kernels import nag, nag_partial_norms, nag_with_norms

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Looser than the dtype's rounding alone: the interpreter truncates fp32 -> bf16 stores (about 2 ulp).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2),
       torch.float64: (1e-12, 1e-12)}
SCALE, TAU, ALPHA = 6.0, 1.5, 0.5  # strong enough that the clamp acts on most tokens


def spec_combine(z_pos, z_neg, scale, tau, alpha, norm):
    """docs/spec.md, "The combine", per token over all channels, in float64."""
    zp, zn = z_pos.double(), z_neg.double()
    g = scale * zp - (scale - 1) * zn
    p = 1 if norm == "l1" else 2
    n_pos = zp.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    n_g = g.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    factor = torch.minimum(torch.ones_like(n_g), tau * n_pos / n_g)
    factor = torch.where(n_g == 0, torch.ones_like(factor), factor)
    return alpha * factor * g + (1 - alpha) * zp


def tokens(dtype, C=37, seed=0):
    """``[2, 6, C]`` pairs sliced to strided ``[2, 5, C]`` views, with an all-zero token and a NaN token."""
    g = torch.Generator().manual_seed(seed)
    z_pos, z_neg = (torch.randn(2, 6, C, generator=g).to(dtype) for _ in range(2))
    z_pos[0, 2], z_neg[0, 2] = 0, 0  # zero token: factor 1, output 0
    z_neg[1, 3, C // 2] = math.nan  # NaN token: its whole output NaN, nothing else
    return z_pos[:, 1:], z_neg[:, 1:]  # leading dims strided (not a contiguous tensor)


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def check_nan_token(out):
    assert torch.isnan(out[1, 2]).all()  # the NaN token (row 3 of the unsliced tensor)
    out = out.clone()
    out[1, 2] = 0
    assert torch.isfinite(out).all()
    assert (out[0, 1] == 0).all()  # the zero token


BACKEND_CASES = [(d, "triton") for d in DTYPES] + [(d, "torch") for d in DTYPES] + [(torch.float64, "torch")]


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("dtype, backend", BACKEND_CASES)
def test_one_shard_equals_nag(dtype, backend, norm):
    z_pos, z_neg = tokens(dtype)
    sums = nag_partial_norms(z_pos, z_neg, SCALE, norm=norm, backend=backend)
    assert sums.shape == (2, 5, 2) and sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out = nag_with_norms(z_pos, z_neg, sums, SCALE, TAU, ALPHA, norm=norm, backend=backend)
    assert out.dtype == dtype and out.shape == z_pos.shape
    expected = nag(z_pos, z_neg, SCALE, TAU, ALPHA, norm=norm, backend=backend)
    rtol, atol = (1e-6, 1e-6) if dtype != torch.float64 else (1e-12, 1e-12)
    if dtype in (torch.float16, torch.bfloat16):  # one rounding of the output may differ
        rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
    check_nan_token(out)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("dtype, backend", BACKEND_CASES)
def test_sharded_channels_equal_the_spec(dtype, backend, norm):
    """Channels split over 3 simulated ranks (uneven widths 13 + 17 + 7): summed partial sums, then each shard's
    combine; joined, they equal the combine over the whole token."""
    z_pos, z_neg = tokens(dtype)
    bounds = [(0, 13), (13, 30), (30, 37)]
    shards = [(z_pos[..., a:b], z_neg[..., a:b]) for a, b in bounds]
    sums = sum(nag_partial_norms(p, n, SCALE, norm=norm, backend=backend) for p, n in shards)
    out = torch.cat([nag_with_norms(p, n, sums, SCALE, TAU, ALPHA, norm=norm, backend=backend) for p, n in shards], -1)
    close(out, spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, norm), dtype)
    check_nan_token(out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_partial_sums_are_the_spec_sums(backend):
    z_pos, z_neg = tokens(torch.bfloat16)
    g = SCALE * z_pos.double() - (SCALE - 1) * z_neg.double()
    for norm, f in (("l1", torch.abs), ("l2", torch.square)):
        sums = nag_partial_norms(z_pos, z_neg, SCALE, norm=norm, backend=backend)
        expected = torch.stack([f(z_pos.double()).sum(-1), f(g).sum(-1)], -1)
        torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_wide_rows_use_the_chunked_kernels():
    C = 8195  # > combine.MAX_BLOCK_C: chunked partial sums, a 2-D grid of 3 column tiles for the combine
    g = torch.Generator().manual_seed(3)
    z_pos, z_neg = torch.randn(2, C, generator=g), torch.randn(2, C, generator=g)
    for norm in ("l1", "l2"):
        sums = nag_partial_norms(z_pos, z_neg, SCALE, norm=norm, backend="triton")
        out = nag_with_norms(z_pos, z_neg, sums, SCALE, TAU, ALPHA, norm=norm, backend="triton")
        close(out, spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, norm), torch.float32)


def test_unmergeable_leading_dims_and_strided_norms():
    # Three leading dims no strides merge (one launch per index of dim 0), and norms given as a strided view.
    base_p, base_n = torch.randn(3, 4, 5, 40), torch.randn(3, 4, 5, 40)
    z_pos, z_neg = base_p[:, ::2, 1:, :33], base_n[:, 1::2, :4, 7:]
    for backend in ("triton", "torch"):
        sums = nag_partial_norms(z_pos, z_neg, SCALE, norm="l2", backend=backend)
        norms = torch.empty(2, *z_pos.shape[:-1]).movedim(0, -1).copy_(sums)  # [..., 2] with stride(-1) != 1
        out = nag_with_norms(z_pos, z_neg, norms, SCALE, TAU, ALPHA, norm="l2", backend=backend)
        close(out, spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, "l2"), torch.float32)


def test_auto_backend_and_tensor_scalars():
    z_pos, z_neg = tokens(torch.float64)
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (SCALE, TAU, ALPHA)]
    sums = nag_partial_norms(z_pos, z_neg, scalars[0])  # auto: float64 runs on PyTorch
    out = nag_with_norms(z_pos, z_neg, sums, *scalars)
    close(out, spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, "l1"), torch.float64)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_in_place(backend):
    z_pos, z_neg = torch.randn(4, 24), torch.randn(4, 24)
    expected = spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, "l1")
    sums = nag_partial_norms(z_pos, z_neg, SCALE, backend=backend)
    assert nag_with_norms(z_pos, z_neg, sums, SCALE, TAU, ALPHA, out=z_pos, backend=backend) is z_pos
    close(z_pos, expected, torch.float32)


def test_errors_name_the_argument():
    z_pos, z_neg = torch.randn(3, 8), torch.randn(3, 8)
    sums = nag_partial_norms(z_pos, z_neg, SCALE)
    cases = [
        (lambda: nag_partial_norms(z_pos, z_neg.half(), SCALE), TypeError, "z_neg must have the dtype"),
        (lambda: nag_partial_norms(z_pos.int(), z_neg, SCALE), TypeError, "z_pos must have dtype"),
        (lambda: nag_partial_norms(z_pos.t(), z_neg.t(), SCALE), ValueError, "z_pos must be contiguous in its last"),
        (lambda: nag_partial_norms(z_pos, z_neg, math.inf), ValueError, "scale must be finite"),
        (lambda: nag_partial_norms(z_pos, z_neg, "5"), TypeError, "scale must be a real number"),
        (lambda: nag_partial_norms(z_pos, z_neg, SCALE, norm="l3"), ValueError, "norm must be one of"),
        (lambda: nag_partial_norms(z_pos, z_neg, SCALE, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: nag_partial_norms(z_pos.double(), z_neg.double(), SCALE, backend="triton"), TypeError, "z_pos must"),
        (lambda: nag_with_norms(z_pos, z_neg, sums[:2], SCALE), ValueError, r"norms must have shape \[..., 2\]"),
        (lambda: nag_with_norms(z_pos, z_neg, sums.half(), SCALE), TypeError, "norms must have dtype"),
        (lambda: nag_with_norms(z_pos, z_neg, sums.numpy(), SCALE), TypeError, "norms must be a torch.Tensor"),
        (lambda: nag_with_norms(z_pos, z_neg, sums.to("meta"), SCALE), ValueError, "norms must be on the device"),
        (lambda: nag_with_norms(z_pos, z_neg, sums, SCALE, tau=0.0), ValueError, "tau must be > 0"),
        (lambda: nag_with_norms(z_pos, z_neg, sums, SCALE, alpha=2.0), ValueError, r"alpha must be in \[0, 1\]"),
        (lambda: nag_with_norms(z_pos, z_neg, sums, SCALE, out=z_pos[:2]), ValueError, "out must have the shape"),
        (lambda: nag_with_norms(z_pos, z_neg, sums, torch.ones(2), TAU), ValueError, "scale must be a real number"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # The registered ops check the same (with the concrete values, on the real kernel path).
    with pytest.raises(ValueError, match="norms must have shape"):
        torch.ops.nag_kernels.nag_with_norms(z_pos, z_neg, sums[:2], SCALE, TAU, ALPHA, "l1", "torch")
    with pytest.raises(ValueError, match="scale must be finite"):
        torch.ops.nag_kernels.nag_partial_norms_scalar_tensors(z_pos, z_neg, torch.tensor(math.nan), "l1", "auto")


def test_out_refuses_grad():
    z_pos = torch.randn(3, 8, requires_grad=True)
    z_neg = torch.randn(3, 8)
    sums = nag_partial_norms(z_pos, z_neg, SCALE)
    with pytest.raises(RuntimeError, match="inference-only"):
        nag_with_norms(z_pos, z_neg, sums, SCALE, out=torch.empty(3, 8))


def test_meta_tensors_run_without_kernel():
    z_pos = torch.empty(2, 4096, 3072 // 4, device="meta", dtype=torch.bfloat16)
    sums = nag_partial_norms(z_pos, z_pos, SCALE)
    assert sums.device.type == "meta" and sums.shape == (2, 4096, 2) and sums.dtype == torch.float32
    out = nag_with_norms(z_pos, z_pos, sums, SCALE, TAU, ALPHA)
    assert out.device.type == "meta" and out.shape == z_pos.shape and out.dtype == torch.bfloat16


def test_compile_fullgraph_changing_scalars_does_not_recompile(backend="auto"):
    torch._dynamo.reset()
    counter = CompileCounter()

    def step(z_pos, z_neg, scale, tau, alpha):
        sums = nag_partial_norms(z_pos, z_neg, scale, norm="l2", backend=backend) * 1  # stands in for the all-reduce
        out = torch.empty_like(z_pos)
        nag_with_norms(z_pos, z_neg, sums, scale, tau, alpha, norm="l2", out=out, backend=backend)
        return nag_with_norms(z_pos, z_neg, sums, scale, tau, alpha, norm="l2", backend=backend) + out

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    z_pos, z_neg = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (3.0, 2.0, 0.5), (7.5, 1.5, 0.125)]:
        scalars = [torch.tensor(v, dtype=torch.float64) for v in (scale, tau, alpha)]
        expected = 2 * spec_combine(z_pos, z_neg, scale, tau, alpha, "l2")
        close(compiled(z_pos, z_neg, *scalars), expected, torch.float32)
    assert counter.frame_count == 1
    for scale in (4.0, 9.0):  # Python floats: at most one recompile, then dynamic
        close(compiled(z_pos, z_neg, scale, TAU, ALPHA), 2 * spec_combine(z_pos, z_neg, scale, TAU, ALPHA, "l2"),
              torch.float32)
    assert counter.frame_count <= 3


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradients(norm):
    g = torch.Generator().manual_seed(7)
    # float64 on PyTorch: gradcheck of both ops (tokens with and without an active clamp).
    z_pos = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    z_neg = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda p, n: nag_partial_norms(p, n, 3.0, norm=norm), (z_pos, z_neg))
    sums = nag_partial_norms(z_pos, z_neg, 3.0, norm=norm).detach().requires_grad_()
    for tau in (1.2, 50.0):  # clamped, then never clamped
        torch.autograd.gradcheck(
            lambda p, n, s, tau=tau: nag_with_norms(p, n, s, 3.0, tau, 0.5, norm=norm), (z_pos, z_neg, sums)
        )
    # The composition equals nag's gradient; and the Triton forward's gradient the PyTorch one.
    zp, zn = (t.detach().float().requires_grad_() for t in (z_pos, z_neg))
    grads = []
    for backend in ("triton", "torch"):
        s = nag_partial_norms(zp, zn, 3.0, norm=norm, backend=backend)
        out = nag_with_norms(zp, zn, s, 3.0, 1.2, 0.5, norm=norm, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), (zp, zn)))
    expected = torch.autograd.grad(nag(zp, zn, 3.0, 1.2, 0.5, norm=norm).sum(), (zp, zn))
    for got in grads:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def parallel_module():
    """``nag_kernels.integrations.parallel``, loaded from its file without running the integrations package's
    ``__init__`` (which imports diffusers and every family: tens of seconds) when that is not imported already."""
    name = "nag_kernels.integrations.parallel"
    if name in sys.modules:
        return sys.modules[name]
    location = importlib.util.find_spec("nag_kernels.integrations").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_nag_parallel_under_test", os.path.join(location, "parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize(
    "dtype, backend", [(torch.float32, "auto"), (torch.bfloat16, "triton"), (torch.float64, "torch")]
)
def test_combine_sharded_with_a_simulated_all_reduce(monkeypatch, dtype, backend, norm):
    """``combine_sharded`` on each of 2 simulated ranks (the all-reduce adds the other rank's sums), in place into
    ``out`` as the Flux processor calls it, equals the whole-token combine."""
    parallel = parallel_module()
    z_pos, z_neg = tokens(dtype, C=30)
    halves = [(z_pos[..., :15], z_neg[..., :15]), (z_pos[..., 15:], z_neg[..., 15:])]
    config = types.SimpleNamespace(scale=torch.tensor(SCALE, dtype=torch.float64), tau=TAU, alpha=ALPHA, norm=norm,
                                   backend=backend)
    calls = []

    for rank in range(2):
        other = nag_partial_norms(*halves[1 - rank], SCALE, norm=norm, backend="torch")

        def all_reduce(tensor, group=None, other=other):
            calls.append((tensor.shape, tensor.dtype, group))
            tensor.add_(other.to(tensor.dtype))

        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
        out = halves[rank][0].clone()
        assert parallel.combine_sharded(out, halves[rank][1], config, "tp", out=out) is out
        expected = spec_combine(z_pos, z_neg, SCALE, TAU, ALPHA, norm)[..., 15 * rank:15 * (rank + 1)]
        close(out, expected, dtype)
    sums_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert calls == [((2, 5, 2), sums_dtype, "tp")] * 2
