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
  residuals from each group's own checkpoint, global state alike in all of them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests import streaming_worker as sw
from tests.failure_worker import read_rt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BASE = sw.Case()
LAYOUTS = {"1-rank": {}, "ddp-2-ranks": {"ranks": 2}, "fsdp2-2-ranks": {"ranks": 2, "fsdp": True}}
KILL_LAYOUTS = {**LAYOUTS, "1-rank-allreduce": {"codec": "none"}}  # codec none: the round is an all-reduce


def _run(case: sw.Case, out, *, hold_until_killed: bool = False) -> dict[str, int | None]:
    """Run ``case``'s providers (and its joiner) to the end; their exit codes. With
    ``hold_until_killed`` every provider is SIGKILLed once all of them hold at ``stop_step``."""
    from resilient_train.membership import TCPKVStore

    os.makedirs(out, exist_ok=True)
    kv = TCPKVStore.host(0)  # the membership store lives in the test process, never killed
    url = f"tcp://127.0.0.1:{kv.port}"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.streaming_worker"])
    procs: dict[str, mp.Process] = {}

    def launch(g: str, joiner: bool = False) -> None:
        port = _free_port()
        for r in range(case.ranks):
            me = g if r == 0 else f"{g}.{r}"
            procs[me] = ctx.Process(target=sw.run, args=(g, url, str(out), case.dump(), joiner, r, port), daemon=True)
            procs[me].start()

    def wait_for(pred, what: str) -> None:
        while not all(pred(g) for g in procs if g[0] in case.groups):
            assert time.monotonic() < deadline, what
            assert all(p.exitcode is None for p in procs.values()), {g: p.exitcode for g, p in procs.items()}
            time.sleep(0.05)

    deadline = time.monotonic() + 200
    try:
        for g in case.groups:
            launch(g)
        if case.joiner:
            wait_for(lambda g: any(e["ev"] == "step" and e["after"] >= case.join_after_step for e in sw.read(str(out), g)),
                     "the founders did not reach the join step")
            launch(case.joiner, joiner=True)
        if hold_until_killed:
            wait_for(lambda g: any(e["ev"] == "held" for e in sw.read(str(out), g)), "the groups did not hold")
            for p in procs.values():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs.values():
            p.join(max(1.0, deadline - time.monotonic()))
        return {g: p.exitcode for g, p in procs.items()}
    finally:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _final(out, g) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, f"final-{g}.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _models(f):
    return {k: v for k, v in f.items() if k.startswith("model.")}


def _sync_steps(out, g) -> list[int]:
    return [e["step"] for e in read_rt(str(out), g) if e["event"] == "sync"]


@pytest.mark.parametrize("codec", ["int8", "none"])
def test_groups_train_with_fragments_and_hold_the_same_global_state(tmp_path, codec):
    """int8: each fragment's round is an all-gather of encoded payloads; none: an all-reduce."""
    codes = _run(replace(BASE, codec=codec), tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0}, codes
    finals = {g: _final(tmp_path, g) for g in "abc"}
    assert all(int(f["step"]) == BASE.stop_step for f in finals.values())
    # the replicated state is identical everywhere; the local weights are each group's own
    assert torch.equal(finals["a"]["global"], finals["b"]["global"]) and torch.equal(finals["a"]["global"], finals["c"]["global"])
    assert not _same(_models(finals["a"]), _models(finals["b"]))
    # one round per fragment per period, at the staggered steps
    assert _sync_steps(tmp_path, "a") == list(range(2, BASE.stop_step + 1, 2))


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
    run, ref = tmp_path / "kill", tmp_path / "leave"
    codes = _run(replace(base, fault=kill), run)
    bs = [me for me in codes if me[0] == "b"]
    assert all(codes[me] == -signal.SIGKILL for me in bs) and all(c == 0 for me, c in codes.items() if me[0] != "b"), codes
    assert set(_run(replace(base, fault=leave), ref).values()) == {0}
    for g in "ac":
        assert _sync_steps(run, g) == list(range(2, BASE.stop_step + 1, 2)), f"{g} redid or skipped a round"
        rec = [e for e in read_rt(str(run), g) if e["event"] == "reconfigured"]
        assert rec and rec[0]["members"] == ["a", "c"] and rec[0]["steps_redone"] == 0, rec
        assert rec[0]["step"] == 10, rec
        for me in [g] + [f"{g}.{r}" for r in range(1, base.ranks)]:
            assert _same(_final(run, me), _final(ref, me)), f"survivor {me} differs from the clean-leave run"
    assert torch.equal(_final(run, "a")["global"], _final(run, "c")["global"])


def test_joiner_takes_every_fragments_global_state(tmp_path):
    case = replace(BASE, joiner="d")
    codes = _run(case, tmp_path)
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}, codes
    joined = [e for e in read_rt(str(tmp_path), "d") if e["event"] == "joined"]
    assert joined and joined[-1]["state_from"] in ("a", "b", "c") and joined[-1]["received_bytes"] > 0, joined
    finals = {g: _final(tmp_path, g) for g in "abcd"}
    assert len({int(f["step"]) for f in finals.values()}) == 1
    for g in "bcd":
        assert torch.equal(finals["a"]["global"], finals[g]["global"]), f"{g}'s global state differs from a's"




# the 2-rank layouts (6 processes a run, ~20 s each here) run in `make test-faults`
@pytest.mark.parametrize("layout", [pytest.param(k, marks=[pytest.mark.faults] if k != "1-rank" else []) for k in LAYOUTS])
def test_whole_job_killed_and_relaunched_resumes_bit_for_bit(tmp_path, layout):
    """Checkpoints at steps 8 and 16 (fragment 1 just synced, fragment 0 two local steps past
    its sync: every group's local weights differ from the global ones and from each other's).
    Every group holds at step 21 and is killed; b's step-16 checkpoint is removed (a kill
    between a's and b's commits): the groups agree on step 8, a and c go back to it, and the
    relaunched job ends equal to the uninterrupted one, bit for bit, in every group and on
    every rank. ``ddp-2-ranks``: DDP inside each group, the leader exchanges; ``fsdp2-2-ranks``:
    the model sharded over each group's 2 ranks, every rank exchanges its pieces (lanes)."""
    base = replace(BASE, **LAYOUTS[layout])
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
    for g in "abc":  # the ranks of a group hold one model (DDP: the same local weights)
        for r in range(1, base.ranks):
            assert _same(_models(_final(run, g)), _models(_final(run, f"{g}.{r}"))), f"the ranks of group {g} differ"
    assert not _same(_models(_final(run, "a")), _models(_final(run, "b")))
