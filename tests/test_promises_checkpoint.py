"""Promises of README.md and docs/format.md about loading that no other test guarded (issue 13).

Each test is written against the public API (``rt.save``/``rt.load``/``CheckpointManager``) so
that a planted bug in the reader fails it: a tampered JSON file of the same size, ``strict=False``,
optimizer state matched by parameter *name*, and RNG states remapped across world sizes.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

import resilient_train as rt
from resilient_train import errors
from resilient_train.testing.ranks import run_ranks

from .helpers import TinyNet, assert_same_state, full_state, make_run, train_steps

pytestmark = pytest.mark.timeout(120)


def _saved(tmp_path, step: int = 1):
    state = make_run(lr=0.1)
    train_steps(state, 2)
    rt.save(str(tmp_path), state, step)
    return state, tmp_path / f"step-{step:010d}"


def _tamper_same_size(path, pattern: bytes, replace) -> None:
    data = path.read_bytes()
    m = re.search(pattern, data)
    assert m is not None, f"{pattern!r} not found in {path.name}"
    new = data[:m.start()] + replace(m.group(0)) + data[m.end():]
    assert len(new) == len(data) and new != data
    path.write_bytes(new)


# The issue found these files checked by size only (lr 0.1 -> 9.1 loaded silently). This
# branch's reader hashes them; if a reader rewrite regresses, these fail.
@pytest.mark.parametrize("how", ["load", "manager"])
def test_tampered_state_json_same_size_is_refused_and_nothing_changes(tmp_path, how):
    _, folder = _saved(tmp_path)
    _tamper_same_size(folder / "state.json", rb'"lr": 0\.1,', lambda b: b.replace(b"0.1", b"9.1"))
    fresh = make_run(seed=3, lr=0.1)
    before = full_state(fresh)
    with pytest.raises(errors.CorruptCheckpointError, match="state.json"):
        if how == "load":
            rt.load(str(tmp_path), fresh)
        else:
            rt.CheckpointManager(str(tmp_path), every_n_steps=1).restore(fresh)
    assert_same_state(before, full_state(fresh))
    assert fresh.optimizer.param_groups[0]["lr"] == 0.1
    if how == "manager":  # the manager uncommits a checkpoint it rejected for its bytes (its step is saved again)
        assert (folder / "rejected-manifest.json").exists() and not (folder / "manifest.json").exists()
        return
    _, problems = rt.verify_checkpoint(str(tmp_path))
    assert any("state.json" in p for p in problems), problems


def test_tampered_rank_json_same_size_is_refused_and_nothing_changes(tmp_path):
    _, folder = _saved(tmp_path)
    # one digit of the python RNG state: still valid JSON, same size, a different RNG stream
    _tamper_same_size(folder / "rank-00000.json", rb'"python": \{\s*"__tuple__": \[\s*\d+,\s*\{\s*"__tuple__": \[\s*\d+',
                      lambda b: b[:-1] + str((int(b[-1:]) + 1) % 10).encode())
    fresh = make_run(seed=3, lr=0.1)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = full_state(fresh)
    with pytest.raises(errors.CorruptCheckpointError, match="rank-00000.json"):
        rt.load(str(tmp_path), fresh)
    assert_same_state(before, full_state(fresh))


def test_strict_false_tolerates_checkpoint_tensors_the_model_lacks(tmp_path):
    big = TinyNet()
    big.register_buffer("retired", torch.arange(5.0))
    with torch.no_grad():
        big.fc1.weight.fill_(0.25)
    rt.save(str(tmp_path), rt.TrainState(model=big, rng=False), 1)

    small = TinyNet()
    before = full_state(rt.TrainState(model=small, rng=False))
    with pytest.raises(errors.StateMismatchError, match="retired: in the checkpoint but not in the model"):
        rt.load(str(tmp_path), rt.TrainState(model=small, rng=False))
    assert_same_state(before, full_state(rt.TrainState(model=small, rng=False)))

    rt.load(str(tmp_path), rt.TrainState(model=small, rng=False), strict=False)
    for k, v in small.state_dict().items():
        assert torch.equal(v, big.state_dict()[k]), k
    # strict=False does not paper over a tensor the model needs and the checkpoint lacks
    needy = TinyNet()
    needy.register_buffer("fresh_buf", torch.zeros(2))
    with pytest.raises(errors.StateMismatchError, match="fresh_buf: missing"):
        rt.load(str(tmp_path), rt.TrainState(model=needy, rng=False), strict=False)


def _opt(model, groups, lr=1e-2):
    named = dict(model.named_parameters())
    return torch.optim.AdamW([{"params": [named[n] for n in g], "lr": lr * (i + 1)} for i, g in enumerate(groups)])


def test_optimizer_state_is_matched_by_parameter_name_not_position(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = _opt(model, [["fc1.weight", "fc1.bias"], ["fc2.weight", "fc2.bias"]])
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    rt.save(str(tmp_path), rt.TrainState(model=model, optimizer=opt, rng=False), 1)
    saved = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}

    # same groups, parameters listed in another order: every moment lands on its own parameter
    torch.manual_seed(1)
    other = TinyNet()
    reordered = _opt(other, [["fc1.bias", "fc1.weight"], ["fc2.bias", "fc2.weight"]])
    rt.load(str(tmp_path), rt.TrainState(model=other, optimizer=reordered, rng=False))
    for n, p in other.named_parameters():
        for k, v in saved[n].items():
            assert torch.equal(reordered.state[p][k], v), (n, k)
    assert [g["lr"] for g in reordered.param_groups] == [1e-2, 2e-2]

    # groups holding other parameter names: refused before anything changes
    torch.manual_seed(2)
    third = TinyNet()
    regrouped = _opt(third, [["fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias"]])
    state = rt.TrainState(model=third, optimizer=regrouped, rng=False)
    before = full_state(state)
    with pytest.raises(errors.StateMismatchError, match="param group 0 differs"):
        rt.load(str(tmp_path), state)
    assert_same_state(before, full_state(state))


# ------------------------------------------------------------------ RNG across world sizes


def _save_rng(rank, world, root):
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    rt.save(root, rt.TrainState(model=torch.nn.Linear(2, 2)), 1)
    # what this rank draws next: a resumed rank must draw the same
    return torch.rand(4), random.random()


def _load_rng(rank, world, root):
    torch.manual_seed(7)
    random.seed(7)
    rt.load(root, rt.TrainState(model=torch.nn.Linear(2, 2)))
    return torch.rand(4), random.random()


@pytest.mark.slow
def test_rng_state_is_remapped_when_the_world_size_changes(tmp_path):
    """docs/format.md: on a different world size, rank r restores rank r % saved_world_size's RNG."""
    root = str(tmp_path)
    saved = run_ranks(_save_rng, 2, root, timeout_s=120)
    assert not torch.equal(saved[0][0], saved[1][0])
    loaded = run_ranks(_load_rng, 3, root, timeout_s=120)
    for r, (t, x) in enumerate(loaded):
        want_t, want_x = saved[r % 2]
        assert torch.equal(t, want_t) and x == want_x, f"rank {r} did not get rank {r % 2}'s RNG"
    # and one rank (this process) takes rank 0's
    state = full_state(rt.TrainState())
    try:
        assert torch.equal(_load_rng(0, 1, root)[0], saved[0][0])
    finally:
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])


# ------------------------------------------------------------------ found by mutation testing


class _Counter:
    """A ``stateful`` object whose state holds a tensor and a plain value."""

    def __init__(self, fill: float):
        self.t = torch.full((3,), fill)
        self.n = int(fill)

    def state_dict(self):
        return {"t": self.t.clone(), "n": self.n}

    def load_state_dict(self, sd):
        self.t, self.n = sd["t"].clone(), sd["n"]


def test_float64_model_scalar_parameter_and_stateful_tensors_round_trip(tmp_path):
    """Optimizer state keeps the parameter's dtype (float64 here), a 0-dim parameter's state
    loads, and tensors inside a ``stateful`` object come back."""

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2).double()
        model.register_parameter("temperature", torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        (model(torch.randn(4, 3, dtype=torch.float64)).sum() * model.temperature).backward()
        opt.step()
        return model, opt

    model, opt = make(0)
    rt.save(str(tmp_path), rt.TrainState(model=model, optimizer=opt, stateful={"c": _Counter(7.0)}, rng=False), 1)
    other, other_opt = make(1)
    counter = _Counter(0.0)
    rt.load(str(tmp_path), rt.TrainState(model=other, optimizer=other_opt, stateful={"c": counter}, rng=False))
    assert torch.equal(counter.t, torch.full((3,), 7.0)) and counter.n == 7
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        for k, v in opt.state[p].items():
            got = other_opt.state[q][k]
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), (name, k)
