"""Object-store throughput: resilient_train save/load/migrate against the same client doing a
plain ``fs.pipe`` / ``fs.cat`` of the same bytes on the same local server (the ceiling the
emulator allows on this machine).

For each server (S3 via moto, Azure via azurite, optionally GCS via fake-gcs-server):

* ``save``: ``resilient_train.save`` (serialise, SHA-256 while writing, manifest last) vs
  ``fs.pipe({path: bytes})`` of the very files that save produces (concurrent puts).
* ``load``: ``resilient_train.load`` (re-hash every file, then read the tensors: the bytes are
  read twice) vs ``fs.cat([paths])`` (concurrent gets).
* ``migrate``: ``copy_checkpoint`` from S3 to the other server (streamed, verified, manifest
  last) vs a hand copy by the same clients: ``fs_src.cat(paths)`` then ``fs_dst.pipe(...)``.

    python benchmarks/bench_storage.py --size-mib 128 --runs 3
    python benchmarks/bench_storage.py --load-only --size-mib 64 --runs 5 --servers s3,azure,gcs

``--load-only``: ``resilient_train.load`` (every byte hashed from the buffer it is placed
from, fetched once as concurrent ranged reads) vs a plain concurrent ``fs.cat`` of the same
files with the same client, interleaved (A B A B ...); one extra load goes through a counting
TCP proxy to count the bytes the server actually sent (one download per byte).
Results: benchmarks/results/storage_load.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, import_baseline, machine_info  # noqa: E402

from resilient_train.testing.servers import SERVERS, prepare_client_env  # noqa: E402

prepare_client_env()

from resilient_train import TrainState, load, save  # noqa: E402
from resilient_train.checkpoint.replicate import copy_checkpoint  # noqa: E402
from resilient_train.checkpoint.writer import SaveOptions  # noqa: E402
from resilient_train.format import step_dirname  # noqa: E402
from resilient_train.storage import open_store  # noqa: E402
from resilient_train.testing.proxy import FaultProxy  # noqa: E402


def make_state(size_mib: int, seed: int = 0) -> TrainState:
    g = torch.Generator().manual_seed(seed)
    n_tensors = 8
    per = size_mib * 1024 * 1024 // 4 // n_tensors
    model = torch.nn.Module()
    for i in range(n_tensors):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(per, generator=g)))
    return TrainState(model=model, rng=False)


def fs_of(store):
    inner = getattr(store, "inner", store)
    return inner.fs, inner._full("", allow_empty=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times: list[float], nbytes: int) -> dict:
    m = statistics.median(times)
    return {"median_s": m, "mb_per_s": nbytes / 1e6 / m, "runs_s": times}


def _proxied_options(kind: str, srv, port: int) -> dict:
    opts = dict(srv.storage_options)
    here = f"127.0.0.1:{srv.port}"
    for k, v in list(opts.items()):
        if isinstance(v, str) and here in v:
            opts[k] = v.replace(here, f"127.0.0.1:{port}")
    return opts


def load_only(args) -> None:
    """Interleaved: A = rt.load, B = plain concurrent fs.cat of the same files (with
    ``--baseline-commit``, C = rt.load of that commit); plus one counted rt.load through a
    proxy (bytes the server sent vs bytes in the checkpoint)."""
    kinds = [k for k in args.servers.split(",") if k]
    before = import_baseline(args.baseline_commit) if args.baseline_commit else None
    opts = SaveOptions(max_file_bytes=args.file_mib * 2**20, io_threads=args.threads)
    state = make_state(args.size_mib)
    fresh = make_state(args.size_mib, seed=1)
    results: dict = {}
    for k in kinds:
        try:
            srv = SERVERS[k]().start()
        except Exception as exc:  # noqa: BLE001 - an emulator missing here is reported, not fatal
            results[k] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        try:
            srv.create_bucket("bench")
            store = open_store(srv.uri("bench", "rt"), srv.storage_options, name=k)
            save(store, state, 1, options=opts)
            fs, root = fs_of(store)
            paths = [f"{root}/{step_dirname(1)}/{n}" for n in store.list(step_dirname(1))]
            nbytes = sum(fs.size(p) for p in paths)
            load(store, fresh, 1)  # warm up clients and the server
            fs.cat(paths)
            rt_t, cat_t, before_t = [], [], []
            if before is not None:
                bstore = importlib.import_module("rt_before.storage").open_store(srv.uri("bench", "rt"), srv.storage_options, name=k)
                bfresh = before.TrainState(model=fresh.model, rng=False)
                before.load(bstore, bfresh, 1)
            for _ in range(args.runs):
                rt_t.append(timed(lambda: load(store, fresh, 1)))
                cat_t.append(timed(lambda: fs.cat(paths)))
                if before is not None:
                    before_t.append(timed(lambda: before.load(bstore, bfresh, 1)))
            assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), fresh.model.parameters()))
            proxy = FaultProxy(srv.port).start()
            try:
                counted = open_store(srv.uri("bench", "rt"), _proxied_options(k, srv, proxy.port), name=k)
                res = load(counted, fresh, 1)
                served = proxy.bytes_to_client
            finally:
                proxy.stop()
            results[k] = {
                "rt load (hash what you use)": summary(rt_t, nbytes),
                "plain concurrent fs.cat": summary(cat_t, nbytes),
                "ratio rt / fs.cat (speed)": statistics.median(cat_t) / statistics.median(rt_t),
                **({f"rt load at {args.baseline_commit} (before)": summary(before_t, nbytes),
                    "ratio before / fs.cat (speed)": statistics.median(cat_t) / statistics.median(before_t)} if before_t else {}),
                "checkpoint_bytes": nbytes,
                "rt_bytes_fetched_by_client": res.bytes_fetched,
                "bytes_served_by_server_incl_http_headers_manifest_listings": served,
                "served / checkpoint bytes": served / nbytes,
            }
        finally:
            srv.stop()
    out = {
        "benchmark": "bench_storage --load-only",
        "order": "interleaved (rt, cat, rt, cat, ...)" if before is None else f"interleaved (rt, cat, rt@{args.baseline_commit}, rt, cat, ...)",
        "size_mib": args.size_mib,
        "runs": args.runs,
        "unit": "seconds (median of runs) and MB/s; ratio = fs.cat time / rt time (1.0 = as fast as the plain client)",
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "results": results,
    }
    path = args.out if args.out != os.path.join(RESULTS, "storage_emulators.json") else os.path.join(RESULTS, "storage_load.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in results.items():
        for name, s in v.items():
            if isinstance(s, dict):
                print(f"{k:<6} {name:<40} {s['median_s']:>8.3f} s {s['mb_per_s']:>8.1f} MB/s")
            else:
                print(f"{k:<6} {name:<40} {s}")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file-mib", type=int, default=32, help="largest checkpoint file (several files move concurrently)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--servers", default="s3,azure", help="comma list of s3, azure, gcs")
    ap.add_argument("--out", default=os.path.join(RESULTS, "storage_emulators.json"))
    ap.add_argument("--load-only", action="store_true", help="only the interleaved load comparison, with bytes served counted")
    ap.add_argument("--baseline-commit", default=None, help="with --load-only: also time rt.load of this git commit, interleaved (before/after)")
    args = ap.parse_args()
    if args.load_only:
        return load_only(args)
    kinds = [k for k in args.servers.split(",") if k]
    opts = SaveOptions(max_file_bytes=args.file_mib * 2**20, io_threads=args.threads)
    state = make_state(args.size_mib)
    fresh = make_state(args.size_mib, seed=1)

    # The exact files a save produces, to give the plain client the same bytes.
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp, state, 1, options=opts)
        folder = os.path.join(tmp, step_dirname(1))
        files = {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
    nbytes = sum(len(b) for b in files.values())

    servers = {k: SERVERS[k]().start() for k in kinds}
    results: dict = {}
    try:
        stores = {}
        for k, srv in servers.items():
            srv.create_bucket("bench")
            stores[k] = srv
        for k, srv in servers.items():
            rt_save, plain_save, rt_load, plain_load = [], [], [], []
            for r in range(args.runs):
                store = open_store(srv.uri("bench", f"rt-{r}"), srv.storage_options, name=k)
                fs, root = fs_of(store)
                rt_save.append(timed(lambda: save(store, state, 1, options=opts)))
                rt_load.append(timed(lambda: load(store, fresh, 1, io_threads=args.threads)))
                assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), fresh.model.parameters()))
                plain_root = f"{root.rsplit('/', 1)[0]}/plain-{r}"
                paths = {f"{plain_root}/{n}": b for n, b in files.items()}
                plain_save.append(timed(lambda: fs.pipe(paths)))
                plain_load.append(timed(lambda: fs.cat(list(paths))))
                fs.rm(plain_root, recursive=True)
            results[k] = {
                "rt save": summary(rt_save, nbytes),
                "plain fs.pipe": summary(plain_save, nbytes),
                "rt load (verify + read)": summary(rt_load, nbytes),
                "plain fs.cat": summary(plain_load, nbytes),
            }
            results[k]["ratios"] = {
                "save / ceiling": statistics.median(plain_save) / statistics.median(rt_save),
                "load / ceiling": statistics.median(plain_load) / statistics.median(rt_load),
            }
        if "s3" in servers:
            for k in [k for k in servers if k != "s3"]:
                src = open_store(servers["s3"].uri("bench", "rt-0"), servers["s3"].storage_options, name="s3")
                sfs, sroot = fs_of(src)
                rt_mig, hand = [], []
                for r in range(args.runs):
                    dst = open_store(servers[k].uri("bench", f"mig-{r}"), servers[k].storage_options, name=k)
                    rt_mig.append(timed(lambda: copy_checkpoint(src, dst, 1, io_threads=args.threads)))
                    dfs, droot = fs_of(dst)
                    names = [f"{sroot}/{step_dirname(1)}/{n}" for n in files]

                    def by_hand() -> None:
                        data = sfs.cat(names)
                        dfs.pipe({f"{droot}-hand/{p.rsplit('/', 1)[-1]}": b for p, b in data.items()})

                    hand.append(timed(by_hand))
                results[f"migrate s3 -> {k}"] = {
                    "rt copy_checkpoint": summary(rt_mig, nbytes),
                    "hand copy (cat + pipe, in memory)": summary(hand, nbytes),
                    "ratio rt / hand": statistics.median(hand) / statistics.median(rt_mig),
                }
    finally:
        for srv in servers.values():
            srv.stop()

    out = {
        "benchmark": "bench_storage",
        "checkpoint_bytes": nbytes,
        "files": len(files),
        "runs": args.runs,
        "threads": args.threads,
        "unit": "seconds (median of runs) and MB/s (1e6 bytes/s); ratio = ceiling time / rt time (1.0 = as fast as the plain client)",
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"checkpoint {nbytes / 2**20:.0f} MiB in {len(files)} files, medians of {args.runs}")
    for k, v in results.items():
        for name, s in v.items():
            if isinstance(s, dict) and "mb_per_s" in s:
                print(f"{k:<18} {name:<36} {s['median_s']:>8.2f} s {s['mb_per_s']:>8.1f} MB/s")
            elif isinstance(s, dict):
                for rn, rv in s.items():
                    print(f"{k:<18} {rn:<36} {rv:>8.2f}")
            else:
                print(f"{k:<18} {name:<36} {s:>8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
