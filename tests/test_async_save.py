"""AsyncCheckpointer: short stall, reused staging memory, one save in flight, errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from resilient_train import load
from resilient_train.checkpoint.async_save import AsyncCheckpointer
from resilient_train.checkpoint.steps import committed_steps
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.errors import CheckpointError, CheckpointWriteError, ConfigError, ReplicationError
from resilient_train.storage import LocalStore
from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy
from resilient_train.testing.faults import FaultyStore

from .conftest import assert_same_tensors, make_train_state, state_tensors

pytestmark = pytest.mark.timeout(120)
OPTS = SaveOptions(max_file_bytes=8192, io_threads=2)


class GatedStore:
    """Delegates to ``inner``; every open_write waits until ``gate`` is set (a slow provider)."""

    def __init__(self, inner):
        self.inner, self.name, self.gate = inner, inner.name, threading.Event()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def open_write(self, path):
        assert self.gate.wait(30)
        return self.inner.open_write(path)


def test_saved_state_is_the_state_at_save_time(tmp_path):
    store = LocalStore(str(tmp_path))
    state = make_train_state()
    want = state_tensors(state)
    gated = GatedStore(store)
    ck = AsyncCheckpointer(gated, options=OPTS)
    assert ck.save(1, state)
    assert ck.in_flight and ck.last_stall_s is not None
    with torch.no_grad():  # training goes on while the write is held back
        for p in state.model.parameters():
            p.add_(1.0)
    gated.gate.set()
    ck.close()
    fresh = make_train_state(seed=4)
    load(store, fresh, 1)
    assert_same_tensors(state_tensors(fresh), want)


def test_staging_buffers_are_reused(tmp_path):
    state = make_train_state()
    with AsyncCheckpointer(LocalStore(str(tmp_path)), options=OPTS) as ck:
        ck.save(1, state)
        ck.wait()
        n = ck.staging_allocations
        ptrs = {k: v.data_ptr() for k, v in ck._staging.items()}
        ck.save(2, state)
        ck.wait()
        assert ck.staging_allocations == n > 0
        assert {k: v.data_ptr() for k, v in ck._staging.items()} == ptrs
    assert committed_steps(LocalStore(str(tmp_path))) == [1, 2]


def test_prepare_allocates_what_the_first_save_stages(tmp_path):
    """prepare() learns the plan and allocates (and touches) every staging buffer the first
    save uses: that save allocates nothing and copies into those very buffers (its stall is
    then a later save's, see bench_async --first-stall), and the checkpoint is the state."""
    state = make_train_state()
    want = state_tensors(state)
    with AsyncCheckpointer(LocalStore(str(tmp_path)), options=OPTS) as ck:
        held = ck.prepare(state)
        n = ck.staging_allocations
        ptrs = {k: v.data_ptr() for k, v in ck._staging.items()}
        assert n > 0 and held == ck.staging_bytes == sum(t.numel() * t.element_size() for t in want.values())
        assert all(int(b.count_nonzero()) == 0 for b in ck._staging.values())  # touched (zeroed), not just reserved
        assert ck.save(1, state)
        ck.wait()
        assert ck.staging_allocations == n
        assert {k: v.data_ptr() for k, v in ck._staging.items()} == ptrs
        assert ck.prepare(state) == held and ck.staging_allocations == n  # again: nothing new
    fresh = make_train_state(seed=4)
    load(LocalStore(str(tmp_path)), fresh, 1)
    assert_same_tensors(state_tensors(fresh), want)


def test_prepare_refuses_what_is_not_a_train_state_and_a_closed_checkpointer(tmp_path):
    ck = AsyncCheckpointer(LocalStore(str(tmp_path)), options=OPTS)
    with pytest.raises(TypeError, match="TrainState"):
        ck.prepare({"w": torch.zeros(3)})
    ck.close()
    with pytest.raises(CheckpointError, match="closed"):
        ck.prepare(make_train_state())


def test_at_most_one_in_flight_skip_and_wait(tmp_path):
    state = make_train_state()
    gated = GatedStore(LocalStore(str(tmp_path / "skip")))
    ck = AsyncCheckpointer(gated, when_busy="skip", options=OPTS)
    assert ck.save(1, state)
    assert ck.save(2, state) is False and ck.saves_skipped == 1
    gated.gate.set()
    ck.close()
    assert committed_steps(gated.inner) == [1]

    gated = GatedStore(LocalStore(str(tmp_path / "wait")))
    ck = AsyncCheckpointer(gated, when_busy="wait", options=OPTS)
    ck.save(1, state)
    t = threading.Timer(0.3, gated.gate.set)
    t.start()
    assert ck.save(2, state)  # waited for step 1, then started step 2
    ck.close()
    assert committed_steps(gated.inner) == [1, 2]
    with pytest.raises(ConfigError):
        AsyncCheckpointer(gated, when_busy="drop")


def test_background_error_surfaces_on_next_call_once(tmp_path):
    down = FaultyStore(LocalStore(str(tmp_path)), down=True)
    ck = AsyncCheckpointer(down, options=OPTS)
    state = make_train_state()
    assert ck.save(1, state)
    ck._join()
    with pytest.raises(CheckpointWriteError):
        ck.save(2, state)  # raised here, not swallowed
    assert ck.save(3, state)  # raised once; this save runs (and fails again)
    with pytest.raises(CheckpointWriteError):
        ck.close()
    with pytest.raises(CheckpointError, match="closed"):
        ck.save(4, state)


def test_async_save_with_replication(tmp_path):
    a, b = LocalStore(str(tmp_path / "a"), name="a"), LocalStore(str(tmp_path / "b"), name="b")
    bad = FaultyStore(LocalStore(str(tmp_path / "c"), name="c"), down=True)
    provs = [Provider(n, str(tmp_path / n), "eu-west-1") for n in ("a", "b", "c")]
    pl = Placement(provs, ReplicationPolicy(copies=3), stores={"a": a, "b": b, "c": bad})
    ck = AsyncCheckpointer(pl, options=OPTS)
    ck.save(1, make_train_state())
    with pytest.raises(ReplicationError) as ei:
        ck.wait()
    assert list(ei.value.failures) == ["c"] and ei.value.committed == ["a", "b"]
    ck.close()
    assert committed_steps(a) == [1] and committed_steps(b) == [1]


def test_save_while_copies_run_stages_exactly_and_restores_torch_threads(tmp_path):
    """While the worker copies the previous step to another provider, the next save stages in
    one single-threaded copy (see ``_stage_all``): the checkpoint still holds the state at
    save time, and torch's intra-op thread count is the caller's again afterwards."""
    a = LocalStore(str(tmp_path / "a"), name="a")
    slow = GatedStore(LocalStore(str(tmp_path / "b"), name="b"))
    provs = [Provider(n, str(tmp_path / n), "eu-west-1") for n in ("a", "b")]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores={"a": a, "b": slow})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        state = make_train_state()
        ck = AsyncCheckpointer(pl, options=OPTS, copy_timeout_s=60)
        ck.save(1, state)
        ck._join()
        assert ck.worker is not None and ck.worker.busy  # step 1's copy to b waits on the gate
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(1.0)
        want = state_tensors(state)
        ck.save(2, state)
        assert torch.get_num_threads() == 2
        slow.gate.set()
        ck.close()
        assert torch.get_num_threads() == 2
        for store in (a, slow.inner):
            fresh = make_train_state(seed=4)
            load(store, fresh, 2)
            assert_same_tensors(state_tensors(fresh), want)
    finally:
        torch.set_num_threads(threads)
