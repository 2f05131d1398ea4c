"""nag_merge (fast-mode LSE merge + NAG) against the float64 reference, on both backends.

The Triton kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay at tens of
tokens. LSEs are built the way callers get them from SDPA: ``[B, H, N]`` tensors passed as ``.transpose(1, 2)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nag_kernels import nag_merge, nag_merge_reference, nag_reference
from nag_kernels.merge import MAX_BLOCK, launch_config

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against the float64 reference: fp32 accumulates the same math; fp16/bf16 are dominated by the rounding of the
# output (the interpreter truncates fp32 -> bf16 instead of rounding: 2 bf16 ulp).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
PARAMS = dict(scale=5.0, tau=2.5, alpha=0.25)


def make_inputs(B, N, H, D, dtype=torch.float32, lse_spread=3.0, seed=0):
    """``(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg)``; o in ``dtype``, LSEs float32 strided views."""
    g = torch.Generator().manual_seed(seed)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = []
    for _ in range(3):
        o = torch.randn(B, N, H, D, generator=g).to(dtype)
        lse = (torch.randn(B, H, N, generator=g) * lse_spread).to(lse_dtype).transpose(1, 2)
        args += [o, lse]
    return args


def reference(args, scale=5.0, tau=2.5, alpha=0.25, norm="l1"):
    """The spec in float64 from the same (already rounded) inputs."""
    return nag_merge_reference(*[a.double() for a in args], scale, tau, alpha, norm=norm)


def assert_matches(out, ref, dtype):
    torch.testing.assert_close(out.double(), ref, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5, 3, 20), (2, 7, 3, 100), (2, 3, 1, 1), (1, 4, 5, 16)])
def test_matches_reference(backend, dtype, shape):
    args = make_inputs(*shape, dtype=dtype)
    assert shape[2] == 1 or not args[1].is_contiguous()  # the LSE views are read in place
    out = nag_merge(*args, **PARAMS, backend=backend)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert_matches(out, reference(args), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("scale,tau,alpha", [(1.0, 2.5, 0.25), (11.0, 1.5, 0.5), (3.0, 100.0, 1.0), (5.0, 0.1, 0.0)])
def test_params_and_norms(backend, norm, scale, tau, alpha):
    args = make_inputs(2, 5, 3, 20, seed=1)
    out = nag_merge(*args, scale, tau, alpha, norm=norm, backend=backend)
    assert_matches(out, reference(args, scale, tau, alpha, norm), torch.float32)


def test_torch_backend_float64():
    args = make_inputs(2, 5, 3, 20, dtype=torch.float64)
    out = nag_merge(*args, **PARAMS, backend="torch")
    assert out.dtype == torch.float64
    assert_matches(out, reference(args), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """o_* as slices of larger buffers and [B, H, N, D] transposes; LSE with a non-unit stride in every dim."""
    B, N, H, D = 2, 6, 3, 20
    g = torch.Generator().manual_seed(2)
    o_shared = torch.randn(B, N + 4, H, D, generator=g)[:, 4:]  # like hidden[:, text_len:]
    o_pos = torch.randn(B, H, N, D, generator=g).transpose(1, 2)  # SDPA's [B, H, N, D] output
    o_neg = torch.randn(B, N, 2 * H, D, generator=g)[:, :, ::2]  # every other head
    lses = [torch.randn(B, 2 * H, N + 1, 3, generator=g)[:, ::2, 1:, 0].transpose(1, 2) * 4 for _ in range(3)]
    args = [o_shared, lses[0], o_pos, lses[1], o_neg, lses[2]]
    out = nag_merge(*args, **PARAMS, backend=backend)
    assert_matches(out, reference(args), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_parts(backend):
    """LSE -inf: that part has weight 0; both -inf for a head: the merged head is 0 before NAG."""
    args = make_inputs(2, 6, 3, 20, seed=3)
    o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg = args
    inf = float("inf")
    lse_shared[0, 1] = -inf  # token (0, 1): only the branch parts count
    lse_pos[0, 2, 1] = -inf  # one head of one token: only the shared part counts for z_pos
    lse_shared[1, 3, 0] = -inf
    lse_pos[1, 3, 0] = -inf  # head 0 of token (1, 3): z_pos is 0 there
    lse_shared[1, 4] = -inf
    lse_pos[1, 4] = -inf
    lse_neg[1, 4] = -inf  # token (1, 4): everything empty, so z_pos = z_neg = 0 and the output is 0
    out = nag_merge(*args, **PARAMS, backend=backend)
    ref = reference(args)
    assert torch.isfinite(out).all()
    assert (out[1, 4] == 0).all()
    # Token (0, 1) has no shared part, so it is plain NAG of the branch parts.
    direct = nag_reference(o_pos[0, 1].flatten().double(), o_neg[0, 1].flatten().double(), **PARAMS)
    assert_matches(out[0, 1].flatten(), direct, torch.float32)
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_lse_differences(backend):
    """exp(80) and exp(-80) overflow/underflow fp32 in a naive merge; the max-shifted form is exact."""
    args = make_inputs(2, 5, 3, 20, seed=4)
    _, lse_shared, _, lse_pos, _, lse_neg = args
    lse_shared[0].fill_(80.0)
    lse_pos[0].fill_(-80.0)  # z_pos = o_shared on batch 0
    lse_neg[0].fill_(85.0)
    lse_shared[1].fill_(-1e4)
    lse_pos[1].fill_(1e4)  # z_pos = o_pos on batch 1
    lse_neg[1].fill_(-1e4)
    out = nag_merge(*args, **PARAMS, backend=backend)
    assert torch.isfinite(out).all()
    assert_matches(out, reference(args), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["o_shared", "o_pos", "o_neg", "lse_shared", "lse_pos", "lse_neg"])
def test_nan_stays_in_its_token(backend, where):
    args = make_inputs(2, 5, 3, 20, seed=5)
    index = ["o_shared", "lse_shared", "o_pos", "lse_pos", "o_neg", "lse_neg"].index(where)
    if where.startswith("o_"):
        args[index][1, 2, 1, 7] = float("nan")
    else:
        args[index][1, 2, 1] = float("nan")
    out = nag_merge(*args, **PARAMS, backend=backend)
    assert out[1, 2].isnan().all()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(out[mask]).all()
    assert_matches(out[mask], reference(args)[mask], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_argument(backend):
    args = make_inputs(2, 5, 3, 20, dtype=torch.float16, seed=6)
    ref = reference(args)
    buffer = torch.full((2, 9, 3, 20), 7.0, dtype=torch.float16)
    out = buffer[:, 4:]  # strided leading dims
    result = nag_merge(*args, **PARAMS, out=out, backend=backend)
    assert result is out
    assert_matches(buffer[:, 4:], ref, torch.float16)
    assert (buffer[:, :4] == 7).all()  # nothing written outside the view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [0, 2])
def test_out_may_be_an_input(backend, target):
    args = make_inputs(2, 5, 3, 20, seed=7)
    ref = reference(args)
    result = nag_merge(*args, **PARAMS, out=args[target], backend=backend)
    assert result is args[target]
    assert_matches(result, ref, torch.float32)


def _bad(**changes):
    """Valid inputs, then ``changes`` applied: name -> value, or name -> callable(valid inputs dict)."""
    args = make_inputs(1, 4, 3, 8)
    base = dict(zip(["o_shared", "lse_shared", "o_pos", "lse_pos", "o_neg", "lse_neg"], args))
    base.update(scale=5.0, tau=2.5, alpha=0.25, norm="l1", backend="auto", out=None)
    for name, value in changes.items():
        base[name] = value(base) if callable(value) else value
    return base


ERRORS = [
    (dict(o_pos=lambda a: a["o_pos"].numpy()), TypeError, "o_pos must be a torch.Tensor"),
    (dict(o_pos=lambda a: a["o_pos"].to(torch.int32)), TypeError, "o_pos must have dtype"),
    (dict(o_pos=lambda a: a["o_pos"][0]), ValueError, "o_pos must be 4-D"),
    (dict(o_shared=lambda a: a["o_shared"][:, :3]), ValueError, "o_shared must have the shape of o_pos"),
    (dict(o_neg=lambda a: a["o_neg"].half()), TypeError, "o_neg must have the dtype of o_pos"),
    (dict(o_neg=lambda a: a["o_neg"].to("meta")), ValueError, "o_neg must be on the device of o_pos"),
    (dict(o_shared=lambda a: a["o_shared"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "o_shared must be contiguous in its last dim"),
    (dict(lse_shared=3.0), TypeError, "lse_shared must be a torch.Tensor"),
    (dict(lse_pos=lambda a: a["lse_pos"].half()), TypeError, "lse_pos must have dtype"),
    (dict(lse_pos=lambda a: a["lse_pos"].double()), TypeError, "lse_pos must have dtype"),
    (dict(lse_neg=lambda a: a["lse_neg"].transpose(1, 2)), ValueError, r"lse_neg must have shape \[B, N, H\]"),
    (dict(lse_shared=lambda a: a["lse_shared"].to("meta")), ValueError, "lse_shared must be on the device of o_pos"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="5"), TypeError, "scale must be a real number"),
    (dict(tau=0.0), ValueError, "tau must be > 0"),
    (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(norm="linf"), ValueError, "norm must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(out=lambda a: torch.empty(1, 4, 3, 8, dtype=torch.float16)), TypeError, "out must have the dtype of o_pos"),
    (dict(out=lambda a: torch.empty(1, 4, 3, 9)), ValueError, "out must have the shape of o_pos"),
    (dict(out=lambda a: torch.empty(1, 4, 8, 3).transpose(2, 3)), ValueError, "out must be contiguous in its last dim"),
]


@pytest.mark.parametrize("changes,exc,match", ERRORS, ids=[m for _, _, m in ERRORS])
def test_errors(changes, exc, match):
    kwargs = _bad(**changes)
    positional = [kwargs.pop(k) for k in ["o_shared", "lse_shared", "o_pos", "lse_pos", "o_neg", "lse_neg"]]
    with pytest.raises(exc, match=match):
        nag_merge(*positional, **kwargs)


def test_error_triton_float64():
    args = make_inputs(1, 4, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton'"):
        nag_merge(*args, **PARAMS, backend="triton")


def test_error_token_too_wide_for_triton():
    args = make_inputs(1, 1, 33, 512)  # padded 64 x 512 = 32768 > MAX_BLOCK
    with pytest.raises(RuntimeError, match="use backend='torch'"):
        nag_merge(*args, **PARAMS, backend="triton")
    assert_matches(nag_merge(*args, **PARAMS, backend="torch"), reference(args), torch.float32)


def test_launch_config():
    flux = launch_config(24, 128, 4096)  # 32 x 128 padded = 4096 elements: one token, 8 warps
    assert flux == {"BLOCK_H": 32, "BLOCK_D": 128, "TOKENS": 1, "num_warps": 8}
    small = launch_config(3, 20, 1000)  # 4 x 32 = 128 elements: 16 tokens per program
    assert small["TOKENS"] == 16 and small["num_warps"] == 4
    assert launch_config(3, 20, 3)["TOKENS"] == 4  # never more tokens per program than there are (pow2)
    wan = launch_config(40, 128, 10)
    assert wan["BLOCK_H"] * wan["BLOCK_D"] == 8192 <= MAX_BLOCK and wan["num_warps"] == 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    args = make_inputs(2, 0, 3, 8)
    out = nag_merge(*args, **PARAMS, backend=backend)
    assert out.shape == (2, 0, 3, 8)


def test_meta_tensors():
    args = [a.to("meta") for a in make_inputs(2, 5, 3, 20, dtype=torch.bfloat16)]
    out = nag_merge(*args, **PARAMS)
    assert out.device.type == "meta" and out.shape == (2, 5, 3, 20) and out.dtype == torch.bfloat16
    out2 = torch.empty(2, 5, 3, 20, dtype=torch.bfloat16, device="meta")
    assert nag_merge(*args, **PARAMS, out=out2) is out2
    with pytest.raises(ValueError, match="lse_pos must have shape"):
        nag_merge(args[0], args[1], args[2], args[3][:, :2], args[4], args[5], **PARAMS)


def test_torch_compile_fullgraph():
    args = make_inputs(1, 4, 3, 8, seed=9)

    def fn(o_shared, lse_shared, o_pos, lse_pos, o_neg, lse_neg):
        # The caller's pattern: SDPA-layout [B, H, N] LSEs transposed inside the graph, NAG merge, more graph ops.
        lses = [lse.transpose(1, 2) for lse in (lse_shared, lse_pos, lse_neg)]
        return nag_merge(o_shared, lses[0], o_pos, lses[1], o_neg, lses[2], 5.0, 2.5, 0.25) * 2.0

    sdpa_layout = [a.transpose(1, 2) if a.dim() == 3 else a for a in args]
    compiled = torch.compile(fn, fullgraph=True)
    result = compiled(*sdpa_layout)
    torch.testing.assert_close(result, fn(*sdpa_layout))
    assert_matches(result / 2, reference(args), torch.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    N=st.integers(1, 6),
    H=st.integers(1, 5),
    D=st.integers(1, 40),
    scale=st.floats(1.0, 12.0),
    tau=st.floats(0.5, 4.0),
    alpha=st.floats(0.0, 1.0),
    spread=st.sampled_from([0.0, 1.0, 30.0]),
    norm=st.sampled_from(["l1", "l2"]),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, N, H, D, scale, tau, alpha, spread, norm, backend, seed):
    args = make_inputs(B, N, H, D, lse_spread=spread, seed=seed)
    out = nag_merge(*args, scale, tau, alpha, norm=norm, backend=backend)
    ref = reference(args, scale, tau, alpha, norm)
    assert math.isfinite(out.abs().sum().item())
    assert_matches(out, ref, torch.float32)
