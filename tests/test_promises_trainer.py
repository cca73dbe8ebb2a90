"""The in-process wrapper resumes the *weights and optimizer state*, not just the step counter
(README: "resumes from the latest committed checkpoint ... the final weights equal an
uninterrupted run bit for bit"). Issue 13: the fast wrapper test never compared weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import resilient_train as rt

pytestmark = pytest.mark.timeout(120)


def _batch(step: int) -> torch.Tensor:
    # the data depend only on the step, so a resumed run sees what the uninterrupted one saw
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1000 + step))


def _run(ckpt: str, steps: int, init_seed: int):
    torch.manual_seed(init_seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: optimizer state matters
    trainer = rt.wrap(model, opt, checkpoint=ckpt, every_n_steps=5, async_save=False)
    at_start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    while trainer.step_count < steps:
        model(_batch(trainer.step_count)).pow(2).sum().backward()
        trainer.step()
        opt.zero_grad()
    trainer.close(save=False)  # resume from the periodic checkpoint of step 10
    return trainer, model, at_start


def test_in_process_resume_restores_weights_and_optimizer_bit_for_bit(tmp_path):
    _, reference, _ = _run(str(tmp_path / "ref"), 17, init_seed=0)

    first, _, _ = _run(str(tmp_path / "run"), 12, init_seed=0)
    assert first.resumed_from is None
    # a different initialisation: everything must come from the checkpoint
    second, resumed, at_start = _run(str(tmp_path / "run"), 17, init_seed=99)
    assert second.resumed_from == 10 and second.step_count == 17
    saved = load_file(str(tmp_path / "run" / "step-0000000010" / "model-00001-of-00001.safetensors"))
    for k, v in at_start.items():
        assert torch.equal(v, saved[k]), f"{k} after resume is not the step-10 checkpoint's"
    for k, v in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), f"{k} differs from the uninterrupted run"
