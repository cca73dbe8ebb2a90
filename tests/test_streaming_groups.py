"""Streaming DiLoCo (``fragments`` > 1) between provider groups (issue 21, first step): real
processes, one per provider, each a real ``rt.wrap(group=..., membership=tcp://...)`` trainer
(tests/streaming_worker.py) with AdamW inside, int8 pseudo-gradients with error feedback, H = 4
and K = 2 fragments: fragment 0 syncs at steps 2, 6, 10, ..., fragment 1 at 4, 8, 12, ...
(round r at step 2r), so between two syncs of a fragment the groups' local weights differ.

* every group ends with the same global weights and outer momentum (their local weights differ);
* a group SIGKILLed inside a fragment's exchange, or in the vote after a fragment's round (the
  other fragment not yet synced in that period), leaves the survivors bit-identical to a run
  in which it left cleanly at that point (0 steps redone);
* a joiner takes every fragment's global state and trains in step with the others;
* the whole job killed between checkpoints and relaunched, one group's newest checkpoint
  missing, equals the uninterrupted run bit for bit: local weights, inner optimizer and
  residuals from each group's own checkpoint, global state alike in all of them; with every
  codec the config accepts (int8, int4, topk, bf16, none).

The launching and the checks shared with tests/test_overlap_groups.py: tests/streaming_harness.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests import streaming_harness as h
from tests import streaming_worker as sw
from tests.failure_worker import read_rt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BASE = sw.Case()
LAYOUTS = {"1-rank": {}, "ddp-2-ranks": {"ranks": 2}, "fsdp2-2-ranks": {"ranks": 2, "fsdp": True}}
KILL_LAYOUTS = {**LAYOUTS, "1-rank-allreduce": {"codec": "none"}}  # codec none: the round is an all-reduce


@pytest.mark.parametrize("codec", ["int8", "none"])
def test_groups_train_with_fragments_and_hold_the_same_global_state(tmp_path, codec):
    """int8: each fragment's round is an all-gather of encoded payloads; none: an all-reduce."""
    codes = h.run(replace(BASE, codec=codec), tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0}, codes
    h.check_same_global_state(BASE, tmp_path)
    # one round per fragment per period, at the staggered steps
    assert h.sync_steps(tmp_path, "a") == list(range(2, BASE.stop_step + 1, 2))


@pytest.mark.parametrize("kill,leave,layout", [("kill-exchange", "leave-before", "1-rank"),
                                               pytest.param("kill-vote", "leave-after", "1-rank", marks=pytest.mark.faults),
                                               pytest.param("kill-exchange", "leave-before", "1-rank-allreduce", marks=pytest.mark.faults),
                                               pytest.param("kill-exchange", "leave-before", "ddp-2-ranks", marks=pytest.mark.faults),
                                               pytest.param("kill-exchange", "leave-before", "fsdp2-2-ranks", marks=pytest.mark.faults)])
def test_group_lost_mid_period_equals_a_clean_leave(tmp_path, kill, leave, layout):
    """Round 5 is fragment 0's sync at step 10; fragment 1 syncs next at step 12. ``kill-exchange``:
    b dies inside round 5's exchange (the survivors redo it without b) against b leaving cleanly
    after step 9. ``kill-vote``: b dies in the vote after round 5, with fragment 0 synced with
    it and fragment 1 not yet, against b leaving cleanly after step 10. With 2 ranks every rank
    of b dies as it enters the exchange (FSDP2: its lane's; the survivors' lanes redo it)."""
    base = replace(BASE, **KILL_LAYOUTS[layout])
    h.check_kill_equals_leave(base, kill, leave, tmp_path, syncs=list(range(2, BASE.stop_step + 1, 2)), reconfigured_at=10)


def test_joiner_takes_every_fragments_global_state(tmp_path):
    case = replace(BASE, joiner="d")
    codes = h.run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}, codes
    joined = [e for e in read_rt(str(tmp_path), "d") if e["event"] == "joined"]
    assert joined and joined[-1]["state_from"] in ("a", "b", "c") and joined[-1]["received_bytes"] > 0, joined
    finals = {g: h.final(tmp_path, g) for g in "abcd"}
    assert len({int(f["step"]) for f in finals.values()}) == 1
    for g in "bcd":
        assert torch.equal(finals["a"]["global"], finals[g]["global"]), f"{g}'s global state differs from a's"


# every codec the config accepts, each with its own error-feedback residual per fragment (none:
# zero); the 2-rank layouts (6 processes a run, ~20 s each here), bf16 and none run in
# `make test-faults`. DDP groups encode on the leader alone, as a 1-rank group does;
# FSDP2 groups encode per piece on every rank (int4 and topk: each rank's own residual pieces)
RESUME_CODECS = ("int8", "int4", "topk", "bf16", "none")
RESUME_CASES = [pytest.param({**LAYOUTS[layout], "codec": codec}, id=layout if codec == "int8" else f"{layout}-{codec}",
                             marks=[] if layout == "1-rank" and codec in ("int8", "int4", "topk") else [pytest.mark.faults])
                for layout in LAYOUTS for codec in RESUME_CODECS
                if codec == "int8" or layout == "1-rank" or (layout == "fsdp2-2-ranks" and codec in ("int4", "topk"))]
RESUME_CASES += [
    pytest.param({"mode": "localsgd", "codec": "none"}, id="1-rank-localsgd", marks=pytest.mark.faults),  # parameter averaging
    # with group= checkpoints need not fall at the end of a sync period (TrainerConfig accepts
    # any every_n_steps); the step resumed from (the one before the newest, 21 // N * N - N):
    # every 5: 15, between two syncs; every 7: 14, fragment 0's sync in the middle of a period
    pytest.param({"every": 5}, id="1-rank-every-5", marks=pytest.mark.faults),
    pytest.param({"every": 7, "codec": "int4"}, id="1-rank-int4-every-7", marks=pytest.mark.faults),
    pytest.param({"every": 5, "codec": "topk", "ranks": 2, "fsdp": True}, id="fsdp2-2-ranks-topk-every-5", marks=pytest.mark.faults),
]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_whole_job_killed_and_relaunched_resumes_bit_for_bit(tmp_path, case):
    """Checkpoints at steps 8 and 16 (fragment 1 just synced, fragment 0 two local steps past
    its sync: every group's local weights differ from the global ones and from each other's).
    Every group holds at step 21 and is killed; b's step-16 checkpoint is removed (a kill
    between a's and b's commits): the groups agree on step 8, a and c go back to it, and the
    relaunched job ends equal to the uninterrupted one, bit for bit, in every group and on
    every rank. ``ddp-2-ranks``: DDP inside each group, the leader exchanges; ``fsdp2-2-ranks``:
    the model sharded over each group's 2 ranks, every rank exchanges its pieces (lanes). Each
    codec: int8/int4 (blockwise, the residual is the rounding), topk (1% kept: the residual
    holds almost all of the pseudo-gradient), bf16, none (an all-reduce, no residual); and local
    SGD (``mode="localsgd"``: parameter averaging, no codec). ``every-N``: checkpoints every N
    steps, off the sync period (the newest before 21 removed from b, the one before agreed)."""
    h.check_resume_bit_for_bit(replace(BASE, **case), tmp_path)
