"""nag_kernels.nag against the float64 reference: both backends, every dtype, odd and strided shapes, semantics."""

import pytest
import torch

import nag_kernels
from nag_kernels import nag, nag_reference
from nag_kernels.combine import MAX_BLOCK_C, launch_config
from nag_kernels.reference import nag_authors_formula

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance by dtype against the float64 reference. bf16 is loose because the Triton interpreter truncates
# fp32 -> bf16 stores instead of rounding (up to 2 ulp = 2**-7).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def assert_matches(actual, expected, dtype):
    """Elementwise check with an absolute floor scaled to the tensor's magnitude; NaNs must sit in the same places."""
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    expected = expected.to(torch.float64)
    finite = expected[torch.isfinite(expected)]
    magnitude = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=tol * magnitude, equal_nan=True)


def reference64(z_pos, z_neg, *args, **kwargs):
    return nag_reference(z_pos.double(), z_neg.double(), *args, **kwargs)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize(
    "shape",
    [(5, 123), (2, 3, 64), (1, 4, 3072), (2, MAX_BLOCK_C + 77), (1, 1), (3, 17)],
    ids=["5x123", "2x3x64", "flux-width", "chunked", "1x1", "3x17"],
)
def test_matches_reference(shape, norm, dtype, backend):
    z_pos, z_neg = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    out = nag(z_pos, z_neg, 5.0, 2.5, 0.25, norm=norm, backend=backend)
    assert out.shape == z_pos.shape
    assert_matches(out, reference64(z_pos, z_neg, 5.0, 2.5, 0.25, norm=norm), dtype)


def test_float64_on_torch_backend_is_exact_to_reference():
    z_pos, z_neg = randn(4, 33, dtype=torch.float64, seed=3), randn(4, 33, dtype=torch.float64, seed=4)
    out = nag(z_pos, z_neg, 7.0, 1.5, 0.5, backend="torch")
    assert out.dtype == torch.float64
    assert_matches(out, nag_reference(z_pos, z_neg, 7.0, 1.5, 0.5), torch.float64)


def test_launch_config_picks_kernel_by_width():
    assert launch_config(3072, 4096) == {"chunked": False, "BLOCK_C": 4096, "ROWS": 1, "num_warps": 8}
    assert launch_config(640, 8192)["ROWS"] == 4
    assert launch_config(640, 1)["ROWS"] == 1
    assert launch_config(16384, 10)["chunked"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_leading_dims_are_read_in_place(backend):
    # hidden[:, text_len:] of a [B, text + image, C] tensor, and a z_neg with different strides.
    hidden = randn(2, 9, 40, seed=5)
    z_pos = hidden[:, 3:]
    z_neg = randn(6, 2, 40, seed=6).transpose(0, 1)
    assert not z_pos.is_contiguous() and not z_neg.is_contiguous()
    out = nag(z_pos, z_neg, 4.0, 2.0, 0.5, backend=backend)
    assert_matches(out, reference64(z_pos, z_neg, 4.0, 2.0, 0.5), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_unmergeable_leading_dims(backend):
    z_pos = randn(3, 4, 5, 16, seed=7)[:, 1:3, 1:4]
    z_neg = randn(3, 2, 3, 16, seed=8)
    out = torch.empty(3, 2, 3, 20)[..., :16]
    nag(z_pos, z_neg, 3.0, 2.5, 0.25, out=out, backend=backend)
    assert_matches(out, reference64(z_pos, z_neg, 3.0, 2.5, 0.25), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_may_alias_z_pos(dtype, backend):
    hidden = randn(2, 7, 96, dtype=dtype, seed=9)
    z_pos = hidden[:, 2:]
    z_neg = randn(2, 5, 96, dtype=dtype, seed=10)
    expected = reference64(z_pos, z_neg, 5.0, 2.5, 0.25)
    text_before = hidden[:, :2].clone()
    result = nag(z_pos, z_neg, 5.0, 2.5, 0.25, out=z_pos, backend=backend)
    assert result.data_ptr() == z_pos.data_ptr()
    assert_matches(hidden[:, 2:], expected, dtype)
    assert torch.equal(hidden[:, :2], text_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_may_alias_z_neg(backend):
    z_pos, z_neg = randn(6, 50, seed=11), randn(6, 50, seed=12)
    expected = reference64(z_pos, z_neg, 5.0, 2.5, 0.25)
    nag(z_pos, z_neg, 5.0, 2.5, 0.25, out=z_neg, backend=backend)
    assert_matches(z_neg, expected, torch.float32)


# --- semantics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_token_is_finite(backend):
    z_pos, z_neg = randn(3, 64, seed=13), randn(3, 64, seed=14)
    z_pos[1] = 0
    z_neg[1] = 0
    out = nag(z_pos, z_neg, 5.0, 2.5, 0.25, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(64))
    # The authors' formula divides 0 / 0 there.
    assert nag_authors_formula(z_pos, z_neg, 5.0, 2.5, 0.25)[1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_is_one_when_extrapolation_vanishes(backend):
    # z_t = scale * z_pos - (scale - 1) * z_neg = 0 for z_neg = scale / (scale - 1) * z_pos: out = (1 - alpha) * z_pos.
    z_pos = torch.full((2, 32), 0.5)
    z_neg = z_pos * (4.0 / 3.0)
    out = nag(z_pos, z_neg, 4.0, 2.5, 0.25, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.75 * z_pos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["z_pos", "z_neg"])
def test_nan_stays_in_its_token(where, backend):
    z_pos, z_neg = randn(4, 3, 48, seed=15), randn(4, 3, 48, seed=16)
    (z_pos if where == "z_pos" else z_neg)[2, 1, 5] = float("nan")
    out = nag(z_pos, z_neg, 5.0, 2.5, 0.25, backend=backend)
    nan_tokens = out.isnan().any(-1)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[2, 1] = True
    assert torch.equal(nan_tokens, expected)
    assert out[2, 1].isnan().all(), "a NaN norm must make the whole token NaN, not be clamped away"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_l1_sum_past_65504_is_accumulated_in_fp32(backend):
    # 3072 channels of magnitude ~40: the L1 norm (~1.2e5) overflows fp16; norms must be accumulated in fp32.
    z_pos = (40 + randn(2, 3072, seed=17)).half()
    z_neg = (-30 + randn(2, 3072, seed=18)).half()
    out = nag(z_pos, z_neg, 3.0, 2.5, 0.25, backend=backend)
    assert torch.isfinite(out).all()
    assert_matches(out, reference64(z_pos, z_neg, 3.0, 2.5, 0.25), torch.float16)
    # In fp16 the authors' formula overflows its norms to inf and returns NaN.
    assert nag_authors_formula(z_pos, z_neg, 3.0, 2.5, 0.25).isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_one_returns_z_pos(dtype, backend):
    z_pos, z_neg = randn(5, 77, dtype=dtype, seed=19), randn(5, 77, dtype=dtype, seed=20)
    out = nag(z_pos, z_neg, 1.0, 2.5, 0.25, backend=backend)
    assert_matches(out, z_pos, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_returns_z_pos(backend):
    z_pos, z_neg = randn(5, 77, seed=21), randn(5, 77, seed=22)
    out = nag(z_pos, z_neg, 9.0, 2.5, 0.0, backend=backend)
    assert torch.equal(out, z_pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_tau_means_no_clamp(backend):
    z_pos, z_neg = randn(5, 77, seed=23), randn(5, 77, seed=24)
    out = nag(z_pos, z_neg, 5.0, 1e30, 0.25, backend=backend)
    z_t = 5.0 * z_pos.double() - 4.0 * z_neg.double()
    assert_matches(out, 0.25 * z_t + 0.75 * z_pos.double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_is_active_at_small_tau(backend):
    # ||z_t|| / ||z_pos|| is far above tau for these inputs, so the output norm follows the clamp exactly.
    z_pos, z_neg = randn(3, 64, seed=25), randn(3, 64, seed=26)
    tau, alpha = 1.5, 1.0
    out = nag(z_pos, z_neg, 5.0, tau, alpha, backend=backend)
    ratio = out.abs().sum(-1) / z_pos.abs().sum(-1)
    torch.testing.assert_close(ratio, torch.full((3,), tau), rtol=1e-5, atol=0)


def test_matches_authors_formula_on_ordinary_tokens():
    z_pos, z_neg = randn(6, 3072, seed=27), randn(6, 3072, seed=28)
    for norm in ("l1", "l2"):
        authors = nag_authors_formula(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25, norm=norm)
        assert_matches(nag_reference(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25, norm=norm), authors, torch.float64)


def test_empty_input():
    z = torch.empty(0, 3, 16)
    assert nag(z, z, 5.0, backend="triton").shape == (0, 3, 16)
    assert nag(z, z, 5.0, backend="torch").shape == (0, 3, 16)


def test_auto_backend_runs_triton_under_the_interpreter():
    from nag_kernels.ops import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_auto_backend_without_interpreter_is_torch(monkeypatch):
    from nag_kernels.ops import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA"):
        resolve_backend("triton", torch.device("cpu"))


def test_public_names():
    assert nag_kernels.nag is nag
    assert nag_kernels.nag_reference is nag_reference
    assert isinstance(nag_kernels.__version__, str)


def test_kernel_modules_do_not_shadow_public_functions():
    import nag_kernels.combine  # noqa: F401  (a submodule named like a public function would replace it)

    assert callable(nag_kernels.nag) and nag_kernels.nag is nag
