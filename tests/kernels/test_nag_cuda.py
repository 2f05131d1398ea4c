"""The compiled Triton kernel on a real GPU (skipped without CUDA, and under the interpreter).

Run on a GPU machine with ``TRITON_INTERPRET=0 python -m pytest tests/kernels/test_nag_cuda.py``. Tolerances are tighter
than on CPU: compiled stores round to nearest, so bf16 is within 1 ulp of the rounded float64 reference.
"""

import os

import pytest
import torch

from nag_kernels import nag, nag_reference
from nag_kernels.combine import MAX_BLOCK_C

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU and the compiled (not interpreted) Triton kernel",
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check(out, z_pos, z_neg, *args, **kwargs):
    expected = nag_reference(z_pos.double(), z_neg.double(), *args, **kwargs)
    tol = TOL[out.dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("C", [123, 3072, 20000])
def test_matches_reference(C, norm, dtype):
    run_case(C, norm, dtype)


@pytest.mark.parametrize("C", [1, 640, 2432, 5120, MAX_BLOCK_C, 16384])
def test_model_widths_bf16(C):
    run_case(C, "l1", torch.bfloat16)


def run_case(C, norm, dtype):
    g = torch.Generator(device="cuda").manual_seed(C)
    z_pos = torch.randn(3, 129, C, device="cuda", generator=g).to(dtype)
    z_neg = torch.randn(3, 129, C, device="cuda", generator=g).to(dtype)
    check(nag(z_pos, z_neg, 5.0, 2.5, 0.25, norm=norm), z_pos, z_neg, 5.0, 2.5, 0.25, norm=norm)


def test_strided_and_in_place():
    hidden = torch.randn(2, 512 + 4096, 3072, device="cuda", dtype=torch.bfloat16)
    z_neg = torch.randn(2, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    z_pos = hidden[:, 512:]
    expected_in = z_pos.clone()
    check(nag(z_pos, z_neg, 5.0), expected_in, z_neg, 5.0)
    nag(z_pos, z_neg, 5.0, out=z_pos)
    check(hidden[:, 512:], expected_in, z_neg, 5.0)


def test_semantics_on_gpu():
    z_pos = torch.randn(4, 3072, device="cuda", dtype=torch.float16) + 40
    z_neg = torch.randn(4, 3072, device="cuda", dtype=torch.float16) - 30
    z_pos[1] = 0
    z_neg[1] = 0
    z_pos[2, 7] = float("nan")
    out = nag(z_pos, z_neg, 3.0)
    assert torch.equal(out.isnan().any(-1).cpu(), torch.tensor([False, False, True, False]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check(out, z_pos, z_neg, 3.0)


def test_more_than_2_31_elements():
    # 700_000 rows x 3072 = 2.15e9 elements > 2**31: row offsets must be int64. ~13 GB of bf16 in all.
    rows, C = 700_000, 3072
    assert rows * C > 2**31
    z_pos = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16)
    z_neg = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16)
    out = nag(z_pos, z_neg, 5.0)
    for sl in (slice(0, 1000), slice(rows - 1000, rows)):
        check(out[sl], z_pos[sl], z_neg[sl], 5.0)


def test_torch_compile_and_opcheck_on_gpu():
    z_pos = torch.randn(2, 256, 3072, device="cuda", dtype=torch.bfloat16)
    z_neg = torch.randn(2, 256, 3072, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nag_kernels.nag.default, (z_pos, z_neg, 5.0, 2.5, 0.25, "l1", "triton"))
    compiled = torch.compile(lambda a, b: nag(a, b, 5.0) * 1, fullgraph=True)
    check(compiled(z_pos, z_neg), z_pos, z_neg, 5.0)
