"""Checkpoint save/load throughput: resilient-train vs torch.save, safetensors, DCP, and the
physical ceilings (memcpy into touched memory; dd with fdatasync; the hash rate of SHA-256 and
BLAKE3 on this machine), for every state size and rank count asked, in one run.

    python benchmarks/bench_checkpoint.py --sizes 1,8 --ranks 1,2 --reps 3 [--dir /path/on/disk]
    python benchmarks/bench_checkpoint.py --load-only --size-gib 1 --reps 5 --baseline-commit eaee4b3

Each configuration (state size x ranks) runs in fresh processes (one per rank; 2 ranks =
FSDP2 ``fully_shard`` on a CPU mesh over gloo, each rank holding half of every tensor, built on
the meta device). Per method, in one round: the save (durable: fsync), then a **warm** load (the
file just written is in the page cache), then a **cold** load (the files evicted with
posix_fadvise DONTNEED first; nobody else's cache is dropped), then the files are deleted: one
checkpoint on disk at a time, so 8 GiB states fit. Methods run one after the other, round
after round (A B C ... A B C ...), medians of ``--reps``; times are barrier to barrier (what the
slowest rank saw). Loads go into the live tensors, zeroed first and checked afterwards (exact
integer sums of their bits). rt.load runs with its default staging budget (staged: every byte
verified before the state changes; beyond 4 GiB per rank, streamed) and streamed
(``staging_budget_bytes=0``: read into the tensors and hashed there; a failure midway raises
PartialLoadError). torch.save and safetensors write one file per rank of its local tensors. The
JSON holds every time, the ratios and which goals of issue 22 are met:
benchmarks/results/<--out>.json.

``--load-only [--cold] [--baseline-commit C]``: the loads alone (warm, or ``--cold``), interleaved (dcp.load, safetensors
+ copy, rt.load staged and streamed, and those two at commit C), with wall time, CPU time and
peak memory, then the ceilings of a verified load on this machine (memcpy, pread, a copy from
a memory map, BLAKE3, read-and-hash both ways) and the least CPU a verified byte can cost.
Results: benchmarks/results/checkpoint_load.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

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
                if args.cold:
                    _evict(base)
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
            "state_bytes": nbytes, "reps": args.reps, "page_cache": "cold (evicted before every load)" if args.cold else "warm", "cores": cores,
            "order": "interleaved (A B C ... A B C ...), one warm-up round first",
            "baseline_commit": args.baseline_commit, "ceilings": ceilings, "hash_rates": rates,
            "verified_floor_cpu_s": floor_cpu_s, "load_average_1m_at_end": os.getloadavg()[0],
            "results": res, "ratios": ratios, "goals_met": goals,
        })
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"state: {nbytes / 1e9:.2f} GB fp32, medians of {args.reps}, interleaved, page cache {'cold' if args.cold else 'warm'}")
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


# ---------------------------------------------------------------- the save/load matrix


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _build(total: int, rank: int, world: int, seed: int) -> torch.nn.Module:
    """The state: 16 fp32 tensors of ``total`` bytes in all; with 2 ranks sharded with FSDP2
    (``fully_shard``, each rank holds half of every tensor), built on the meta device so no
    rank ever holds the whole state."""
    if world == 1:
        torch.manual_seed(seed)
        return Blob(total)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Blob(total)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    with torch.no_grad():
        for p in model.parameters():
            _local(p).normal_(generator=g)
    return model


def _fingerprint(sd: dict[str, torch.Tensor]) -> list[int]:
    """Exact integer sums of every local tensor's bits: a load that left any region untouched
    (zeroed before each load) or wrong shows up here."""
    return [int(_local(v).view(torch.int32).sum(dtype=torch.int64)) for v in sd.values()]


def _config_rank(rank: int, world: int, total: int, reps: int, root: str, format2: bool, q) -> None:
    """One configuration (state size x ranks) on this rank: every method's save, its warm load
    and its cold load, method after method, round after round (A B C ... A B C ...). Only one
    checkpoint is on disk at a time. Times are barrier to barrier (the slowest rank's); rank 0
    puts the result on ``q`` as JSON."""
    import json
    import statistics
    import time

    import safetensors.torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from common import peak_rss

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    multi = world > 1

    def barrier() -> None:
        if multi:
            dist.barrier()

    def fsync_file(f: str) -> None:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def methods(model: torch.nn.Module, base: str) -> dict[str, tuple[Any, list[str], dict[str, Any]]]:
        """name -> (save, paths it writes, {load name: load}) for ``model`` under ``base``."""
        state = rt.TrainState(model=model, rng=False)
        sd = {k: v.detach() for k, v in model.state_dict().items()}  # DTensors with 2 ranks
        local = {k: _local(v) for k, v in sd.items()}
        nbytes_local = sum(v.numel() * v.element_size() for v in local.values())
        p = lambda name: os.path.join(base, name)  # noqa: E731
        scratch = torch.ones(min(256 * 1024**2, nbytes_local) // 4 + 1)

        def memcpy() -> None:  # into touched memory: the copy's ceiling, not page faults
            for v in local.values():
                flat = v.reshape(-1)
                for a in range(0, flat.numel(), scratch.numel()):
                    n = min(scratch.numel(), flat.numel() - a)
                    scratch[:n].copy_(flat[a:a + n])

        def dd() -> None:
            count = max(1, nbytes_local // (16 * 1024**2))
            subprocess.run(["dd", "if=/dev/zero", f"of={p(f'dd-{rank}.bin')}", "bs=16M", f"count={count}", "conv=fdatasync"], check=True, capture_output=True)

        def torch_save() -> None:
            with open(p(f"t-{rank}.pt"), "wb") as f:
                torch.save(local, f)
                f.flush()
                os.fsync(f.fileno())

        def torch_load() -> None:
            for k, v in torch.load(p(f"t-{rank}.pt"), weights_only=True, mmap=False).items():
                local[k].copy_(v)

        def st_save() -> None:
            safetensors.torch.save_file(local, p(f"s-{rank}.safetensors"))
            fsync_file(p(f"s-{rank}.safetensors"))

        def st_load() -> None:
            for k, v in safetensors.torch.load_file(p(f"s-{rank}.safetensors")).items():
                local[k].copy_(v)

        def dcp_save() -> None:
            dcp.save(sd, checkpoint_id=p("dcp"))
            for f in os.listdir(p("dcp")):  # each rank makes its own files durable
                if f.startswith(f"__{rank}_") or (rank == 0 and not f.startswith("__")):
                    fsync_file(os.path.join(p("dcp"), f))

        v2 = rt.checkpoint.SaveOptions(format_version=2)
        # The default stages within its 4 GiB budget and streams beyond it; which one it did is
        # taken from its log line (``rt_load_mode`` in the results). Where the state is clearly
        # beyond the budget, the default is the streamed load and is timed once.
        beyond = nbytes_local > rt.checkpoint.reader.DEFAULT_STAGING_BUDGET_BYTES
        rt_loads = {
            "rt.load default (staged within the 4 GiB budget: every byte verified before the state changes; else streamed)": lambda: rt.load(p("rt"), state),
            "rt.load streamed (staging_budget_bytes=0: read into the tensors, hashed there)": lambda: rt.load(p("rt"), state, staging_budget_bytes=0),
        } if not beyond else {"rt.load default (streamed beyond the 4 GiB staging budget: read into the tensors, hashed there)": lambda: rt.load(p("rt"), state)}
        out = {
            "memcpy (ceiling, touched memory)": (memcpy, [], {}),
            "dd conv=fdatasync (disk ceiling)": (dd, [f"dd-{rank}.bin"], {}),
            "torch.save+fsync": (torch_save, [f"t-{rank}.pt"], {"torch.load (+copy)": torch_load}),
            "safetensors.save_file+fsync": (st_save, [f"s-{rank}.safetensors"], {"safetensors.load_file (+copy, no verification)": st_load}),
            "dcp.save+fsync": (dcp_save, ["dcp"], {"dcp.load (no verification)": lambda: dcp.load(sd, checkpoint_id=p("dcp"))}),
            "rt.save (format 3, BLAKE3, fsync)": (lambda: rt.save(p("rt"), state, 1), ["rt"], rt_loads),
        }
        if format2:
            out["rt.save (format 2, SHA-256, fsync)"] = (lambda: rt.save(p("rt2"), state, 1, options=v2), ["rt2"],
                                                         {"rt.load (format 2, SHA-256, default budget)": lambda: rt.load(p("rt2"), state)})
        return out

    import logging

    modes: list[str] = []

    class _Mode(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("loaded step"):
                modes.append("staged" if ", staged)" in record.getMessage() else "streamed")

    reader_log = logging.getLogger("resilient_train.checkpoint.reader")
    reader_log.setLevel(logging.INFO)
    reader_log.addHandler(_Mode())

    def one_round(model: torch.nn.Module, base: str, rows: dict[str, dict] | None) -> None:
        os.makedirs(base, exist_ok=True)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        want = _fingerprint(sd)
        for name, (save, paths, loads) in methods(model, base).items():
            def timed(fn: Any) -> tuple[float, int]:
                barrier()
                with peak_rss() as mem:
                    t0 = time.perf_counter()
                    fn()
                    barrier()
                    dt = time.perf_counter() - t0
                return dt, mem["peak_extra_bytes"]

            dt, peak = timed(save)
            if rows is not None:
                rows.setdefault(f"save | {name}", {"all_s": [], "peak_extra_bytes": 0})
                rows[f"save | {name}"]["all_s"].append(dt)
                rows[f"save | {name}"]["peak_extra_bytes"] = max(rows[f"save | {name}"]["peak_extra_bytes"], peak)
            for lname, load in loads.items():
                for cache in ("warm", "cold"):
                    for v in sd.values():
                        _local(v).zero_()
                    if cache == "cold" and rank == 0:
                        _evict(base)  # the page cache is the machine's: one rank drops the files for all
                    modes.clear()
                    dt, peak = timed(load)
                    if _fingerprint(sd) != want:
                        raise AssertionError(f"{lname} ({cache}) did not restore the state")
                    if rows is not None:
                        key = f"load {cache} | {lname}"
                        rows.setdefault(key, {"all_s": [], "peak_extra_bytes": 0})
                        rows[key]["all_s"].append(dt)
                        rows[key]["peak_extra_bytes"] = max(rows[key]["peak_extra_bytes"], peak)
                        if modes:
                            rows[key]["rt_load_mode"] = modes[-1]
            barrier()
            for rel in paths:
                full = os.path.join(base, rel)
                if rel in ("dcp", "rt", "rt2"):
                    if rank == 0:
                        shutil.rmtree(full, ignore_errors=True)
                elif os.path.exists(full):
                    os.unlink(full)
            barrier()

    t_start = time.time()
    warm = _build(32 * 1024**2, rank, world, seed=1)  # imports and code paths, not timed
    one_round(warm, os.path.join(root, "warmup"), None)
    del warm
    model = _build(total, rank, world, seed=0)
    nbytes = sum(_local(v).numel() * 4 for v in model.state_dict().values())
    if multi:
        t = torch.tensor([nbytes], dtype=torch.int64)
        dist.all_reduce(t)
        nbytes = int(t.item())
    rows: dict[str, dict] = {}
    for i in range(reps):
        one_round(model, os.path.join(root, "run"), rows)
        if rank == 0:
            print(f"  {nbytes / 2**30:.0f} GiB x {world} rank(s): round {i + 1}/{reps} done, {time.time() - t_start:.0f} s", flush=True)
    if rank == 0:
        for r in rows.values():
            r["median_s"] = statistics.median(r["all_s"])
            r["gb_per_s"] = nbytes / r["median_s"] / 1e9
        q.put(json.dumps({"state_bytes": nbytes, "rows": rows, "seconds": time.time() - t_start, "load_average_1m_at_end": os.getloadavg()[0]}))


def _config_entry(rank: int, world: int, store: str, args: tuple, q) -> None:
    import datetime

    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    try:
        _config_rank(rank, world, *args, q)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_config(size_gib: float, world: int, reps: int, root: str, format2: bool) -> dict:
    """One configuration in fresh processes (one per rank), so each starts with the same memory."""
    import json
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(root, "pg-store")
    procs = [ctx.Process(target=_config_entry, args=(r, world, store, (int(size_gib * 1024**3), reps, root, format2), q)) for r in range(world)]
    for pr in procs:
        pr.start()
    result = None
    while result is None:
        try:
            result = json.loads(q.get(timeout=5))  # plain JSON text: nothing unpickled
        except queue.Empty:
            if any(pr.exitcode not in (None, 0) for pr in procs) or all(pr.exitcode is not None for pr in procs):
                for pr in procs:
                    pr.kill()
                raise RuntimeError(f"configuration {size_gib} GiB x {world} rank(s) failed (exit codes {[pr.exitcode for pr in procs]})")
    for pr in procs:
        pr.join()
    if os.path.exists(store):
        os.unlink(store)
    return result


def _ratios(rows: dict[str, dict]) -> dict[str, float]:
    """Ours over theirs, speed (GB/s) ratios, for whatever rows the configuration has."""
    rate = {k: v["gb_per_s"] for k, v in rows.items()}
    ours_save = rate["save | rt.save (format 3, BLAKE3, fsync)"]
    out = {
        "save_vs_safetensors": ours_save / rate["save | safetensors.save_file+fsync"],
        "save_vs_dcp": ours_save / rate["save | dcp.save+fsync"],
        "save_vs_torch_save": ours_save / rate["save | torch.save+fsync"],
        "save_vs_dd_ceiling": ours_save / rate["save | dd conv=fdatasync (disk ceiling)"],
    }
    for cache in ("warm", "cold"):
        dcp_r = rate[f"load {cache} | dcp.load (no verification)"]
        st_r = rate[f"load {cache} | safetensors.load_file (+copy, no verification)"]
        for k, r in rate.items():
            if k.startswith(f"load {cache} | rt.load") and "format 2" not in k:
                kind = "default" if "default" in k else "streamed"
                out[f"load_{cache}_{kind}_vs_dcp"] = r / dcp_r
                out[f"load_{cache}_{kind}_vs_safetensors"] = r / st_r
    return out


def matrix(args) -> int:
    import time

    sizes = [float(s) for s in args.sizes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    root = tempfile.mkdtemp(dir=args.dir, prefix="rt-bench-")
    t0 = time.time()
    rates_before = hash_rates()
    configs: dict[str, dict] = {}
    try:
        for size in sizes:
            for world in ranks:
                label = f"{size:g} GiB, {world} rank{'s' if world > 1 else ''}"
                print(f"{label}: {args.reps} interleaved rounds ...", flush=True)
                res = run_config(size, world, args.reps, root, format2=size <= args.format2_max_gib)
                res["ratios"] = _ratios(res["rows"])
                configs[label] = res
    finally:
        shutil.rmtree(root, ignore_errors=True)
    goals = {}
    for label, c in configs.items():
        r = c["ratios"]
        goals[label] = {
            "hashed fsynced save >= 1.0x safetensors.save_file+fsync": r["save_vs_safetensors"] >= 1.0,
            "hashed fsynced save >= 1.2x dcp.save": r["save_vs_dcp"] >= 1.2,
            **{f"verified load ({k.split('_')[1]}, {k.split('_')[2]}) >= {'3x dcp.load' if k.endswith('dcp') else '0.5x safetensors.load_file+copy'}":
               v >= (3.0 if k.endswith("dcp") else 0.5) for k, v in r.items() if k.startswith("load_")},
        }
    out = write_result(args.out, {
        "order": "per configuration, in fresh processes: each method's save, then its warm load, then its cold load "
                 "(posix_fadvise DONTNEED of the files), method after method, round after round (A B C ... A B C ...); "
                 "one warm-up round on a 32 MiB state first; times barrier to barrier (the slowest rank's)",
        "two_ranks": "FSDP2 (fully_shard on a CPU mesh, gloo): each rank holds and writes half of every tensor; "
                     "torch.save and safetensors write one file per rank of its local shards",
        "reps": args.reps, "seconds": time.time() - t0, "hash_rates_before": rates_before, "hash_rates_after": hash_rates(),
        "configs": configs, "goals_met": goals,
    })
    for label, c in configs.items():
        print(f"{label}: {c['state_bytes'] / 1e9:.2f} GB, {c['seconds']:.0f} s, load average at end {c['load_average_1m_at_end']:.1f}")
        for name, r in c["rows"].items():
            mode = f"  ({r['rt_load_mode']})" if "rt_load_mode" in r else ""
            print(f"  {name:<100} {r['gb_per_s']:6.2f} GB/s  {r['median_s']:7.3f} s  peak +{r['peak_extra_bytes'] / 1e9:.2f} GB{mode}")
        for k, v in c["ratios"].items():
            print(f"  {k:<40} {v:5.2f}x")
    print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1", help="comma list of state sizes in GiB (default 1; e.g. 1,8)")
    p.add_argument("--ranks", default="1", help="comma list of rank counts (1 = one process; 2 = FSDP2 over 2 gloo ranks)")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds per configuration (medians)")
    p.add_argument("--format2-max-gib", type=float, default=1.0, help="also time format 2 (SHA-256) at sizes up to this")
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    p.add_argument("--out", default="checkpoint", help="results file name under benchmarks/results/ (no .json)")
    p.add_argument("--load-only", action="store_true", help="only the warm loads of one state (--size-gib), with CPU time and the load ceilings")
    p.add_argument("--size-gib", type=float, default=1.0, help="with --load-only: the state size")
    p.add_argument("--cold", action="store_true", help="with --load-only: evict the files from the page cache before every load")
    p.add_argument("--baseline-commit", default=None, help="with --load-only: also time rt.load of this git commit, interleaved (before/after)")
    args = p.parse_args()
    if args.load_only:
        return load_only(args)
    return matrix(args)


if __name__ == "__main__":
    sys.exit(main())
