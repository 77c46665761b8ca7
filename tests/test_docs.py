"""The README is the front page: it starts with the two commands a newcomer types (install + demo, then the tests),
and every relative link in it and in docs/ resolves to a file inside the repository (anchors to a heading)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
QUICK_START = ['python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-cpu.txt -e ".[dev]" '
               '&& unitok demo', "python -m pytest -q tests"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


def test_readme_begins_with_the_two_quick_start_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash)?\n(.*?)```", text, re.S)
    assert first_block is not None
    assert first_block.group(1).strip().splitlines() == QUICK_START


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{target} leaves the repository")
        elif not resolved.exists():
            broken.append(f"{target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.name}: {broken}"
