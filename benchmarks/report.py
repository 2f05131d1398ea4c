"""Render the markdown tables of finished (or cut-short) runs from their JSON files.

``python -m benchmarks.report FILE.json [...]`` prints each run's table (and the kernel and flux targets) and rewrites the
``.md`` beside the JSON. ``gpu_suite.sh`` ends with it, so the tables are printed last even when a phase ran out of
time and was stopped before writing its own table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(path: Path) -> str:
    from . import flops, flux, kernel, quality
    from . import harness as h

    doc = json.loads(path.read_text())
    suite, rows, env = doc["suite"], doc["rows"], doc["environment"]
    if suite == "kernel":
        import torch

        targets = kernel.evaluate_targets(rows, torch.device(env["device_type"]))
        body = kernel.markdown(rows, targets)
    elif suite == "flux":
        flux.add_overheads(rows)
        body = flux.markdown(rows, flux.evaluate_targets(rows, env["device_type"]))
    elif suite == "flops":
        flops.add_ratios(rows)
        body = flops.markdown(rows)
    elif suite == "quality":
        body = quality.markdown(rows, quality.summarize(rows), doc)
    else:
        raise ValueError(f"{path}: unknown suite {suite!r}")
    head = h.markdown_head(doc, path.name)
    return head + body


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    status = 0
    for name in argv:
        path = Path(name)
        try:
            text = render(path)
        except Exception as exc:  # one unreadable file must not hide the others
            print(f"{path}: cannot render ({type(exc).__name__}: {exc})")
            status = 1
            continue
        path.with_suffix(".md").write_text(text)
        print("\n" + text, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
