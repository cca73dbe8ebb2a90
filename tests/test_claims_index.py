"""The claims index (tests/README.md) names only tests that exist (tools/check_claims.py)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_claims  # noqa: E402


def test_every_test_named_in_the_claims_index_exists():
    problems, rows, refs = check_claims.check(os.path.join(ROOT, "tests", "README.md"))
    assert problems == []
    assert rows >= 40 and refs >= 100  # the index really lists the promises


def test_the_checker_catches_a_missing_test_and_an_unexcused_row(tmp_path):
    index = tmp_path / "README.md"
    index.write_text(
        "| promise | guarded by | notes |\n|---|---|---|\n"
        "| exists | `tests/test_claims_index.py::test_every_test_named_in_the_claims_index_exists` | |\n"
        "| renamed | `tests/test_claims_index.py::test_that_was_renamed[x]` | |\n"
        "| gone file | `tests/test_nope.py::test_x` | |\n"
        "| bare claim | none | |\n"
        "| excused | none | **not guarded**: measured only |\n"
    )
    problems, rows, refs = check_claims.check(str(index), ROOT)
    assert rows == 5 and refs == 3
    assert len(problems) == 3, problems
    assert "has no test test_that_was_renamed" in problems[0]
    assert "test_nope.py does not exist" in problems[1]
    assert "no test named" in problems[2]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_claims.py"), str(index)], capture_output=True, text=True)
    assert proc.returncode == 1 and "test_that_was_renamed" in proc.stdout
