"""The repository documents itself: README.md, docs/ and the code point to nothing outside it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Written in pieces, so that this file does not match itself.
OUTSIDE = [".." + "/shared", "/work" + "/", "DESIGN" + ".md", "RAY" + "_NOTES", "paper" + ".md"]
LINK = re.compile(r"\]\(([^)#\s]+)")  # markdown links: [text](target)


def _documents() -> list[Path]:
    skip = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache"}
    code = [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(code)]


def test_docs_exist_and_the_readme_links_them():
    readme = (REPO / "README.md").read_text()
    for page in ("design.md", "cli.md", "ray.md"):
        assert (REPO / "docs" / page).is_file()
        assert f"(docs/{page})" in readme


def test_nothing_points_outside_the_repository():
    found = []
    for path in _documents():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            found += [f"{path.relative_to(REPO)}:{number}: {needle}" for needle in OUTSIDE if needle in line]
    assert found == [], "\n".join(found)


def test_relative_links_resolve_inside_the_repository():
    for page in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{page.relative_to(REPO)}: {target}"
