"""A non-finite pseudo-gradient vetoes the round everywhere; the poisoned replica heals (local
weights to the global ones, inner optimizer state dropped) so that it does not veto every
later round, and repeated vetoes surface as SyncVetoError. Real gloo ranks (threads)."""

from __future__ import annotations

import pytest
import torch

from resilient_train.compression import get_codec
from resilient_train.errors import SyncVetoError
from resilient_train.sync import DiLoCo
from resilient_train.sync.threads import run_thread_ranks


def _model() -> torch.nn.Module:
    m = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(0)  # not the global RNG: the ranks are threads of one process
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _train(model, opt, rank, step, poison):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 8, generator=g)
    loss = model(x).pow(2).mean()
    if poison:
        loss = loss * float("nan")
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_veto_heals_the_poisoned_replica_and_keeps_the_residuals():
    H = 2

    def fn(rank, comm):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        healed = []
        codec = get_codec("int8", backend="reference")
        sync = DiLoCo(model, None, sync_every=H, comm=comm, codec=codec, max_vetoes_in_a_row=3,
                      on_local_veto=lambda: (opt.state.clear(), healed.append(sync.step_count)))
        rounds = []
        for step in range(1, 4 * H + 1):
            _train(model, opt, rank, step, poison=(rank == 1 and step == 2 * H))  # round 2 on replica 1
            before = (sync.global_weights(0).clone(), sync._fragments[0].residual.clone())
            sync.step()
            if step % H == 0:
                rounds.append((step, sync.skipped_rounds, before, sync.global_weights(0).clone(),
                               sync._fragments[0].residual.clone(), len(opt.state)))
        return healed, rounds, [p.detach().clone() for p in model.parameters()]

    (healed0, rounds0, w0), (healed1, rounds1, w1) = run_thread_ranks(fn, 2)
    assert healed0 == [] and healed1 == [2 * H]  # only the poisoned replica dropped its Adam state
    step, skipped, (g_before, r_before), g_after, r_after, n_state = rounds1[1]
    assert step == 2 * H and skipped == 1
    assert torch.equal(g_before, g_after)                      # the global weights did not move
    assert torch.equal(r_before, r_after) and r_before.abs().sum() > 0  # residuals of round 1 kept
    assert n_state == 0                                         # healed: a clean inner state
    assert rounds0[1][4].abs().sum() > 0 and torch.equal(rounds0[1][2][1], rounds0[1][4])
    # the next rounds are not vetoed again: the replica healed
    assert rounds0[-1][1] == rounds1[-1][1] == 1
    assert all(torch.isfinite(p).all() for p in w1)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))      # both hold the global weights after the last round


def test_repeated_vetoes_raise_a_typed_error():
    def fn(rank, comm):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        sync = DiLoCo(model, None, sync_every=1, comm=comm, max_vetoes_in_a_row=3)
        for step in range(1, 10):
            _train(model, opt, rank, step, poison=(rank == 0))
            sync.step()
        return None

    with pytest.raises(Exception) as info:
        run_thread_ranks(fn, 2)
    errors = getattr(info.value, "errors", {})
    assert errors and all(isinstance(e, SyncVetoError) for e in errors.values()), info.value
    assert "3 synchronisation rounds in a row were vetoed" in str(errors[0])
