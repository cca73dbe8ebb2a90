"""Membership at scale: roll call, view switch and store load against the number of groups.

    python benchmarks/sim_membership_scale.py                      # 8 16 32 (x2), 64, TCPStore; 8 on etcd
    python benchmarks/sim_membership_scale.py --groups 8 --runs 1 --no-etcd

Each *group* is one replica group's leader: one real :class:`~resilient_train.membership.Membership`
(heartbeat thread, abort watcher) plus a training thread that runs a tiny "round" every
``--round-s`` seconds: an all-reduce of two floats over the epoch's real gloo group (the vote
slot included, as the trainer does), and on a failed round the real roll call
(``report_failure``), then ``communicator()`` and ``sync_state`` in the new view. Nothing is
mocked: real TCPStore (or a real 3-member etcd), real gloo over loopback, real SIGKILL.

**Why threads inside a few processes.** This machine has 2 cores shared with other work. One
process per group (64 Python interpreters importing torch) would spend minutes starting and
would measure the scheduler; all groups in one process would serialise 64 x 3 threads on one
GIL. So the resident groups are threads spread over ``W = max(2, N // 16)`` worker processes
(2 for 8-32 groups, 4 for 64), and the group that joins and is then killed runs alone in its own
process, so that its SIGKILL is a real process death (its sockets reset, its heartbeat stops).
All timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process here).

Measured per run of N resident groups (every figure per run lands in the JSON):

* ``store``: membership store load in steady state (every group in one view, rounds running),
  counted by a :class:`CountingKV` wrapper around the real store in every process: calls per
  second by kind (``get``/``set``/``add``/``compare_set``; ``add0`` is ``add(key, 0)``, which
  reads the registry counter and counts as a read) and by key family (``hb``,
  ``registry``, ``view``, ``abort`` ...), per group and in total; the number of keys (TCPStore:
  ``num_keys()`` of the server, gloo's rendezvous keys included; etcd: distinct keys written).
* ``abort_watch``: one group holds back from a round for ``--stall-s`` seconds, so every other
  group's all-reduce is in flight meanwhile: ``abort/<epoch>`` reads per second per waiting group.
* ``join`` (per cycle): a new group starts (``Membership.start``) -> the view that admits it is
  published (``view/<e>`` compare_set won, timestamped in the publishing process) -> every
  member has adopted epoch ``e`` (its ``communicator()`` built the gloo group and ``sync_state``
  returned; the resident groups switch after their next round's vote).
* ``rollcall`` (per cycle): the joined group is SIGKILLed -> every survivor holds the next view
  (``report_failure`` returned it) and -> every survivor has built that view's gloo group.

Configurations are interleaved (``--groups`` forward then backward, ``--runs`` times: 8 16 32
32 16 8 by default), then ``--once`` sizes (64) and ``--etcd-groups`` (8) against a real
3-member etcd. A run that does not reach a phase within its limit is recorded with the reason
(the store load, abort watch and cycles measured before a failing join-and-kill cycle are
kept). Medians and spreads per N are in
``benchmarks/results/membership_scale.json`` with the machine and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# the membership timings every run uses (library defaults except first_view_after_s)
HB_S = 1.0
TIMEOUT_S = 10.0
FIRST_VIEW_AFTER_S = 2.0
ROUND_DEADLINE_S = 30.0
ABORT_POLL_S = 0.02


# ----------------------------------------------------------------------------- the counting store

class CountingKV:
    """A :class:`~resilient_train.membership.KVStore` that counts every call by kind and key
    family into ``counts`` (shared with its clones) and reports won ``compare_set`` calls on
    ``view/<e>`` and ``abort/<e>`` through ``on_publish(family, epoch)``. It offers
    ``torch_store`` exactly when the wrapped store does, so gloo's rendezvous takes the same
    path as without the wrapper (native for TCPStore: not counted here, but in ``num_keys()``)."""

    def __init__(self, inner: Any, prefix: str, counts: dict | None = None, lock: threading.Lock | None = None,
                 on_publish: Any = None, written: set | None = None):
        self._inner, self._prefix = inner, prefix.rstrip("/") + "/"
        self.counts = {} if counts is None else counts
        self.written = set() if written is None else written
        self._lock = lock or threading.Lock()
        self._on_publish = on_publish
        if callable(getattr(inner, "torch_store", None)):
            self.torch_store = inner.torch_store

    def _family(self, key: str) -> str:
        rest = key[len(self._prefix):] if key.startswith(self._prefix) else key
        head = rest.split("/", 1)[0]
        return "epoch" if head.startswith("epoch-") else head

    def _count(self, op: str, key: str, write: bool = False) -> None:
        with self._lock:
            k = f"{op} {self._family(key)}"
            self.counts[k] = self.counts.get(k, 0) + 1
            if write:
                self.written.add(key)

    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
        self._count("set", key, True)
        self._inner.set(key, value, timeout=timeout)

    def get(self, key: str, *, timeout: timedelta) -> bytes | None:
        self._count("get", key)
        return self._inner.get(key, timeout=timeout)

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int:
        self._count("add" if amount else "add0", key, amount != 0)  # add(key, 0) reads the counter
        return self._inner.add(key, amount, timeout=timeout)

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        self._count("compare_set", key, True)
        out = self._inner.compare_set(key, expected, desired, timeout=timeout)
        fam = self._family(key)
        if out == desired and fam in ("view", "abort") and self._on_publish is not None:
            self._on_publish(fam, int(key.rsplit("/", 1)[1]))
        return out

    def clone(self) -> "CountingKV":
        return CountingKV(self._inner.clone(), self._prefix, self.counts, self._lock, self._on_publish, self.written)

    def snapshot(self) -> tuple[dict, int]:
        with self._lock:
            return dict(self.counts), len(self.written)


def open_store(spec: str) -> Any:
    from resilient_train.membership import EtcdKVStore, TCPKVStore

    kind, _, where = spec.partition(":")
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        return TCPKVStore(host, int(port))
    if kind == "etcd":
        return EtcdKVStore(where)
    raise ValueError(f"unknown store spec {spec!r}")


# ----------------------------------------------------------------------------- worker process

def worker_main(cfg: dict) -> None:
    """Host ``cfg['groups']`` as threads; JSON lines out on stdout, commands in on stdin."""
    import logging

    import torch

    from resilient_train.errors import DistributedError, MembershipError
    from resilient_train.membership import Membership, sync_state

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    out_lock = threading.Lock()

    def emit(ev: str, **kw: Any) -> None:
        line = json.dumps({"ev": ev, "t": time.monotonic(), **kw})
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    kv = CountingKV(open_store(cfg["store"]), cfg["prefix"],
                    on_publish=lambda fam, e: emit("published", family=fam, epoch=e))
    stop = threading.Event()
    stalls: dict[str, float] = {}
    deadline = timedelta(seconds=ROUND_DEADLINE_S)

    def group(mid: str) -> None:
        # each group its own connection, as each provider's leader process has (a handle
        # shared by the groups of this process would serialise their roll calls)
        m = Membership(kv.clone(), mid, "sim-model", heartbeat_interval_s=cfg["hb_s"], timeout_s=cfg["timeout_s"],
                       first_view_after_s=FIRST_VIEW_AFTER_S, collective_timeout_s=ROUND_DEADLINE_S,
                       prefix=cfg["prefix"], abort_poll_s=ABORT_POLL_S)
        emit("started", member=mid)
        m.start()
        m.wait_for_admission(timeout_s=300)
        flat, step = torch.zeros(16), 0
        comm = None
        while not stop.is_set():
            try:
                if comm is None:
                    comm = m.communicator()
                    view = m.view
                    step = sync_state(comm, view, mid, flat, step, fallback=lambda f: 0, timeout=deadline).step
                    emit("adopted", member=mid, epoch=view.epoch, size=len(view.members))
                pause = stalls.pop(mid, 0.0)
                if pause:
                    emit("stall", member=mid, seconds=pause)
                    time.sleep(pause)
                buf = torch.tensor([1.0, float(m.check())])
                comm.allreduce_sum(buf).wait(deadline)
                step += 1
                if buf[1] > 0:  # someone saw a newer view: everyone switches after this round
                    emit("switch", member=mid, epoch=m.view.epoch)
                    m.wait_for_change(timeout_s=cfg["timeout_s"])
                    comm = None
                    continue
                stop.wait(cfg["round_s"])
            except DistributedError as exc:
                e = m.view.epoch
                emit("failed", member=mid, epoch=e)
                try:
                    v = m.report_failure(deadline_s=ROUND_DEADLINE_S, error=str(exc)[:200])
                    emit("rollcall_done", member=mid, epoch=v.epoch, failed_epoch=e)
                except MembershipError as exc2:
                    emit("error", member=mid, where="report_failure", error=str(exc2)[:300])
                comm = None
            except MembershipError as exc:  # the group of a view could not connect: roll call on it
                emit("error", member=mid, where="communicator", error=str(exc)[:300])
                if mid not in m.latest.members:
                    m.wait_for_admission(timeout_s=300)
                else:
                    try:
                        m.report_failure(deadline_s=ROUND_DEADLINE_S, view=m.latest, error=str(exc)[:200])
                    except MembershipError:
                        m.wait_for_change(timeout_s=cfg["timeout_s"])
                comm = None

    emit("ready", pid=os.getpid())
    threads = []
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "go":
            for mid in cfg["groups"]:
                t = threading.Thread(target=group, args=(mid,), name=mid, daemon=True)
                t.start()
                threads.append(t)
        elif cmd[0] == "counts":
            counts, nwritten = kv.snapshot()
            emit("counts", tag=cmd[1], counts=counts, written=nwritten)
        elif cmd[0] == "stacks":  # diagnosis: every thread's stack to this worker's log
            import faulthandler

            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        elif cmd[0] == "stall":
            stalls[cmd[1]] = float(cmd[2])
        elif cmd[0] == "stop":
            break
    stop.set()
    sys.stdout.flush()
    os._exit(0)  # the driver ends the job; closing 16 memberships one by one would only slow it


# ----------------------------------------------------------------------------- driver

class Worker:
    def __init__(self, cfg: dict, events: "queue.Queue[dict]", log_path: str):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.groups = cfg["groups"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=ROOT)
        self.reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.reader.start()

    def _read(self, events: "queue.Queue[dict]") -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["pid"] = self.proc.pid
            events.put(ev)

    def send(self, cmd: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


class Run:
    """One configuration: N resident groups, ``cycles`` x (join a group, SIGKILL it)."""

    def __init__(self, n: int, store_spec: str, prefix: str, workdir: str, round_s: float, hb_s: float,
                 timeout_s: float):
        self.n, self.store_spec, self.prefix, self.workdir, self.round_s = n, store_spec, prefix, workdir, round_s
        self.hb_s, self.timeout_s = hb_s, timeout_s
        self.events: queue.Queue[dict] = queue.Queue()
        self.log: list[dict] = []
        self.workers: list[Worker] = []

    def cfg(self, groups: list[str]) -> dict:
        return {"groups": groups, "store": self.store_spec, "prefix": self.prefix, "hb_s": self.hb_s,
                "timeout_s": self.timeout_s, "round_s": self.round_s}

    def spawn(self, groups: list[str], tag: str) -> Worker:
        w = Worker(self.cfg(groups), self.events, os.path.join(self.workdir, f"{self.prefix}-{tag}.log"))
        self.workers.append(w)
        return w

    def pump(self) -> None:
        while True:
            try:
                self.log.append(self.events.get_nowait())
            except queue.Empty:
                return

    def wait_for(self, pred: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        next_note = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.pump()
            got = pred()
            if got:
                return got
            if time.monotonic() > next_note:
                next_note += 20
                print(f"  N={self.n} waiting for {what}: {self.progress()}", file=sys.stderr, flush=True)
            time.sleep(0.05)
        errors = [e for e in self.log if e["ev"] == "error"][-5:]
        raise TimeoutError(f"{what}: not within {timeout_s} s (N={self.n}; last errors {errors}; logs in "
                           f"{self.workdir})")

    def progress(self) -> str:
        kinds: dict[str, int] = {}
        latest: dict[str, tuple[int, int]] = {}
        for e in self.log:
            kinds[e["ev"]] = kinds.get(e["ev"], 0) + 1
            if e["ev"] == "adopted":
                latest[e["member"]] = (e["epoch"], e["size"])
        views = sorted({e["epoch"] for e in self.log if e["ev"] == "published" and e["family"] == "view"})
        by_view: dict[tuple[int, int], int] = {}
        for v in latest.values():
            by_view[v] = by_view.get(v, 0) + 1
        errors = [e for e in self.log if e["ev"] == "error"]
        last = f"; last error ({errors[-1]['member']}, {errors[-1]['where']}): {errors[-1]['error'][:300]}" if errors else ""
        return f"events {kinds}; views published {views[-5:]}; members by adopted (epoch, size) {by_view}{last}"

    def adopted(self, members: set[str], epoch_min: int, size: int) -> dict[str, dict]:
        """member -> its first 'adopted' event with epoch >= epoch_min and that view size."""
        out: dict[str, dict] = {}
        for e in self.log:
            if e["ev"] == "adopted" and e["member"] in members and e["epoch"] >= epoch_min and e["size"] == size:
                out.setdefault(e["member"], e)
        return out

    def counts(self, tag: str, workers: list[Worker]) -> tuple[float, dict[str, int], int]:
        for w in workers:
            w.send(f"counts {tag}")
        got = self.wait_for(lambda: [e for e in self.log if e["ev"] == "counts" and e["tag"] == tag]
                            if len([e for e in self.log if e["ev"] == "counts" and e["tag"] == tag]) == len(workers)
                            else None, 30, f"counts {tag}")
        total: dict[str, int] = {}
        for e in got:
            for k, v in e["counts"].items():
                total[k] = total.get(k, 0) + v
        return statistics.median(e["t"] for e in got), total, sum(e["written"] for e in got)


_READS = ("get", "add0")


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) - a.get(k, 0)}


def run_once(n: int, store_spec: str, *, cycles: int = 2, workdir: str | None = None, round_s: float = 1.0,
             steady_s: float = 4.0, stall_s: float = 2.0, num_keys: Any = None, tag: str = "",
             hb_s: float = HB_S, timeout_s: float = TIMEOUT_S) -> dict:
    """One configuration (module docstring); returns its figures. ``num_keys``: a callable that
    returns the store's key count (TCPStore server), or None. Raises TimeoutError naming the
    phase that did not complete (the workers' logs stay in ``workdir``)."""
    workdir = workdir or tempfile.mkdtemp(prefix="rt-sim-")
    prefix = f"sim{tag}-n{n}-{os.getpid()}-{int(time.monotonic() * 1000) % 10**8}"
    r = Run(n, store_spec, prefix, workdir, round_s, hb_s, timeout_s)
    ids = [f"g{i:03d}" for i in range(n)]
    nw = max(2, n // 16)
    try:
        resident = [r.spawn(ids[i::nw], f"w{i}") for i in range(nw)]
        joiners = [r.spawn([f"j{c}"], f"j{c}") for c in range(cycles)]  # pre-started: imports off the clock
        r.wait_for(lambda: len([e for e in r.log if e["ev"] == "ready"]) == len(r.workers), 180, "workers ready")
        for w in resident:
            w.send("go")
        everyone = set(ids)
        formed = r.wait_for(lambda: (lambda a: a if len(a) == n and len({e["epoch"] for e in a.values()}) == 1
                                     else None)(r.adopted(everyone, 1, n)), 150, "all groups in one view")
        epoch = next(iter(formed.values()))["epoch"]
        time.sleep(1.5 * hb_s)  # a beat or two in the settled view
        # (c) steady-state store load
        t0, c0, _ = r.counts("s0", resident)
        time.sleep(steady_s)
        t1, c1, written = r.counts("s1", resident)
        steady = _delta(c0, c1)
        if not steady.get("set hb"):  # no heartbeat in the window: keep every thread's stack for diagnosis
            for w in resident:
                w.send("stacks")
        dt = t1 - t0
        membership_ops = sum(v for k, v in steady.items() if k.split()[1] not in ("abort", "epoch"))
        reads = sum(v for k, v in steady.items() if k.split()[0] in _READS)
        writes = sum(v for k, v in steady.items() if k.split()[0] not in _READS)
        store = {"window_s": dt, "calls": steady, "calls_per_s": {k: v / dt for k, v in steady.items()},
                 "reads_per_s": reads / dt, "writes_per_s": writes / dt,
                 "membership_calls_per_group_per_s": membership_ops / dt / n,
                 "membership_calls_per_group_per_beat": membership_ops / dt / n * hb_s,
                 "hb_reads_per_group_per_s": steady.get("get hb", 0) / dt / n,
                 "beats_per_group_per_s": steady.get("set hb", 0) / dt / n,
                 "membership_calls_per_beat": membership_ops / max(1, steady.get("set hb", 0)),
                 "keys_written_by_members": written, "keys_in_store": num_keys() if num_keys else None}
        # (d) abort-watch reads while a round is in flight: g000 holds back, the others wait in it
        a0 = r.counts("a0", resident)
        resident[0].send(f"stall g000 {stall_s}")
        time.sleep(stall_s + 1.0)
        a1 = r.counts("a1", resident)
        stall_ev = [e for e in r.log if e["ev"] == "stall"]
        abort_reads = a1[1].get("get abort", 0) - a0[1].get("get abort", 0)
        abort_watch = {"stall_s": stall_s, "window_s": a1[0] - a0[0], "abort_reads": abort_reads,
                       "abort_reads_per_waiting_group_per_s": abort_reads / max(1, n - 1) / stall_s,
                       "abort_reads_per_s_total": abort_reads / stall_s, "stalled": bool(stall_ev),
                       "abort_poll_s": ABORT_POLL_S}
        joins, rollcalls = [], []
        size = n
        cycle_error = None
        for c in range(cycles):
            try:
                jid = f"j{c}"
                joiners[c].send("go")
                t_go = time.monotonic()
                members = everyone | {jid}
                adopted = r.wait_for(lambda: (lambda a: a if len(a) == n + 1 else None)(r.adopted(members, epoch + 1, n + 1)),
                                     120, f"join of {jid}")
                e_join = max(e["epoch"] for e in adopted.values())
                started = next(e["t"] for e in r.log if e["ev"] == "started" and e["member"] == jid)
                pub = min((e["t"] for e in r.log if e["ev"] == "published" and e["family"] == "view" and e["epoch"] == e_join),
                          default=None)
                last = max(e["t"] for e in adopted.values())
                switches = [e["t"] for e in r.log if e["ev"] == "switch" and e["epoch"] == epoch and e["member"] in everyone]
                joins.append({"epoch": e_join, "start_to_admission_s": pub - started if pub else None,
                              "admission_to_first_vote_s": min(switches) - pub if pub and switches else None,
                              "first_vote_to_all_adopted_s": last - min(switches) if switches else None,
                              "admission_to_all_adopted_s": last - pub if pub else None,
                              "start_to_all_adopted_s": last - started, "go_to_start_s": started - t_go,
                              "adopted_spread_s": last - min(e["t"] for e in adopted.values())})
                epoch = e_join
                time.sleep(2 * round_s + 0.5)  # a few rounds in the new view
                t_kill = time.monotonic()
                joiners[c].kill()
                survivors = everyone

                def after_kill() -> Any:
                    held = {}
                    for e in r.log:
                        if e["t"] < t_kill or e.get("member") not in survivors:
                            continue
                        if (e["ev"] == "rollcall_done" and e["epoch"] > epoch) or (e["ev"] == "adopted" and e["epoch"] > epoch):
                            held.setdefault(e["member"], e["t"])
                    built = r.adopted(survivors, epoch + 1, size)
                    built = {m: e for m, e in built.items() if e["t"] >= t_kill}
                    return (held, built) if len(held) == n and len(built) == n else None

                held, built = r.wait_for(after_kill, 120, f"roll call after SIGKILL of {jid}")
                failed = [e["t"] for e in r.log if e["ev"] == "failed" and e["t"] >= t_kill and e["member"] in survivors]
                e_new = max(e["epoch"] for e in built.values())
                pub = min((e["t"] for e in r.log if e["ev"] == "published" and e["family"] == "view" and e["epoch"] == e_new),
                          default=None)
                rollcalls.append({"epoch": e_new, "kill_to_all_hold_next_view_s": max(held.values()) - t_kill,
                                  "kill_to_view_published_s": pub - t_kill if pub else None,
                                  "kill_to_all_rebuilt_s": max(e["t"] for e in built.values()) - t_kill,
                                  "first_failure_s": min(failed) - t_kill if failed else None,
                                  "last_failure_s": max(failed) - t_kill if failed else None,
                                  "survivors_that_saw_a_failure": len({e["member"] for e in r.log if e["ev"] == "failed"
                                                                       and e["t"] >= t_kill})})
                epoch = e_new
            except TimeoutError as exc:  # keep what was measured before (store load, abort watch, earlier cycles)
                cycle_error = str(exc)[:1500]
                break
        errors = [e for e in r.log if e["ev"] == "error"]
        return {"groups": n, "workers": nw, "logs": workdir, "heartbeat_interval_s": hb_s, "timeout_s": timeout_s,
                "store": store_spec.split(":")[0], "store_load": store,
                "abort_watch": abort_watch, "joins": joins, "rollcalls": rollcalls,
                "member_errors": errors[:10], "loadavg_end": os.getloadavg(), "cycle_error": cycle_error}
    finally:
        for w in r.workers:
            w.send("stop")
        for w in r.workers:
            w.kill()


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in sorted({(r["store"], r["groups"]) for r in runs}, key=lambda k: (k[0] != "tcp", k[0], k[1])):
        rs = [r for r in runs if (r["store"], r["groups"]) == key and "error" not in r]
        if not rs:
            out[f"{key[0]}-{key[1]}"] = {"store": key[0], "groups": key[1], "runs": 0,
                                         "errors": [r["error"] for r in runs if (r["store"], r["groups"]) == key]}
            continue
        out[f"{key[0]}-{key[1]}"] = {
            "store": key[0], "groups": key[1], "runs": len(rs),
            "rollcall_kill_to_all_hold_next_view_s": _summary([c["kill_to_all_hold_next_view_s"] for r in rs for c in r["rollcalls"]]),
            "rollcall_kill_to_all_rebuilt_s": _summary([c["kill_to_all_rebuilt_s"] for r in rs for c in r["rollcalls"]]),
            "join_start_to_admission_s": _summary([j["start_to_admission_s"] for r in rs for j in r["joins"]]),
            "join_admission_to_all_adopted_s": _summary([j["admission_to_all_adopted_s"] for r in rs for j in r["joins"]]),
            "join_admission_to_first_vote_s": _summary([j["admission_to_first_vote_s"] for r in rs for j in r["joins"]]),
            "join_first_vote_to_all_adopted_s": _summary([j["first_vote_to_all_adopted_s"] for r in rs for j in r["joins"]]),
            "beats_per_group_per_s": _summary([r["store_load"]["beats_per_group_per_s"] for r in rs]),
            "membership_calls_per_beat": _summary([r["store_load"]["membership_calls_per_beat"] for r in rs]),
            "store_reads_per_s": _summary([r["store_load"]["reads_per_s"] for r in rs]),
            "store_writes_per_s": _summary([r["store_load"]["writes_per_s"] for r in rs]),
            "membership_calls_per_group_per_s": _summary([r["store_load"]["membership_calls_per_group_per_s"] for r in rs]),
            "keys_in_store": _summary([r["store_load"]["keys_in_store"] for r in rs]),
            "keys_written_by_members": _summary([r["store_load"]["keys_written_by_members"] for r in rs]),
            "abort_reads_per_waiting_group_per_s": _summary([r["abort_watch"]["abort_reads_per_waiting_group_per_s"] for r in rs]),
        }
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
        return
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--once", type=int, nargs="*", default=[64], help="sizes tried once, after the others")
    p.add_argument("--round-s", type=float, default=1.0, help="seconds between a group's rounds")
    p.add_argument("--runs", type=int, default=2, help="runs per size, interleaved (each runs --cycles joins+kills)")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--etcd-groups", type=int, nargs="*", default=[8], help="sizes also run against etcd")
    p.add_argument("--no-etcd", action="store_true")
    p.add_argument("--out", default="membership_scale")
    args = p.parse_args()
    from common import write_result

    from resilient_train.membership import TCPKVStore

    workdir = tempfile.mkdtemp(prefix="rt-sim-")
    load_start = os.getloadavg()
    t_start = time.monotonic()
    runs: list[dict] = []
    order = []
    for i in range(args.runs):
        order += args.groups if i % 2 == 0 else list(reversed(args.groups))
    order += args.once
    for n in order:
        host = TCPKVStore.host(port=0)  # a fresh server per run: its key count is this run's
        spec = f"tcp:127.0.0.1:{host.port}"
        t0 = time.monotonic()
        try:
            res = run_once(n, spec, cycles=args.cycles, workdir=workdir, round_s=args.round_s,
                           num_keys=lambda: int(host._store.num_keys()))
        except TimeoutError as exc:  # recorded: the machine could not carry this size
            runs.append({"groups": n, "store": "tcp", "error": str(exc)[:1500], "wall_s": time.monotonic() - t0,
                         "loadavg_end": os.getloadavg()})
            print(f"tcp N={n}: FAILED {str(exc)[:300]}", flush=True)
            continue
        res["wall_s"] = time.monotonic() - t0
        runs.append(res)
        print(f"tcp N={n}: rollcall {[round(c['kill_to_all_hold_next_view_s'], 2) for c in res['rollcalls']]} s, "
              f"join {[round(j['admission_to_all_adopted_s'] or -1, 2) for j in res['joins']]} s, "
              f"store {res['store_load']['reads_per_s']:.0f} r/s {res['store_load']['writes_per_s']:.0f} w/s, "
              f"abort watch {res['abort_watch']['abort_reads_per_waiting_group_per_s']:.1f}/s/group "
              f"({res['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        del host
    etcd_error = None
    if not args.no_etcd and args.etcd_groups:
        try:
            from resilient_train.testing.servers import EtcdCluster

            with EtcdCluster(3) as cluster:
                url = cluster.url[len("etcd://"):]
                for n in args.etcd_groups:
                    t0 = time.monotonic()
                    res = run_once(n, f"etcd:{url}", cycles=1, workdir=workdir, round_s=args.round_s)
                    res["wall_s"] = time.monotonic() - t0
                    runs.append(res)
                    print(f"etcd N={n}: rollcall {[round(c['kill_to_all_hold_next_view_s'], 2) for c in res['rollcalls']]} s, "
                          f"join {[round(j['admission_to_all_adopted_s'] or -1, 2) for j in res['joins']]} s, "
                          f"store {res['store_load']['reads_per_s']:.0f} r/s {res['store_load']['writes_per_s']:.0f} w/s "
                          f"({res['wall_s']:.0f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - the TCPStore figures stand; the JSON says why etcd is missing
            etcd_error = f"{type(exc).__name__}: {exc}"
            print("etcd part failed:", etcd_error, flush=True)
    path = write_result(args.out, {
        "settings": {"heartbeat_interval_s": HB_S, "timeout_s": TIMEOUT_S, "round_deadline_s": ROUND_DEADLINE_S,
                     "abort_poll_s": ABORT_POLL_S, "round_every_s": args.round_s, "first_view_after_s": FIRST_VIEW_AFTER_S,
                     "rollcall_silence_s": 3 * HB_S + 0.05, "order": order, "cycles_per_run": args.cycles},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.monotonic() - t_start,
        "summary": summarise(runs), "runs": runs, "etcd_error": etcd_error})
    print("wrote", path)


if __name__ == "__main__":
    main()
