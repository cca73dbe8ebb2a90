"""Membership and state transfer on thread ranks (real gloo, real TCPStore, no process faults)."""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta

import pytest
import torch

from resilient_train.errors import ConfigError, DistributedError, MembershipError, MembershipRefusedError
from resilient_train.membership import (Membership, MemoryKVStore, TCPKVStore, View, model_fingerprint,
                                        state_digest, sync_state)
from resilient_train.sync.threads import run_thread_ranks
from tests.test_membership_faults import Cfg, Events, member_main

pytestmark = pytest.mark.timeout(60)

TO = timedelta(seconds=20)


def _until(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got is not None:
            return got
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s} s waiting for: {what}")


def _errors(exc: DistributedError) -> dict:
    return getattr(exc, "errors", {})


def test_transfer_serves_joiners_and_laggards_from_the_most_advanced_member():
    view = View(4, ("a", "b", "c"), "fp", joiners=("c",))
    ahead = torch.randn(1000)

    def rank(r: int, comm):
        flat = {0: ahead.clone(), 1: ahead * 0.5, 2: torch.full((1000,), float("nan"))}[r]
        step = {0: 7, 1: 6, 2: 123}[r]  # b missed the last step; c's own step does not count
        meta = [b'{"sampler": 7000, "sync": "a"}', b"b-stale", b""][r]  # e.g. DiLoCo's JSON meta
        res = sync_state(comm, view, view.members[r], flat, step, meta=meta, chunk_bytes=999, timeout=TO)
        return res, flat

    out = run_thread_ranks(rank, 3, timeout_s=40)
    for res, flat in out:
        assert res.step == 7 and res.source == "a" and res.receivers == ("b", "c")
        assert torch.equal(flat, ahead)  # bit-identical, NaNs overwritten
        assert res.meta == b'{"sampler": 7000, "sync": "a"}'
    assert [r.received_bytes for r, _ in out] == [0, 4030, 4030]
    assert [r.sent_bytes for r, _ in out] == [8060, 0, 0]


def test_transfer_sends_nothing_when_members_agree():
    view = View(2, ("a", "b"), "fp")
    out = run_thread_ranks(lambda r, comm: sync_state(comm, view, view.members[r], torch.ones(10), 3, timeout=TO),
                           2, timeout_s=40)
    assert all(r.source is None and r.received_bytes == r.sent_bytes == 0 and r.step == 3 for r in out)


def test_transfer_falls_back_when_no_member_holds_the_state():
    view = View(1, ("a", "b", "c"), "fp", joiners=("a", "b", "c"))
    calls = []

    def rank(r: int, comm):
        flat = torch.zeros(64, dtype=torch.float64)

        def fallback(buf: torch.Tensor) -> int:  # "load the latest checkpoint": b's is newer
            calls.append(r)
            buf.fill_(9.0 if r == 1 else 5.0)
            return 9 if r == 1 else 5

        res = sync_state(comm, view, view.members[r], flat, 0, fallback=fallback, timeout=TO)
        return res, flat

    out = run_thread_ranks(rank, 3, timeout_s=40)
    assert sorted(calls) == [0, 1, 2]
    for res, flat in out:
        assert res.used_fallback and res.step == 9 and res.source == "b"
        assert torch.equal(flat, torch.full((64,), 9.0, dtype=torch.float64))


def test_transfer_without_fallback_or_with_mismatched_sizes_fails_on_every_rank():
    view = View(1, ("a", "b"), "fp", joiners=("a", "b"))
    with pytest.raises(DistributedError) as info:
        run_thread_ranks(lambda r, comm: sync_state(comm, view, view.members[r], torch.zeros(4), 0, timeout=TO), 2,
                         timeout_s=40)
    assert all(isinstance(e, MembershipError) and "fallback" in str(e) for e in _errors(info.value).values())
    assert len(_errors(info.value)) == 2
    view2 = View(2, ("a", "b"), "fp")
    with pytest.raises(DistributedError) as info:
        run_thread_ranks(lambda r, comm: sync_state(comm, view2, view2.members[r], torch.zeros(4 + r), 0, timeout=TO),
                         2, timeout_s=40)
    assert len(_errors(info.value)) == 2 and all("numel" in str(e) for e in _errors(info.value).values())


def test_joiner_with_another_model_is_refused_and_members_are_undisturbed():
    cfg = Cfg(numel=1000, max_steps=5000, step_sleep_s=0.01)
    kv = TCPKVStore.host()
    ev = Events(queue.Queue())
    to = timedelta(seconds=5)
    for mid in "abx":
        kv.set(f"test/go/{mid}", b"1", timeout=to)

    def run(mid: str, fp: str) -> threading.Thread:
        def body() -> None:
            try:
                member_main("127.0.0.1", kv.port, mid, fp, cfg, ev.q)
            except BaseException as exc:  # noqa: BLE001 - surfaced by Events
                ev.q.put(("error", mid, time.time(), {"error": repr(exc)}))

        t = threading.Thread(target=body, daemon=True, name=f"member-{mid}")
        t.start()
        return t

    threads = [run("a", "fp-v1"), run("b", "fp-v1")]
    ev.wait_for(lambda e: e[0] == "step" and e[3]["step"] >= 5, 30, "a and b training")
    threads.append(run("x", "fp-v2-other-shapes"))
    refused = ev.wait_for(lambda e: e[0] == "refused", 20, "x refused")
    assert "fp-v2-other-shapes" in refused[3]["reason"] and "'fp-v1'" in refused[3]["reason"]
    steps_at_refusal = max(e[3]["step"] for e in ev.of("step"))
    ev.wait_for(lambda e: e[0] == "step" and e[3]["step"] >= steps_at_refusal + 10, 20, "a and b still training")
    kv.set("test/stop_at", str(steps_at_refusal + 15).encode(), timeout=to)
    for mid in "ab":
        ev.wait_for(lambda e, mid=mid: e[0] == "done" and e[1] == mid, 20, f"{mid} done")
    for t in threads:
        t.join(10)
    # undisturbed: one epoch, no failed collective, no retry, both finished at the same step
    assert {e[3]["epoch"] for e in ev.of("epoch")} == {1}
    assert not ev.of("fault") and not ev.of("retry")
    assert {e[3]["step"] for e in ev.of("done")} == {steps_at_refusal + 15}
    assert ev.of("done", "a")[0][3]["flat"] == ev.of("done", "b")[0][3]["flat"]


def test_membership_over_a_plain_kvstore_and_its_api():
    """Two members on the in-memory store (what a pluggable store gets: the Python adapter for
    gloo), admission, one collective, a clean leave, and the survivor's new view."""
    kv = MemoryKVStore()
    kw = dict(heartbeat_interval_s=0.1, timeout_s=0.5, collective_timeout_s=10)
    a = Membership(kv, "a", "fp", **kw)
    b = Membership(kv, "b", "fp", **kw)
    assert a.view == View(0) and not a.check()  # the constructor did no I/O
    with a, b:
        va = a.wait_for_admission(10)
        assert b.wait_for_admission(10) == va and va.members == ("a", "b")
        results = {}

        def reduce(m: Membership) -> None:
            results[m.member_id] = m.communicator().allreduce_sum(torch.ones(3)).wait(TO)

        threads = [threading.Thread(target=reduce, args=(m,)) for m in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert all(torch.equal(results[m], torch.full((3,), 2.0)) for m in "ab")
        assert a.communicator() is a.communicator()  # cached within an epoch
        b.close()
        t0 = time.monotonic()
        new = a.wait_for_change(5)
        assert new is not None and new.members == ("a",) and new.epoch == va.epoch + 1
        assert time.monotonic() - t0 < 0.5 + 0.5  # timeout_s plus a few beats
        assert "dropped ['b']" in a.latest_reason
        assert a.communicator().world_size == 1 and a.view == new
        with pytest.raises(MembershipError, match="closed"):
            b.communicator()


def test_bad_configuration_is_refused_at_construction():
    kv = MemoryKVStore()
    with pytest.raises(ConfigError, match="2 \\* heartbeat_interval_s"):
        Membership(kv, "a", "fp", heartbeat_interval_s=1.0, timeout_s=1.5)
    with pytest.raises(ConfigError, match="member_id"):
        Membership(kv, "a/b", "fp")
    with pytest.raises(ConfigError, match="fingerprint"):
        Membership(kv, "a", "")
    with pytest.raises(ConfigError, match="KVStore"):
        Membership(object(), "a", "fp")  # type: ignore[arg-type]


def test_model_fingerprint_sees_shapes_and_code_version_not_values():
    m1, m2 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert model_fingerprint(m1) == model_fingerprint(m2)
    assert model_fingerprint(m1) != model_fingerprint(torch.nn.Linear(4, 2))
    assert model_fingerprint(m1, "v1") != model_fingerprint(m1, "v2")
    assert state_digest(torch.arange(10)) != state_digest(torch.arange(10).flip(0))


def test_refused_error_type():
    assert issubclass(MembershipRefusedError, MembershipError)


def test_member_wrongly_dropped_rejoins_as_a_joiner_and_gets_the_state():
    """A partition: b's heartbeats stop reaching the store while b lives. a drops b; once b's
    beats are back, b sees it was dropped, asks to join, and is re-admitted with a's state."""
    kv = MemoryKVStore()
    kw = dict(heartbeat_interval_s=0.1, timeout_s=0.5, collective_timeout_s=10)
    with Membership(kv, "a", "fp", **kw) as a, Membership(kv, "b", "fp", **kw) as b:
        v1 = a.wait_for_admission(10)
        assert b.wait_for_admission(10) == v1
        beat = b._beat
        b._beat = lambda: None  # the partition: b's beats are lost
        v2 = _until(lambda: a.latest if a.latest.members == ("a",) else None, 5, "a drops b")
        assert v2.epoch == v1.epoch + 1
        b._beat = beat
        v3 = _until(lambda: a.latest if a.latest.epoch > v2.epoch else None, 5, "b re-admitted")
        assert v3.members == ("a", "b") and v3.joiners == ("b",) and v3.epoch == v2.epoch + 1
        assert b.wait_for_admission(5) == v3
        out = {}

        def enter(m: Membership, flat: torch.Tensor, step: int) -> None:
            out[m.member_id] = (sync_state(m.communicator(), m.latest, m.member_id, flat, step, timeout=TO), flat)

        threads = [threading.Thread(target=enter, args=(a, torch.arange(100.0), 42)),
                   threading.Thread(target=enter, args=(b, torch.zeros(100), 17))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert out["b"][0].source == "a" and out["b"][0].step == 42 and torch.equal(out["b"][1], torch.arange(100.0))


def test_coordinator_loss_and_restart_under_the_same_id():
    """a (the coordinator: lowest id) stops; b takes over and publishes. Then c restarts under
    its own id before the timeout: the new process is re-admitted as a joiner, not taken for
    the old one."""
    kv = MemoryKVStore()
    kw = dict(heartbeat_interval_s=0.1, timeout_s=0.5, collective_timeout_s=10)
    a, b, c = (Membership(kv, mid, "fp", **kw).start() for mid in "abc")
    try:
        v1 = _until(lambda: a.latest if a.latest.members == ("a", "b", "c") else None, 5, "a, b, c admitted")
        for m in (b, c):
            m.wait_for_admission(5)
        a.close()
        v2 = _until(lambda: b.latest if b.latest.epoch > v1.epoch else None, 5, "a dropped")
        assert v2.members == ("b", "c") and v2.joiners == () and "dropped ['a']" in b.latest_reason
        c.close()
        c2 = Membership(kv, "c", "fp", **kw).start()  # the restarted process, at once
        v3 = _until(lambda: b.latest if b.latest.epoch > v2.epoch else None, 5, "c restarted")
        assert v3.members == ("b", "c") and v3.joiners == ("c",) and "restarted" in b.latest_reason
        assert c2.wait_for_admission(5) == v3
        time.sleep(1.0)  # ten beats: nothing else changes (c2 is not taken for a restart again)
        assert b.latest == v3 and c2.latest == v3
    finally:
        for m in (a, b, c):
            m.close()
        if "c2" in locals():
            c2.close()


def test_a_member_id_used_twice_by_live_processes_is_refused_but_a_restart_is_not():
    from resilient_train.errors import ConfigError

    kv = MemoryKVStore()
    kw = dict(heartbeat_interval_s=0.05, timeout_s=1.0)
    first = Membership(kv, "a", "fp", **kw).start()
    try:
        with pytest.raises(ConfigError, match="already used by a live process"):
            Membership(kv, "a", "fp", **kw).start()
    finally:
        first.close()
    # the first process is gone (its heartbeat is still): a restart under the same id is fine
    again = Membership(kv, "a", "fp", **kw).start()
    again.close()


def test_every_bad_argument_is_refused_with_what_to_fix():
    """Each argument check of ``Membership`` on its own, with its message (found by ``make
    mutate``: an empty member id was accepted when the check's ``or`` became ``and``)."""
    kv = MemoryKVStore()
    cases = [
        (dict(member_id=""), "member_id must be a non-empty str without '/', got ''"),
        (dict(member_id=7), "member_id must be a non-empty str without '/', got 7"),
        (dict(fingerprint=7), "fingerprint must be a non-empty str"),
        (dict(heartbeat_interval_s=0), "heartbeat_interval_s must be > 0, got 0"),
        (dict(min_members=0), "min_members must be an int >= 1, got 0"),
        (dict(min_members=True), "min_members must be an int >= 1, got True"),
        (dict(min_members=1.0), "min_members must be an int >= 1, got 1.0"),
        (dict(collective_timeout_s=0), "collective_timeout_s and store_timeout_s must be > 0"),
        (dict(store_timeout_s=-1), "collective_timeout_s and store_timeout_s must be > 0"),
        (dict(abort_poll_s=0), "abort_poll_s must be in \\(0, 1\\] seconds, got 0"),
        (dict(abort_poll_s=1.5), "abort_poll_s must be in \\(0, 1\\] seconds, got 1.5"),
    ]
    for kw, message in cases:
        args = dict(member_id="a", fingerprint="fp")
        args.update(kw)
        with pytest.raises(ConfigError, match=message):
            Membership(kv, args.pop("member_id"), args.pop("fingerprint"), **args)
            pytest.fail(f"accepted {kw}")
    Membership(kv, "a", "fp", abort_poll_s=1.0, min_members=1)  # the bounds themselves are valid


def test_close_is_safe_before_start_and_twice_and_ends_both_threads():
    """``close()`` is idempotent and safe on a Membership whose ``start()`` never ran or failed
    (a ``finally`` calls it after a refused start); after it returns, neither of its threads
    (heartbeat, abort watcher) is alive (found by ``make mutate``: with the watcher check
    inverted, close() on an unstarted Membership raised AttributeError)."""
    kv = MemoryKVStore()
    m = Membership(kv, "a", "fp")
    m.close()
    m.close()
    with Membership(kv, "b", "fp", heartbeat_interval_s=0.05, timeout_s=1.0) as b:
        b.wait_for_admission(10)
    b.close()
    alive = [t.name for t in threading.enumerate() if t.name in ("membership-b", "membership-watch-b")]
    assert alive == [], alive
