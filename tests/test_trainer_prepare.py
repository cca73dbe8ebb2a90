"""The trainer prepares its asynchronous saves after the first optimizer step (issue 22): the
save plan is learnt and every staging buffer allocated then, so the first save allocates
nothing (its stall is the copy alone, like the later saves').

Asserted on events and counters, not on times: ``checkpoint_prepared`` (after step 1, with the
number of staging allocations) and ``checkpoint_started`` (with that count at the save).
"""

from __future__ import annotations

import pytest

from resilient_train.testing.ranks import run_ranks

pytestmark = pytest.mark.timeout(180)


def _train(rank, world, root, steps=7):
    import torch

    import resilient_train as rt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # its moments appear at the first step
    seen: list[dict] = []
    tr = rt.wrap(model, opt, checkpoint=root, every_n_steps=3, log="off", save_on_close=False, on_event=seen.append)
    g = torch.Generator().manual_seed(rank)
    while tr.step_count < steps:
        model(torch.randn(4, 64, generator=g)).sum().backward()
        tr.step()
        opt.zero_grad()
    tr.close()
    keep = ("checkpoint_prepared", "checkpoint_started", "checkpoint_prepare_failed")
    return [{k: v for k, v in e.items() if k in ("event", "step", "allocations", "staging_bytes")} for e in seen if e["event"] in keep]


def _check(evs):
    prepared = [e for e in evs if e["event"] == "checkpoint_prepared"]
    started = [e for e in evs if e["event"] == "checkpoint_started"]
    assert not [e for e in evs if e["event"] == "checkpoint_prepare_failed"], evs
    assert len(prepared) == 1 and prepared[0]["step"] == 1, evs  # once, after the first optimizer step
    assert prepared[0]["allocations"] > 0 and prepared[0]["staging_bytes"] > 0
    assert [e["step"] for e in started] == [3, 6]
    # the first save (and the next) allocated nothing: every buffer existed, moments included
    assert [e["allocations"] for e in started] == [prepared[0]["allocations"]] * 2, evs
    assert [e["staging_bytes"] for e in started] == [prepared[0]["staging_bytes"]] * 2


def test_first_save_allocates_nothing_one_rank(tmp_path):
    evs = _train(0, 1, str(tmp_path / "ck"))
    _check(evs)
    # one rank stages the whole state: model and AdamW's two moments (and the step counters)
    n = (64 * 64 + 64 + 64 * 8 + 8) * 4
    assert evs[0]["staging_bytes"] >= 3 * n


def test_first_save_allocates_nothing_two_ranks(tmp_path):
    """prepare() is a collective on the checkpoint group: both ranks run it at step 1."""
    outs = run_ranks(_train, 2, str(tmp_path / "ck"), timeout_s=150)
    for evs in outs:
        _check(evs)
