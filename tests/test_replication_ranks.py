"""Replicated and async saves with two real gloo ranks: every rank sees the same outcome of the
collective write; the async copies are rank 0's background work."""

from __future__ import annotations

import pytest

from resilient_train.testing.ranks import run_ranks

pytestmark = pytest.mark.timeout(180)


def _state(rank):
    import torch

    from resilient_train import TrainState

    torch.manual_seed(0)  # same replicated model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    return TrainState(model=model, rng=False)


def _save(rank, world, root):
    import torch.distributed as dist

    from resilient_train.checkpoint.async_save import AsyncCheckpointer
    from resilient_train.checkpoint.saving import save_replicated
    from resilient_train.errors import ReplicationError
    from resilient_train.storage import LocalStore
    from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy
    from resilient_train.testing.faults import FaultyStore

    stores = {n: LocalStore(f"{root}/{n}", name=n) for n in ("a", "b", "c")}
    stores["c"] = FaultyStore(stores["c"], down=True)
    provs = [Provider(n, f"{root}/{n}", "eu-west-1") for n in ("a", "b", "c")]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores=stores)
    rep = save_replicated(pl, _state(rank), 1)
    out = {"sync": rep.committed}
    pl3 = Placement(provs, ReplicationPolicy(copies=3), stores=stores)
    ck = AsyncCheckpointer(pl3, process_group=dist.new_group(backend="gloo"))
    ck.save(2, _state(rank))
    try:
        ck.close()
        out["async"] = "ok"
    except ReplicationError as exc:
        out["async"] = (sorted(exc.failures), exc.committed)
    return out


def test_two_ranks_agree_on_replication_outcome(tmp_path):
    outs = run_ranks(_save, 2, str(tmp_path), timeout_s=150)
    assert outs[0]["sync"] == outs[1]["sync"] == ["a", "b"]
    # Async: the copies are rank 0's background work (no rank waits for them in a collective),
    # so only rank 0 learns that c missed its copy; rank 1's save committed and that is all it sees.
    assert outs[0]["async"] == (["c"], ["a", "b"])
    assert outs[1]["async"] == "ok"
    from resilient_train.checkpoint.steps import committed_steps
    from resilient_train.storage import LocalStore

    assert committed_steps(LocalStore(str(tmp_path / "a"))) == [1, 2]
    assert committed_steps(LocalStore(str(tmp_path / "b"))) == [1, 2]


# ---------------------------------------------------------------- copies="now" vs the collective timeout

TIMEOUT_S = 3.0


def _slow_sync(rank, world, root):
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from resilient_train.checkpoint.saving import save_replicated
    from resilient_train.storage import LocalStore
    from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy

    class SlowStore(LocalStore):
        """A provider whose first write takes twice the collective timeout (a slow link)."""

        slept = 0.0

        def write_bytes(self, path, data):
            if not SlowStore.slept:
                SlowStore.slept = 2 * TIMEOUT_S
                time.sleep(SlowStore.slept)
            super().write_bytes(path, data)

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    stores = {"a": LocalStore(f"{root}/a", name="a"), "b": SlowStore(f"{root}/b", name="b")}
    provs = [Provider(n, f"{root}/{n}", "eu-west-1") for n in ("a", "b")]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores=stores)
    t0 = time.monotonic()
    rep = save_replicated(pl, _state(rank), 1, process_group=group)
    return {"committed": rep.committed, "seconds": time.monotonic() - t0, "slept": SlowStore.slept}


def test_copies_longer_than_the_collective_timeout_fail_no_rank(tmp_path):
    """copies="now": rank 0 copies while every rank waits for the outcome; a copy that outlasts
    the group's collective timeout (3 s here) used to fail every rank with gloo's timeout though
    the copy went through. Now the ranks exchange a beat every 0.5 s and both return the same
    outcome."""
    outs = run_ranks(_slow_sync, 2, str(tmp_path), timeout_s=150)
    assert outs[0]["slept"] == 2 * TIMEOUT_S and outs[1]["slept"] == 0.0  # only rank 0 copied, and it outlasted the timeout
    assert outs[0]["committed"] == outs[1]["committed"] == ["a", "b"]
    assert outs[1]["seconds"] > TIMEOUT_S  # rank 1 did wait for the copy (the outcome is the same on every rank)
    from resilient_train.checkpoint.steps import committed_steps
    from resilient_train.storage import LocalStore

    assert committed_steps(LocalStore(str(tmp_path / "b"))) == [1]
