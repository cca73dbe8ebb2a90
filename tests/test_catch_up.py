"""Members that a failure leaves at different points of the job's operations never post
different collectives (the cause of a CI abort: tests/test_failure_matrix.py's 4-provider
mid-ring case, where one survivor had completed the exchange and was in the vote while the
others redid the exchange: gloo aborted the processes, "Is there a distributed collective
mismatch").

Every epoch starts with the same prologue for every member (ProviderGroup._prologue, docs/
membership.md "Members at different points"): a hello with each member's position, then the
members one operation behind take its result from one that completed it, and joiners that
arrive inside a round wait for the next boundary. The scenarios run in subprocesses
(tests/catch_up_worker.py) because the bug aborts the process; each fails on the code before
the prologue (two abort, the joiner never gets in).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import catch_up_worker as w

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(scenario: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "catch_up_worker.py"), scenario],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["errors"] and not out["alive"], out
    return out


def _events(out: dict, g: str, name: str) -> list[dict]:
    return [f for e, f in out["events"][g] if e == name]


def _consistent(out: dict) -> None:
    """Every member ends at the same step with the same running sum, and saw the same result in
    every round it took part in."""
    assert len(set(out["steps"].values())) == 1, out["steps"]
    assert len({tuple(t) for t in out["totals"].values()}) == 1, out["totals"]
    by_step: dict[str, set] = {}
    for r in out["results"].values():
        for step, (total, _epoch, _members) in r.items():
            by_step.setdefault(step, set()).add(total)
    assert all(len(v) == 1 for v in by_step.values()), by_step


@pytest.mark.parametrize("op", ["exchange", "vote"])
def test_a_member_behind_by_one_operation_takes_its_result_from_one_that_completed_it(op):
    out = _run(op)
    _consistent(out)
    caught = _events(out, "c", "caught_up")
    assert [c["op"] for c in caught] == ["allreduce" if op == "exchange" else "vote"], out["events"]["c"]
    assert not _events(out, "a", "caught_up") and not _events(out, "b", "caught_up")
    for g in "abc":  # nobody was dropped: the failure was c's alone, everyone answered the roll call
        assert all(r["members"] == ["a", "b", "c"] for r in _events(out, g, "reconfigured")), out["events"][g]
    assert out["steps"]["c"] == w.ROUNDS


def test_a_joiner_arriving_inside_a_round_waits_for_the_next_boundary():
    out = _run("joiner")
    _consistent(out)
    for g in "abc":
        ev = out["events"][g]
        kinds = [e for e, _ in ev]
        assert "round_failed" in kinds, ev
        # the epoch that held d was rolled without it, then d came in after a vote
        rec = _events(out, g, "reconfigured")
        assert rec and rec[-1]["members"] == ["a", "b", "c"], ev
        mem = _events(out, g, "membership")
        assert mem and mem[-1]["members"] == ["a", "b", "c", "d"] and kinds.index("membership") > kinds.index("reconfigured"), ev
    joined = _events(out, "d", "joined")
    assert len(joined) == 1 and joined[0]["members"] == ["a", "b", "c", "d"], out["events"]["d"]
    first_d = min(int(s) for s in out["results"]["d"])
    assert first_d > w.FAULT_ROUND
    assert all(out["results"]["a"][s][0] == out["results"]["d"][s][0] for s in out["results"]["d"])
