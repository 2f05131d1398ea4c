"""The compiled partial-norm kernels and the tensor-scalar path on a real GPU (skipped without CUDA, and under the
interpreter). Run with ``TRITON_INTERPRET=0 python -m pytest tests/kernels/test_partial_norm_cuda.py`` (benchmarks/gpu_suite.sh
does)."""

import os

import pytest
import torch

from nag_kernels import nag, nag_partial_norms, nag_reference, nag_with_norms

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU and the compiled (not interpreted) Triton kernel",
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("C", [123, 3072, 20000])
def test_shards_with_reduced_norms_equal_the_reference(C, norm, dtype):
    g = torch.Generator("cuda").manual_seed(C)
    z_pos = torch.randn(2, 37, C, device="cuda", dtype=dtype, generator=g)
    z_neg = torch.randn(2, 37, C, device="cuda", dtype=dtype, generator=g)
    cut = C // 3
    shards = [(z_pos[..., :cut], z_neg[..., :cut]), (z_pos[..., cut:], z_neg[..., cut:])]
    norms = sum(nag_partial_norms(p, n, 5.0, norm=norm, backend="triton") for p, n in shards)  # the all-reduce
    out = torch.cat([nag_with_norms(p, n, norms, 5.0, 1.5, 0.5, norm=norm, backend="triton") for p, n in shards], -1)
    expected = nag_reference(z_pos.double(), z_neg.double(), 5.0, 1.5, 0.5, norm=norm)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_tensor_scalars_on_cuda_eager_and_compiled():
    z_pos, z_neg = torch.randn(2, 1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda a, b, s, t, al: nag(a, b, s, t, al), fullgraph=True)
    for scale, tau, alpha in [(5.0, 2.5, 0.25), (3.0, 1.5, 0.5)]:
        scalars = [torch.tensor(v, dtype=torch.float64) for v in (scale, tau, alpha)]  # CPU, as the integration passes
        expected = nag_reference(z_pos.double(), z_neg.double(), scale, tau, alpha)
        for out in (nag(z_pos, z_neg, *scalars), compiled(z_pos, z_neg, *scalars)):
            torch.testing.assert_close(out.double(), expected, rtol=8e-3, atol=8e-3)
