"""NAG scalars given as 0-dim tensors, and backend="auto" choosing by dtype (float64 runs on PyTorch)."""

import math

import pytest
import torch

from nag_kernels import nag, nag_merge, nag_merge_reference, nag_reference
from nag_kernels.ops import validate_backend


def pair(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 20, generator=g).to(dtype), torch.randn(3, 20, generator=g).to(dtype)


def merge_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    o = [torch.randn(1, 4, 2, 8, generator=g).to(dtype) for _ in range(3)]
    lse = [torch.randn(1, 4, 2, generator=g).to(lse_dtype) for _ in range(3)]
    return [o[0], lse[0], o[1], lse[1], o[2], lse[2]]


@pytest.mark.parametrize(
    "make",
    [
        lambda v: torch.tensor(v),
        lambda v: torch.tensor(v, dtype=torch.float64),
        lambda v: torch.tensor(v, dtype=torch.bfloat16),  # 5.0, 2.5, 0.25 are exact in bf16
        lambda v: torch.tensor(v, requires_grad=True),
    ],
    ids=["float32", "float64", "bfloat16", "requires_grad"],
)
def test_nag_scalar_tensors_match_the_op_and_floats(make):
    z_pos, z_neg = pair()
    scalars = [make(v) for v in (5.0, 2.5, 0.25)]
    out = nag(z_pos, z_neg, *scalars)
    torch.testing.assert_close(out, torch.ops.nag_kernels.nag(z_pos, z_neg, *[t.detach() for t in scalars]))
    torch.testing.assert_close(out.double(), nag_reference(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25))


def test_integer_scalar_tensor_and_keyword_use():
    z_pos, z_neg = pair()
    out = nag(z_pos, z_neg, torch.tensor(3), tau=torch.tensor(2), alpha=torch.tensor(1))
    torch.testing.assert_close(out.double(), nag_reference(z_pos.double(), z_neg.double(), 3, 2, 1))


def test_nag_merge_scalar_tensors():
    args = merge_args()
    out = nag_merge(*args, torch.tensor(5.0), torch.tensor(2.5), alpha=torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(out, torch.ops.nag_kernels.nag_merge(*args, torch.tensor(5.0), 2.5, 0.25))
    expected = nag_merge_reference(*[a.double() for a in args], 5.0, 2.5, 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", ["nag", "nag_merge"])
@pytest.mark.parametrize(
    "name, value, exc, match",
    [
        ("scale", torch.tensor(math.nan), ValueError, "scale must be finite, got nan"),
        ("tau", torch.tensor(0.0), ValueError, "tau must be > 0, got 0.0"),
        ("alpha", torch.tensor(2.0), ValueError, r"alpha must be in \[0, 1\], got 2.0"),
        ("scale", torch.tensor([5.0]), ValueError, r"scale must be a real number or a 0-dim tensor, got .* \(1,\)"),
        ("tau", torch.tensor(True), TypeError, "tau must be a real number or a 0-dim real tensor, got .*torch.bool"),
        ("alpha", torch.tensor(0.5 + 0j), TypeError, "alpha must be a real number or a 0-dim real tensor"),
    ],
)
def test_bad_scalar_tensors(fn, name, value, exc, match):
    scalars = {"scale": 5.0, "tau": 2.5, "alpha": 0.25, name: value}
    with pytest.raises(exc, match=match):
        if fn == "nag":
            nag(*pair(), **scalars)
        else:
            nag_merge(*merge_args(), **scalars)


def test_nan_tensor_raises_like_the_nan_float():
    z_pos, z_neg = pair()
    with pytest.raises(ValueError) as from_float:
        nag(z_pos, z_neg, math.nan)
    with pytest.raises(ValueError) as from_tensor:
        nag(z_pos, z_neg, torch.tensor(math.nan))
    assert str(from_tensor.value) == str(from_float.value)


def test_auto_backend_picks_torch_for_float64():
    z64 = torch.zeros(2, 4, dtype=torch.float64)
    assert validate_backend("z_pos", z64, "auto") == "torch"
    assert validate_backend("z_pos", z64.float(), "auto") == "triton"  # CPU under TRITON_INTERPRET=1
    with pytest.raises(TypeError, match="z_pos must be float32, float16 or bfloat16 for backend='triton'"):
        validate_backend("z_pos", z64, "triton")


def test_nag_float64_auto():
    z_pos, z_neg = pair(torch.float64)
    out = nag(z_pos, z_neg, 5.0, backend="auto")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, nag_reference(z_pos, z_neg, 5.0), rtol=1e-12, atol=1e-12)
    out = torch.ops.nag_kernels.nag(z_pos, z_neg, 5.0, 2.5, 0.25)  # through the op: same choice
    torch.testing.assert_close(out, nag_reference(z_pos, z_neg, 5.0), rtol=1e-12, atol=1e-12)


def test_nag_merge_float64_auto():
    args = merge_args(torch.float64)
    expected = nag_merge_reference(*args, 5.0)
    torch.testing.assert_close(nag_merge(*args, 5.0), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="o_pos must be float32, float16 or bfloat16 for backend='triton'"):
        nag_merge(*args, 5.0, backend="triton")
