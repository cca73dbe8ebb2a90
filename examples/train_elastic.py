"""A training script made resilient with three lines; launch it with torchrun.

    torchrun --nproc-per-node=2 --max-restarts=3 examples/train_elastic.py --ckpt ./ckpts

If a worker dies, torchrun restarts the workers and the script resumes by itself from the last
committed checkpoint (resharded if the world size changed). Several providers are several
torchrun jobs, one per provider: see examples/provider_train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

import resilient_train as rt
from resilient_train.data import ResumableSampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or URL")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument("--samples", type=int, default=960)
    p.add_argument("--log-dir", default=None, help="write per-rank JSON lines of (step, sample ids, loss)")
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL rank --kill-rank at this step on the first attempt")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--sync-save", action="store_true", help="wait for each checkpoint to commit (deterministic tests)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 16, generator=g)
    w_true = torch.randn(16, 4, generator=g)
    y = x @ w_true + 0.01 * torch.randn(args.samples, 4, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ResumableSampler(args.samples, seed=3)

    trainer = rt.wrap(  # (1) wrap: joins the job, resumes from the latest checkpoint
        model, opt,
        rt.TrainerConfig(checkpoint=args.ckpt, every_n_steps=args.every, keep_last=2,
                         event_log=os.path.join(args.log_dir, "events-rank{rank}.jsonl") if args.log_dir else None,
                         timeout_s=60, async_save=not args.sync_save),
        sampler=sampler,
    )
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = open(os.path.join(args.log_dir, f"steps-rank{trainer.rank}-attempt{attempt}.jsonl"), "a") if args.log_dir else None
    while trainer.step_count < args.steps:
        if sampler.consumed + trainer.world_size * args.batch > args.samples:
            sampler.set_epoch(sampler.epoch + 1)
        idx = []
        for i in sampler:
            idx.append(i)
            if len(idx) == args.batch:
                break
        loss = torch.nn.functional.mse_loss(trainer.model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        trainer.step()  # (2) instead of opt.step()
        if log:
            log.write(json.dumps({"step": trainer.step_count, "epoch": sampler.epoch, "ids": idx, "loss": loss.item(), "world": trainer.world_size}) + "\n")
            log.flush()
        if args.kill_at == trainer.step_count and attempt == 0 and trainer.rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.close()  # (3) finish the checkpoint in flight
    if trainer.rank == 0:
        print(json.dumps({"event": "done", "step": trainer.step_count, "resumed_from": trainer.resumed_from, "world": trainer.world_size, "loss": loss.item()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
