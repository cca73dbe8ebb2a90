"""Checkpoint save/load throughput: resilient-train vs torch.save, safetensors, DCP, and the
physical ceilings (memcpy into preallocated memory; dd with fdatasync), in one run.

    python benchmarks/bench_checkpoint.py --size-gib 2 --reps 3 [--dir /path/on/disk]

Every save is durable (fsync) and resilient-train additionally hashes every byte on save and
re-verifies every byte on load. Medians of --reps runs; page cache is warm (noted in the JSON).
Results: benchmarks/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resilient_train as rt  # noqa: E402
from common import timed, write_result  # noqa: E402


class Blob(torch.nn.Module):
    def __init__(self, total_bytes: int, n_tensors: int = 16):
        super().__init__()
        per = total_bytes // 4 // n_tensors
        for i in range(n_tensors):
            self.register_parameter(f"w{i:02d}", torch.nn.Parameter(torch.randn(per // 1024, 1024)))


def fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _two_rank_save(rank, world, total, root, reps):
    import statistics
    import time

    import torch.distributed as dist

    torch.set_num_threads(2)
    torch.manual_seed(0)
    state = rt.TrainState(model=Blob(total), rng=False)
    times = []
    for i in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        rt.save(root, state, i + 1)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            shutil.rmtree(os.path.join(root, f"step-{i + 1:010d}"))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    p.add_argument("--out", default="checkpoint")
    args = p.parse_args()

    total = int(args.size_gib * 1024**3)
    torch.manual_seed(0)
    model = Blob(total)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in sd.values())
    base = tempfile.mkdtemp(dir=args.dir, prefix="rt-bench-")
    path = lambda name: os.path.join(base, name)  # noqa: E731
    reps = args.reps
    res: dict[str, dict] = {"save": {}, "load": {}}

    def clean(name):
        return lambda: shutil.rmtree(path(name), ignore_errors=True) if os.path.isdir(path(name)) else (os.path.exists(path(name)) and os.unlink(path(name)))

    # ceilings
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    res["save"]["memcpy_ceiling"] = timed(lambda: [dst[k].copy_(v) for k, v in sd.items()], reps)
    count = max(1, nbytes // (16 * 1024**2))
    res["save"]["dd_fdatasync_ceiling"] = timed(lambda: subprocess.run(["dd", "if=/dev/zero", f"of={path('dd.bin')}", "bs=16M", f"count={count}", "conv=fdatasync"], check=True, capture_output=True), reps, clean("dd.bin"))
    del dst

    # saves
    def torch_save():
        with open(path("t.pt"), "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())

    def st_save():
        import safetensors.torch

        safetensors.torch.save_file(sd, path("s.safetensors"))
        fd = os.open(path("s.safetensors"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def dcp_save():
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, checkpoint_id=path("dcp"))
        fsync_tree(path("dcp"))

    state = rt.TrainState(model=model, rng=False)
    res["save"]["torch.save+fsync"] = timed(torch_save, reps, clean("t.pt"))
    res["save"]["safetensors.save_file+fsync"] = timed(st_save, reps, clean("s.safetensors"))
    res["save"]["dcp.save+fsync"] = timed(dcp_save, reps, clean("dcp"))
    res["save"]["resilient_train.save (hashed, fsync)"] = timed(lambda: rt.save(path("rt"), state, 1), reps, clean("rt"))

    from resilient_train.testing.ranks import run_ranks

    two = run_ranks(_two_rank_save, 2, total, path("rt2"), reps, timeout_s=1800)
    res["save"]["resilient_train.save, 2 ranks (hashed, fsync)"] = {"median_s": max(two), "all_s": two, "peak_extra_bytes": None}

    # loads (each into the model's existing tensors where the API allows)
    target = Blob(total)
    tsd = {k: v.detach() for k, v in target.state_dict().items()}

    def torch_load():
        loaded = torch.load(path("t.pt"), weights_only=True, mmap=False)
        for k, v in loaded.items():
            tsd[k].copy_(v)

    def st_load():
        import safetensors.torch

        for k, v in safetensors.torch.load_file(path("s.safetensors")).items():
            tsd[k].copy_(v)

    def dcp_load():
        import torch.distributed.checkpoint as dcp

        dcp.load(tsd, checkpoint_id=path("dcp"))

    tstate = rt.TrainState(model=target, rng=False)
    res["load"]["torch.load (+copy)"] = timed(torch_load, reps)
    res["load"]["safetensors.load_file (+copy)"] = timed(st_load, reps)
    res["load"]["dcp.load (no verification)"] = timed(dcp_load, reps)
    res["load"]["resilient_train.load (every byte verified)"] = timed(lambda: rt.load(path("rt"), tstate), reps)
    assert all(torch.equal(tsd[k], sd[k]) for k in sd)

    for phase in res.values():
        for r in phase.values():
            r["gb_per_s"] = nbytes / r["median_s"] / 1e9
    s, l = res["save"], res["load"]
    ours_s, ours_l = s["resilient_train.save (hashed, fsync)"], l["resilient_train.load (every byte verified)"]
    ratios = {
        "save_vs_safetensors": ours_s["gb_per_s"] / s["safetensors.save_file+fsync"]["gb_per_s"],
        "save_vs_torch_save": ours_s["gb_per_s"] / s["torch.save+fsync"]["gb_per_s"],
        "save_vs_dcp": ours_s["gb_per_s"] / s["dcp.save+fsync"]["gb_per_s"],
        "save_vs_dd_ceiling": ours_s["gb_per_s"] / s["dd_fdatasync_ceiling"]["gb_per_s"],
        "save_2_ranks_vs_1": s["resilient_train.save, 2 ranks (hashed, fsync)"]["gb_per_s"] / ours_s["gb_per_s"],
        "load_vs_dcp": ours_l["gb_per_s"] / l["dcp.load (no verification)"]["gb_per_s"],
        "load_vs_torch_load": ours_l["gb_per_s"] / l["torch.load (+copy)"]["gb_per_s"],
        "load_vs_safetensors": ours_l["gb_per_s"] / l["safetensors.load_file (+copy)"]["gb_per_s"],
    }
    shutil.rmtree(base, ignore_errors=True)
    out = write_result(args.out, {"state_bytes": nbytes, "reps": reps, "page_cache": "warm", "results": res, "ratios": ratios})
    print(f"state: {nbytes / 1e9:.2f} GB fp32, medians of {reps}")
    for phase, rows in res.items():
        for name, r in rows.items():
            peak = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 1e9:.2f} GB"
            print(f"  {phase:<5} {name:<50} {r['gb_per_s']:7.2f} GB/s  {r['median_s']:7.3f} s  peak +{peak}")
    for k, v in ratios.items():
        print(f"  {k:<22} {v:5.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
