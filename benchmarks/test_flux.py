"""The flux suite keeps working on a Flux-shaped toy: every variant runs (or is skipped with its reason), NAG
returns batch B, and the suite writes its files. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import flux, random_flux
from benchmarks import harness as h
from benchmarks.__main__ import main
from meta_models.flux import FLUX_TINY

CPU = torch.device("cpu")

HAVE_INTEGRATION = h.integration_available()


@pytest.fixture(scope="module")
def toy():
    model = random_flux.transformer(FLUX_TINY, CPU, torch.float32)
    inputs = flux.make_inputs(FLUX_TINY, 64, 8, 1, 2, torch.float32, CPU)
    return model, inputs


@pytest.mark.parametrize("variant", ["no_nag", "cfg", "nag_exact_torch"])
def test_step(benchmark, toy, variant):
    if variant.startswith("nag") and not HAVE_INTEGRATION:
        pytest.skip("the Flux integration is not available")
    model, inputs = toy
    with torch.no_grad(), flux.nag_applied(model, variant, CPU):
        fn = flux.step_fn(model, variant, inputs, 1)
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (1, 16, FLUX_TINY["in_channels"]) and torch.isfinite(out).all()
        benchmark.pedantic(fn, rounds=2, iterations=1)


def test_random_weights_built_in_place():
    model = random_flux.transformer(FLUX_TINY, CPU, torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in params.values())
    assert all(torch.isfinite(p).all() for p in params.values())
    w = params["transformer_blocks.0.attn.to_q.weight"].float()
    assert 0.5 < w.std().item() * w.shape[1] ** 0.5 < 2.0


@pytest.mark.skipif(not HAVE_INTEGRATION, reason="the Flux integration is not available")
@pytest.mark.slow  # a whole suite run
def test_suite_writes_files(tmp_path):
    rc = main(["flux", "--device", "cpu", "--quick", "--resolutions", "32", "--reps", "1",
               "--variants", "no_nag,cfg,nag_exact_torch,nag_exact_triton,nag_fast", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("flux-*.json")
    doc = json.loads(path.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert doc["finished"] and set(rows) == set(flux.VARIANTS)
    for v in ("no_nag", "cfg", "nag_exact_torch"):
        assert rows[v]["status"] == "ok", rows[v]
        assert rows[v]["output_shape"][0] == 1 and rows[v]["median_ms"] > 0
    assert rows["no_nag"]["overhead_vs_no_nag"] == 0
    assert rows["nag_fast"]["status"] == "ok", rows["nag_fast"]
    # interpreted Triton runs, or the row says why it cannot here
    assert rows["nag_exact_triton"]["status"] in ("ok", "skipped"), rows["nag_exact_triton"]
    assert tmp_path.joinpath(path.stem + ".md").exists()


def test_integration_found_from_a_bare_checkout():
    """The GPU machine imports nag_kernels from the repo root (PYTHONPATH), with no installed package mapping
    integrations/ to nag_kernels.integrations: the harness must still find it."""
    pytest.importorskip("diffusers")
    root = str(h.REPO_ROOT)
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()];"
        f"sys.path.insert(0, {root!r});"
        "import nag_kernels; assert nag_kernels.__file__.startswith(" + repr(root) + "), nag_kernels.__file__;"
        "from benchmarks import harness as h; m = h.import_integrations(); print(m.__file__); m.apply_nag"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("integrations/__init__.py")


def test_targets_compare_fast_mode_with_the_plain_step_per_mode():
    def row(mode, variant, ms, status="ok", resolution=1024):
        return dict(config="FLUX.1", resolution=resolution, mode=mode, variant=variant, status=status, median_ms=ms)

    rows = [row("eager", "no_nag", 100.0), row("eager", "nag_fast", 119.0), row("eager", "cfg", 300.0),
            row("compiled", "no_nag", 80.0), row("compiled", "nag_fast", 97.0),
            row("eager", "nag_fast", 10.0, resolution=2048), row("eager", "no_nag", 100.0, resolution=2048)]
    got = {t["mode"]: t for t in flux.evaluate_targets(rows, "cuda")}
    assert set(got) == {"eager", "compiled"}
    assert got["eager"]["verdict"] == "PASS" and got["eager"]["value"] == pytest.approx(1.19)
    assert got["compiled"]["verdict"] == "FAIL" and got["compiled"]["value"] == pytest.approx(97 / 80)
    rows[1]["status"] = "error"  # a failed fast-mode row is not a pass
    assert flux.evaluate_targets(rows, "cuda")[0]["verdict"] == "n/a"
    assert "not measured" in flux.target_lines(flux.evaluate_targets(rows, "cuda"))[0]
    assert flux.evaluate_targets(rows, "cpu") == []  # CPU figures say nothing about the GPU target
    assert "## Targets" in flux.markdown([], flux.evaluate_targets(rows, "cuda"))
