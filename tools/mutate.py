"""Mutation testing of the modules whose bugs change a persisted byte, a verification, a retry
budget or a membership decision (``make mutate``; not part of ``make test``).

Runs mutmut (``pip install -e '.[mutate]'``; configuration in ``[tool.mutmut]`` of
pyproject.toml: which modules, which fast tests). mutmut copies the package to ``mutants/``,
generates every mutant of ``format/``, ``checkpoint/``, ``storage/retry.py``,
``membership/decision.py`` and ``compression/codecs.py``, records which tests execute each
function, then runs each mutant against only those tests.

All ~5,000 mutants take hours on 2 cores, so by default this runs a seeded, stratified sample
(every file gets a share proportional to its mutant count, at least ``--min-per-file``) and
stops starting new batches when ``--budget-s`` is spent. Mutants whose function no selected
test executes are reported as "no tests" without running. ``--all`` runs every mutant.

Writes ``benchmarks/results/mutation.json``: per file how many mutants exist, were run,
killed, survived; every survivor with its diff (``mutmut show``); machine info; what was run.

    python tools/mutate.py                       # sample 300, budget 18 min, 2 workers
    python tools/mutate.py --sample 100 --only 'resilient_train.format.*'
    python tools/mutate.py --all --budget-s 36000
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = [sys.executable, "-m", "mutmut"]
# a small module run in full first: it makes mutmut generate every mutant and collect stats
BOOTSTRAP = "resilient_train.format.names.*"

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not run"}


def _env() -> dict[str, str]:
    # subprocesses started by tests (ranks, scripts) import the mutated copy too
    return dict(os.environ, PYTHONPATH=os.path.join(ROOT, "mutants"), OMP_NUM_THREADS="1")


def mutmut(*args: str, log) -> int:
    proc = subprocess.run([*MUTMUT, *args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode


def metas() -> dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "mutants", "resilient_train", "**", "*.py.meta"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(ROOT, "mutants"))[: -len(".meta")]
        with open(path, encoding="utf-8") as f:
            out[rel] = json.load(f)["exit_code_by_key"]
    return out


def covered_functions() -> set[str]:
    with open(os.path.join(ROOT, "mutants", "mutmut-stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    return {k for k, v in stats["tests_by_mangled_function_name"].items() if v}


def function_of(mutant: str) -> str:
    return mutant.replace("__init__.", "").partition("__mutmut_")[0]


def sample(by_file: dict[str, list[str]], n: int, min_per_file: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    total = sum(len(v) for v in by_file.values()) or 1
    chosen: list[str] = []
    for file, names in sorted(by_file.items()):
        k = min(len(names), max(min_per_file, round(n * len(names) / total)))
        chosen += rng.sample(sorted(names), k)
    return chosen


def show(mutant: str) -> str:
    proc = subprocess.run([*MUTMUT, "show", mutant], cwd=ROOT, env=_env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("+", "-", "@@")) and not ln.startswith(("+++", "---"))]
    return "\n".join(lines[:12])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=int, default=300, help="mutants to run (stratified by file); ignored with --all")
    ap.add_argument("--all", action="store_true", help="run every mutant that some selected test covers")
    ap.add_argument("--min-per-file", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=[], help="glob(s) over mutant names, e.g. 'resilient_train.format.*'")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=18 * 60, help="no new batch starts after this many seconds")
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first (after a source change)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mutation.json"))
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    log_path = os.path.join(ROOT, "mutants.log")
    if args.fresh and os.path.isdir(os.path.join(ROOT, "mutants")):
        import shutil

        shutil.rmtree(os.path.join(ROOT, "mutants"))
    with open(log_path, "w", encoding="utf-8") as log:
        print(f"[mutate] generating mutants and collecting stats ({BOOTSTRAP} runs in full); log: {log_path}", flush=True)
        rc = mutmut("run", "--max-children", str(args.max_children), BOOTSTRAP, log=log)
        if rc != 0:
            print(f"[mutate] mutmut failed (exit {rc}); see {log_path}", file=sys.stderr)
            return rc
        covered = covered_functions()
        by_file: dict[str, list[str]] = defaultdict(list)
        untested: dict[str, list[str]] = defaultdict(list)
        for file, codes in metas().items():
            for name, code in codes.items():
                if args.only and not any(fnmatch.fnmatch(name, p) for p in args.only):
                    continue
                if function_of(name) not in covered:
                    untested[file].append(name)
                elif code is None:
                    by_file[file].append(name)
        todo = [n for v in by_file.values() for n in v] if args.all else sample(by_file, args.sample, args.min_per_file, args.seed)
        random.Random(args.seed).shuffle(todo)  # batches mix files, so a cut-off budget still covers every file
        print(f"[mutate] {sum(map(len, by_file.values()))} mutants covered by tests not yet run; running {len(todo)} "
              f"in batches of {args.batch}, budget {args.budget_s:.0f} s", flush=True)
        done_batches = 0
        for i in range(0, len(todo), args.batch):
            elapsed = time.monotonic() - t0
            if elapsed > args.budget_s:
                print(f"[mutate] budget spent after {elapsed:.0f} s: {len(todo) - i} sampled mutants not run", flush=True)
                break
            batch = todo[i:i + args.batch]
            mutmut("run", "--max-children", str(args.max_children), *batch, log=log)
            done_batches += 1
            print(f"[mutate] batch {done_batches}: {i + len(batch)}/{len(todo)} after {time.monotonic() - t0:.0f} s", flush=True)

    results = metas()
    files = {}
    survivors = []
    for file, codes in sorted(results.items()):
        if args.only and not any(fnmatch.fnmatch(n, p) for p in args.only for n in codes):
            continue
        no_tests = set(untested.get(file, []))
        counts = Counter("no tests" if n in no_tests else STATUS.get(c, "suspicious") for n, c in codes.items())
        files[file] = {"mutants": len(codes), **{k: v for k, v in sorted(counts.items()) if v}}
        for name, code in sorted(codes.items()):
            if STATUS.get(code) == "survived":
                survivors.append({"mutant": name, "file": file, "function": function_of(name).rpartition(".")[2], "diff": show(name)})
    ran = sum(v.get("killed", 0) + v.get("survived", 0) + v.get("timeout", 0) + v.get("suspicious", 0) for v in files.values())
    killed = sum(v.get("killed", 0) + v.get("timeout", 0) for v in files.values())
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from common import machine_info

        machine = machine_info()
    except Exception:  # noqa: BLE001 - machine info is a nicety
        machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    payload = {
        "tool": "mutmut " + subprocess.run([*MUTMUT, "--version"], capture_output=True, text=True).stdout.strip(),
        "command": "python tools/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "seconds": round(time.monotonic() - t0, 1),
        "mutants_total": sum(v["mutants"] for v in files.values()),
        "mutants_run": ran,
        "killed_or_timeout": killed,
        "survived": len(survivors),
        "score_of_run": round(killed / ran, 3) if ran else None,
        "untested_functions": sorted({function_of(n) for v in untested.values() for n in v}),
        "files": files,
        "survivors": survivors,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[mutate] ran {ran} of {payload['mutants_total']} mutants: {killed} killed, {len(survivors)} survived; "
          f"{sum(v.get('no tests', 0) for v in files.values())} have no covering fast test. Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
