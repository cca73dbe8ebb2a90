"""Forward the trainer's events to TensorBoard with ``TrainerConfig(on_event=...)``.

    pip install tensorboard
    python examples/tensorboard_events.py --ckpt ./ckpts --logdir ./tb
    tensorboard --logdir ./tb

Every numeric field of an event becomes a scalar ``event/field`` at the event's step
(checkpoint stall, resume time, sync bytes...). The same shape works for W&B
(``wandb.log({...}, step=...)``) or a Prometheus gauge. The callback runs in the thread that
emitted the event; if it raises, the trainer logs a warning and trains on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

import resilient_train as rt


def tensorboard_forwarder(writer: Any) -> Callable[[dict], None]:
    """A callback for ``on_event`` that writes each numeric field as a scalar."""

    def on_event(event: dict) -> None:
        step = event.get("step")
        for key, value in event.items():
            if key in ("t", "step", "rank") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            writer.add_scalar(f"{event['event']}/{key}", value, global_step=step if isinstance(step, int) else None, walltime=event["t"])
        if event["event"] in ("checkpoint_committed", "close"):
            writer.flush()

    return on_event


def main(argv=None) -> int:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--logdir", required=True)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    writer = SummaryWriter(args.logdir)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = rt.wrap(model, opt, checkpoint=args.ckpt, every_n_steps=10, on_event=tensorboard_forwarder(writer))
    while trainer.step_count < args.steps:
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        trainer.step()
        writer.add_scalar("train/loss", loss.item(), trainer.step_count)
    trainer.close()
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
