"""The overlapped outer step (``overlap_steps`` = d > 0) between provider groups (issue 21): real
processes, one per provider, each a real ``rt.wrap(group=..., membership=tcp://...)`` trainer
(tests/streaming_worker.py), AdamW inside, int8 pseudo-gradients with error feedback unless
said, H = 4.
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
  waited for and saved) and relaunched equals the uninterrupted run bit for bit;
* a round vetoed by one group's non-finite pseudo-gradient is skipped by every group at its
  apply step.

Besides int8: int4, topk, none and local SGD (``mode="localsgd"``) in the cases named below.
The launching and the checks shared with tests/test_streaming_groups.py: tests/streaming_harness.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests import streaming_harness as h
from tests import streaming_worker as sw
from tests.failure_worker import read_rt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# fault_round: the round launched at step 12 (K = 1) / 10 (K = 2)
SCHEDULES = {"K1-d2": sw.Case(fragments=1, overlap=2, fault_round=3), "K2-d1": sw.Case(fragments=2, overlap=1, fault_round=5)}


def _launches(case: sw.Case) -> list[int]:
    gap = case.sync_every // case.fragments
    return list(range(gap, case.stop_step + 1, gap))


def _applied(case: sw.Case) -> list[int]:
    return [t + case.overlap for t in _launches(case) if t + case.overlap <= case.stop_step]


# the engine's variants under overlap: DiLoCo with int8 (blockwise, an all-gather), int4, none
# (an all-reduce), and local SGD (parameter averaging: the same engine with an outer SGD of lr 1)
VARIANTS = {"int8": {}, "int4": {"codec": "int4"}, "none": {"codec": "none"}, "localsgd": {"mode": "localsgd", "codec": "none"}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlapped_exchange_runs_in_the_background_and_groups_hold_the_same_global_state(tmp_path, variant):
    case = replace(SCHEDULES["K2-d1"], **VARIANTS[variant])
    codes = h.run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0}, codes
    h.check_same_global_state(case, tmp_path)
    for g in "abc":
        ex = [e for e in sw.read(str(tmp_path), g) if e["ev"] == "exchange"]
        # every round's exchange started at its launch, on a thread other than the training thread
        assert [e["launched"] for e in ex] == _launches(case), ex
        assert not any(e["main"] for e in ex), ex
        # the round boundary (the vote, the sync event) follows the apply step
        assert h.sync_steps(tmp_path, g) == _applied(case)


@pytest.mark.faults
@pytest.mark.parametrize("kill,leave,schedule,layout", [
    ("kill-exchange", "leave-before", "K1-d2", {}),
    ("kill-exchange", "leave-before", "K2-d1", {}),
    ("kill-exchange", "leave-before", "K2-d1", {"ranks": 2}),
    ("kill-exchange", "leave-before", "K2-d1", {"ranks": 2, "fsdp": True}),
    ("kill-vote", "leave-after", "K2-d1", {}),
    ("kill-exchange", "leave-before", "K2-d1", VARIANTS["none"]),
    ("kill-exchange", "leave-before", "K2-d1", VARIANTS["localsgd"]),
], ids=["K1-d2-exchange", "K2-d1-exchange", "K2-d1-exchange-ddp-2-ranks", "K2-d1-exchange-fsdp2-2-ranks", "K2-d1-vote",
        "K2-d1-exchange-none", "K2-d1-exchange-localsgd"])
def test_group_lost_mid_overlap_equals_a_clean_leave(tmp_path, kill, leave, schedule, layout):
    """``kill-exchange``: every rank of b dies as the exchange of the round launched at step t
    (12 with K = 1, 10 with K = 2) starts on its exchange thread; a and c are then inside the
    same exchange on their threads and taking their d overlapped steps on their training
    threads; their exchange threads run the roll call and redo the round without b, and they
    apply it at t + d. Against b leaving cleanly after step t - 1. ``kill-vote``: b dies in the
    vote after the round's apply step (t + d = 11), against b leaving cleanly after it."""
    base = replace(SCHEDULES[schedule], **layout)
    t = base.fault_round * base.sync_every // base.fragments
    h.check_kill_equals_leave(base, kill, leave, tmp_path, syncs=_applied(base),
                              reconfigured_at=t if kill == "kill-exchange" else t + base.overlap)
    if kill == "kill-exchange":
        died = [e for e in sw.read(str(tmp_path / "kill"), "b") if e["ev"] == "fault"]
        assert died and died[0]["launched"] == t, died


@pytest.mark.faults
def test_joiner_under_overlap_takes_the_global_state(tmp_path):
    case = replace(SCHEDULES["K2-d1"], joiner="d")
    codes = h.run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}, codes
    joined = [e for e in read_rt(str(tmp_path), "d") if e["event"] == "joined"]
    assert joined and joined[-1]["state_from"] in ("a", "b", "c") and joined[-1]["received_bytes"] > 0, joined
    # admitted at a vote, which follows an apply step: no round was in flight
    assert (joined[-1]["step"] - case.overlap) % (case.sync_every // case.fragments) == 0, joined
    finals = {g: h.final(tmp_path, g) for g in "abcd"}
    assert len({int(f["step"]) for f in finals.values()}) == 1
    for g in "bcd":
        assert torch.equal(finals["a"]["global"], finals[g]["global"]), f"{g}'s global state differs from a's"


# every-N: checkpoints every N steps, off the sync period (with group= TrainerConfig accepts any
# interval); the step resumed from is the one before the newest (21 // N * N - N): K = 1, d = 2,
# every 9: 9, inside the round launched at 8 (in flight, applied at 10); K = 2, d = 1, every 5:
# 15, the apply step of the round launched at 14; every 7: 14, fragment 0's launch in the middle
# of a period (in flight)
RESUME = {"K1-d2": ("K1-d2", {}), "K2-d1-ddp-2-ranks": ("K2-d1", {"ranks": 2}), "K1-d2-fsdp2-2-ranks": ("K1-d2", {"ranks": 2, "fsdp": True}),
          "K2-d1-int4": ("K2-d1", {"codec": "int4"}), "K2-d1-topk": ("K2-d1", {"codec": "topk"}), "K2-d1-bf16": ("K2-d1", {"codec": "bf16"}),
          "K2-d1-none": ("K2-d1", VARIANTS["none"]), "K2-d1-localsgd": ("K2-d1", VARIANTS["localsgd"]),
          "K2-d1-topk-fsdp2-2-ranks": ("K2-d1", {"codec": "topk", "ranks": 2, "fsdp": True}),
          "K1-d2-every-9": ("K1-d2", {"every": 9}), "K2-d1-every-5": ("K2-d1", {"every": 5}), "K2-d1-int4-every-7": ("K2-d1", {"codec": "int4", "every": 7}),
          "K2-d1-ddp-2-ranks-every-7": ("K2-d1", {"ranks": 2, "every": 7}), "K1-d2-fsdp2-2-ranks-every-9": ("K1-d2", {"ranks": 2, "fsdp": True, "every": 9})}


@pytest.mark.parametrize("name", [pytest.param(k, marks=[] if k == "K1-d2-every-9" else [pytest.mark.faults]) for k in RESUME])
def test_whole_job_killed_and_relaunched_under_overlap_resumes_bit_for_bit(tmp_path, name):
    """Checkpoints at 8 and 16 fall on a launch step (the round launched there is in flight:
    the checkpoint waits for its result and saves it, the resumed run applies it at 8 + d).
    Every group holds at 21 and is killed; b's step-16 checkpoint is removed; the groups agree
    on 8 and the relaunched job ends equal to the uninterrupted one in every group and rank.
    Every codec (each fragment's residual and the one saved at the launch of the round in
    flight, ``pending.saved_residual``, both in the checkpoint) and local SGD; ``every-N``:
    checkpoints every N steps instead (the newest before 21 removed from b)."""
    schedule, layout = RESUME[name]
    h.check_resume_bit_for_bit(replace(SCHEDULES[schedule], **layout), tmp_path)


@pytest.mark.parametrize("layout", [pytest.param({}, id="1-rank"),
                                    pytest.param({"codec": "none"}, id="1-rank-none", marks=pytest.mark.faults),
                                    pytest.param({"mode": "localsgd", "codec": "none"}, id="1-rank-localsgd", marks=pytest.mark.faults),
                                    pytest.param({"ranks": 2}, id="ddp-2-ranks", marks=pytest.mark.faults),
                                    pytest.param({"ranks": 2, "fsdp": True}, id="fsdp2-2-ranks", marks=pytest.mark.faults)])
def test_a_vetoed_round_under_overlap_is_skipped_by_every_group(tmp_path, layout):
    """b's pseudo-gradient of the round launched at step 10 (fragment 0) is not finite (FSDP2:
    one element of rank 0's piece). The round's exchange runs in the background like any
    other; at its apply step 11 every group skips it: the global state after step 11 is the
    one after step 9 (the last apply), on every group; the skip is counted once in every
    group's ``sync`` event at 11; b alone heals (drops its inner optimizer state); the next
    round (fragment 1, launched at 12, applied at 13) changes the global state again, and the
    groups end with the same global state."""
    case = replace(SCHEDULES["K2-d1"], fault="nan", **layout)
    t, d = case.fault_round * case.sync_every // case.fragments, case.overlap
    codes = h.run(case, tmp_path)
    assert set(codes.values()) == {0}, codes
    assert [e["step"] for e in sw.read(str(tmp_path), "b") if e["ev"] == "fault"] == [t]
    h.check_same_global_state(case, tmp_path)
    for me in h.everyone(case):
        crc = {e["after"]: e["global"] for e in sw.read(str(tmp_path), me) if e["ev"] == "step"}
        assert crc[t + d] == crc[t - 1], f"{me}: the vetoed round changed the global state"
        assert crc[t - 1] != crc[t - 2] and crc[t + d + 2] != crc[t + d + 1], f"{me}: the rounds around it did not apply"
        if me[0] == me:  # a group's leader logs its sync events
            syncs = [e for e in read_rt(str(tmp_path), me) if e["event"] == "sync"]
            assert [e["step"] for e in syncs] == _applied(case), syncs
            assert [e["skipped"] for e in syncs] == [0 if e["step"] < t + d else 1 for e in syncs], syncs
        healed = [e["step"] for e in read_rt(str(tmp_path), me) if e["event"] == "veto_healed"]
        assert healed == ([t + d] if me[0] == "b" else []), (me, healed)
