"""Small models and training loops shared by the checkpoint tests."""

from __future__ import annotations

import torch

from resilient_train import TrainState
from resilient_train.data import ResumableSampler


class TinyNet(torch.nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.drop = torch.nn.Dropout(0.2)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


DATA_X = torch.Generator().manual_seed(123)
DATASET = torch.randn(64, 8, generator=DATA_X)
TARGETS = torch.randn(64, 4, generator=DATA_X)


def make_run(seed: int = 0, lr: float = 1e-2):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW([
        {"params": [model.fc1.weight, model.fc1.bias], "lr": lr},
        {"params": [model.fc2.weight, model.fc2.bias], "lr": lr * 0.5, "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    sampler = ResumableSampler(len(DATASET), seed=7)
    state = TrainState(model=model, optimizer=opt, scheduler=sched, sampler=sampler, extra={"epoch_losses": [], "note": "tiny"})
    return state


def train_steps(state: TrainState, n: int, batch: int = 8) -> list[float]:
    """Train ``n`` steps, drawing batches from the sampler (epochs roll over) and fresh noise."""
    losses = []
    sampler = state.sampler
    it = iter(sampler)
    while len(losses) < n:
        idx = []
        for i in it:
            idx.append(i)
            if len(idx) == batch:
                break
        if len(idx) < batch:
            sampler.set_epoch(sampler.epoch + 1)
            it = iter(sampler)
            continue
        x = DATASET[idx] + 0.01 * torch.randn(batch, 8)
        loss = torch.nn.functional.mse_loss(state.model(x), TARGETS[idx])
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        losses.append(loss.item())
        state.extra["epoch_losses"].append(round(loss.item(), 6))
    return losses


def full_state(state: TrainState) -> dict:
    """Every part of ``state`` a load may change, copied: model and optimizer tensors, optimizer
    hyper-parameters, scheduler, sampler, stateful objects, extras and the RNG states of python,
    numpy and torch. Compare two with :func:`assert_same_state`."""
    import copy
    import random

    import numpy as np

    out: dict = {}
    if state.model is not None:
        out["model"] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    if state.optimizer is not None:
        out["optimizer"] = copy.deepcopy(state.optimizer.state_dict())
    if state.scheduler is not None:
        out["scheduler"] = copy.deepcopy(state.scheduler.state_dict())
    if state.sampler is not None:
        out["sampler"] = copy.deepcopy(state.sampler.state_dict())
    out["stateful"] = {k: copy.deepcopy(v.state_dict()) for k, v in state.stateful.items()}
    out["extra"] = copy.deepcopy(state.extra)
    np_state = np.random.get_state()
    out["rng"] = {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
                  "torch": torch.get_rng_state().clone()}
    return out


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where} differs"
        assert torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ ({sorted(map(str, a))} vs {sorted(map(str, b))})"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where} changed: {a!r} -> {b!r}"


def assert_same_state(before: dict, after: dict) -> None:
    """Every part captured by :func:`full_state` is equal (tensors bit for bit)."""
    _same(before, after, "state")
