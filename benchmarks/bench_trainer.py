"""Overhead of the drop-in wrapper: steps/s of the same loop with and without resilient-train.

    python benchmarks/bench_trainer.py --ranks 1 2 --steps 300 --every 100

For each world size (real gloo ranks, one process each), interleaved per repetition: plain loop
(DDP when ranks > 1) vs the wrapped loop (``rt.wrap``: DDP inside, async checkpoints every --every
steps to a local folder) vs the provider-group loop (``rt.wrap(..., group="a",
membership="tcp://...")``: the same ranks as one provider's group, DiLoCo every --sync-every
steps through a membership TCPStore hosted by this process; one provider, so the outer round
has no peer to wait for). Reports the median step time between checkpoints, the mean step time
including checkpoints (and the rounds), and the overhead ratios. Results:
benchmarks/results/trainer_overhead.json.
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


def _loop(rank, world, mode, steps, every, width, root, membership=None, sync_every=10):
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
    elif mode == "wrapped":
        trainer = rt.wrap(model, opt, checkpoint=os.path.join(root, f"ck-{world}"), every_n_steps=every, keep_last=1)
        net = trainer.model
        step_fn = trainer.step
    else:
        trainer = rt.wrap(model, opt, rt.TrainerConfig(
            checkpoint=os.path.join(root, f"ckg-{world}-{membership.rsplit(':', 1)[1]}"), every_n_steps=every, keep_last=1,
            group="a", membership=membership, sync=rt.SyncConfig(mode="diloco", sync_every=sync_every), start_groups=1))
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
    p.add_argument("--modes", nargs="+", default=["plain", "wrapped", "group"], choices=["plain", "wrapped", "group"])
    p.add_argument("--sync-every", type=int, default=10, help="DiLoCo round length of the group mode")
    args = p.parse_args()
    from resilient_train.membership.kvstore import TCPKVStore
    from resilient_train.testing.ranks import run_ranks

    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for world in args.ranks:
            res: dict[str, list[float]] = {}
            for _ in range(args.reps):
                for mode in args.modes:  # interleaved
                    kv = TCPKVStore.host(0) if mode == "group" else None  # a fresh membership store per run
                    url = f"tcp://127.0.0.1:{kv.port}" if kv is not None else None
                    out = run_ranks(_loop, world, mode, args.steps, args.every, args.width, root, url, args.sync_every, timeout_s=1800)
                    del kv
                    res.setdefault(mode, []).append(max(o["median_step_s"] for o in out))
                    res.setdefault(mode + "_mean", []).append(max(o["mean_step_s"] for o in out))
            row: dict = {"raw": res}
            for mode in args.modes:
                row[f"{mode}_median_step_s"] = statistics.median(res[mode])
                row[f"{mode}_mean_step_s"] = statistics.median(res[mode + "_mean"])
            line = f"ranks={world}:"
            if "plain" in args.modes:
                plain, pm = row["plain_median_step_s"], row["plain_mean_step_s"]
                line += f" plain {plain * 1e3:.2f} ms/step"
                for mode in args.modes:
                    if mode == "plain":
                        continue
                    key = "" if mode == "wrapped" else f"{mode}_"
                    row[f"{key}overhead_between_checkpoints"] = row[f"{mode}_median_step_s"] / plain - 1
                    row[f"{key}overhead_incl_checkpoints"] = row[f"{mode}_mean_step_s"] / pm - 1
                    line += (f", {mode} {row[f'{mode}_median_step_s'] * 1e3:.2f} ms/step -> overhead between checkpoints "
                             f"{100 * row[f'{key}overhead_between_checkpoints']:+.1f}%, incl. checkpoints every {args.every} "
                             f"{100 * row[f'{key}overhead_incl_checkpoints']:+.1f}%")
            rows[str(world)] = row
            print(line, flush=True)
    params = sum(p.numel() for p in _model(args.width).parameters())
    out = write_result("trainer_overhead", {"steps": args.steps, "every_n_steps": args.every, "params": params, "reps": args.reps,
                                            "modes": args.modes, "group_sync_every": args.sync_every, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
