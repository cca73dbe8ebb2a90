"""A failure one member sees reaches every member at once (issue 16), on thread ranks with real
gloo groups and a real TCPStore: the two mechanisms of docs/membership.md, each alone.

* connections: a member that releases its epoch's group makes every peer blocked on it fail at
  once, instead of waiting out the group's timeout;
* the store: a member that reports a failed collective (``abort/<epoch>``) cancels every
  member's wait on that epoch, also members that are not connected to the failure.

The process matrix (SIGKILLed providers, every ring position, codecs, modes, the vote and the
joiner's state transfer) is in tests/test_failure_matrix.py.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch

from resilient_train.errors import ConfigError, DistributedError
from resilient_train.membership import Membership, TCPKVStore
from resilient_train.sync.threads import run_thread_ranks

pytestmark = pytest.mark.timeout(90)

DEADLINE = timedelta(seconds=30)  # a stall cannot pass for a fast exit


def _ranks_owning_only_their_communicator(fn, n: int) -> list:
    """Thread ranks whose gloo group is referenced by their communicator alone (as
    ``Membership.communicator()`` builds it), so that ``release()`` really drops it."""
    import torch.distributed as dist

    from resilient_train.sync.communicator import ProcessGroupCommunicator
    from resilient_train.sync.threads import make_gloo_group

    master = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=DEADLINE, wait_for_workers=False)
    out: dict[int, object] = {}

    def body(r: int) -> None:
        store = dist.TCPStore("127.0.0.1", master.port, n, is_master=False, timeout=DEADLINE)
        comm = ProcessGroupCommunicator(make_gloo_group(store, r, n, DEADLINE))
        try:
            out[r] = fn(r, comm)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out[r] = exc

    ts = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert len(out) == n and not any(isinstance(v, BaseException) for v in out.values()), out
    return [out[r] for r in range(n)]


def test_releasing_a_group_fails_every_peer_blocked_on_it_at_once():
    """Ranks 0 and 2 wait in an all-reduce for rank 1, which releases its group instead of
    entering: they fail within a second, not after the group's 30 s timeout."""

    def rank(r: int, comm):
        comm.allreduce_sum(torch.ones(4)).wait(DEADLINE)  # connected, every pair used once
        if r == 1:
            time.sleep(0.3)
            t0 = time.monotonic()
            assert comm.release() is True
            time.sleep(3.0)  # this rank lives on, holding its communicator: only release() may close
            return ("released", time.monotonic() - t0, t0)
        try:
            comm.allreduce_sum(torch.ones(1 << 16)).wait(DEADLINE)
        except DistributedError as exc:
            return ("failed", str(exc), time.monotonic())
        return ("completed", None, time.monotonic())

    out = _ranks_owning_only_their_communicator(rank, 3)
    released_at = out[1][2]
    for r in (0, 2):
        kind, msg, t = out[r]
        assert kind == "failed", out[r]
        assert "closed" in msg.lower() or "reset" in msg.lower(), msg
        assert t - released_at < 1.0, f"rank {r} left {t - released_at:.2f} s after rank 1 released its group"


def test_release_waits_for_the_operation_in_flight_and_abort_is_sticky():
    def rank(r: int, comm):
        if r == 0:
            h = comm.allreduce_sum(torch.ones(8))  # rank 1 joins only later: in flight
            time.sleep(0.2)
            assert comm.busy and comm.release() is False  # dropping it now would block on the op
            comm.abort("test abort")
            with pytest.raises(DistributedError, match="aborted.*test abort"):
                h.wait(DEADLINE)
            with pytest.raises(DistributedError, match="test abort"):
                comm.allgather(torch.ones(2)).wait(DEADLINE)  # every later wait fails too
            deadline = time.monotonic() + 10
            while comm.busy and time.monotonic() < deadline:
                time.sleep(0.01)
            return comm.release()
        time.sleep(0.5)
        comm.allreduce_sum(torch.ones(8)).wait(DEADLINE)  # completes rank 0's abandoned op
        time.sleep(0.5)  # keep the group until rank 0 released
        return True

    assert run_thread_ranks(rank, 2, timeout_s=60, pg_timeout=DEADLINE) == [True, True]


def _members(n: int, **kw):
    kv = TCPKVStore.host(0)
    names = "abcd"[:n]
    ms = [Membership(TCPKVStore("127.0.0.1", kv.port), x, "fp", heartbeat_interval_s=0.1, timeout_s=5.0,
                     min_members=2, collective_timeout_s=DEADLINE.total_seconds(), first_view_after_s=0.3, **kw)
          for x in names]
    for m in ms:
        m.start()
    for m in ms:
        m.wait_for_admission(30)
    deadline = time.monotonic() + 30
    while any(len(m.latest.members) < n for m in ms):  # the first view may hold fewer
        assert time.monotonic() < deadline, [m.latest for m in ms]
        time.sleep(0.05)
    return kv, ms


def _adopt_all(ms):
    comms: dict[str, object] = {}
    errors: list[BaseException] = []

    def adopt(m):
        try:
            comms[m.member_id] = m.communicator()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=adopt, args=(m,)) for m in ms]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    return comms


def test_a_reported_failure_cancels_the_collective_of_members_not_connected_to_it():
    """Four members: d hangs (its training thread never enters the collective; its heartbeat
    runs), a, b, c wait for it. a sees a failure that closes nothing (a partition: its own
    operation stays in flight) and reports it. b and c leave the collective within a second
    (goal 0.2 s) on the store's news alone, answer the roll call, and a, b, c go on in the next
    epoch without d. Without the watcher they would sit in the all-reduce for 30 s."""
    kv, ms = _members(4)
    try:
        comms = _adopt_all(ms)
        epoch = ms[0].view.epoch
        left: dict[str, tuple[float, str]] = {}
        reported: list[float] = []
        views: dict[str, object] = {}

        def member(m):
            comm = comms[m.member_id]
            h = comm.allreduce_sum(torch.ones(1 << 16))
            if m.member_id == "a":
                time.sleep(0.3)
                comm.abort("simulated: a lost its link to d")  # the op stays in flight, no socket closes
            try:
                h.wait(DEADLINE)
                left[m.member_id] = (time.monotonic(), "completed")
            except DistributedError as exc:
                left[m.member_id] = (time.monotonic(), str(exc))
            if m.member_id == "a":
                reported.append(time.monotonic())
            views[m.member_id] = m.report_failure(deadline_s=3.0, error="all-reduce failed: link to d")

        ts = [threading.Thread(target=member, args=(m,)) for m in ms[:3]]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert set(views) == {"a", "b", "c"}, (views, left)
        for x in ("b", "c"):
            t, msg = left[x]
            assert "reported a failed collective" in msg and "link to d" in msg, msg
            assert t - reported[0] < 1.0, f"{x} left the collective {t - reported[0]:.2f} s after a's report"
        assert {v.members for v in views.values()} == {("a", "b", "c")}
        assert all(v.epoch == epoch + 1 for v in views.values())
        # the next epoch works among the survivors
        comms = _adopt_all(ms[:3])
        out = {}

        def reduce(x):
            out[x] = comms[x].allreduce_sum(torch.ones(3)).wait(DEADLINE)

        ts = [threading.Thread(target=reduce, args=(x,)) for x in "abc"]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert all(torch.equal(v, torch.full((3,), 3.0)) for v in out.values()), out
    finally:
        for m in ms:
            m.close()


def test_the_abort_watcher_outlives_an_unexpected_error_in_one_poll():
    """An unexpected exception in one poll (here planted in the watcher's first reap) is logged
    and the watcher polls on: b still leaves its collective on a's report within a second.
    Without the catch the watcher thread died silently and b sat in the all-reduce for the
    whole deadline (30 s)."""
    kv, ms = _members(2)
    try:
        comms = _adopt_all(ms)
        a, b = ms
        epoch = a.view.epoch
        polls: list[int] = []
        real = b._reap

        def flaky():
            polls.append(1)
            if len(polls) == 1:
                raise RuntimeError("planted: one poll fails")
            return real()

        b._reap = flaky
        h = comms["b"].allreduce_sum(torch.ones(1 << 10))  # a never joins it
        deadline = time.monotonic() + 5
        while len(polls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()  # the store's news alone (a keeps its group: no connection closes)
        a._kv.compare_set(a._k(f"abort/{epoch}"), None, b'{"member": "a", "error": "test"}', timeout=DEADLINE)
        with pytest.raises(DistributedError, match="reported a failed collective"):
            h.wait(DEADLINE)
        assert time.monotonic() - t0 < 1.0 and len(polls) >= 3
    finally:
        for m in ms:
            m.close()


def test_a_failed_epoch_is_never_connected_again():
    """After a member reported a failure of its epoch, asking for that epoch's group again (a
    store error cut the roll call short, the trainer rejoins) fails at once instead of
    rendezvousing on keys that name the dead member (a 30 s connect timeout per try)."""
    from resilient_train.errors import MembershipError

    kv, ms = _members(2)
    try:
        _adopt_all(ms)
        a = ms[0]
        epoch = a.view.epoch
        a.abort_epoch(epoch, "test: the exchange failed")
        t0 = time.monotonic()
        with pytest.raises(MembershipError, match=f"epoch {epoch} failed"):
            a.communicator()
        assert time.monotonic() - t0 < 1.0
    finally:
        for m in ms:
            m.close()


def test_abort_poll_is_validated():
    with pytest.raises(ConfigError, match="abort_poll_s"):
        Membership(object.__new__(TCPKVStore), "a", "fp", abort_poll_s=0)


def test_dropping_a_communicator_with_an_operation_in_flight_does_not_abort_the_process():
    """A completion callback must not hold the communicator: if it held the last reference, the
    group would be destroyed on gloo's own worker thread, which it joins (std::terminate,
    "Resource deadlock avoided": it aborted the whole test process in a CI run)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "drop_comm_in_flight.py")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])


@pytest.mark.parametrize("body", [b"\xff\xfe not JSON", b"[1, 2]"], ids=["not-json", "not-an-object"])
def test_an_abort_record_that_is_not_a_json_object_still_cancels_the_collective(body):
    """``abort/<epoch>`` holding bytes no member writes (another tool's record, a damaged
    store value) still cancels the wait on that epoch's collective, naming "a member" and the
    record's text (found by ``make mutate``: a watcher that failed on such a record polled on
    forever and the collective sat out its whole timeout)."""
    kv, ms = _members(2)
    try:
        comms = _adopt_all(ms)
        a, b = ms
        epoch = a.view.epoch
        h = comms["b"].allreduce_sum(torch.ones(1 << 10))  # a never joins it
        a._kv.compare_set(a._k(f"abort/{epoch}"), None, body, timeout=DEADLINE)
        with pytest.raises(DistributedError, match=f"a member reported a failed collective in epoch {epoch}: "):
            h.wait(timedelta(seconds=15))  # the news arrives within a poll; 15 s only bounds a broken watcher
    finally:
        for m in ms:
            m.close()
