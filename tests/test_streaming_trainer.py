"""Streaming DiLoCo (``fragments`` > 1) through ``rt.wrap`` without provider groups: one job of 2
real gloo ranks (resilient_train.testing.ranks), DDP inside, DiLoCo (int8; int4 and topk in
`make test-faults`) with H = 4 and K = 2
between its ranks. Checkpoints fall at steps 8 and 16, where fragment 1 has just synced and
fragment 0 is two local steps past its sync (local weights != global weights): the job stopped
after step 12 and resumed from step 8 ends equal to the uninterrupted run bit for bit (local
weights from the model's checkpoint, global weights, outer momentum and residuals from the
sync state)."""

from __future__ import annotations

import pytest
import torch

from resilient_train.testing.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _train(rank: int, world: int, root: str, stop: int, codec: str) -> dict:
    import resilient_train as rt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tr = rt.wrap(model, opt, checkpoint=root, every_n_steps=8, async_save=False, save_on_close=False, log="off",
                 sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, codec=codec))
    resumed = tr.resumed_from
    while tr.step_count < stop:
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * tr.step_count + rank))
        loss = (tr.model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        tr.step()
    out = {"resumed": resumed, "step": tr.step_count, "model": {k: v.clone() for k, v in model.state_dict().items()},
           "global": tr.sync.global_flat().clone(), "differs": not torch.equal(tr.sync.global_weights(0), torch.cat([p.detach().reshape(-1) for p in tr.sync.fragment_params(0)]))}
    tr.close()
    return out


def _three_runs(rank: int, world: int, root: str, codec: str) -> list[dict]:
    """Uninterrupted to 24; stopped after 12; resumed to 24 (three trainers in turn on the same ranks)."""
    return [_train(rank, world, f"{root}/ref", 24, codec), _train(rank, world, f"{root}/run", 12, codec), _train(rank, world, f"{root}/run", 24, codec)]


@pytest.mark.parametrize("codec", ["int8", pytest.param("int4", marks=pytest.mark.faults), pytest.param("topk", marks=pytest.mark.faults)])
def test_streaming_without_groups_resumes_bit_for_bit(tmp_path, codec):
    """int8, int4, topk: each fragment's error-feedback residual comes from the sync state."""
    runs = run_ranks(_three_runs, 2, str(tmp_path), codec)
    ref, first, again = runs[0][0], runs[0][1], runs[0][2]
    assert ref["differs"], "fragment 0's local weights should differ from its global ones at step 24"
    assert first["resumed"] is None and first["step"] == 12 and again["resumed"] == 8
    for r in range(2):
        ref, again = runs[r][0], runs[r][2]
        assert torch.equal(ref["global"], again["global"]), f"rank {r}: global state differs"
        for k, v in ref["model"].items():
            assert torch.equal(v, again["model"][k]), f"rank {r}: {k} differs from the uninterrupted run"


class _Uneven(torch.nn.Module):
    """Parameters whose FSDP2 pieces are uneven: ``head`` has one row, all of it on rank 0."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Parameter(torch.ones(1, 100))
        self.a = torch.nn.Parameter(torch.ones(4, 10))
        self.b = torch.nn.Parameter(torch.ones(2, 30))
        self.c = torch.nn.Parameter(torch.ones(2, 50))


def _fragments_of_a_sharded_model(rank: int, world: int) -> list[list[str]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from resilient_train.sync import DiLoCo

    model = _Uneven()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    sync = DiLoCo(model, sync_every=4, fragments=2)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in sync.fragment_params(k)] for k in range(sync.num_fragments)]


def test_the_ranks_of_a_sharded_model_split_it_into_the_same_fragments():
    """Split by this rank's piece sizes, rank 0 (which holds all of ``head``) would put ``head``
    alone in fragment 0 and rank 1 (none of it) ``head, a, b``: the ranks of a group would sync
    different parameters at each step and checkpoint ``fragment.<k>.*.p<j>`` under different
    names. Split by the logical sizes, both agree."""
    per_rank = run_ranks(_fragments_of_a_sharded_model, 2)
    assert per_rank[0] == per_rank[1] == [["head", "a", "b"], ["c"]], per_rank


def test_config_accepts_fragments_and_overlap_with_groups_and_refuses_overlapping_rounds():
    """With group= one round runs at a time: overlap_steps must stay below sync_every // fragments.
    Without group= a checkpoint interval off the sync period is refused with where checkpoints
    fall instead; with group= it is accepted (resume tested there: tests/test_streaming_groups.py,
    tests/test_overlap_groups.py, ``every`` cases)."""
    import resilient_train as rt
    from resilient_train import errors

    groups = {"group": "a", "membership": "tcp://127.0.0.1:1"}
    for group in ({}, groups):
        cfg = rt.TrainerConfig(checkpoint="x", every_n_steps=8, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2), **group)
        assert cfg.sync.fragments == 2
    for k, d in ((2, 1), (1, 2), (1, 3)):
        assert rt.TrainerConfig(checkpoint="x", every_n_steps=8, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=k, overlap_steps=d), **groups)
    with pytest.raises(errors.ConfigError, match=r"overlap_steps \(2\) must be smaller than .* = 2.*docs/sync.md"):
        rt.TrainerConfig(checkpoint="x", every_n_steps=8, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, overlap_steps=2), **groups)
    # without group=, checkpoints at the end of a sync period, where only the last fragment
    # syncs: the message says so; with group= any interval (resume tested off the period)
    with pytest.raises(errors.ConfigError, match=r"every_n_steps \(6\) must be a multiple of sync.sync_every \(4\).*"
                                                 r"the last of the 2 fragments launches its sync there, the others synced earlier.*"
                                                 r"overlap_steps = 1 that round is in flight.*without group=.*e\.g\. every_n_steps = 8"):
        rt.TrainerConfig(checkpoint="x", every_n_steps=6, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, overlap_steps=1))
    for every in (1, 5, 6, 7):
        assert rt.TrainerConfig(checkpoint="x", every_n_steps=every, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, overlap_steps=1), **groups)
    # without group= the engine keeps several rounds in flight, as before
    assert rt.TrainerConfig(checkpoint="x", every_n_steps=8, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, overlap_steps=3))
