"""attention_with_lse: CPU paths against float64 attention written out by hand, LSE-merge of split keys against one
attention over all keys, and the CUDA paths checked on meta tensors (shapes, LSE layout, FLOP counts)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nag_kernels import nag_merge, nag_reference
from nag_kernels.attention import attention_with_lse, choose_backend
from nag_kernels.reference import merge_attention_reference

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def attention_f64(q, k, v, scale=None):
    """Independent float64 reference: explicit scores, softmax and logsumexp per head."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)
    return out, torch.logsumexp(scores, dim=-1).transpose(1, 2)


CPU_BACKENDS = ["auto", "cpu_flash", "math"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 20])
def test_matches_float64_attention(backend, dtype, D):
    B, Nq, Nk, H = 2, 9, 13, 3
    q, k, v = rand(B, Nq, H, D, dtype=dtype, seed=1), rand(B, Nk, H, D, dtype=dtype, seed=2), rand(B, Nk, H, D, dtype=dtype, seed=3)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    ref_out, ref_lse = attention_f64(q, k, v)
    assert out.shape == (B, Nq, H, D) and out.dtype == dtype and out.stride(-1) == 1
    assert lse.shape == (B, Nq, H) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    # bf16 inputs are exact in float64, and the LSE is accumulated in float32 by every path.
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float64 if dtype == torch.float64 else torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_argument(backend):
    q, k, v = rand(1, 4, 2, 8, seed=4), rand(1, 6, 2, 8, seed=5), rand(1, 6, 2, 8, seed=6)
    out, lse = attention_with_lse(q, k, v, scale=0.7, backend=backend)
    ref_out, ref_lse = attention_f64(q, k, v, scale=0.7)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_of_split_keys_equals_full_attention(backend, dtype):
    """Keys split into two disjoint, interleaved sets: the LSE merge of the parts is the attention over all keys."""
    B, Nq, Nk, H, D = 2, 7, 15, 3, 16
    q, k, v = rand(B, Nq, H, D, dtype=dtype, seed=7), rand(B, Nk, H, D, dtype=dtype, seed=8), rand(B, Nk, H, D, dtype=dtype, seed=9)
    perm = torch.randperm(Nk, generator=torch.Generator().manual_seed(10))
    a, b = perm[:6], perm[6:]
    o_a, lse_a = attention_with_lse(q, k[:, a], v[:, a], backend=backend)
    o_b, lse_b = attention_with_lse(q, k[:, b], v[:, b], backend=backend)
    merged = merge_attention_reference(o_a, lse_a, o_b, lse_b)
    full, full_lse = attention_with_lse(q, k, v, backend=backend)
    tol = TOL[dtype]
    torch.testing.assert_close(merged, full.to(merged.dtype), **tol)
    torch.testing.assert_close(torch.logaddexp(lse_a, lse_b), full_lse, **tol)
    torch.testing.assert_close(merged.double(), attention_f64(q, k, v)[0], **tol)


def test_empty_key_set_is_an_empty_part():
    q, k, v = rand(1, 5, 2, 8, seed=11), rand(1, 6, 2, 8, seed=12), rand(1, 6, 2, 8, seed=13)
    assert choose_backend(q, k[:, :0]) == "math"
    o_empty, lse_empty = attention_with_lse(q, k[:, :0], v[:, :0])
    assert (o_empty == 0).all() and torch.isneginf(lse_empty).all()
    o, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(merge_attention_reference(o, lse, o_empty, lse_empty), o)


def test_fast_mode_pipeline_equals_nag_of_full_attentions():
    """Shared image keys + per-branch text keys, merged by nag_merge, equal NAG of the two full attentions."""
    B, N_img, N_txt, H, D = 1, 6, 4, 3, 16
    q, k_img, v_img = (rand(B, N_img, H, D, seed=s) for s in (14, 15, 16))
    k_pos, v_pos, k_neg, v_neg = (rand(B, N_txt, H, D, seed=s) for s in (17, 18, 19, 20))
    o_s, l_s = attention_with_lse(q, k_img, v_img)
    o_p, l_p = attention_with_lse(q, k_pos, v_pos)
    o_n, l_n = attention_with_lse(q, k_neg, v_neg)
    out = nag_merge(o_s, l_s, o_p, l_p, o_n, l_n, 5.0, 2.5, 0.25)
    z_pos = attention_f64(q, torch.cat([k_pos, k_img], 1), torch.cat([v_pos, v_img], 1))[0]
    z_neg = attention_f64(q, torch.cat([k_neg, k_img], 1), torch.cat([v_neg, v_img], 1))[0]
    ref = nag_reference(z_pos.flatten(-2), z_neg.flatten(-2), 5.0, 2.5, 0.25).unflatten(-1, (H, D))
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


# Meta tensors: every path, including the CUDA ones that cannot run here, against its op schema and meta kernel.
META_CASES = [
    ("flash", torch.bfloat16),
    ("flash", torch.float16),
    ("efficient", torch.bfloat16),
    ("efficient", torch.float32),
    ("cudnn", torch.bfloat16),
    ("cpu_flash", torch.float32),
    ("math", torch.float32),
    ("auto", torch.bfloat16),
    ("auto", torch.float32),
]


@pytest.mark.parametrize("backend,dtype", META_CASES)
def test_meta_shapes_and_flops(backend, dtype):
    B, Nq, Nk, H, D = 2, 37, 11, 3, 64  # Nq not a multiple of 32: the efficient kernel's LSE is padded
    q = torch.empty(B, Nq, H, D, device="meta", dtype=dtype)
    k = torch.empty(B, Nk, H, D, device="meta", dtype=dtype)
    v = torch.empty(B, Nk, H, D, device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        out, lse = attention_with_lse(q, k, v, backend=backend)
    assert out.shape == (B, Nq, H, D) and out.dtype == dtype and out.stride(-1) == 1
    assert lse.shape == (B, Nq, H) and lse.dtype == torch.float32
    assert counter.get_total_flops() == 4 * B * H * Nq * Nk * D


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_cpu_flops_counted(backend):
    B, Nq, Nk, H, D = 1, 5, 7, 2, 8
    q, k, v = rand(B, Nq, H, D, seed=21), rand(B, Nk, H, D, seed=22), rand(B, Nk, H, D, seed=23)
    with FlopCounterMode(display=False) as counter:
        attention_with_lse(q, k, v, backend=backend)
    assert counter.get_total_flops() == 4 * B * H * Nq * Nk * D


def test_auto_order():
    meta = dict(device="meta")
    assert choose_backend(torch.empty(1, 4, 2, 64, dtype=torch.bfloat16, **meta), torch.empty(1, 4, 2, 64, **meta)) == "flash"
    assert choose_backend(torch.empty(1, 4, 2, 64, **meta), torch.empty(1, 4, 2, 64, **meta)) == "efficient"
    assert choose_backend(torch.empty(1, 4, 2, 20, dtype=torch.bfloat16, **meta), torch.empty(1, 4, 2, 20, **meta)) == "math"
    assert choose_backend(torch.empty(1, 4, 2, 512, dtype=torch.float16, **meta), torch.empty(1, 4, 2, 512, **meta)) == "efficient"
    assert choose_backend(torch.empty(1, 4, 2, 20), torch.empty(1, 4, 2, 20)) == "cpu_flash"


ERRORS = [
    (lambda q, k, v: attention_with_lse(q, k, v, backend="xformers"), ValueError, "backend must be one of"),
    (lambda q, k, v: attention_with_lse(q, k, v, backend="flash"), ValueError, "backend='flash' cannot run"),
    (lambda q, k, v: attention_with_lse(q.to("meta"), k.to("meta"), v.to("meta"), backend="flash"), ValueError,
     "float16/bfloat16"),
    (lambda q, k, v: attention_with_lse(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: attention_with_lse(q, k.to(torch.int64), v), TypeError, "k must be a floating-point"),
    (lambda q, k, v: attention_with_lse(q, k, v.double()), TypeError, "v must have the dtype of q"),
    (lambda q, k, v: attention_with_lse(q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: attention_with_lse(q, k, v[:, :3]), ValueError, "v must have the shape of k"),
    (lambda q, k, v: attention_with_lse(q, k[:, :, :1], v[:, :, :1]), ValueError, "k must be"),
    (lambda q, k, v: attention_with_lse(q, k, v.to("meta")), ValueError, "v must be on the device of q"),
    (lambda q, k, v: attention_with_lse(q.transpose(2, 3).contiguous().transpose(2, 3), k, v), ValueError,
     "q must be contiguous in its last dim"),
    (lambda q, k, v: attention_with_lse(q, k, v, scale="1"), TypeError, "scale must be a real number"),
    (lambda q, k, v: attention_with_lse(q, k, v, scale=float("inf")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[m for _, _, m in ERRORS])
def test_errors(call, exc, match):
    q, k, v = rand(1, 4, 2, 8), rand(1, 5, 2, 8), rand(1, 5, 2, 8)
    with pytest.raises(exc, match=match):
        call(q, k, v)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("meta", torch.bfloat16)])
def test_traces_under_torch_compile_fullgraph(device, dtype):
    """Backend choice and op calls trace without graph breaks (meta: the flash path's ops)."""
    q = rand(1, 5, 2, 64, seed=24).to(device=device, dtype=dtype)
    k = rand(1, 7, 2, 64, seed=25).to(device=device, dtype=dtype)
    compiled = torch.compile(lambda q, k: attention_with_lse(q, k, k), fullgraph=True, backend="eager")
    out, lse = compiled(q, k)
    assert out.shape == (1, 5, 2, 64) and lse.shape == (1, 5, 2)
    if device == "cpu":
        ref_out, ref_lse = attention_f64(q, k, k)
        torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
        torch.testing.assert_close(lse.double(), ref_lse, **TOL[torch.float32])
