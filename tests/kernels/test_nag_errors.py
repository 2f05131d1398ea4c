"""Bad input to nag_kernels.nag: a clear error that names the argument and what was expected."""

import math

import pytest
import torch

from nag_kernels import nag

GOOD = dict(scale=5.0, tau=2.5, alpha=0.25)


def pair(shape=(3, 16), dtype=torch.float32):
    return torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(3, 16), torch.randn(3, 17)), ValueError, r"z_neg must have the shape of z_pos \(3, 16\)"),
        (lambda: (torch.randn(3, 16), torch.randn(3, 16).half()), TypeError, "z_neg must have the dtype of z_pos"),
        (lambda: (torch.randn(3, 16), torch.randn(3, 16, device="meta")), ValueError, "z_neg must be on the device"),
        (lambda: (torch.randn(16, 3).t(), torch.randn(3, 16)), ValueError, "z_pos must be contiguous in its last dim"),
        (lambda: (torch.randn(3, 16), torch.randn(16, 3).t()), ValueError, "z_neg must be contiguous in its last dim"),
        (lambda: (torch.ones(3, 16, dtype=torch.int32),) * 2, TypeError, "z_pos must have dtype in"),
        (lambda: (torch.tensor(1.0), torch.tensor(2.0)), ValueError, "at least one dim"),
        (lambda: ([1.0], [2.0]), TypeError, "z_pos must be a torch.Tensor"),
    ],
    ids=["shape", "dtype", "device", "pos-last-dim", "neg-last-dim", "int", "0-dim", "list"],
)
def test_bad_tensors(make, exc, match, backend):
    z_pos, z_neg = make()
    with pytest.raises(exc, match=match):
        nag(z_pos, z_neg, **GOOD, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tau=0.0), ValueError, "tau must be > 0, got 0.0"),
        (dict(tau=-1.0), ValueError, "tau must be > 0"),
        (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
        (dict(scale=math.nan), ValueError, "scale must be finite, got nan"),
        (dict(scale=math.inf), ValueError, "scale must be finite"),
        (dict(tau=math.inf), ValueError, "tau must be finite"),
        (dict(alpha=math.nan), ValueError, "alpha must be finite"),
        (dict(scale="5"), TypeError, "scale must be a real number, got str"),
        (dict(norm="l3"), ValueError, r"norm must be one of \('l1', 'l2'\), got 'l3'"),
    ],
)
def test_bad_scalars(kwargs, exc, match, backend):
    z_pos, z_neg = pair()
    params = dict(GOOD, **kwargs)
    norm = params.pop("norm", "l1")
    with pytest.raises(exc, match=match):
        nag(z_pos, z_neg, params["scale"], params["tau"], params["alpha"], norm=norm, backend=backend)


def test_unknown_backend():
    z_pos, z_neg = pair()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        nag(z_pos, z_neg, 5.0, backend="cuda")


def test_float64_needs_torch_backend():
    z_pos, z_neg = pair(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton'"):
        nag(z_pos, z_neg, 5.0, backend="triton")


@pytest.mark.parametrize(
    "make_out, exc, match",
    [
        (lambda: torch.empty(3, 15), ValueError, r"out must have the shape of z_pos \(3, 16\)"),
        (lambda: torch.empty(3, 16, dtype=torch.float16), TypeError, "out must have the dtype of z_pos"),
        (lambda: torch.empty(16, 3).t(), ValueError, "out must be contiguous in its last dim"),
    ],
)
def test_bad_out(make_out, exc, match):
    z_pos, z_neg = pair()
    with pytest.raises(exc, match=match):
        nag(z_pos, z_neg, 5.0, out=make_out())
