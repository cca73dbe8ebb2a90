"""Where a large rt.save's time goes on this machine: the hash, the early writeback, the writers.

    python benchmarks/bench_save_breakdown.py --size-gib 8 --reps 3

One process, one state of 16 fp32 tensors, saved to a local folder (``--dir``, default
``/work/bench-save``; deleted and ``sync``ed between saves), method after method, round after
round (A B C D ... A B C D ...), medians. Per save: wall time and this process's user and
system CPU time (``getrusage``: the kernel's copy into the page cache is the writer's system
time; the disk's own flusher threads are not counted). Methods:

* ``rt.save``: format 3 (BLAKE3 per chunk, hashed on a helper thread while each file is written),
  256 MiB files, ``io_threads`` files at once (2 here), each fsynced when written;
* ``rt.save, io_threads=1`` and ``rt.save, 1 GiB files``: the writers' count and the files' size;
* ``rt.save, no early writeback``: without ``sync_file_range`` after each piece;
* ``rt.save, hash skipped``: a **diagnostic, not a save** (the manifest's digests are wrong):
  what the hash costs;
* ``safetensors.save_file`` + fsync: one file, no hash (what a user would pick instead).

Results: ``benchmarks/results/save_breakdown.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=8.0, help="state size in GiB (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--dir", default="/work/bench-save", help="folder to save into (deleted between saves)")
    ap.add_argument("--out", default="save_breakdown", help="results file name under benchmarks/results/")
    args = ap.parse_args()

    import safetensors.torch
    import torch

    import resilient_train as rt
    from resilient_train import TrainState
    from resilient_train.checkpoint.writer import SaveOptions
    from resilient_train.format import safetensors_io as sio

    n = 16
    size = int(args.size_gib * (1 << 30))
    tensors = {f"w{i}": torch.randn(size // 4 // n) for i in range(n)}
    model = torch.nn.Module()
    for k, v in tensors.items():
        model.register_buffer(k, v)
    state = TrainState(model=model, rng=False)
    total = sum(t.numel() * 4 for t in tensors.values())
    d = args.dir

    def rt_save(**kw):
        return lambda: rt.save(d, state, 1, options=SaveOptions(**kw))

    def patched(obj, name, value):
        def run():
            real = getattr(obj, name)
            setattr(obj, name, value)
            try:
                rt.save(d, state, 1)
            finally:
                setattr(obj, name, real)
        return run

    def st_save():
        os.makedirs(d, exist_ok=True)
        safetensors.torch.save_file(tensors, f"{d}/model.safetensors")
        fd = os.open(f"{d}/model.safetensors", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    methods = {
        "rt.save": rt_save(),
        "rt.save, io_threads=1": rt_save(io_threads=1),
        "rt.save, 1 GiB files": rt_save(max_file_bytes=1 << 30),
        "rt.save, no early writeback": patched(sio, "_start_writeback", lambda *a: None),
        "rt.save, hash skipped (diagnostic, not a save)": patched(sio.FileHasher, "update", lambda self, data: None),
        "safetensors.save_file+fsync": st_save,
    }
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for r in range(args.reps):
        for name, fn in methods.items():
            shutil.rmtree(d, ignore_errors=True)
            os.sync()
            time.sleep(1.0)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            runs[name].append({"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                               "load_1m": os.getloadavg()[0]})
            print(f"round {r + 1}/{args.reps} {name}: {total / wall / 1e9:.3f} GB/s, cpu user {runs[name][-1]['user_s']:.1f} s "
                  f"sys {runs[name][-1]['sys_s']:.1f} s", flush=True)
    shutil.rmtree(d, ignore_errors=True)
    summary = {}
    for name, rs in runs.items():
        wall = statistics.median(x["wall_s"] for x in rs)
        summary[name] = {"gb_per_s": total / wall / 1e9, "wall_s": wall,
                         "user_cpu_s": statistics.median(x["user_s"] for x in rs),
                         "sys_cpu_s": statistics.median(x["sys_s"] for x in rs)}
    base = summary["safetensors.save_file+fsync"]["gb_per_s"]
    ratios = {f"{k} / safetensors": v["gb_per_s"] / base for k, v in summary.items() if k != "safetensors.save_file+fsync"}
    for k, v in summary.items():
        print(f"{k:50s} {v['gb_per_s']:.3f} GB/s  user {v['user_cpu_s']:.1f} s  sys {v['sys_cpu_s']:.1f} s")
    for k, v in ratios.items():
        print(f"{k:62s} {v:.2f}x")
    path = write_result(args.out, {"size_bytes": total, "reps": args.reps, "dir": d, "summary": summary, "ratios": ratios, "runs": runs})
    print("wrote", path)


if __name__ == "__main__":
    main()
