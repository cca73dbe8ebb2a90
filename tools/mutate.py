"""Mutation testing of the code whose bugs change a persisted byte, a verification, a commit, a
retry budget or a membership decision (``make mutate``; not part of ``make test``).

Runs mutmut (``pip install -e '.[mutate]'``; ``[tool.mutmut]`` of pyproject.toml says which files
are mutated and which fast test files exist for it). mutmut copies the package to ``mutants/``,
generates every mutant, records which tests execute each function, then runs each mutant
against only those tests, under a per-mutant wall-clock limit (``(t + timeout_constant) *
timeout_multiplier``, t = the covering tests' own time): a mutant that hits it is reported
as ``timeout``, counted as detected but listed apart from ``killed``.

**Targets.** The code is split into the named targets of :data:`TARGETS`, each a list of
mutant-name globs (whole modules, or single functions such as the manifest commit) and the
FAST test files that guard it. A mutant belongs to the first target whose globs match; it
runs only the tests that execute its function AND belong to its target's files (the stats
file is cut down to those before any mutant runs), so each mutant costs seconds, not the
whole suite.

**The sample** is stated and repeatable: for each target, ``--per-target`` mutants (its
``n`` by default) drawn with ``random.Random(f"{seed}:{target}")`` from the sorted names of
ALL its mutants, covered or not, so adding tests never changes which mutants are drawn (the
same source gives the same names; ``mutation.json`` lists them). A drawn mutant that no
selected test executes is reported as ``no tests`` and counts against the score. The score
of a target is (killed + timeout) / drawn.

Writes ``benchmarks/results/mutation.json``: the sample definition (seed, targets, globs,
test files, names drawn), per target and overall the counts and score, every survivor with
its diff (``mutmut show``) and, from ``tools/mutation_survivors.json``, its classification
(``equivalent``: no input can tell it apart; ``gap``: a real test gap, and whether a test now
kills it). ``--baseline OLD.json`` keeps the score of an earlier run of the same sample as
``before``.

    python tools/mutate.py                                 # the stated sample (seed 19)
    python tools/mutate.py --targets signing storage-commit
    python tools/mutate.py --baseline benchmarks/results/mutation.json --fresh
    python tools/mutate.py --all --budget-s 36000          # every mutant of every target
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = [sys.executable, "-m", "mutmut"]
CLASSES = os.path.join(ROOT, "tools", "mutation_survivors.json")
# One mutant of a small function run first: it makes mutmut generate every mutant and collect
# stats, then runs only that function's few tests as its clean run. Its result is not scored
# unless the sample draws it.
BOOTSTRAP = "resilient_train.membership.decision.x_coordinator__mutmut_1"


@dataclass(frozen=True)
class Target:
    mutants: tuple[str, ...]
    """globs over mutant names (``module.x_function__mutmut_N``, ``module.xǁClassǁmethod__mutmut_N``)"""
    tests: tuple[str, ...]
    """fast test files that guard it (each must be in ``pytest_add_cli_args_test_selection``)"""
    n: int
    """mutants drawn per run of the sample"""
    always: tuple[str, ...] = ()
    """test files run for EVERY mutant of the target, whatever the stats say: tests that drive the
    code in subprocesses (mutmut only sees the calls made in its own process)"""


# Order matters: a mutant belongs to the first target that matches it.
TARGETS: dict[str, Target] = {
    "signing": Target(
        ("resilient_train.format.signing.*", "resilient_train.checkpoint.signatures.*"),
        ("tests/test_signing.py", "tests/test_verify_truth.py"), 25),
    "storage-commit": Target(
        ("resilient_train.checkpoint.writer.x_commit_manifest__*",
         "resilient_train.checkpoint.writer.x_prepare_folder__*",
         "resilient_train.checkpoint.saving.x__write_step__*",
         "resilient_train.checkpoint.replicate.x__commit_copy__*",
         "resilient_train.checkpoint.steps.x__has_manifest_bytes__*",
         "resilient_train.checkpoint.steps.x__committed_on__*",
         "resilient_train.storage.local.xǁLocalStoreǁwrite_bytes_exclusive__*",
         "resilient_train.storage.fsspec_store.xǁFsspecStoreǁwrite_bytes_exclusive__*",
         "resilient_train.storage.retry.xǁRetryingStoreǁwrite_bytes_exclusive__*"),
        ("tests/test_latest_commit.py", "tests/test_verify_truth.py", "tests/test_storage_conformance.py",
         "tests/test_storage_retry.py", "tests/test_checkpoint_local.py", "tests/test_promises_storage.py",
         "tests/test_replication.py"), 25),
    "membership-service": Target(
        ("resilient_train.membership.service.*",),
        ("tests/test_membership_service.py", "tests/test_membership_rollcall.py", "tests/test_membership_kvstore.py",
         "tests/test_failure_propagation.py"), 25),
    "membership-decision": Target(
        ("resilient_train.membership.decision.*",),
        ("tests/test_membership_decision.py", "tests/test_membership_rollcall.py", "tests/test_membership_service.py"), 20),
    "recovery": Target(
        ("resilient_train.recovery.*",),
        ("tests/test_provider_group_vote.py", "tests/test_catch_up.py", "tests/test_promises_sync.py",
         "tests/test_storage_ledger.py"), 25,
        always=("tests/test_catch_up.py",)),  # its scenarios run ProviderGroups in a subprocess
    "format": Target(
        ("resilient_train.format.*",),
        ("tests/test_format.py", "tests/test_verify_truth.py", "tests/test_signing.py"), 10),
    "checkpoint": Target(
        ("resilient_train.checkpoint.*",),
        ("tests/test_checkpoint_local.py", "tests/test_promises_checkpoint.py", "tests/test_async_save.py",
         "tests/test_verify_truth.py", "tests/test_latest_commit.py", "tests/test_signing.py"), 10),
    "storage-retry": Target(
        ("resilient_train.storage.retry.*",),
        ("tests/test_storage_retry.py", "tests/test_promises_storage.py", "tests/test_storage_conformance.py"), 10),
    "compression-codecs": Target(
        ("resilient_train.compression.codecs.*",),
        ("tests/test_compression_codecs.py",), 10),
}
SEED = 19

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -9: "timeout", -11: "killed", None: "not run"}


def _env() -> dict[str, str]:
    # subprocesses started by tests (ranks, scripts) import the mutated copy too
    return dict(os.environ, PYTHONPATH=os.path.join(ROOT, "mutants"), OMP_NUM_THREADS="1")


def mutmut(*args: str, log) -> int:
    log.flush()
    proc = subprocess.run([*MUTMUT, *args], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode


def metas() -> dict[str, dict[str, int | None]]:
    """mutant name -> mutmut's exit code (None: not run), over every mutated file."""
    out: dict[str, int | None] = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "mutants", "resilient_train", "**", "*.py.meta"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            out.update(json.load(f)["exit_code_by_key"])
    return out


def function_of(mutant: str) -> str:
    return mutant.replace("__init__.", "").partition("__mutmut_")[0]


def target_of(mutant: str) -> str | None:
    for name, t in TARGETS.items():
        if any(fnmatch.fnmatch(mutant, g) for g in t.mutants):
            return name
    return None


def selected_test_files() -> list[str]:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["tool"]["mutmut"]["pytest_add_cli_args_test_selection"])


def restrict_stats() -> dict[str, int]:
    """Cut ``mutants/mutmut-stats.json`` down so that each function's tests are only its target's
    files; functions outside every target keep none. Returns tests kept per target."""
    path = os.path.join(ROOT, "mutants", "mutmut-stats.json")
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    kept: Counter[str] = Counter()
    always = {t: sorted(n for n in stats["duration_by_test"] if n.partition("::")[0] in TARGETS[t].always) for t in TARGETS}
    functions = set(stats["tests_by_mangled_function_name"])
    for meta in glob.glob(os.path.join(ROOT, "mutants", "resilient_train", "**", "*.py.meta"), recursive=True):
        with open(meta, encoding="utf-8") as f:
            functions |= {function_of(n) for n in json.load(f)["exit_code_by_key"]}
    for fn in sorted(functions):
        tests = stats["tests_by_mangled_function_name"].get(fn, [])
        target = target_of(fn + "__mutmut_1")
        files = TARGETS[target].tests if target else ()
        mine = sorted({t for t in tests if t.partition("::")[0] in files} | set(always[target] if target else ()))
        stats["tests_by_mangled_function_name"][fn] = mine
        if target:
            kept[target] += len(mine)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    return dict(kept)


def draw(all_names: list[str], targets: list[str], per_target: int | None, seed: int, everything: bool) -> dict[str, list[str]]:
    by_target: dict[str, list[str]] = {t: [] for t in targets}
    for name in sorted(all_names):
        t = target_of(name)
        if t in by_target:
            by_target[t].append(name)
    out = {}
    for t, names in by_target.items():
        k = len(names) if everything else min(len(names), per_target if per_target is not None else TARGETS[t].n)
        out[t] = sorted(random.Random(f"{seed}:{t}").sample(names, k))
    return out


def show(mutant: str) -> str:
    proc = subprocess.run([*MUTMUT, "show", mutant], cwd=ROOT, env=_env(), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("+", "-", "@@")) and not ln.startswith(("+++", "---"))]
    return "\n".join(lines[:12])


def score(counts: Counter) -> float | None:
    drawn = sum(counts.values()) - counts.get("not run", 0) - counts.get("skipped", 0)
    return round((counts.get("killed", 0) + counts.get("timeout", 0)) / drawn, 3) if drawn else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--per-target", type=int, default=None, help="mutants drawn per target (default: each target's n)")
    ap.add_argument("--all", action="store_true", help="every mutant of the chosen targets")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=45 * 60, help="no new target starts after this many seconds")
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first (after a source change)")
    ap.add_argument("--recheck", action="store_true",
                    help="with --baseline: run only the drawn mutants that the baseline run did not detect (survived, "
                         "no tests, suspicious, not run); the others keep the baseline's verdict. Sound when tests "
                         "were only added since and the library code is unchanged")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from mutmut's cache (e.g. after a run was stopped at the deadline)")
    ap.add_argument("--baseline", default=None, help="an earlier mutation.json of the same sample: kept as 'before'")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mutation.json"))
    args = ap.parse_args(argv)

    selection = set(selected_test_files())
    missing = sorted({f for t in args.targets for f in TARGETS[t].tests} - selection)
    if missing:
        print(f"[mutate] add {missing} to pytest_add_cli_args_test_selection in [tool.mutmut] of pyproject.toml", file=sys.stderr)
        return 2
    baseline = None
    if args.recheck and not args.baseline:
        print("[mutate] --recheck needs --baseline (the run whose verdicts are kept)", file=sys.stderr)
        return 2
    if args.baseline:
        with open(args.baseline, encoding="utf-8") as f:
            baseline = json.load(f)

    t0 = time.monotonic()
    log_path = os.path.join(ROOT, "mutants.log")
    if args.fresh and os.path.isdir(os.path.join(ROOT, "mutants")):
        shutil.rmtree(os.path.join(ROOT, "mutants"))
    # mutmut's tests import from mutants/ by PYTHONPATH: a folder missing when the interpreter
    # starts is cached as "no finder" and `tests` is then not importable in that process
    os.makedirs(os.path.join(ROOT, "mutants"), exist_ok=True)
    not_started: list[str] = []
    kept_verdicts: dict[str, str] = {}
    if args.recheck:
        kept_verdicts = {n: v for n, v in (baseline or {}).get("verdicts", {}).items() if v in ("killed", "timeout")}
    if args.report_only:
        sample = draw(list(metas()), args.targets, args.per_target, args.seed, args.all)
    if not args.report_only:
        with open(log_path, "w", encoding="utf-8") as log:
            print(f"[mutate] generating mutants and collecting stats; log: {log_path}", flush=True)
            rc = mutmut("run", "--max-children", str(args.max_children), BOOTSTRAP, log=log)
            if rc != 0:
                print(f"[mutate] mutmut failed (exit {rc}); see {log_path}", file=sys.stderr)
                return rc
            kept = restrict_stats()
            sample = draw(list(metas()), args.targets, args.per_target, args.seed, args.all)
            print(f"[mutate] drew {sum(map(len, sample.values()))} mutants (seed {args.seed}): "
                  + ", ".join(f"{t} {len(v)}" for t, v in sample.items()) + f"; covering tests kept per target: {kept}", flush=True)
            for t, names in sample.items():
                names = [n for n in names if n not in kept_verdicts]
                elapsed = time.monotonic() - t0
                if elapsed > args.budget_s:
                    print(f"[mutate] budget spent after {elapsed:.0f} s: target {t} not run", flush=True)
                    not_started.append(t)
                    continue
                if names:
                    restrict_stats()  # a run that found new tests re-collected their stats unrestricted
                    rc = mutmut("run", "--max-children", str(args.max_children), *names, log=log)
                    if rc != 0:  # e.g. its clean run failed once under load: one more try
                        print(f"[mutate] mutmut exit {rc} on target {t}; trying once more", flush=True)
                        restrict_stats()
                        rc = mutmut("run", "--max-children", str(args.max_children), *names, log=log)
                    if rc != 0:
                        print(f"[mutate] mutmut exit {rc} on target {t}; see {log_path}", flush=True)
                print(f"[mutate] target {t}: {len(names)} mutants after {time.monotonic() - t0:.0f} s", flush=True)

    results = metas()
    try:
        with open(CLASSES, encoding="utf-8") as f:
            classes = json.load(f)
    except FileNotFoundError:
        classes = {}
    verdicts = {n: kept_verdicts.get(n) or STATUS.get(results.get(n), "suspicious") for names in sample.values() for n in names}
    # --recheck: a mutant the baseline did not detect and this run did not reach keeps the
    # baseline's verdict (listed in sample.not_rerun), never "not run"
    not_rerun = sorted(n for n, v in verdicts.items() if v == "not run" and args.recheck and n in (baseline or {}).get("verdicts", {}))
    for n in not_rerun:
        verdicts[n] = baseline["verdicts"][n]
    per_target = {}
    survivors = []
    total: Counter[str] = Counter()
    for t, names in sample.items():
        counts = Counter(verdicts[n] for n in names)
        total += counts
        per_target[t] = {"globs": list(TARGETS[t].mutants), "tests": list(TARGETS[t].tests),
                         "mutants_in_target": sum(1 for n in results if target_of(n) == t), "drawn": len(names),
                         **{k: v for k, v in sorted(counts.items())}, "score": score(counts)}
        for n in names:
            status = verdicts[n]
            if status in ("survived", "no tests", "suspicious"):
                survivors.append({"mutant": n, "target": t, "status": status, "diff": show(n), **classes.get(n, {"class": "unclassified"})})
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
        "sample": {
            "seed": args.seed,
            "how": "per target, random.Random(f'{seed}:{target}').sample(sorted names of all the target's mutants, n); "
                   "a mutant belongs to the first target whose globs match it; each runs only the tests that execute "
                   "its function among its target's test files (pytest -m 'not slow', -k filter of [tool.mutmut])",
            "per_target": {t: len(v) for t, v in sample.items()},
            "targets_not_run": not_started,
            "recheck": args.recheck and f"only the mutants {args.baseline} did not detect were run; the "
                                        f"{len(kept_verdicts)} it detected keep its verdict",
            "not_rerun": not_rerun,
            "names": sample,
        },
        "score": score(total),
        "counts": dict(sorted(total.items())),
        "targets": per_target,
        "survivors": survivors,
        "verdicts": verdicts,
    }
    if baseline is not None:
        before_survivors = [s["mutant"] for s in baseline.get("survivors", [])]
        payload["before"] = {
            "command": baseline.get("command"), "seconds": baseline.get("seconds"), "score": baseline.get("score"),
            "counts": baseline.get("counts"),
            "score_per_target": {t: d.get("score") for t, d in baseline.get("targets", {}).items()},
            "survivors": before_survivors,
            "detected_now": sorted(set(before_survivors) - {s["mutant"] for s in survivors}),
        }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[mutate] score {payload['score']} over {sum(total.values())} drawn mutants: {dict(total)}. Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
