"""The overlapped outer step (``overlap_steps`` = d > 0) between provider groups (issue 21): real
processes, one per provider, each a real ``rt.wrap(group=..., membership=tcp://...)`` trainer
(tests/streaming_worker.py), AdamW inside, int8 pseudo-gradients with error feedback, H = 4.
A round launched at step t exchanges in the background (a thread of its own on every rank of
the group) while the group takes d more inner steps; it is applied at t + d, and its vote (where
joiners are admitted) follows the apply. Two schedules: K = 1, d = 2 (rounds launched at 4, 8,
12, ..., applied at 6, 10, 14, ...) and K = 2, d = 1 (launched at 2, 4, 6, ..., applied at 3, 5,
7, ...).

* the exchange runs off the training thread, started at the launch step; the groups end with
  the same global state, their local weights differ;
* a group SIGKILLed as the overlapped exchange starts (the survivors' exchange threads redo it
  without it while their training threads take the d overlapped steps) leaves the survivors
  bit-identical to a run in which it left cleanly before that round, 0 steps redone;
  SIGKILLed in the vote after the round's apply step, bit-identical to a clean leave after it;
* a joiner, admitted at a vote after an apply step, takes a global state that holds the round;
* the whole job killed between checkpoints (taken while a round is in flight: its result is
  waited for and saved) and relaunched equals the uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from tests import streaming_worker as sw
from tests.failure_worker import read_rt
from tests.test_streaming_groups import _final, _models, _run, _same, _sync_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# fault_round: the round launched at step 12 (K = 1) / 10 (K = 2)
SCHEDULES = {"K1-d2": sw.Case(fragments=1, overlap=2, fault_round=3), "K2-d1": sw.Case(fragments=2, overlap=1, fault_round=5)}


def _launches(case: sw.Case) -> list[int]:
    gap = case.sync_every // case.fragments
    return list(range(gap, case.stop_step + 1, gap))


def _applied(case: sw.Case) -> list[int]:
    return [t + case.overlap for t in _launches(case) if t + case.overlap <= case.stop_step]


def test_overlapped_exchange_runs_in_the_background_and_groups_hold_the_same_global_state(tmp_path):
    case = SCHEDULES["K2-d1"]
    codes = _run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0}, codes
    finals = {g: _final(tmp_path, g) for g in "abc"}
    assert all(int(f["step"]) == case.stop_step for f in finals.values())
    assert torch.equal(finals["a"]["global"], finals["b"]["global"]) and torch.equal(finals["a"]["global"], finals["c"]["global"])
    assert not _same(_models(finals["a"]), _models(finals["b"]))
    for g in "abc":
        ex = [e for e in sw.read(str(tmp_path), g) if e["ev"] == "exchange"]
        # every round's exchange started at its launch, on a thread other than the training thread
        assert [e["launched"] for e in ex] == _launches(case), ex
        assert not any(e["main"] for e in ex), ex
        # the round boundary (the vote, the sync event) follows the apply step
        assert _sync_steps(tmp_path, g) == _applied(case)


@pytest.mark.faults
@pytest.mark.parametrize("kill,leave,schedule,layout", [
    ("kill-exchange", "leave-before", "K1-d2", {}),
    ("kill-exchange", "leave-before", "K2-d1", {}),
    ("kill-exchange", "leave-before", "K2-d1", {"ranks": 2}),
    ("kill-exchange", "leave-before", "K2-d1", {"ranks": 2, "fsdp": True}),
    ("kill-vote", "leave-after", "K2-d1", {}),
], ids=["K1-d2-exchange", "K2-d1-exchange", "K2-d1-exchange-ddp-2-ranks", "K2-d1-exchange-fsdp2-2-ranks", "K2-d1-vote"])
def test_group_lost_mid_overlap_equals_a_clean_leave(tmp_path, kill, leave, schedule, layout):
    """``kill-exchange``: every rank of b dies as the exchange of the round launched at step t
    (12 with K = 1, 10 with K = 2) starts on its exchange thread; a and c are then inside the
    same exchange on their threads and taking their d overlapped steps on their training
    threads; their exchange threads run the roll call and redo the round without b, and they
    apply it at t + d. Against b leaving cleanly after step t - 1. ``kill-vote``: b dies in the
    vote after the round's apply step (t + d = 11), against b leaving cleanly after it."""
    base = replace(SCHEDULES[schedule], **layout)
    run, ref = tmp_path / "kill", tmp_path / "leave"
    codes = _run(replace(base, fault=kill), run)
    bs = [me for me in codes if me[0] == "b"]
    assert all(codes[me] == -signal.SIGKILL for me in bs) and all(c == 0 for me, c in codes.items() if me[0] != "b"), codes
    assert set(_run(replace(base, fault=leave), ref).values()) == {0}
    t = base.fault_round * base.sync_every // base.fragments
    for g in "ac":
        assert _sync_steps(run, g) == _applied(base), f"{g} redid or skipped a round"
        rec = [e for e in read_rt(str(run), g) if e["event"] == "reconfigured"]
        assert rec and rec[0]["members"] == ["a", "c"] and rec[0]["steps_redone"] == 0, rec
        assert rec[0]["step"] == (t if kill == "kill-exchange" else t + base.overlap), rec
        for me in [g] + [f"{g}.{r}" for r in range(1, base.ranks)]:
            assert _same(_final(run, me), _final(ref, me)), f"survivor {me} differs from the clean-leave run"
    assert torch.equal(_final(run, "a")["global"], _final(run, "c")["global"])
    if kill == "kill-exchange":
        died = [e for e in sw.read(str(run), "b") if e["ev"] == "fault"]
        assert died and died[0]["launched"] == t, died


@pytest.mark.faults
def test_joiner_under_overlap_takes_the_global_state(tmp_path):
    case = replace(SCHEDULES["K2-d1"], joiner="d")
    codes = _run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}, codes
    joined = [e for e in read_rt(str(tmp_path), "d") if e["event"] == "joined"]
    assert joined and joined[-1]["state_from"] in ("a", "b", "c") and joined[-1]["received_bytes"] > 0, joined
    # admitted at a vote, which follows an apply step: no round was in flight
    assert (joined[-1]["step"] - case.overlap) % (case.sync_every // case.fragments) == 0, joined
    finals = {g: _final(tmp_path, g) for g in "abcd"}
    assert len({int(f["step"]) for f in finals.values()}) == 1
    for g in "bcd":
        assert torch.equal(finals["a"]["global"], finals[g]["global"]), f"{g}'s global state differs from a's"


@pytest.mark.faults
@pytest.mark.parametrize("schedule,layout", [("K1-d2", {}), ("K2-d1", {"ranks": 2}), ("K1-d2", {"ranks": 2, "fsdp": True})],
                         ids=["K1-d2", "K2-d1-ddp-2-ranks", "K1-d2-fsdp2-2-ranks"])
def test_whole_job_killed_and_relaunched_under_overlap_resumes_bit_for_bit(tmp_path, schedule, layout):
    """Checkpoints at 8 and 16 fall on a launch step (the round launched there is in flight:
    the checkpoint waits for its result and saves it, the resumed run applies it at 8 + d).
    Every group holds at 21 and is killed; b's step-16 checkpoint is removed; the groups agree
    on 8 and the relaunched job ends equal to the uninterrupted one in every group and rank."""
    base = replace(SCHEDULES[schedule], **layout)
    ref, run = tmp_path / "ref", tmp_path / "run"
    everyone = [g if r == 0 else f"{g}.{r}" for g in "abc" for r in range(base.ranks)]
    assert _run(base, ref) == dict.fromkeys(everyone, 0)
    codes = _run(replace(base, fault="hold", stop_step=21), run, hold_until_killed=True)
    assert set(codes.values()) == {-signal.SIGKILL}, codes
    b16 = run / "ckpt" / "group-b" / "step-0000000016"
    assert (b16 / "manifest.json").exists()
    shutil.rmtree(b16)
    for me in everyone:
        os.remove(run / f"w-{me}.jsonl")
    assert _run(base, run) == dict.fromkeys(everyone, 0)
    agreed = [e for e in read_rt(str(run), "a") if e["event"] == "restart_point"]
    assert agreed and agreed[-1]["agreed"] == 8 and agreed[-1]["loaded"] == {"a": 16, "b": 8, "c": 16}, agreed
    for me in everyone:
        assert _same(_final(ref, me), _final(run, me)), f"{me} differs from the uninterrupted run"
    assert not _same(_models(_final(run, "a")), _models(_final(run, "b")))
