"""Check the claims index (tests/README.md): every test it names exists, every row has a test
or says why not.

A test reference is ``tests/<file>.py::<name>`` (optionally ``[param]``, ignored); it exists when
``<file>`` defines a module-level function ``<name>`` (found with ``ast``, nothing is imported).
A table row with no reference must contain "not guarded" or "owned by issue". Exit status 1
with one line per problem; 0 and a summary otherwise.

    python tools/check_claims.py [INDEX]
"""

from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = re.compile(r"`?(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`?")
EXCUSE = re.compile(r"not guarded|owned by issue", re.IGNORECASE)


def test_names(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")}


def check(index: str, root: str = ROOT) -> tuple[list[str], int, int]:
    """``(problems, rows, references)`` for the index file at ``index``."""
    problems: list[str] = []
    cache: dict[str, set[str] | None] = {}
    rows = refs = 0
    with open(index, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        is_row = line.startswith("|") and not re.match(r"^\|[\s|:-]+\|?$", line) and not line.startswith("| promise")
        found = REF.findall(line)
        if is_row:
            rows += 1
            if not found and not EXCUSE.search(line):
                problems.append(f"{index}:{lineno}: no test named and no reason given (say 'not guarded' or 'owned by issue N'): {line[:80]}")
        for file, name in found:
            refs += 1
            if file not in cache:
                path = os.path.join(root, file)
                cache[file] = test_names(path) if os.path.isfile(path) else None
            names = cache[file]
            if names is None:
                problems.append(f"{index}:{lineno}: {file} does not exist")
            elif name not in names:
                problems.append(f"{index}:{lineno}: {file} has no test {name}")
    return problems, rows, refs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    index = args[0] if args else os.path.join(ROOT, "tests", "README.md")
    problems, rows, refs = check(index)
    for p in problems:
        print(p)
    if not problems:
        print(f"{index}: {rows} promises, {refs} test references, all present")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
