"""Every link in the project's documents points at something that exists: markdown links to files and folders of the
repository, and the repository paths the documents name in backticks (result files, modules, tests)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A backticked repository path: starts with one of the project's folders (or ../ from docs/), names a file type.
TOP = ("nag_kernels", "integrations", "benchmarks", "meta_models", "tests", "docs")
PATH = re.compile(r"`((?:\.\./)*(?:" + "|".join(TOP) + r")/[^`\s]*\.(?:py|md|json|sh|png))`")


def _links(document: pathlib.Path):
    text = document.read_text()
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            yield target.split("#")[0]


def _paths(document: pathlib.Path):
    for path in PATH.findall(document.read_text()):
        if not any(c in path for c in "<*{"):
            yield path


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(document):
    missing = [t for t in _links(document) if not (document.parent / t).exists()]
    assert not missing, f"{document.relative_to(ROOT)} links to missing {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(document):
    missing = []
    for path in _paths(document):
        # Relative to the document or to the repository root (both spellings are used).
        if not ((document.parent / path).exists() or (ROOT / path.lstrip("./")).exists()):
            missing.append(path)
    assert not missing, f"{document.relative_to(ROOT)} names missing paths {missing}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 230


RESULTS = ROOT / "benchmarks" / "results"
# A result the documents cite: a backticked path or a link target with ``results/`` in it (a file, a glob, a folder).
CITED_RESULT = re.compile(r"(?:`|\]\()([^`()\s]*results/[^`()\s]*)")


def _committed_results() -> list[pathlib.Path]:
    """The files under benchmarks/results/ in git's index (a clean clone: the files on disk)."""
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", str(RESULTS)], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in RESULTS.rglob("*") if p.is_file())
    return sorted(ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file())


def _cited_results() -> set[pathlib.Path]:
    """What the documents cite under benchmarks/results/: each cited file with the JSON and PNG of the same run beside
    it (a markdown table's raw figures and plot), and every file of a cited run folder (a folder cited, or a file in
    one: the run's log, README and raw files go with its tables)."""
    cited = set()
    for document in DOCUMENTS:
        for ref in CITED_RESULT.findall(document.read_text()):
            rel = ref.split("results/", 1)[1].rstrip("/")
            if not rel:  # the folder itself ("results go to benchmarks/results/"): not a citation of its files
                continue
            for hit in RESULTS.glob(rel):
                run = hit if hit.is_dir() else hit.parent
                if run != RESULTS:
                    cited.update(p for p in run.rglob("*") if p.is_file())
                else:
                    cited.update(hit.with_suffix(s) for s in ("", ".md", ".json", ".png"))
    return cited


def test_every_committed_result_is_cited_by_a_document():
    cited = _cited_results()
    uncited = [str(p.relative_to(ROOT)) for p in _committed_results() if p not in cited]
    assert not uncited, f"results no document cites (cite them, or git rm them): {uncited}"
