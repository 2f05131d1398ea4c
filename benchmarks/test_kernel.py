"""The kernel suite keeps working: every provider runs under pytest-benchmark on tiny CPU shapes, the suite writes
its files, and the figures it derives (GB/s, speedups, targets) are computed as documented. No timing is asserted."""

import json

import pytest
import torch

from benchmarks import harness as h
from benchmarks import kernel
from benchmarks.configs import KERNEL_SHAPES
from benchmarks.__main__ import main
from nag_kernels.reference import nag_reference

CPU = torch.device("cpu")


def triton_ok() -> bool:
    from nag_kernels.ops import triton_runs_on

    return triton_runs_on(CPU)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("provider", ["torch", "authors", "torch_backend", "torch_compile", "triton", "triton_inplace"])
def test_provider(benchmark, provider, norm):
    if provider.startswith("triton") and not triton_ok():
        pytest.skip("Triton cannot run here")
    if provider == "torch_compile" and norm == "l2":
        pytest.skip("one compile is enough to keep the provider working (CPU compiles are slow)")
    z_pos, z_neg = kernel.make_inputs((2, 37, 200), torch.float32, CPU)
    expected = nag_reference(z_pos, z_neg, **kernel.PARAMS, norm=norm)
    zp = z_pos.clone()
    fn = kernel.make_provider(provider, zp, z_neg, norm, CPU)
    first = fn()
    torch.testing.assert_close(zp if provider == "triton_inplace" else first, expected, rtol=1e-5, atol=1e-5)
    benchmark.pedantic(fn, rounds=3, iterations=1)


def test_suite_writes_files(tmp_path):
    providers = "torch,authors" + (",triton_inplace" if triton_ok() else "")
    rc = main(["kernel", "--device", "cpu", "--quick", "--shapes", "tiny-odd", "--dtypes", "fp32,bf16", "--norms", "l1",
               "--providers", providers, "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("kernel-*.json")
    doc = json.loads(path.read_text())
    assert doc["finished"] and doc["environment"]["torch"] == torch.__version__
    rows = doc["rows"]
    assert len(rows) == 2 * len(providers.split(","))
    for r in rows:
        assert r["status"] == "ok", r
        assert r["bytes"] == 3 * 2 * 37 * 200 * (4 if r["dtype"] == "fp32" else 2)
        assert r["gbps"] > 0 and r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["x_torch"] > 0 and r["x_authors"] > 0 and r["x_torch_compile"] is None
        assert r["device"] and r["timestamp"] and r["peak_extra_bytes"] is None  # no CPU allocator stats
        assert r["max_rel_err"] < (1e-5 if r["dtype"] == "fp32" else 2e-2)
    assert tmp_path.joinpath(path.stem + ".md").exists()


def test_presets_and_targets():
    class Args:
        quick, preset, shapes, dtypes, norms = None, None, None, None, None

    quick = kernel.cases(Args, CPU)
    assert ("flux-1024-b1", "fp32", "l1") in quick  # the CPU backend target's case is in the CPU default
    suite = kernel.PRESETS["gpu-suite"]
    assert ("flux-1024-b1", "bf16", "l1") in suite and ("flux-2048-b2", "bf16", "l1") in suite
    full = kernel.cases(type("A", (Args,), {"preset": "full"}), CPU)
    assert len(full) == len(KERNEL_SHAPES) * 3 * 2
    named = {"wan14b-720p": (1, 75600, 5120), "sdxl-1024": (2, 4096, 640), "sdxl-1024-1280ch": (2, 1024, 1280),
             "sd35l-1024": (2, 4096, 2432), "qwen-image-1328": (1, 6889, 3072), "wan14b-480p": (1, 32760, 5120)}
    for name, shape in named.items():
        assert KERNEL_SHAPES[name].shape == shape and (name, "bf16", "l1") in full and (name, "bf16", "l1") in suite
    assert {c[0] for c in quick} == {"flux-1024-b1", "sdxl-1024"}  # a CPU run keeps small shapes

    rows = [dict(shape_name="flux-1024-b1", dtype="fp32", norm="l1", provider="torch_backend", status="ok",
                 x_authors=2.5)]
    (t,) = kernel.evaluate_targets(rows, CPU)
    assert t["verdict"] == "PASS"
    rows[0]["x_authors"] = 1.5
    assert kernel.evaluate_targets(rows, CPU)[0]["verdict"] == "FAIL"
    gpu = kernel.evaluate_targets([], torch.device("cuda"))
    assert len(gpu) == 6 and all(t["verdict"] == "n/a" for t in gpu)


def test_harness_helpers():
    assert h.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    s = h.time_cpu(lambda: None, warmup=0, min_reps=4, max_reps=4)
    assert s["reps"] == 4 and s["q20_ms"] <= s["median_ms"] <= s["q80_ms"]
    assert h.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    _, err = h.guarded(lambda: 1 / 0, CPU)
    assert err["status"] == "error" and "ZeroDivisionError" in err["error"]
    _, err = h.guarded(lambda: (_ for _ in ()).throw(h.Skip("why")), CPU)
    assert err == {"status": "skipped", "reason": "why"}
