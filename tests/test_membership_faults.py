"""Elastic membership under real faults: member processes over gloo, one SIGKILLed mid-run.

The test process hosts the TCPStore (it is never killed). Each member process trains a toy
model whose arithmetic is exact (int64, modular), so the final state can be recomputed from
the membership history that the state itself records (one bitmask per step), and compared
bit for bit. Timeline: a, b, c train; c is SIGKILLed; a and b detect it, agree on a new epoch,
rebuild their group and continue; d joins, receives the state from a live peer (bit-identical),
and a, b, d train together; d is SIGSTOPped (a hang: its sockets stay open), the collective
timeout and the heartbeat timeout bound the survivors' wait, and a, b finish.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

WEIGHTS = {"a": 1, "b": 2, "c": 3, "d": 4, "x": 5}
MOD_G, MOD_X = 1009, 1_000_003


@dataclass(frozen=True)
class Cfg:
    heartbeat_interval_s: float = 0.25
    timeout_s: float = 1.5
    collective_timeout_s: float = 3.0
    min_members: int = 2
    numel: int = 100_000  # 0.8 MB of int64: several transfer chunks
    max_steps: int = 3000
    chunk_bytes: int = 256 << 10
    step_sleep_s: float = 0.02
    admit_timeout_s: float = 30.0


def toy_step(x, members: tuple[str, ...], step: int):
    """The reference update (what the all-reduce computes) for a member set."""
    import torch

    total = torch.zeros_like(x)
    for mid in members:
        total += (x * WEIGHTS[mid] + step) % MOD_G
    return (x + total) % MOD_X


def replay(flat_bytes: bytes, cfg: Cfg) -> tuple[Any, list[tuple[str, ...]]]:
    """Recompute x from the history recorded in a final state; returns (x, members per step)."""
    import numpy as np
    import torch

    flat = torch.from_numpy(np.frombuffer(flat_bytes, dtype=np.int64).copy())
    hist = flat[cfg.numel:].tolist()
    x = torch.arange(cfg.numel, dtype=torch.int64)
    history = []
    for step, mask in enumerate(hist):
        if mask == 0:
            break
        members = tuple(sorted(m for m, w in WEIGHTS.items() if mask >> w & 1))
        history.append(members)
        x = toy_step(x, members, step)
    return (x, flat[:cfg.numel]), history


def member_main(host: str, port: int, member_id: str, fingerprint: str, cfg: Cfg, events: Any) -> None:
    """One replica group's leader: join, train until ``stop_at`` (a store key), report events."""
    import torch

    from resilient_train.errors import DistributedError, MembershipError
    from resilient_train.membership import Membership, TCPKVStore, state_digest, sync_state

    torch.set_num_threads(1)

    def emit(kind: str, **kw: Any) -> None:
        events.put((kind, member_id, time.time(), kw))

    kv = TCPKVStore(host, port)
    to = timedelta(seconds=5)
    emit("ready")
    while kv.get(f"test/go/{member_id}", timeout=to) is None:
        time.sleep(0.02)
    m = Membership(kv, member_id, fingerprint, heartbeat_interval_s=cfg.heartbeat_interval_s,
                   timeout_s=cfg.timeout_s, min_members=cfg.min_members,
                   collective_timeout_s=cfg.collective_timeout_s).start()
    flat = torch.zeros(cfg.numel + cfg.max_steps, dtype=torch.int64)
    x, hist = flat[:cfg.numel], flat[cfg.numel:]
    x.copy_(torch.arange(cfg.numel))
    if member_id not in ("a", "b", "c"):
        x.fill_(-1)  # a joiner's own state is garbage until it receives the members'
    step = 0
    try:
        m.wait_for_admission(cfg.admit_timeout_s)
    except MembershipError as exc:
        emit("refused", reason=str(exc))
        m.close()
        return

    def enter(step: int) -> tuple[Any, int]:
        deadline = time.monotonic() + cfg.admit_timeout_s
        while True:
            try:
                comm = m.communicator()
                # fallback: the founders (all joiners of epoch 1) start from their initial state
                res = sync_state(comm, m.view, member_id, flat, step, fallback=lambda _flat: 0,
                                 chunk_bytes=cfg.chunk_bytes,
                                 timeout=timedelta(seconds=cfg.collective_timeout_s))
                emit("epoch", epoch=m.view.epoch, members=m.view.members, step=res.step, source=res.source,
                     received=res.received_bytes, sent=res.sent_bytes, digest=state_digest(flat))
                return comm, res.step
            except (DistributedError, MembershipError) as exc:
                emit("retry", error=str(exc)[:300])
                if time.monotonic() > deadline or m.wait_for_change(cfg.timeout_s * 4) is None:
                    raise

    comm, step = enter(step)
    while step < cfg.max_steps:
        stop = kv.get("test/stop_at", timeout=to)
        if stop is not None and step >= int(stop):
            break
        g = (x * WEIGHTS[member_id] + step) % MOD_G
        buf = torch.cat([g, torch.tensor([int(m.check())], dtype=torch.int64)])
        try:
            comm.allreduce_sum(buf).wait(timedelta(seconds=cfg.collective_timeout_s))
        except DistributedError as exc:
            emit("fault", step=step, error=str(exc)[:300])
            if m.wait_for_change(cfg.timeout_s * 4) is None:
                raise MembershipError(f"{member_id}: collective failed and no new view came") from exc
            comm, step = enter(step)
            continue
        x.copy_((x + buf[:-1]) % MOD_X)
        hist[step] = sum(1 << WEIGHTS[mid] for mid in m.view.members)
        step += 1
        emit("step", step=step, epoch=m.view.epoch)
        if buf[-1] > 0:  # someone saw a newer view: everyone switches after this same step
            if m.wait_for_change(cfg.timeout_s * 4) is not None:
                comm, step = enter(step)
        time.sleep(cfg.step_sleep_s)
    emit("done", step=step, epoch=m.view.epoch, flat=flat.numpy().tobytes())
    m.close()


def _proc_entry(host, port, member_id, fingerprint, cfg, events) -> None:
    try:
        member_main(host, port, member_id, fingerprint, cfg, events)
    except BaseException as exc:  # noqa: BLE001 - reported to the test with its type
        import traceback

        events.put(("error", member_id, time.time(), {"error": f"{exc!r}\n{traceback.format_exc()}"}))


class Events:
    """Collects events from members; ``wait_for(pred)`` with a timeout; fails on member errors.

    One queue per member: a multiprocessing queue's writers share one lock, and a member
    SIGKILLed (or SIGSTOPped) while its feeder thread held it would silence every other member's
    events for good (the test then timed out waiting for survivors that were training fine)."""

    def __init__(self, ctx: Any):
        self.log: list = []
        if isinstance(ctx, queue.Queue):  # thread members (test_membership_service): one shared queue, ``.q``
            self.ctx, self.q, self.queues = None, ctx, {"threads": ctx}
        else:  # a multiprocessing context: queue_for(member) makes each member's own
            self.ctx, self.queues = ctx, {}

    def queue_for(self, mid: str) -> Any:
        self.queues[mid] = self.ctx.Queue()
        return self.queues[mid]

    def drain(self, timeout_s: float = 0.05) -> None:
        got = False
        for q in list(self.queues.values()):
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                got = True
                self.log.append(item)
                if item[0] == "error":
                    pytest.fail(f"member {item[1]} failed: {item[3]['error']}")
        if not got:
            time.sleep(min(timeout_s, 0.01))

    def wait_for(self, pred, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in self.log:
                if pred(e):
                    return e
            self.drain()
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last events: {self.log[-8:]}")

    def of(self, kind: str, member: str | None = None) -> list:
        return [e for e in self.log if e[0] == kind and (member is None or e[1] == member)]


def test_sigkill_then_join_then_sigstop():
    from resilient_train.membership import TCPKVStore

    cfg = Cfg()
    kv = TCPKVStore.host()  # lives in the test process, which is never killed
    to = timedelta(seconds=5)
    # forkserver: torch is imported once, in the server, not once per member (a 2-core CI box)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["resilient_train.membership", "tests.test_membership_faults"])
    t0 = time.time()
    ev = Events(ctx)
    procs: dict[str, Any] = {}

    def spawn(mid: str, fp: str = "fp-toy-v1") -> None:
        procs[mid] = ctx.Process(target=_proc_entry, args=("127.0.0.1", kv.port, mid, fp, cfg, ev.queue_for(mid)), daemon=True)
        procs[mid].start()

    try:
        for mid in "abcd":  # d starts now too, but waits for its go before it joins
            spawn(mid)
        for mid in "abcd":
            ev.wait_for(lambda e, mid=mid: e[0] == "ready" and e[1] == mid, 60, f"{mid} ready")
        t_ready = time.time()
        for mid in "abc":
            kv.set(f"test/go/{mid}", b"1", timeout=to)
        first = ev.wait_for(lambda e: e[0] == "epoch", 30, "the first epoch")
        assert first[3]["members"] == ("a", "b", "c") and first[3]["epoch"] == 1
        ev.wait_for(lambda e: e[0] == "step" and e[3]["step"] >= 30, 30, "30 steps")

        # --- fault: SIGKILL c mid-run
        t_kill = time.time()
        os.kill(procs["c"].pid, signal.SIGKILL)
        survivors = ("a", "b")
        for mid in survivors:
            ev.wait_for(lambda e, mid=mid: e[0] == "epoch" and e[1] == mid and e[3]["members"] == survivors,
                        cfg.timeout_s + 15, f"{mid} in epoch without c")
        for mid in survivors:
            ev.wait_for(lambda e, mid=mid: e[0] == "step" and e[1] == mid and e[2] > t_kill and e[3]["epoch"] == 2,
                        10, f"{mid} stepping in epoch 2")
        detected = max(min((e[2] for e in ev.of("fault", mid) if e[2] > t_kill), default=float("nan"))
                       for mid in survivors) - t_kill
        adopted = max(e[2] for e in ev.log if e[0] == "epoch" and e[3]["epoch"] == 2) - t_kill
        resumed = max(min(e[2] for e in ev.of("step", mid) if e[3]["epoch"] == 2) for mid in survivors) - t_kill
        assert all(e[3]["epoch"] == 2 for e in ev.log if e[0] == "epoch" and e[2] > t_kill)
        # bounded by the configured timeout (plus beats, the publish and a loaded 2-core machine)
        assert resumed < cfg.timeout_s + 4 * cfg.heartbeat_interval_s + 3.0, (detected, adopted, resumed)

        # --- join: d arrives with garbage state, receives the members' state from a live peer
        t_spawn = time.time()
        kv.set("test/go/d", b"1", timeout=to)
        joined = ev.wait_for(lambda e: e[0] == "epoch" and e[1] == "d", 30, "d admitted")
        assert joined[3]["members"] == ("a", "b", "d") and joined[3]["epoch"] == 3
        assert joined[3]["source"] == "a" and joined[3]["received"] == (cfg.numel + cfg.max_steps) * 8
        a3 = ev.wait_for(lambda e: e[0] == "epoch" and e[1] == "a" and e[3]["epoch"] == 3, 10, "a in epoch 3")
        assert joined[3]["digest"] == a3[3]["digest"] and joined[3]["step"] == a3[3]["step"]  # bit-identical
        ev.wait_for(lambda e: e[0] == "step" and e[1] == "d" and e[3]["step"] >= joined[3]["step"] + 15, 30,
                    "15 steps with d")

        # --- hang: SIGSTOP d; its sockets stay open, so only the collective timeout can notice
        t_stop = time.time()
        os.kill(procs["d"].pid, signal.SIGSTOP)
        for mid in survivors:
            ev.wait_for(lambda e, mid=mid: e[0] == "step" and e[1] == mid and e[3]["epoch"] == 4,
                        cfg.collective_timeout_s + cfg.timeout_s + 15, f"{mid} stepping in epoch 4")
        resumed_hang = max(min(e[2] for e in ev.of("step", mid) if e[3]["epoch"] == 4) for mid in survivors) - t_stop
        bound = max(cfg.collective_timeout_s, cfg.timeout_s) + 4 * cfg.heartbeat_interval_s + 3.0
        assert resumed_hang < bound, resumed_hang
        last = max(e[3]["step"] for e in ev.of("step"))
        kv.set("test/stop_at", str(last + 20).encode(), timeout=to)
        for mid in survivors:
            ev.wait_for(lambda e, mid=mid: e[0] == "done" and e[1] == mid, 30, f"{mid} done")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)

    rates = {}
    for e in ev.of("step", "a"):
        rates.setdefault(e[3]["epoch"], []).append(e[2])
    step_s = {ep: round((ts[-1] - ts[0]) / max(1, len(ts) - 1), 3) for ep, ts in rates.items()}
    done = {e[1]: e[3] for e in ev.of("done")}
    assert {v["step"] for v in done.values()} == {last + 20}
    assert done["a"]["flat"] == done["b"]["flat"]  # bit-identical
    (x_ref, x_got), history = replay(done["a"]["flat"], cfg)
    import torch

    assert len(history) == last + 20
    assert torch.equal(x_ref, x_got)  # every step's result is what its members' all-reduce should give
    # the membership history, in order: a,b,c until the kill; a,b; a,b,d after the join; a,b
    runs = [h for i, h in enumerate(history) if i == 0 or history[i - 1] != h]
    assert runs == [("a", "b", "c"), ("a", "b"), ("a", "b", "d"), ("a", "b")], runs
    print(f"\nSIGKILL c: survivors' collective failed after {detected:.2f} s, epoch 2 adopted after "
          f"{adopted:.2f} s, training resumed after {resumed:.2f} s (timeout_s={cfg.timeout_s}, "
          f"heartbeat {cfg.heartbeat_interval_s} s); d admitted and caught up {joined[2] - t_spawn:.2f} s "
          f"after it asked; SIGSTOP d: resumed after {resumed_hang:.2f} s (collective_timeout_s="
          f"{cfg.collective_timeout_s}); timeline from spawn: ready {t_ready - t0:.1f} s, epoch 1 "
          f"{first[2] - t0:.1f} s, kill {t_kill - t0:.1f} s, d asked {t_spawn - t0:.1f} s, "
          f"all done {time.time() - t0:.1f} s; seconds per step by epoch {step_s} "
          f"(steps per membership run: {[(''.join(r), sum(1 for _ in g)) for r, g in itertools.groupby(history)]})")
