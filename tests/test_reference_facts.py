"""The code's citations of reference behaviour point into docs/reference_facts.md: every cited fact id exists
there, and no file cites a path a user's clone does not have (the team's ../shared/ notes) or a section of a
README that is not ours."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "docs" / "reference_facts.md"
CITATION = re.compile(r"docs/reference_facts\.md#(F-[A-Za-z0-9-]+)")
UNREACHABLE = re.compile(r"/work/shared|\.\./shared/|shared/reference|README §")


def code_files() -> list[Path]:
    """Every Python file of the repository: the top level and every folder (scoring/, report/, formats/, ...)."""
    skip = {".venv", ".git", "fixtures"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def test_every_cited_fact_exists_in_the_facts_file() -> None:
    anchors = re.findall(r'<a id="(F-[A-Za-z0-9-]+)"></a>', FACTS.read_text())
    assert len(anchors) == len(set(anchors)), "duplicate fact ids"
    cited = {(p.name, m) for p in code_files() for m in CITATION.findall(p.read_text())}
    assert cited, "no file cites docs/reference_facts.md"
    assert {m for _, m in cited} <= set(anchors), sorted((f, m) for f, m in cited if m not in anchors)


def test_no_code_cites_a_path_or_section_users_do_not_have() -> None:
    here = Path(__file__).name
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in code_files()
        if p.name != here
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if UNREACHABLE.search(line)
    ]
    assert not found, "\n".join(found)
