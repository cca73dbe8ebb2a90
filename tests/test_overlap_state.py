"""The flat global state (a state transfer between provider groups) with ``overlap_steps`` > 0
carries a round in flight whose result is known (restored from a checkpoint, or waited for by
``state_dict``): a group that receives it at a whole-job restart applies the round at the same
step as the sender, so their global states stay equal (issue 21). Real gloo ranks as threads."""

from __future__ import annotations

import json

import torch

from resilient_train.sync import DiLoCo
from resilient_train.sync.threads import run_thread_ranks
from tests.test_sync_diloco import mlp

H, D = 4, 2


def _train(model, sync, steps, rank):
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        sync.step()


def test_a_known_round_in_flight_travels_with_the_global_state_and_is_applied_at_the_same_step():
    def fn(rank, comm):
        model = mlp(0)
        sync = DiLoCo(model, sync_every=H, comm=comm, overlap_steps=D)
        _train(model, sync, H, rank)  # the round launched at step 4 is in flight
        running = sync.global_flat_meta()["pending"]  # not waited for: not carried
        sync.state_dict()  # a checkpoint waits for its result
        flat, meta = sync.global_flat(), sync.global_flat_meta()
        _train(model, sync, D, rank)  # applied at 4 + d
        return running, flat, meta, sync.global_weights(0).clone(), sync.completed_rounds

    running, flat, meta, applied, completed = run_thread_ranks(fn, 2)[0]
    n = sum(p.numel() for p in mlp(0).parameters())
    assert running == [None]
    assert flat.numel() == 3 * n  # global weights, outer momentum, the round's result
    assert meta["pending"] == [{"launched_at": H, "apply_at": H + D, "nbad": 0}], meta
    assert completed == 1

    model = mlp(7)
    healed = DiLoCo(model, sync_every=H, overlap_steps=D)
    healed.load_global_flat(flat.clone(), json.loads(json.dumps(meta)))
    assert healed.rounds == 1 and healed.completed_rounds == 0 and healed.step_count == H
    assert torch.equal(healed.global_flat(), flat)  # it carries the round on, in turn
    before = healed.global_weights(0).clone()
    _train(model, healed, D, 5)
    assert not torch.equal(before, applied)
    assert torch.equal(healed.global_weights(0), applied)  # the peer's round, applied at 4 + d here too
    assert healed.completed_rounds == 1


def test_without_overlap_the_flat_state_is_unchanged():
    sync = DiLoCo(mlp(0), sync_every=H)
    n = sum(p.numel() for p in mlp(0).parameters())
    assert sync.global_flat().numel() == 2 * n and "pending" not in sync.global_flat_meta()
