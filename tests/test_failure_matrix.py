"""Provider loss reaches every survivor at once (issue 16): real processes, one per provider,
each a real ``rt.wrap(group=..., membership=tcp://...)`` trainer (tests/failure_worker.py),
one of them SIGKILLed inside the cross-provider exchange, the vote or the state transfer to a
joiner, or cut off from one live peer inside the exchange (a partition: the others see nothing
on their own connections and must leave on the store's news); all-reduce (codec none) and all-gather (int8), DiLoCo and local SGD, the victim at
every ring position, 3 and 4 providers.

The round deadline is 30 s and the heartbeat timeout 10 s, so neither can rescue a stalled
survivor within the bound: each case asserts that every survivor trained a step in the view
without the victim within ``RESUME_BOUND_S`` of the SIGKILL (measured from each survivor's own
events; the figure is the slowest survivor's), that the survivors left the failed collective
within ``SPREAD_BOUND_S`` of each other, and that every survivor ends bit-identical. The
bounds are far below the deadline and loose for a loaded 2-core machine; the goal (0.5 s to
training again, 0.2 s spread) is measured by benchmarks/bench_recovery.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import replace

import pytest

from tests import failure_worker as fw

pytestmark = pytest.mark.timeout(240)

RESUME_BOUND_S = 6.0
SPREAD_BOUND_S = 2.0

CASES = {
    "allreduce-victim-a": fw.Case(victim="a"),
    "allreduce-victim-b": fw.Case(victim="b"),
    "allreduce-victim-c-mid-ring": fw.Case(victim="c", kill_delay_ms=15, width=512),
    "allgather-int8-victim-b": fw.Case(victim="b", codec="int8"),
    "localsgd-victim-c": fw.Case(victim="c", mode="localsgd"),
    "4-providers-victim-b": fw.Case(groups=("a", "b", "c", "d"), victim="b"),
    "4-providers-victim-d-mid-ring": fw.Case(groups=("a", "b", "c", "d"), victim="d", kill_delay_ms=10, width=512),
    "vote-victim-b": fw.Case(victim="b", fault="vote"),
    "transfer-source-dies": fw.Case(victim="a", fault="transfer", joiner="d", stop_step=32),
    # a link broken between two live members: only they see an error; the third must not wait
    "partition-b-from-a": fw.Case(victim="b", fault="partition", cut_from="a"),
    "partition-d-from-a-4-providers": fw.Case(groups=("a", "b", "c", "d"), victim="d", fault="partition", cut_from="a"),
}


def _run_case(case: fw.Case, tmp_path) -> dict:
    from resilient_train.membership import TCPKVStore

    out = str(tmp_path)
    kv = TCPKVStore.host(0)  # the membership store lives in the test process, never killed
    url = f"tcp://127.0.0.1:{kv.port}"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.failure_worker"])
    procs = {}

    def launch(g: str, joiner: bool = False) -> None:
        procs[g] = ctx.Process(target=fw.run, args=(g, url, out, case.dump(), joiner), daemon=True)
        procs[g].start()

    try:
        for g in case.groups:
            launch(g)
        deadline = time.monotonic() + 200
        if case.joiner:
            while not all(any(e["ev"] == "step" and e["after"] >= case.join_after_step for e in fw.read(out, g))
                          for g in case.groups):
                assert time.monotonic() < deadline, "the founders did not reach the join step"
                assert all(p.exitcode is None for p in procs.values()), {g: p.exitcode for g, p in procs.items()}
                time.sleep(0.1)
            launch(case.joiner, joiner=True)
        for g, p in procs.items():
            p.join(max(1.0, deadline - time.monotonic()))
        codes = {g: p.exitcode for g, p in procs.items()}
    finally:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
    cut = case.fault == "partition"  # nobody dies: everyone redoes the round
    survivors = [g for g in procs if g != case.victim or cut]
    logs = {g: fw.read(out, g) for g in procs}
    tails = {g: [e["ev"] for e in logs[g][-3:]] for g in procs}
    assert cut or codes[case.victim] == -signal.SIGKILL, (codes, tails)
    assert all(codes[g] == 0 for g in survivors), (codes, tails)
    fault = next(e for e in logs[case.victim] if e["ev"] == "fault")
    tf = fault["t"]
    if cut:
        assert fault["connections"] >= 1, fault
    resumed = {}
    for g in survivors:
        after = [e for e in logs[g] if e["ev"] == "step" and e["t"] > tf
                 and (e["i"] >= fault["step"] - 1 if cut else case.victim not in e["members"])]
        assert after, f"{g} never trained past the fault"
        resumed[g] = round(after[0]["t"] - tf, 3)
    failed = {g: min((e["t"] for e in fw.read_rt(out, g) if e["event"] == "round_failed" and e["t"] >= tf - 0.05),
                     default=None) for g in survivors}
    done = {g: next(e for e in logs[g] if e["ev"] == "done") for g in survivors}
    # survivors the roll call dropped although alive (they would rejoin as joiners)
    dropped = {g for g in survivors if any(e["event"] == "dropped" and e["t"] >= tf - 0.05 for e in fw.read_rt(out, g))}
    return {"resumed": resumed, "failed": failed, "done": done, "tf": tf, "dropped": dropped}


@pytest.mark.parametrize("name", list(CASES))
def test_every_survivor_resumes_at_once(name, tmp_path):
    case = CASES[name]
    r = _run_case(case, tmp_path)
    # every survivor is alive and answers the roll call: none may be dropped, not even after a
    # partition (two CI runs dropped live members whose heartbeats had not yet said "member":
    # the roll call took them for restarted processes, fixed in the roll call)
    assert not r["dropped"], f"{name}: live members {sorted(r['dropped'])} were dropped"
    assert max(r["resumed"].values()) < RESUME_BOUND_S, f"{name}: survivors trained again after {r['resumed']} s (round deadline 30 s)"
    seen = [t for t in r["failed"].values() if t is not None]
    if case.fault != "transfer":  # the joiner is in its join, not in a round: it reports no round_failed
        assert len(seen) == len(r["failed"]), f"{name}: a survivor never saw the round fail: {r['failed']}"
    assert max(seen) - min(seen) < SPREAD_BOUND_S, f"{name}: survivors left the failed operation at {r['failed']}"
    steps = {d["step"] for d in r["done"].values()}
    digests = {d["digest"] for d in r["done"].values()}
    assert len(steps) == 1 and len(digests) == 1, f"{name}: survivors ended apart: {r['done']}"
    print(f"{name}: resumed {r['resumed']} s after the SIGKILL; round_failed at "
          f"{ {g: round(t - r['tf'], 3) for g, t in r['failed'].items() if t is not None} }")


def test_the_cases_cover_the_matrix():
    """Every fault point, both exchange kinds, both modes, every ring position of three, 3 and 4
    providers (a guard against the matrix shrinking silently)."""
    cs = list(CASES.values())
    assert {c.fault for c in cs} == {"exchange", "vote", "transfer", "partition"}
    assert {c.codec for c in cs} >= {"none", "int8"} and {c.mode for c in cs} == {"diloco", "localsgd"}
    assert {c.victim for c in cs if len(c.groups) == 3 and c.fault == "exchange"} == {"a", "b", "c"}
    assert {len(c.groups) for c in cs} == {3, 4}
    assert all(c.round_deadline_s >= 30 and c.heartbeat_timeout_s >= 10 for c in cs)
    assert replace(cs[0], victim="x").victim == "x"
