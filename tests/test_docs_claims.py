"""What docs/ says about the test suite matches the suite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _strict_xfails() -> list[str]:
    found = []
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name == Path(__file__).name:
            continue
        found += [f"{path.name}: {m}" for m in re.findall(r"xfail\([^)]*strict\s*=\s*True",
                                                          path.read_text())]
    return found


def test_reliability_doc_mentions_open_bugs_only_while_xfails_mark_them():
    text = (ROOT / "docs" / "reliability.md").read_text()
    open_bug_claims = re.findall(r"(?:see the \w+ bug below|known bugs below|each such gap "
                                 r"is a strict `xfail`)", text)
    if not _strict_xfails():
        assert open_bug_claims == []
