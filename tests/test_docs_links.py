"""Every link in the project's documents points at something that exists: markdown links to files and folders of the
repository, and the repository paths the documents name in backticks (result files, modules, tests)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A backticked repository path: starts with one of the project's folders (or ../ from docs/), names a file type.
PATH = re.compile(r"`((?:\.\./)*(?:nag_kernels|integrations|benchmarks|tests|docs)/[^`\s]*\.(?:py|md|json|sh|png))`")
TOP = ("nag_kernels", "integrations", "benchmarks", "tests", "docs")


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
