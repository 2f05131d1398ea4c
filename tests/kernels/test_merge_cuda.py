"""Fast-mode building blocks on a real GPU: the compiled nag_merge kernel and the CUDA attention-with-LSE paths.

Skipped without CUDA and under the interpreter; run with ``TRITON_INTERPRET=0 python -m pytest tests/kernels/test_merge_cuda.py``.
"""

import os

import pytest
import torch

from nag_kernels import nag, nag_merge, nag_merge_reference
from nag_kernels.attention import attention_with_lse
from nag_kernels.reference import merge_attention_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA GPU and the compiled (not interpreted) Triton kernel",
)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def full_attention64(q, k, v):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H, D", [(24, 128), (3, 20), (40, 128)])
def test_nag_merge_matches_reference(H, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(H * D)
    B, N = 2, 300
    o = [torch.randn(B, N, H, D, device="cuda", generator=g).to(dtype) for _ in range(3)]
    lse = [torch.randn(B, H, N, device="cuda", generator=g).mul(5).transpose(1, 2) for _ in range(3)]
    lse[1][0, 7] = float("-inf")  # an empty branch part for one token
    out = nag_merge(o[0], lse[0], o[1], lse[1], o[2], lse[2], 5.0, 2.5, 0.25)
    expected = nag_merge_reference(*(t.double() for t in (o[0], lse[0], o[1], lse[1], o[2], lse[2])), 5.0, 2.5, 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_with_lse_paths_merge_to_full_attention(backend, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Nq, Na, Nb, H, D = 2, 333, 257, 77, 4, 64
    q = torch.randn(B, Nq, H, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Na + Nb, H, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Na + Nb, H, D, device="cuda", generator=g).to(dtype)
    try:
        o_a, lse_a = attention_with_lse(q, k[:, :Na], v[:, :Na], backend=backend)
        o_b, lse_b = attention_with_lse(q, k[:, Na:], v[:, Na:], backend=backend)
    except (ValueError, RuntimeError) as exc:
        if backend == "cudnn":
            pytest.skip(f"cuDNN attention unavailable here: {exc}")
        raise
    assert lse_a.shape == (B, Nq, H) and lse_a.dtype == torch.float32
    merged = merge_attention_reference(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(merged.double(), full_attention64(q, k, v), rtol=2e-2, atol=2e-2)
    # the LSE itself, against float64
    scores = torch.einsum("bqhd,bkhd->bqhk", q.double(), k[:, :Na].double()) / D**0.5
    torch.testing.assert_close(lse_a.double(), scores.logsumexp(-1), rtol=1e-3, atol=1e-2)


def test_fast_split_with_nag_merge_equals_nag_of_full_attentions():
    # image queries over [text_pos ; image] and [text_neg ; image], split as fast mode does it
    g = torch.Generator(device="cuda").manual_seed(1)
    B, N, T, H, D = 1, 1024, 128, 24, 128
    dt = torch.bfloat16
    q, k_img, v_img = (torch.randn(B, N, H, D, device="cuda", generator=g).to(dt) for _ in range(3))
    k_pos, v_pos, k_neg, v_neg = (torch.randn(B, T, H, D, device="cuda", generator=g).to(dt) for _ in range(4))
    o_s, l_s = attention_with_lse(q, k_img, v_img)
    o_p, l_p = attention_with_lse(q, k_pos, v_pos)
    o_n, l_n = attention_with_lse(q, k_neg, v_neg)
    out = nag_merge(o_s, l_s, o_p, l_p, o_n, l_n, 5.0, 2.5, 0.25)
    full_pos = full_attention64(q, torch.cat([k_pos, k_img], 1), torch.cat([v_pos, v_img], 1))
    full_neg = full_attention64(q, torch.cat([k_neg, k_img], 1), torch.cat([v_neg, v_img], 1))
    expected = nag(full_pos.flatten(-2), full_neg.flatten(-2), 5.0, backend="torch").unflatten(-1, (H, D))
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)


def test_nag_merge_compiles_on_gpu():
    o = [torch.randn(1, 64, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    lse = [torch.randn(1, 24, 64, device="cuda").transpose(1, 2) for _ in range(3)]
    args = (o[0], lse[0], o[1], lse[1], o[2], lse[2])
    torch.library.opcheck(torch.ops.nag_kernels.nag_merge.default, (*args, 5.0, 2.5, 0.25, "l1", "triton"))
    compiled = torch.compile(lambda *a: nag_merge(*a, 5.0) * 1, fullgraph=True)
    torch.testing.assert_close(compiled(*args), nag_merge(*args, 5.0), rtol=0, atol=0)


def test_auto_backend_on_hopper_is_cudnn():
    from nag_kernels.attention import choose_backend

    q = torch.randn(1, 64, 24, 128, device="cuda", dtype=torch.bfloat16)
    expected = "cudnn" if torch.cuda.get_device_capability()[0] == 9 else "flash"
    assert choose_backend(q, q) == expected
    assert choose_backend(q.float(), q.float()) == "efficient"
