"""The harness of the streaming and overlap tests between provider groups
(tests/test_streaming_groups.py, tests/test_overlap_groups.py): launches one process per rank
of every provider (tests/streaming_worker.py), kills them where a case says, reads what they
left, and holds the two checks both files make: a group lost mid-round equals a clean leave,
and the whole job killed and relaunched equals the uninterrupted run.

Each multi-rank provider meets in a rendezvous store that this (the test) process hosts on a
port it bound itself (port 0): its ranks run with ``TORCHELASTIC_USE_AGENT_STORE=True`` and
connect as clients, as torchrun's workers do to their agent's store. No port is chosen here
and bound later elsewhere, so none can be taken by another process in between.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import replace
from datetime import timedelta
from typing import Callable

import torch
from safetensors.torch import load_file

from tests import streaming_worker as sw
from tests.failure_worker import read_rt


def run(case: sw.Case, out, *, hold_until_killed: bool = False) -> dict[str, int | None]:
    """Run ``case``'s providers (and its joiner) to the end; their exit codes. With
    ``hold_until_killed`` every provider is SIGKILLed once all of them hold at ``stop_step``."""
    import torch.distributed as dist

    from resilient_train.membership import TCPKVStore

    os.makedirs(out, exist_ok=True)
    kv = TCPKVStore.host(0)  # the membership store lives in the test process, never killed
    url = f"tcp://127.0.0.1:{kv.port}"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.streaming_worker"])
    procs: dict[str, mp.Process] = {}
    stores = []  # each multi-rank provider's rendezvous store, alive until its ranks are done

    def launch(g: str, joiner: bool = False) -> None:
        port = 0
        if case.ranks > 1:
            stores.append(dist.TCPStore("127.0.0.1", 0, case.ranks, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False))
            port = stores[-1].port
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


def final(out, g) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, f"final-{g}.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def models(f):
    return {k: v for k, v in f.items() if k.startswith("model.")}


def sync_steps(out, g) -> list[int]:
    return [e["step"] for e in read_rt(str(out), g) if e["event"] == "sync"]


def everyone(case: sw.Case) -> list[str]:
    return [g if r == 0 else f"{g}.{r}" for g in case.groups for r in range(case.ranks)]


def check_same_global_state(case: sw.Case, out) -> dict[str, dict[str, torch.Tensor]]:
    """Every provider ran to ``stop_step`` and exited 0; all hold the same global state (each
    fragment's global weights and outer momentum), their local weights differ. The finals."""
    finals = {g: final(out, g) for g in case.groups}
    assert all(int(f["step"]) == case.stop_step for f in finals.values())
    first = case.groups[0]
    for g in case.groups[1:]:
        assert torch.equal(finals[first]["global"], finals[g]["global"]), f"{g}'s global state differs from {first}'s"
    assert not same(models(finals[first]), models(finals[case.groups[1]]))
    return finals


def check_kill_equals_leave(base: sw.Case, kill: str, leave: str, tmp_path, *, syncs: list[int], reconfigured_at: int) -> None:
    """Every rank of ``base.victim`` SIGKILLed (``kill``) against it leaving cleanly (``leave``):
    the survivors sync at ``syncs`` (none redone or skipped), reconfigure once at
    ``reconfigured_at`` with 0 steps redone, and end bit-identical to the clean-leave run on
    every rank."""
    run_dir, ref = tmp_path / "kill", tmp_path / "leave"
    codes = run(replace(base, fault=kill), run_dir)
    victims = [me for me in codes if me[0] == base.victim]
    assert all(codes[me] == -signal.SIGKILL for me in victims) and all(c == 0 for me, c in codes.items() if me[0] != base.victim), codes
    assert set(run(replace(base, fault=leave), ref).values()) == {0}
    survivors = [g for g in base.groups if g != base.victim]
    for g in survivors:
        assert sync_steps(run_dir, g) == syncs, f"{g} redid or skipped a round"
        rec = [e for e in read_rt(str(run_dir), g) if e["event"] == "reconfigured"]
        assert rec and rec[0]["members"] == survivors and rec[0]["steps_redone"] == 0, rec
        assert rec[0]["step"] == reconfigured_at, rec
        for me in [g] + [f"{g}.{r}" for r in range(1, base.ranks)]:
            assert same(final(run_dir, me), final(ref, me)), f"survivor {me} differs from the clean-leave run"
    assert torch.equal(final(run_dir, survivors[0])["global"], final(run_dir, survivors[-1])["global"])


def check_resume_bit_for_bit(base: sw.Case, tmp_path, *, also: Callable[[str], None] = lambda run_dir: None) -> None:
    """The uninterrupted run against the whole job held at step 21 and SIGKILLed (checkpoints
    every ``base.every`` steps: at 8 and 16 by default), b's newest checkpoint removed (a kill
    between a's and b's commits), relaunched: the groups agree on the one before (8; a and c
    go back to it) and the relaunched job ends equal to the uninterrupted one, bit for bit, in
    every group and on every rank; the ranks of a group hold one model; the groups' local
    weights differ. ``also(run_dir)``: the caller's own checks."""
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    ranks = everyone(base)
    held = 21
    newest = held // base.every * base.every
    before = newest - base.every
    assert before > 0, "the case needs two checkpoints before step 21"
    assert run(base, ref) == dict.fromkeys(ranks, 0)
    codes = run(replace(base, fault="hold", stop_step=held), run_dir, hold_until_killed=True)
    assert set(codes.values()) == {-signal.SIGKILL}, codes
    b_newest = run_dir / "ckpt" / "group-b" / f"step-{newest:010d}"
    assert (b_newest / "manifest.json").exists()
    shutil.rmtree(b_newest)
    for me in ranks:
        os.remove(run_dir / f"w-{me}.jsonl")
    assert run(base, run_dir) == dict.fromkeys(ranks, 0)
    agreed = [e for e in read_rt(str(run_dir), "a") if e["event"] == "restart_point"]
    assert agreed and agreed[-1]["agreed"] == before and agreed[-1]["loaded"] == {"a": newest, "b": before, "c": newest}, agreed
    for me in ranks:
        assert same(final(ref, me), final(run_dir, me)), f"{me} differs from the uninterrupted run"
    for g in base.groups:  # the ranks of a group hold one model (DDP: the same local weights)
        for r in range(1, base.ranks):
            assert same(models(final(run_dir, g)), models(final(run_dir, f"{g}.{r}"))), f"the ranks of group {g} differ"
    assert not same(models(final(run_dir, "a")), models(final(run_dir, "b")))
    also(run_dir)


__all__ = ["run", "final", "same", "models", "sync_steps", "everyone", "check_same_global_state",
           "check_kill_equals_leave", "check_resume_bit_for_bit"]
