"""The meta-device model builders live in ``meta_models/``, which tests and benchmarks both import: no file under
``tests/`` imports ``benchmarks`` (the benchmarks' own tests live in ``benchmarks/``), and ``meta_models`` imports
nothing from ``benchmarks``."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# A family being added may keep its builder in benchmarks/model_<family>.py for now (krea2, qwenimage21,
# hunyuanvideo15, kandinsky6, flux3 when this was written): its tests/test_<family>_meta.py may import it from there
# until it moves to meta_models/<family>.py. Once every builder has moved, drop this exemption.
PENDING = tuple(p.stem.removeprefix("model_") for p in (ROOT / "benchmarks").glob("model_*.py"))


def _imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_imports_benchmarks():
    pending = {f"test_{family}_meta.py" for family in PENDING}
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                 if p.name not in pending and "benchmarks" in _imported(p)]
    assert not offenders, f"import the builders from meta_models/, not benchmarks: {offenders}"


def test_meta_models_import_nothing_from_benchmarks():
    offenders = [p.name for p in sorted((ROOT / "meta_models").glob("*.py")) if "benchmarks" in _imported(p)]
    assert not offenders, offenders
