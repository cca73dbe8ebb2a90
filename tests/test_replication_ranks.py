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
