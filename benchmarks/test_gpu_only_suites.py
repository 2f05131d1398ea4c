"""The suites folded in from standalone scripts: profile runs its CPU form; overhead and sweep say on a CPU that
they need CUDA (exit status 3, nothing written) and render their tables from rows like a GPU run's; the report
renders every suite's JSON. No timing is asserted."""

import json

import pytest
import torch

from benchmarks import harness as h
from benchmarks import launch_sweep, overhead, report
from benchmarks.__main__ import NEEDS_CUDA_STATUS, main, parser
from benchmarks.suites import SUITES

HAVE_INTEGRATION = h.integration_available()


def test_help_lists_every_suite(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in SUITES:
        assert f"\n  {name} " in text, name
    assert "--top" in text and "--shapes" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cuda_only_suite_says_so_on_cpu(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path)]) == NEEDS_CUDA_STATUS
    assert "the sweep suite needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available() or not HAVE_INTEGRATION, reason="checks the CPU form")
def test_overhead_on_cpu_measures_the_integration_only(tmp_path, monkeypatch):
    from benchmarks import integration_overhead

    monkeypatch.setattr(integration_overhead.host_us, "__defaults__", (1, 2))  # 1 run of 2 calls: no timing asserted
    assert main(["overhead", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("overhead-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["part"] == "integration" and r["status"] == "ok" for r in rows), rows
    assert "(The combine-call part needs a CUDA GPU.)" in report.render(path)


@pytest.mark.skipif(not HAVE_INTEGRATION, reason="the diffusers integration is not available")
def test_profile_cpu_form_writes_files(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy's ops are too small for two threads
    try:
        rc = main(["profile", "--device", "cpu", "--quick", "--resolutions", "32", "--variants", "no_nag,nag_fast",
                   "--top", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (path,) = tmp_path.glob("profile-*.json")
    doc = json.loads(path.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"no_nag", "nag_fast"} and doc["finished"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert 0 < len(r["top"]) <= 3 and r["total_ms"] > 0 and r["timed"] == "self CPU time"
    assert rows["nag_fast"]["attention_with_lse"]  # fast mode's split attention goes through attention_with_lse
    assert "## flux-tiny 32^2 `nag_fast`" in report.render(path)


def _doc(suite, rows):
    env = h.environment(torch.device("cpu"))
    env.update(device="NVIDIA test card", device_type="cuda")
    for r in rows:
        r.setdefault("status", "ok")
        r.setdefault("device", env["device"])
    return {"suite": suite, "environment": env, "command": "test", "rows": rows}


def test_overhead_table_and_plot(tmp_path):
    base = dict(shape_name="flux-1024-b1", shape=[1, 4096, 3072], dtype="bf16", norm="l1")
    rows = [dict(base, call="nag", device_us=19.0, host_us=47.0, device_gbps=3900.0, share_of_copy=0.97),
            dict(base, call="copy", device_us=12.0, host_us=6.0, device_gbps=4000.0, share_of_copy=1.0),
            dict(base, call="torch_compile", status="error", error="RuntimeError: x")]
    text = overhead.table(_doc("overhead", rows))
    assert "| flux-1024-b1 (1, 4096, 3072) | bf16 | l1 | `nag` | 19.0 | 3900 | 97% | 47.0 |" in text
    assert "error: RuntimeError: x" in text and "- `raw_launch`:" in text
    if h.try_matplotlib():
        assert overhead.plot(rows, tmp_path / "o.png") and (tmp_path / "o.png").stat().st_size > 0


def test_sweep_table_sets_the_heuristic_next_to_the_best():
    base = dict(shape_name="sdxl-1024", shape=[2, 4096, 640], dtype="bf16", norm="l1")
    rows = [dict(base, setting={"chunked": False, "BLOCK_C": 1024, "ROWS": 2, "num_warps": 4}, heuristic=True,
                 median_ms=0.010, gbps=3000.0),
            dict(base, setting={"chunked": False, "BLOCK_C": 1024, "ROWS": 4, "num_warps": 8}, heuristic=False,
                 median_ms=0.008, gbps=3700.0, best=True),
            dict(base, setting={"chunked": True, "BLOCK_C": 4096, "ROWS": 1, "num_warps": 16}, heuristic=False,
                 status="error", error="OutOfResources")]
    text = launch_sweep.table(_doc("sweep", rows))
    assert "rows BLOCK_C=1024 ROWS=2 warps=4 | 10.0 | rows BLOCK_C=1024 ROWS=4 warps=8 | 8.0 | 1.25x |" in text
    assert "error: OutOfResources" in text


def test_report_refuses_an_unknown_suite(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_doc("nonsense", [])))
    assert report.main([str(path)]) == 1


def test_report_prints_every_target_last(tmp_path, capsys):
    # the committed H200 runs, copied: the report rewrites the markdown beside each JSON
    run = h.REPO_ROOT / "benchmarks" / "results" / "h200-20261127-run2"
    paths = []
    for src in sorted(run.glob("*.json")):
        paths.append(tmp_path / src.name)
        paths[-1].write_text(src.read_text())
    assert report.main([str(p) for p in paths]) == 0
    tail = capsys.readouterr().out.rstrip().splitlines()[-8:]  # flux's target per mode, then the kernel's six
    assert [line.split(" ", 1)[0] for line in tail] == ["FAIL", "FAIL"] + ["FAIL", "PASS"] * 3, tail
    assert "fast-mode step-time target" in tail[0] and "kernel bandwidth target" in tail[2]
