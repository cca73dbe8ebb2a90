"""Checkpoint save/load throughput: resilient-train vs torch.save, safetensors, DCP, and the
physical ceilings (memcpy into preallocated memory; dd with fdatasync), in one run.

    python benchmarks/bench_checkpoint.py --size-gib 2 --reps 3 [--dir /path/on/disk]
    python benchmarks/bench_checkpoint.py --load-only --size-gib 0.25 --reps 5

``--load-only``: verified load alone, interleaved (dcp.load, rt.load staged, rt.load streamed,
dcp.load, ...), beside the hash ceiling (cores x one core's SHA-256 rate, measured in the same
run) and peak memory. Results: benchmarks/results/checkpoint_load.json.

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


def sha256_rate_one_core(nbytes: int = 256 * 1024**2) -> float:
    """Bytes/s one core hashes with SHA-256 (best of 3, 8 MiB updates as the reader does)."""
    import hashlib
    import time

    buf = memoryview(os.urandom(nbytes))
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, nbytes, 8 * 1024**2):
            hashlib.sha256(buf[i:i + 8 * 1024**2]).digest()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def load_only(args) -> int:
    """Interleaved verified loads: A = dcp.load, B = rt.load (staged), C = rt.load (streamed)."""
    import statistics
    import time

    import torch.distributed.checkpoint as dcp
    from common import peak_rss

    total = int(args.size_gib * 1024**3)
    torch.manual_seed(0)
    model = Blob(total)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in sd.values())
    base = tempfile.mkdtemp(dir=args.dir, prefix="rt-bench-")
    try:
        rt.save(os.path.join(base, "rt"), rt.TrainState(model=model, rng=False), 1)
        dcp.save(sd, checkpoint_id=os.path.join(base, "dcp"))
        target = Blob(total)
        tsd = {k: v.detach() for k, v in target.state_dict().items()}
        tstate = rt.TrainState(model=target, rng=False)
        methods = {
            "dcp.load (no verification)": lambda: dcp.load(tsd, checkpoint_id=os.path.join(base, "dcp")),
            "rt.load staged (every byte verified, state untouched on failure)": lambda: rt.load(os.path.join(base, "rt"), tstate),
            "rt.load streamed (staging_budget_bytes=0)": lambda: rt.load(os.path.join(base, "rt"), tstate, staging_budget_bytes=0),
        }
        for fn in methods.values():  # warm the page cache and imports
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        peaks: dict[str, int] = {k: 0 for k in methods}
        for _ in range(args.reps):
            for name, fn in methods.items():  # interleaved: A B C A B C ...
                for t in tsd.values():
                    t.zero_()
                with peak_rss() as mem:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], mem["peak_extra_bytes"])
                assert all(torch.equal(tsd[k], sd[k]) for k in sd), name
        per_core = sha256_rate_one_core()
        cores = os.cpu_count() or 1
        res = {
            name: {"median_s": statistics.median(t), "all_s": t, "gb_per_s": nbytes / statistics.median(t) / 1e9, "peak_extra_bytes": peaks[name]}
            for name, t in times.items()
        }
        dcp_rate = res["dcp.load (no verification)"]["gb_per_s"]
        staged = res["rt.load staged (every byte verified, state untouched on failure)"]["gb_per_s"]
        streamed = res["rt.load streamed (staging_budget_bytes=0)"]["gb_per_s"]
        ceiling = cores * per_core / 1e9
        ratios = {
            "staged_vs_dcp": staged / dcp_rate,
            "streamed_vs_dcp": streamed / dcp_rate,
            "staged_vs_hash_ceiling": staged / ceiling,
            "streamed_vs_hash_ceiling": streamed / ceiling,
        }
        out = write_result(args.out if args.out != "checkpoint" else "checkpoint_load", {
            "state_bytes": nbytes, "reps": args.reps, "page_cache": "warm", "order": "interleaved",
            "sha256_one_core_gb_per_s": per_core / 1e9, "cores": cores, "hash_ceiling_gb_per_s": ceiling,
            "load_average_1m_at_end": os.getloadavg()[0], "results": res, "ratios": ratios,
        })
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"state: {nbytes / 1e9:.2f} GB fp32, medians of {args.reps}, interleaved; hash ceiling {cores} x {per_core / 1e9:.2f} = {ceiling:.2f} GB/s")
    for name, r in res.items():
        print(f"  {name:<66} {r['gb_per_s']:6.2f} GB/s  {r['median_s']:7.3f} s  peak +{r['peak_extra_bytes'] / 1e9:.2f} GB")
    for k, v in ratios.items():
        print(f"  {k:<26} {v:5.2f}x")
    print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    p.add_argument("--out", default="checkpoint")
    p.add_argument("--load-only", action="store_true", help="only the interleaved verified-load comparison")
    args = p.parse_args()
    if args.load_only:
        return load_only(args)

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
