"""A plain PyTorch training loop with resilient-train checkpoints: the lines to add are marked.

    python examples/train_small.py --ckpt ./ckpts --steps 200 --every 25

Run it, kill it (Ctrl-C, SIGKILL, a lost machine), run the same command again: it resumes from
the last committed checkpoint and continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import torch

import resilient_train as rt  # (1) import
from resilient_train.data import ResumableSampler


def make_data(n: int = 2048, seed: int = 0):
    """Two interleaved spirals: a small task a small MLP visibly learns."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 1.5 * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = 0.2 + t / (1.5 * torch.pi)
    angle = t + label * torch.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return x, label


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or URL")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="checkpoint every N steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL this process at that step (to show recovery)")
    p.add_argument("--log", default=None, help="append one JSON line per step to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    x, y = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Dropout(0.05), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    sampler = ResumableSampler(len(x), seed=1)
    # Its own generator: a DataLoader otherwise draws from the global torch RNG each time an
    # iterator starts, so a resumed run (which starts one mid-epoch) would diverge.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch, sampler=sampler, drop_last=True, generator=torch.Generator())

    # (2) describe the state and where checkpoints go; (3) resume if there is one
    state = rt.TrainState(model=model, optimizer=opt, scheduler=sched, sampler=sampler, extra={"step": 0})
    manager = rt.CheckpointManager(args.ckpt, every_n_steps=args.every, keep_last=3)
    restored = manager.restore(state)
    step = state.extra["step"]
    print(json.dumps({"event": "start", "resumed_from": restored.step if restored else None, "step": step}), flush=True)

    log = open(args.log, "a") if args.log else None
    while step < args.steps:
        sampler.set_epoch(sampler.epoch if sampler.consumed < len(x) - args.batch + 1 else sampler.epoch + 1)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            state.extra["step"] = step
            if log:
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                log.flush()
            if manager.maybe_save(step, state):  # (4) checkpoint on schedule
                print(json.dumps({"event": "checkpoint", "step": step, "loss": round(loss.item(), 4)}), flush=True)
            if args.kill_at is not None and step == args.kill_at:
                print(json.dumps({"event": "killed", "step": step}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= args.steps:
                break
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    print(json.dumps({"event": "done", "step": step, "accuracy": round(acc, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
