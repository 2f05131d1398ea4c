"""Render the markdown tables of finished (or cut-short) runs from their JSON files.

``python -m benchmarks.report FILE.json [...]`` prints each run's table (with its targets, for the suites that have
them) and rewrites the ``.md`` beside the JSON, then the targets' PASS/FAIL lines of every run (a suite's
``summary(doc)``, recomputed from the rows), so the end of the output holds them. ``gpu_suite.sh`` ends with it, so the
tables and targets are printed last even when a phase ran out of time and was stopped before writing its own table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(path: Path) -> str:
    from . import harness as h
    from . import suites

    doc = json.loads(path.read_text())
    if doc.get("suite") not in suites.SUITES:
        raise ValueError(f"{path}: unknown suite {doc.get('suite')!r}")
    return h.markdown_head(doc, path.name) + suites.module(doc["suite"]).table(doc)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from . import suites

    status, summary = 0, []
    for name in argv:
        path = Path(name)
        try:
            text = render(path)
            doc = json.loads(path.read_text())
            summary += getattr(suites.module(doc["suite"]), "summary", lambda doc: [])(doc)
        except Exception as exc:  # one unreadable file must not hide the others
            print(f"{path}: cannot render ({type(exc).__name__}: {exc})")
            status = 1
            continue
        path.with_suffix(".md").write_text(text)
        print("\n" + text, flush=True)
    if summary:
        print("\n" + "\n".join(summary), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
