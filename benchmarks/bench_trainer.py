"""Overhead of the drop-in wrapper: steps/s of the same loop with and without resilient-train.

    python benchmarks/bench_trainer.py --ranks 1 2 --steps 300 --every 100

For each world size (real gloo ranks, one process each): plain loop (DDP when ranks > 1) vs
the wrapped loop (``rt.wrap``: DDP inside, async checkpoints every --every steps to a local
folder). Reports the median step time between checkpoints, the mean step time including
checkpoints, and the overhead ratios. Results: benchmarks/results/trainer_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_result  # noqa: E402


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 256))


def _loop(rank, world, mode, steps, every, width, root):
    import torch.distributed as dist

    import resilient_train as rt

    torch.set_num_threads(max(1, 2 // world))
    model = _model(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    data = [torch.randn(32, 256, generator=g) for _ in range(8)]
    if mode == "plain":
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        step_fn = opt.step
        trainer = None
    else:
        trainer = rt.wrap(model, opt, checkpoint=os.path.join(root, f"ck-{world}"), every_n_steps=every, keep_last=1)
        net = trainer.model
        step_fn = trainer.step
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        x = data[i % len(data)]
        loss = (net(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        step_fn()
        times.append(time.perf_counter() - t0)
    if trainer is not None:
        trainer.close()
    if world > 1:
        dist.barrier()
    warm = times[10:]
    ckpt_steps = {i for i in range(len(times)) if (i + 1) % every == 0}
    between = [t for i, t in enumerate(times) if i >= 10 and i not in ckpt_steps]
    return {"median_step_s": statistics.median(between), "mean_step_s": statistics.fmean(warm)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from resilient_train.testing.ranks import run_ranks

    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for world in args.ranks:
            res = {"plain": [], "wrapped": []}
            for _ in range(args.reps):
                for mode in ("plain", "wrapped"):
                    out = run_ranks(_loop, world, mode, args.steps, args.every, args.width, root, timeout_s=1800)
                    res[mode].append(max(o["median_step_s"] for o in out))
                    res[mode + "_mean"] = res.get(mode + "_mean", []) + [max(o["mean_step_s"] for o in out)]
            plain, wrapped = statistics.median(res["plain"]), statistics.median(res["wrapped"])
            pm, wm = statistics.median(res["plain_mean"]), statistics.median(res["wrapped_mean"])
            rows[str(world)] = {
                "plain_median_step_s": plain, "wrapped_median_step_s": wrapped,
                "overhead_between_checkpoints": wrapped / plain - 1,
                "plain_mean_step_s": pm, "wrapped_mean_step_s_incl_checkpoints": wm,
                "overhead_incl_checkpoints": wm / pm - 1,
                "raw": res,
            }
            print(f"ranks={world}: plain {plain * 1e3:.2f} ms/step, wrapped {wrapped * 1e3:.2f} ms/step -> overhead between checkpoints {100 * (wrapped / plain - 1):+.1f}%, incl. checkpoints every {args.every} {100 * (wm / pm - 1):+.1f}%")
    params = sum(p.numel() for p in _model(args.width).parameters())
    out = write_result("trainer_overhead", {"steps": args.steps, "every_n_steps": args.every, "params": params, "reps": args.reps, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
