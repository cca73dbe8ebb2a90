"""Checkpoint save/load throughput: resilient-train vs torch.save, safetensors, DCP, and the
physical ceilings (memcpy into preallocated memory; dd with fdatasync; the hash rate of SHA-256
and BLAKE3 on this machine), in one interleaved run (A B C ... A B C ..., medians).

    python benchmarks/bench_checkpoint.py --size-gib 1 --reps 5 [--cold] [--two-ranks] [--dir /path/on/disk]
    python benchmarks/bench_checkpoint.py --load-only --size-gib 1 --reps 5 --baseline-commit eaee4b3

The default run: saves (every one durable: fsync) of torch.save, safetensors, dcp.save and
rt.save in format 3 (BLAKE3) and format 2 (SHA-256); then loads into a second model's tensors
(torch.load, safetensors.load_file, dcp.load: nothing verified) against rt.load staged (the
default within the staging budget: every byte verified before the live state changes) and
streamed (``staging_budget_bytes=0``: every chunk read straight into its tensor and hashed
there). ``--cold`` evicts the benchmark's own files from the page cache before each load
(posix_fadvise; nobody else's cache is dropped). The JSON holds every run, the ratios and
which goals of issue 22 are met: benchmarks/results/<--out>.json.

``--load-only [--baseline-commit C]``: the loads alone, interleaved (dcp.load, safetensors +
copy, rt.load staged and streamed, and those two at commit C), with wall time, CPU time and
peak memory, then the ceilings of a verified load on this machine (memcpy, pread, a copy from
a memory map, BLAKE3, read-and-hash both ways) and the least CPU a verified byte can cost.
Results: benchmarks/results/checkpoint_load.json.

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
from common import write_result  # noqa: E402


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


def load_ceilings(path: str, nbytes: int, chunk: int = 8 * 1024**2) -> dict[str, float]:
    """GB/s of the pieces a verified load is made of, on ``path`` (in the page cache) into
    preallocated, touched memory, one thread per core: memcpy, ``pread`` (the kernel's copy),
    a copy out of a memory map, BLAKE3, and the two ways to read and hash (pread then hash;
    copy from the map in 1 MiB pieces, each hashed while still in the CPU cache). Best of 3."""
    import mmap
    import time
    from concurrent.futures import ThreadPoolExecutor

    import blake3
    import numpy as np

    cores = os.cpu_count() or 1
    fd = os.open(path, os.O_RDONLY)
    n = min(nbytes, os.fstat(fd).st_size) // chunk * chunk
    dst = np.ones(n, dtype=np.uint8)
    src = np.ones(n, dtype=np.uint8)
    m = mmap.mmap(fd, n, prot=mmap.PROT_READ)
    mapped = np.frombuffer(m, dtype=np.uint8, count=n)
    sub = 1024**2

    def mapped_hash(o):
        h = blake3.blake3()
        for a in range(o, o + chunk, sub):
            np.copyto(dst[a:a + sub], mapped[a:a + sub])
            h.update(memoryview(dst[a:a + sub]))
        return h.digest()

    ops = {
        "memcpy": lambda o: np.copyto(dst[o:o + chunk], src[o:o + chunk]),
        "pread": lambda o: os.preadv(fd, [memoryview(dst[o:o + chunk])], o),
        "copy from mmap": lambda o: np.copyto(dst[o:o + chunk], mapped[o:o + chunk]),
        "blake3": lambda o: blake3.blake3(memoryview(dst[o:o + chunk])).digest(),
        "pread then blake3": lambda o: (os.preadv(fd, [memoryview(dst[o:o + chunk])], o), blake3.blake3(memoryview(dst[o:o + chunk])).digest()),
        "mmap copy + blake3 per 1 MiB": mapped_hash,
    }
    out: dict[str, float] = {}
    with ThreadPoolExecutor(cores) as pool:
        for name, op in ops.items():
            best = best_cpu = float("inf")
            for _ in range(3):
                c0, t0 = time.process_time(), time.perf_counter()
                list(pool.map(op, range(0, n, chunk)))
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            out[f"{name} ({cores} threads) GB/s"] = n / best / 1e9
            # per CPU-second (all threads' CPU time): what the operation costs, whatever else runs
            out[f"{name} GB per cpu-s"] = n / best_cpu / 1e9
    del mapped
    m.close()
    os.close(fd)
    return out


def load_only(args) -> int:
    """Interleaved verified loads against the unverified ones: dcp.load, safetensors.load_file
    + copy, rt.load staged and streamed (with ``--baseline-commit``, the same two of that
    commit too), each with its wall time, the process's CPU time and peak memory; then the
    ceilings (:func:`load_ceilings`, :func:`hash_rates`) measured in the same run."""
    import statistics
    import time

    import safetensors.torch
    import torch.distributed.checkpoint as dcp
    from common import import_baseline, peak_rss

    total = int(args.size_gib * 1024**3)
    torch.manual_seed(0)
    model = Blob(total)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in sd.values())
    base = tempfile.mkdtemp(dir=args.dir, prefix="rt-bench-")
    before = import_baseline(args.baseline_commit) if args.baseline_commit else None
    try:
        rt.save(os.path.join(base, "rt"), rt.TrainState(model=model, rng=False), 1)
        dcp.save(sd, checkpoint_id=os.path.join(base, "dcp"))
        safetensors.torch.save_file(sd, os.path.join(base, "s.safetensors"))
        target = Blob(total)
        tsd = {k: v.detach() for k, v in target.state_dict().items()}
        tstate = rt.TrainState(model=target, rng=False)

        def st_load():
            for k, v in safetensors.torch.load_file(os.path.join(base, "s.safetensors")).items():
                tsd[k].copy_(v)

        staged, streamed = "rt.load staged (every byte verified, state untouched on failure)", "rt.load streamed (staging_budget_bytes=0)"
        methods = {
            "dcp.load (no verification)": lambda: dcp.load(tsd, checkpoint_id=os.path.join(base, "dcp")),
            "safetensors.load_file (+copy, no verification)": st_load,
            staged: lambda: rt.load(os.path.join(base, "rt"), tstate),
            streamed: lambda: rt.load(os.path.join(base, "rt"), tstate, staging_budget_bytes=0),
        }
        if before is not None:
            bstate = before.TrainState(model=target, rng=False)
            methods[f"{staged} at {args.baseline_commit} (before)"] = lambda: before.load(os.path.join(base, "rt"), bstate)
            methods[f"{streamed} at {args.baseline_commit} (before)"] = lambda: before.load(os.path.join(base, "rt"), bstate, staging_budget_bytes=0)
        for fn in methods.values():  # warm the page cache and imports
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        cpu: dict[str, list[float]] = {k: [] for k in methods}
        peaks: dict[str, int] = {k: 0 for k in methods}
        for _ in range(args.reps):
            for name, fn in methods.items():  # interleaved: A B C A B C ...
                for t in tsd.values():
                    t.zero_()
                with peak_rss() as mem:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                peaks[name] = max(peaks[name], mem["peak_extra_bytes"])
                assert all(torch.equal(tsd[k], sd[k]) for k in sd), name
        ceilings = load_ceilings(os.path.join(base, "s.safetensors"), nbytes)
        rates = hash_rates()
        res = {
            name: {"median_s": statistics.median(t), "all_s": t, "gb_per_s": nbytes / statistics.median(t) / 1e9,
                   "cpu_s_median": statistics.median(cpu[name]), "cpu_s_all": cpu[name], "peak_extra_bytes": peaks[name]}
            for name, t in times.items()
        }
        rate = {k: v["gb_per_s"] for k, v in res.items()}
        dcp_rate, st_rate = rate["dcp.load (no verification)"], rate["safetensors.load_file (+copy, no verification)"]
        cores = os.cpu_count() or 1
        # The least CPU a verified byte can cost: hashed once and copied once out of the page
        # cache (both in CPU time, so other jobs on the machine do not distort it).
        floor_cpu_s = nbytes / (ceilings["blake3 GB per cpu-s"] * 1e9) + nbytes / (ceilings["copy from mmap GB per cpu-s"] * 1e9)
        st_cpu = res["safetensors.load_file (+copy, no verification)"]["cpu_s_median"]
        ratios = {
            "staged_vs_dcp": rate[staged] / dcp_rate,
            "streamed_vs_dcp": rate[streamed] / dcp_rate,
            "staged_vs_safetensors": rate[staged] / st_rate,
            "streamed_vs_safetensors": rate[streamed] / st_rate,
            "streamed_cpu_s_vs_verified_floor": res[streamed]["cpu_s_median"] / floor_cpu_s,
            "best_possible_verified_vs_safetensors (cpu_s)": st_cpu / floor_cpu_s,
        }
        if before is not None:
            for label, key in (("staged", staged), ("streamed", streamed)):
                b = f"{key} at {args.baseline_commit} (before)"
                ratios[f"{label}_after_vs_before (speed)"] = rate[key] / rate[b]
                ratios[f"{label}_after_vs_before (cpu_s)"] = res[key]["cpu_s_median"] / res[b]["cpu_s_median"]
                ratios[f"{label}_before_vs_dcp"] = rate[b] / dcp_rate
        goals = {
            "verified load >= 3x dcp.load (staged / streamed)": [ratios["staged_vs_dcp"] >= 3, ratios["streamed_vs_dcp"] >= 3],
            "verified load >= 0.5x safetensors.load_file+copy (staged / streamed)": [ratios["staged_vs_safetensors"] >= 0.5, ratios["streamed_vs_safetensors"] >= 0.5],
        }
        out = write_result(args.out if args.out != "checkpoint" else "checkpoint_load", {
            "state_bytes": nbytes, "reps": args.reps, "page_cache": "warm", "cores": cores,
            "order": "interleaved (A B C ... A B C ...), one warm-up round first",
            "baseline_commit": args.baseline_commit, "ceilings": ceilings, "hash_rates": rates,
            "verified_floor_cpu_s": floor_cpu_s, "load_average_1m_at_end": os.getloadavg()[0],
            "results": res, "ratios": ratios, "goals_met": goals,
        })
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"state: {nbytes / 1e9:.2f} GB fp32, medians of {args.reps}, interleaved, page cache warm")
    for name, r in res.items():
        print(f"  {name:<86} {r['gb_per_s']:6.2f} GB/s  {r['median_s']:7.3f} s  cpu {r['cpu_s_median']:6.3f} s  peak +{r['peak_extra_bytes'] / 1e9:.2f} GB")
    for k, v in {**ceilings, **rates}.items():
        print(f"  {k:<40} {v:6.2f}")
    for k, v in ratios.items():
        print(f"  {k:<40} {v:5.2f}x")
    print(f"wrote {out}")
    return 0


def hash_rates(nbytes: int = 256 * 1024**2, chunk: int = 8 * 1024**2) -> dict[str, float]:
    """GB/s of each digest algorithm on this machine, best of 3 over ``nbytes`` of random data
    hashed in ``chunk`` pieces as the reader does: one thread, and one thread per core."""
    import hashlib
    import time
    from concurrent.futures import ThreadPoolExecutor

    import blake3

    buf = memoryview(os.urandom(nbytes))
    pieces = [buf[i:i + chunk] for i in range(0, nbytes, chunk)]
    cores = os.cpu_count() or 1
    algos = {"sha256": lambda b: hashlib.sha256(b).digest(), "blake3": lambda b: blake3.blake3(b).digest()}
    out: dict[str, float] = {}
    with ThreadPoolExecutor(cores) as pool:
        for name, h in algos.items():
            for label, run in (("1_thread", lambda: [h(p) for p in pieces]), (f"{cores}_threads", lambda: list(pool.map(h, pieces)))):
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - t0)
                out[f"{name}_{label}_gb_per_s"] = nbytes / best / 1e9
    return out


def _evict(path: str) -> None:
    """Drop ``path``'s pages (every file under it) from the page cache: a cold read of our own
    files, without dropping anyone else's cache."""
    paths = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    import statistics
    import time

    import safetensors.torch
    import torch.distributed.checkpoint as dcp
    from common import peak_rss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    p.add_argument("--out", default="checkpoint")
    p.add_argument("--cold", action="store_true", help="evict the benchmark's files from the page cache before every load")
    p.add_argument("--two-ranks", action="store_true", help="also time rt.save from 2 ranks (gloo, one process each)")
    p.add_argument("--load-only", action="store_true", help="only the loads, interleaved, with CPU time and the load ceilings")
    p.add_argument("--baseline-commit", default=None, help="with --load-only: also time rt.load of this git commit, interleaved (before/after)")
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
    state = rt.TrainState(model=model, rng=False)
    v2 = rt.checkpoint.SaveOptions(format_version=2)

    def rm(name):
        full = path(name)
        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else (os.path.exists(full) and os.unlink(full))

    def fsync_file(f):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    # ---- saves, each into a fresh path, durable (fsync), interleaved
    count = max(1, nbytes // (16 * 1024**2))
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    for t in dst.values():
        t.fill_(1)  # touched: the ceiling is the copy, not page faults

    def torch_save():
        with open(path("t.pt"), "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())

    saves = {
        "memcpy (ceiling, preallocated)": (lambda: [dst[k].copy_(v) for k, v in sd.items()], None),
        "dd conv=fdatasync (disk ceiling)": (lambda: subprocess.run(["dd", "if=/dev/zero", f"of={path('dd.bin')}", "bs=16M", f"count={count}", "conv=fdatasync"], check=True, capture_output=True), "dd.bin"),
        "torch.save+fsync": (torch_save, "t.pt"),
        "safetensors.save_file+fsync": (lambda: (safetensors.torch.save_file(sd, path("s.safetensors")), fsync_file(path("s.safetensors"))), "s.safetensors"),
        "dcp.save+fsync": (lambda: (dcp.save(sd, checkpoint_id=path("dcp")), fsync_tree(path("dcp"))), "dcp"),
        "rt.save (format 3, BLAKE3, fsync)": (lambda: rt.save(path("rt"), state, 1), "rt"),
        "rt.save (format 2, SHA-256, fsync)": (lambda: rt.save(path("rt2"), state, 1, options=v2), "rt2"),
    }
    res: dict[str, dict] = {"save": {k: {"all_s": [], "peak_extra_bytes": 0} for k in saves}, "load": {}}
    for name, (fn, out) in saves.items():  # warm-up (imports, allocator), not timed
        fn()
        if out:
            rm(out)
    for _ in range(args.reps):
        for name, (fn, out) in saves.items():  # interleaved: A B C ... A B C ...
            with peak_rss() as mem:
                t0 = time.perf_counter()
                fn()
                res["save"][name]["all_s"].append(time.perf_counter() - t0)
            res["save"][name]["peak_extra_bytes"] = max(res["save"][name]["peak_extra_bytes"], mem["peak_extra_bytes"])
            if out:
                rm(out)
    del dst

    # ---- loads, each into the existing tensors of a second model where the API allows
    torch_save()
    safetensors.torch.save_file(sd, path("s.safetensors"))
    dcp.save(sd, checkpoint_id=path("dcp"))
    rt.save(path("rt"), state, 1)
    rt.save(path("rt2"), state, 1, options=v2)
    target = Blob(total)
    tsd = {k: v.detach() for k, v in target.state_dict().items()}
    tstate = rt.TrainState(model=target, rng=False)

    def torch_load():
        for k, v in torch.load(path("t.pt"), weights_only=True, mmap=False).items():
            tsd[k].copy_(v)

    def st_load():
        for k, v in safetensors.torch.load_file(path("s.safetensors")).items():
            tsd[k].copy_(v)

    loads = {
        "torch.load (+copy)": (torch_load, "t.pt"),
        "safetensors.load_file (+copy, no verification)": (st_load, "s.safetensors"),
        "dcp.load (no verification)": (lambda: dcp.load(tsd, checkpoint_id=path("dcp")), "dcp"),
        "rt.load staged (format 3, every byte verified, state untouched on failure)": (lambda: rt.load(path("rt"), tstate), "rt"),
        "rt.load streamed (format 3, every byte verified, read into the tensors)": (lambda: rt.load(path("rt"), tstate, staging_budget_bytes=0), "rt"),
        "rt.load staged (format 2, SHA-256)": (lambda: rt.load(path("rt2"), tstate), "rt2"),
    }
    res["load"] = {k: {"all_s": [], "peak_extra_bytes": 0} for k in loads}
    for fn, _ in loads.values():  # warm the page cache and imports
        fn()
    for _ in range(args.reps):
        for name, (fn, src) in loads.items():
            for t in tsd.values():
                t.zero_()
            if args.cold:
                _evict(path(src))
            with peak_rss() as mem:
                t0 = time.perf_counter()
                fn()
                res["load"][name]["all_s"].append(time.perf_counter() - t0)
            res["load"][name]["peak_extra_bytes"] = max(res["load"][name]["peak_extra_bytes"], mem["peak_extra_bytes"])
            assert all(torch.equal(tsd[k], sd[k]) for k in sd), name

    two = None
    if args.two_ranks:
        from resilient_train.testing.ranks import run_ranks

        two = run_ranks(_two_rank_save, 2, total, path("rt2r"), args.reps, timeout_s=1800)
    shutil.rmtree(base, ignore_errors=True)

    for phase in res.values():
        for r in phase.values():
            r["median_s"] = statistics.median(r["all_s"])
            r["gb_per_s"] = nbytes / r["median_s"] / 1e9
    if two is not None:
        res["save"]["rt.save, 2 ranks (format 3, fsync)"] = {"median_s": max(two), "all_s": two, "gb_per_s": nbytes / max(two) / 1e9, "peak_extra_bytes": None}
    s, l = res["save"], res["load"]
    rate = lambda rows, k: rows[k]["gb_per_s"]  # noqa: E731
    ours_s = "rt.save (format 3, BLAKE3, fsync)"
    staged, streamed = "rt.load staged (format 3, every byte verified, state untouched on failure)", "rt.load streamed (format 3, every byte verified, read into the tensors)"
    ratios = {
        "save_vs_safetensors": rate(s, ours_s) / rate(s, "safetensors.save_file+fsync"),
        "save_vs_dcp": rate(s, ours_s) / rate(s, "dcp.save+fsync"),
        "save_vs_torch_save": rate(s, ours_s) / rate(s, "torch.save+fsync"),
        "save_vs_dd_ceiling": rate(s, ours_s) / rate(s, "dd conv=fdatasync (disk ceiling)"),
        "save_format3_vs_format2": rate(s, ours_s) / rate(s, "rt.save (format 2, SHA-256, fsync)"),
        "load_staged_vs_dcp": rate(l, staged) / rate(l, "dcp.load (no verification)"),
        "load_streamed_vs_dcp": rate(l, streamed) / rate(l, "dcp.load (no verification)"),
        "load_staged_vs_safetensors": rate(l, staged) / rate(l, "safetensors.load_file (+copy, no verification)"),
        "load_streamed_vs_safetensors": rate(l, streamed) / rate(l, "safetensors.load_file (+copy, no verification)"),
        "load_staged_format3_vs_format2": rate(l, staged) / rate(l, "rt.load staged (format 2, SHA-256)"),
    }
    goals = {
        "verified load >= 3x dcp.load (staged / streamed)": [ratios["load_staged_vs_dcp"] >= 3, ratios["load_streamed_vs_dcp"] >= 3],
        "verified load >= 0.5x safetensors.load_file+copy (staged / streamed)": [ratios["load_staged_vs_safetensors"] >= 0.5, ratios["load_streamed_vs_safetensors"] >= 0.5],
        "hashed fsynced save >= 1.0x safetensors.save_file+fsync": ratios["save_vs_safetensors"] >= 1.0,
        "hashed fsynced save >= 1.2x dcp.save": ratios["save_vs_dcp"] >= 1.2,
    }
    out = write_result(args.out, {
        "state_bytes": nbytes, "reps": args.reps, "order": "interleaved (A B C ... A B C ...), one warm-up round first",
        "page_cache": "cold (posix_fadvise DONTNEED of the files before every load)" if args.cold else "warm",
        "hash_rates": hash_rates(), "load_average_1m_at_end": os.getloadavg()[0],
        "results": res, "ratios": ratios, "goals_met": goals,
    })
    print(f"state: {nbytes / 1e9:.2f} GB fp32, medians of {args.reps}, interleaved, page cache {'cold' if args.cold else 'warm'}")
    for phase, rows in res.items():
        for name, r in rows.items():
            peak = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 1e9:.2f} GB"
            print(f"  {phase:<5} {name:<78} {r['gb_per_s']:6.2f} GB/s  {r['median_s']:7.3f} s  peak +{peak}")
    for k, v in ratios.items():
        print(f"  {k:<32} {v:5.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
