"""The docs stay true to the repository: every test they cite exists, every relative link
resolves, and nothing refers to a file outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Team notes that live outside the repository, and absolute paths of one machine. Built from
# parts so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\b" + "DESIGN" + r"\.md", r"\b" + "STYLE" + r"\.md", r"\.\./" + "shared/",
                               "/" + "work/"]))


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [REPO / line for line in out.splitlines() if line]
    return [f for f in files if f.is_file() and not f.is_symlink() and f.suffix not in (".png", ".jpg", ".whl")]


def test_docs_cite_only_tests_that_exist() -> None:
    cited = [(doc, m.group(1), m.group(2)) for doc in DOCS for m in TEST_REF.finditer(doc.read_text())]
    assert len(cited) > 20  # docs/guarantees.md names the tests of every guarantee
    missing = []
    for doc, file, name in cited:
        path = REPO / file
        defined = set()
        if path.is_file():
            defined = {n.name for n in ast.walk(ast.parse(path.read_text()))
                       if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name not in defined:
            missing.append(f"{doc.relative_to(REPO)}: {file}::{name}")
    assert not missing, "docs cite tests that do not exist:\n" + "\n".join(missing)


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for m in LINK.finditer(doc.read_text()):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_nothing_refers_to_a_path_outside_the_repository() -> None:
    hits = []
    for f in _tracked_text_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
