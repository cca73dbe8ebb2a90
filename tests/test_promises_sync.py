"""Promises of docs/sync.md and docs/membership.md that no other test guarded (issue 13).

* A vetoed DiLoCo round (non-finite pseudo-gradient) leaves the error-feedback residuals as
  they were, also when they are not zero (round >= 2).
* A peer-to-peer state transfer whose bytes are corrupted in transit is detected by the
  state digest and raised as DistributedError on the receiver.
Both run on real gloo thread ranks.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from resilient_train.compression import get_codec
from resilient_train.errors import DistributedError
from resilient_train.membership import View, sync_state
from resilient_train.sync import DiLoCo
from resilient_train.sync.threads import run_thread_ranks

pytestmark = pytest.mark.timeout(60)

TO = timedelta(seconds=20)


def _mlp() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_veto_at_round_two_keeps_the_error_feedback_residuals():
    def fn(rank, comm):
        model = _mlp()
        sync = DiLoCo(model, sync_every=1, comm=comm, codec=get_codec("int8", backend="reference", block_size=4))
        g = torch.Generator().manual_seed(10 + rank)
        with torch.no_grad():  # round 1: an ordinary round leaves non-zero residuals
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        sync.step()
        after1 = sync.state_dict()["tensors"]
        with torch.no_grad():  # round 2: replica 1 produces a NaN, the round is vetoed everywhere
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if rank == 1:
                next(model.parameters())[0, 0] = float("nan")
        sync.step()
        after2 = sync.state_dict()["tensors"]
        return after1, after2, [p.detach().clone() for p in model.parameters()], sync.skipped_rounds

    for after1, after2, params, skipped in run_thread_ranks(fn, 2):
        assert skipped == 1
        assert float(after1["fragment.0.residual"].abs().max()) > 0  # the round-1 residual is real
        assert after1.keys() == after2.keys()
        for k in after1:  # residuals, global weights and outer optimizer state: all as after round 1
            assert torch.equal(after1[k], after2[k]), f"{k} changed in the vetoed round"
        flat = torch.cat([p.reshape(-1) for p in params])
        assert torch.equal(flat, after1["fragment.0.global"]), "local weights not reset to the global ones"


class _Comm:
    """The communicator, but the first chunk a receiver gets has one bit flipped after it
    arrived (what a faulty link or NIC would do past TCP's checksum)."""

    def __init__(self, comm, corrupt: bool):
        self._comm, self._corrupt = comm, corrupt

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def recv(self, buf, src, tag):
        handle = self._comm.recv(buf, src, tag)
        if not self._corrupt or tag != 0:
            return handle

        def flip(result):
            buf.view(torch.uint8).reshape(-1)[3] ^= 0x10
            return result

        return handle.then(flip)


def test_state_transfer_corrupted_in_transit_is_detected_by_the_digest():
    view = View(3, ("a", "b"), "fp", joiners=("b",))
    source = torch.randn(300, generator=torch.Generator().manual_seed(0))

    def fn(rank, comm):
        flat = source.clone() if rank == 0 else torch.zeros(300)
        try:
            res = sync_state(_Comm(comm, corrupt=rank == 1), view, view.members[rank], flat, 5 if rank == 0 else 0,
                             chunk_bytes=256, timeout=TO)
        except DistributedError as exc:
            return exc, flat
        return res, flat

    (res_a, flat_a), (res_b, _) = run_thread_ranks(fn, 2, timeout_s=40)
    assert not isinstance(res_a, Exception) and res_a.receivers == ("b",) and torch.equal(flat_a, source)
    assert isinstance(res_b, DistributedError), f"corrupted transfer accepted: {res_b!r}"
    assert "digest" in str(res_b) + str(getattr(res_b, "errors", ""))

    # the same transfer without the fault succeeds bit for bit (the wrapper itself is harmless)
    def clean(rank, comm):
        flat = source.clone() if rank == 0 else torch.zeros(300)
        sync_state(_Comm(comm, corrupt=False), view, view.members[rank], flat, 5 if rank == 0 else 0,
                   chunk_bytes=256, timeout=TO)
        return flat

    assert all(torch.equal(f, source) for f in run_thread_ranks(clean, 2, timeout_s=40))
