"""On a real GPU: the gradient of the log-sum-exp through the CUDA attention kernels, the compiled kernels at
``scale = 1`` (NAG off: ``z_pos`` exactly), and ``out=`` overlapping an input, with the compiled Triton kernels.

The CPU suite checks these on the CPU kernels, the Triton interpreter and meta tensors; this file is what only a GPU
can run. Skipped without CUDA and under the interpreter (``TRITON_INTERPRET=0 python -m pytest`` on a GPU).
"""

import os

import pytest
import torch

from nag_kernels import nag, nag_merge, nag_reference
from nag_kernels.attention import attention_with_lse
from nag_kernels.reference import merge_attention_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU and the compiled (not interpreted) Triton kernels",
)


def _qkv(dtype, B=2, N=96, M=80, H=4, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, device="cuda", generator=g).to(dtype) for n in (N, M, M))
    return [x.requires_grad_(True) for x in (q, k, v)]


def _loss(out, lse):
    weights = torch.linspace(-1, 1, lse.numel(), device=lse.device).view_as(lse)
    return out.float().square().mean() + (lse.float() * weights).sum()


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_gradient_through_each_cuda_kernel_equals_the_math_path(backend, dtype):
    q, k, v = _qkv(dtype)
    try:
        out, lse = attention_with_lse(q, k, v, backend=backend)
    except ValueError as err:  # the kernel cannot run these inputs on this card / build: say so
        pytest.skip(str(err))
    got = torch.autograd.grad(_loss(out, lse), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    expected = torch.autograd.grad(_loss(*attention_with_lse(q64, k64, v64, backend="math")), (q64, k64, v64))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_one_returns_z_pos_exactly_on_the_compiled_kernels(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    z_pos, z_neg = (torch.randn(3, 77, 3072, device="cuda", generator=g).to(dtype) for _ in range(2))
    assert torch.equal(nag(z_pos, z_neg, 1.0, tau=0.5, alpha=0.9), z_pos)
    o = [torch.randn(2, 50, 8, 64, device="cuda", generator=g).to(dtype) for _ in range(3)]
    lse = [torch.randn(2, 50, 8, device="cuda", generator=g) for _ in range(3)]
    merged_off = nag_merge(o[0], lse[0], o[1], lse[1], o[2], lse[2], 1.0, 0.5, 0.9)
    positive = merge_attention_reference(o[0].double(), lse[0].double(), o[1].double(), lse[1].double())
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(merged_off.double(), positive, rtol=tol, atol=tol)  # the positive branch alone


def test_out_overlapping_an_input_gives_the_reference_result():
    g = torch.Generator(device="cuda").manual_seed(2)
    buffer = torch.randn(1, 65, 3072, device="cuda", generator=g, dtype=torch.bfloat16)
    z_pos, z_neg = buffer[:, :64], torch.randn(1, 64, 3072, device="cuda", generator=g, dtype=torch.bfloat16)
    expected = nag_reference(z_pos.double(), z_neg.double(), 5.0, 2.5, 0.25)
    out = buffer[:, 1:]  # shifted by one token: partially overlaps z_pos
    nag(z_pos, z_neg, 5.0, tau=2.5, alpha=0.25, out=out, backend="triton")
    torch.testing.assert_close(out.double(), expected, rtol=1.6e-2, atol=1.6e-2)
