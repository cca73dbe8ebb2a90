"""The roll call (``Membership.report_failure``) on thread members over a real in-memory store.

Fast and event-driven: three members heartbeat on their own threads (as in a real job, the
heartbeat runs beside the training thread); the "training threads" are test threads that call
``report_failure`` when the test decides. Two promises (docs/membership.md):

* a member whose heartbeat still advances is waited for, even when it answers long after the
  silence window (it has not reached the collective yet: late, not dead);
* a member that never answers while its heartbeat runs (its training thread hung) is dropped
  at the round deadline, not waited for forever.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
import time

import pytest
import torch

from resilient_train.errors import MembershipError
from resilient_train.membership import Membership, MemoryKVStore

pytestmark = pytest.mark.timeout(60)

HB = 0.05
TO = timedelta(seconds=10)


def _three(kv, collective_timeout_s=10):
    # heartbeat drops out of the way (timeout_s), the first view as soon as all three are seen
    kw = dict(heartbeat_interval_s=HB, timeout_s=30.0, collective_timeout_s=collective_timeout_s, first_view_after_s=0.5)
    ms = [Membership(kv, m, "fp", **kw) for m in "abc"]
    for m in ms:
        m.start()
    views = [m.wait_for_admission(20) for m in ms]
    deadline = time.monotonic() + 20
    while not all(m.latest.members == ("a", "b", "c") for m in ms):  # a view of all three, seen by all
        assert time.monotonic() < deadline, [m.latest for m in ms]
        time.sleep(0.02)
    # ... and heartbeating as members (a "join" heartbeat is a restarted process: not waited for)
    while not all(json.loads(kv.get(f"rt-membership/hb/{m}", timeout=TO))["intent"] == "member" for m in "abc"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return ms, ms[0].latest


def _answered(kv, view, who):
    return kv.get(f"rt-membership/rollcall/{view.epoch}/{who}", timeout=TO) is not None


def _timed(view, results, took, **kw):
    """A member's training thread calling the roll call of ``view``: its result and seconds."""
    def call(m):
        t0 = time.monotonic()
        results[m.member_id] = m.report_failure(view=view, **kw)
        took[m.member_id] = time.monotonic() - t0
    return call


def _run_survivors(call, survivors, results):
    """a and c run ``call`` on threads (their training threads); returns when both are done."""
    threads = [threading.Thread(target=call, args=(m,)) for m in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert set(results) == {m.member_id for m in survivors}, results


def test_late_member_still_heartbeating_is_waited_for():
    kv = MemoryKVStore()
    ms, view = _three(kv)
    a, b, c = ms
    results: dict[str, object] = {}
    silent_after = 4 * HB  # the silence window: b answers 10 of them late

    def call(m, wait_for=None):
        if wait_for is not None:
            wait_for()
        results[m.member_id] = m.report_failure(deadline_s=30.0, silent_after_s=silent_after, view=view)

    def b_is_late():  # b reaches the roll call only after a and c are in it, and long after
        while not (_answered(kv, view, "a") and _answered(kv, view, "c")):
            time.sleep(0.01)
        time.sleep(10 * silent_after)

    try:
        threads = [threading.Thread(target=call, args=(a,)), threading.Thread(target=call, args=(c,)),
                   threading.Thread(target=call, args=(b, b_is_late))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert set(results) == {"a", "b", "c"}, results
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "b", "c"), v  # b was late, not dead
    finally:
        for m in ms:
            m.close()


def test_hung_member_still_heartbeating_is_dropped_at_the_round_deadline():
    kv = MemoryKVStore()
    ms, view = _three(kv)
    a, b, c = ms
    deadline_s = 1.0
    results: dict[str, object] = {}
    took: dict[str, float] = {}

    call = _timed(view, results, took, deadline_s=deadline_s)

    try:
        beats_before = kv.get("rt-membership/hb/b", timeout=TO)
        threads = [threading.Thread(target=call, args=(m,)) for m in (a, c)]  # b's training thread never comes
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(results) == {"a", "c"}, "the roll call did not end: a hung member was waited for past the deadline"
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "c"), v
        assert "round deadline" in a.latest_reason or "round deadline" in c.latest_reason, (a.latest_reason, c.latest_reason)
        # a, the lowest member, waited for b while its heartbeat ran and dropped it at the deadline
        # (c may return sooner: it started its call after a did, and takes the view a publishes)
        assert took["a"] >= deadline_s
        assert kv.get("rt-membership/hb/b", timeout=TO) != beats_before  # b's heartbeat really ran all along
    finally:
        for m in ms:
            m.close()


def _stale_heartbeat(kv, m, **fields):
    """Hold ``m``'s heartbeat thread off for a minute and leave its last heartbeat rewritten
    with ``fields`` (its token, seq and liveness port kept)."""
    m.heartbeat_interval_s = 60.0
    time.sleep(4 * HB)  # its thread's current wait ends and the next one is a minute
    key = f"rt-membership/hb/{m.member_id}"
    hb = json.loads(kv.get(key, timeout=TO))
    kv.set(key, json.dumps({**hb, **fields}).encode(), timeout=TO)


def test_member_admitted_by_the_failed_epoch_that_has_not_beaten_since_is_waited_for():
    """A fault right after a view admits the members (a CI run killed b 8 steps into epoch 1):
    c's heartbeat still says "join" with the epoch before, because its heartbeat thread has not
    beaten since it read the view. It is alive and in the round: the roll call waits for it (it
    answers within the silence window) instead of taking it for a restarted process. A CI run
    of the failure matrix dropped a and c this way (both alive) and d trained alone."""
    kv = MemoryKVStore()
    ms, view = _three(kv)
    a, b, c = ms
    results: dict[str, object] = {}

    def call(m, wait_for=None):
        if wait_for is not None:
            wait_for()
        results[m.member_id] = m.report_failure(deadline_s=30.0, silent_after_s=5.0, view=view)

    def c_is_late():  # c reaches the roll call after a and b are in it
        while not (_answered(kv, view, "a") and _answered(kv, view, "b")):
            time.sleep(0.01)
        time.sleep(0.3)

    try:
        _stale_heartbeat(kv, c, intent="join", epoch=view.epoch - 1)
        threads = [threading.Thread(target=call, args=(a,)), threading.Thread(target=call, args=(b,)),
                   threading.Thread(target=call, args=(c, c_is_late))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert set(results) == {"a", "b", "c"}, results
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "b", "c"), (v, a.latest_reason)
    finally:
        for m in ms:
            m.close()


def test_member_restarted_under_the_same_id_is_not_waited_for():
    """c's process was replaced by a new one under the same id (its heartbeat: a new token,
    "join", having read the failed epoch's view): the old process is gone, the new one
    rejoins; the roll call does not wait for it (5 s silence window here) and says why."""
    kv = MemoryKVStore()
    ms, view = _three(kv)
    a, b, c = ms
    results: dict[str, object] = {}
    took: dict[str, float] = {}

    call = _timed(view, results, took, deadline_s=30.0, silent_after_s=5.0)

    try:
        _stale_heartbeat(kv, c, intent="join", epoch=view.epoch, token="a-new-process", seq=1)
        _run_survivors(call, (a, b), results)
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "b"), v
        assert max(took.values()) < 4.0, took
        assert "c: restarted" in a.latest_reason, a.latest_reason
    finally:
        for m in ms:
            m.close()


def test_roll_call_that_every_member_answers_ends_at_the_last_answer_not_the_deadline():
    """All three members reach the roll call: it ends as soon as the last one has answered (no
    one left to wait for), long before the round deadline, and keeps all three (found by
    ``make mutate``: a roll call that waited for members who had answered until the deadline
    passed every test, because they all answered in the end)."""
    kv = MemoryKVStore()
    ms, view = _three(kv)
    deadline_s = 30.0
    results: dict[str, object] = {}

    def call(m):
        results[m.member_id] = m.report_failure(deadline_s=deadline_s, view=view)

    try:
        threads = [threading.Thread(target=call, args=(m,)) for m in ms]
        for t in threads:
            t.start()
        for t in threads:
            t.join(deadline_s + 15)
        assert set(results) == {"a", "b", "c"}, results
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "b", "c"), v
        reason = ms[0].latest_reason
        assert "dropped []" in reason and "round deadline" not in reason, reason  # not ended by the deadline
    finally:
        for m in ms:
            m.close()


def test_member_whose_process_is_gone_is_dropped_at_once_not_after_the_silence_window():
    """b's process is gone (its heartbeat stops and its liveness port closes, as at a SIGKILL):
    the roll call drops it as soon as it probes the port, not after the silence window (20 s
    here) or the deadline; the view's reason says why. Without the probe this waits 20 s."""
    kv = MemoryKVStore()
    ms, view = _three(kv)
    a, b, c = ms
    results: dict[str, object] = {}
    took: dict[str, float] = {}

    call = _timed(view, results, took, deadline_s=30.0, silent_after_s=20.0)

    try:
        deadline = time.monotonic() + 20
        while not all(any(addr == b._liveness.address for addr, _ in m._live_ok) for m in (a, c)):
            assert time.monotonic() < deadline, "a and c never verified b's liveness port"
            time.sleep(0.02)
        b.close()  # stops b's heartbeat and closes its liveness port: a dead process, as others see it
        _run_survivors(call, (a, c), results)
        for v in results.values():
            assert v.epoch == view.epoch + 1 and v.members == ("a", "c"), v
        assert max(took.values()) < 10.0, took  # far below the 20 s silence window
        reason = a.latest_reason or c.latest_reason
        assert "liveness port refused" in reason, reason
    finally:
        for m in ms:
            m.close()


class _RefusingPort:
    """A liveness port that refused from the start (a firewall that rejects): never verified."""

    def __init__(self, token: str):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()

    def close(self) -> None:
        pass


def test_refusal_from_a_port_never_verified_is_not_taken_for_death(monkeypatch):
    """b's port refused from the start (never answered with its token): when b then dies, the
    roll call must fall back to the silence window, not trust the refusal."""
    import resilient_train.membership.service as service

    kv = MemoryKVStore()
    real = service.LivenessServer
    made = []

    def server(token):
        made.append(token)
        return _RefusingPort(token) if len(made) == 2 else real(token)  # the second member, b

    monkeypatch.setattr(service, "LivenessServer", server)
    ms, view = _three(kv)
    a, b, c = ms
    results: dict[str, object] = {}
    took: dict[str, float] = {}
    silent_after = 1.5

    call = _timed(view, results, took, deadline_s=30.0, silent_after_s=silent_after)

    try:
        b.close()
        _run_survivors(call, (a, c), results)
        assert took["a"] >= silent_after, took  # waited for b's silence, did not trust the refusal
        assert "heartbeat still" in a.latest_reason, a.latest_reason
    finally:
        for m in ms:
            m.close()


def test_member_that_dies_before_connecting_the_new_epoch_costs_no_connect_timeout():
    """b dies after the view that lists it is published, before it connects that epoch's group
    (its heartbeat stops and its liveness port closes). a and c, connecting with a 60 s connect
    timeout, give up as soon as b's port refuses (and the second one as soon as the first
    reports the epoch failed), then the roll call drops b and a and c connect the next epoch.
    Without the cancellable connect both wait out the 60 s."""
    kv = MemoryKVStore()
    ms, view = _three(kv, collective_timeout_s=60)
    a, b, c = ms
    deadline = time.monotonic() + 20
    while not all(any(addr == b._liveness.address for addr, _ in m._live_ok) for m in (a, c)):
        assert time.monotonic() < deadline, "a and c never verified b's liveness port"
        time.sleep(0.02)
    out: dict[str, object] = {}
    took: dict[str, float] = {}

    def member(m):
        t0 = time.monotonic()
        try:
            m.communicator()
            out[m.member_id] = "connected"
        except MembershipError as exc:
            out[m.member_id] = str(exc)
            v = m.report_failure(deadline_s=30.0, silent_after_s=20.0, view=m.latest)
            out[m.member_id + "-next"] = m.communicator().allreduce_sum(torch.ones(2)).wait(TO).tolist()
            out[m.member_id + "-view"] = v
        took[m.member_id] = time.monotonic() - t0

    try:
        b.close()  # dies after the view, before connecting
        threads = [threading.Thread(target=member, args=(m,)) for m in (a, c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert "gave up connecting" in str(out.get("a")) and "gave up connecting" in str(out.get("c")), out
        assert out["a-next"] == out["c-next"] == [2.0, 2.0], out
        assert out["a-view"].members == ("a", "c"), out
        assert max(took.values()) < 20.0, took  # not the 60 s connect timeout, nor the 20 s silence
    finally:
        for m in ms:
            m.close()
