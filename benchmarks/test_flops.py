"""The flops suite keeps working: counts on the meta device, CFG is exactly two plain passes, NAG exact costs more
than a plain step and less than CFG, and nothing that looks like a matmul goes uncounted."""

import json

import pytest

from benchmarks import harness as h
from benchmarks.__main__ import main

HAVE_INTEGRATION = h.integration_available()


def test_suite_counts_toy(tmp_path):
    rc = main(["flops", "--models", "flux-tiny-256", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("flops-meta-*.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["no_nag"]["status"] == "ok" and rows["no_nag"]["flops"] > 0
    assert rows["cfg"]["ratio_vs_no_nag"] == pytest.approx(2.0)
    for r in rows.values():
        assert r["status"] != "error", r
        if r["status"] == "ok":
            assert r["uncounted_ops"] == [], r["uncounted_ops"]
    if HAVE_INTEGRATION:
        assert 1.0 < rows["nag_exact"]["ratio_vs_no_nag"] < 2.0
    assert tmp_path.joinpath(path.stem + ".md").exists()
