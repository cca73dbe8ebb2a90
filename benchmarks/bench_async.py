"""Async save: the training stall and the total time, against DCP's async_save and a sync save.

Same state for every contender (one module of float32 parameters, --size-mib in total), same
local disk, one process. Each contender runs --runs times; medians are reported.

* ``sync``: ``resilient_train.save`` (capture, write, hash, manifest): the stall is all of it.
* ``rt async``: ``AsyncCheckpointer.save`` returns after copying into staging buffers; ``total``
  adds ``wait()``. The first save allocates the buffers; later saves reuse them (reported
  separately: ``first`` vs ``steady``).
* ``dcp async (thread)`` / ``dcp async (process)``: ``torch.distributed.checkpoint.async_save``
  on a 1-rank gloo group; the stall is until it returns, the total until its future resolves.

    python benchmarks/bench_async.py --size-mib 512 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine_info  # noqa: E402

from resilient_train import TrainState, save  # noqa: E402
from resilient_train.checkpoint.async_save import AsyncCheckpointer  # noqa: E402


def make_state(size_mib: int) -> TrainState:
    n_tensors = 8
    per = size_mib * 1024 * 1024 // 4 // n_tensors
    model = torch.nn.Module()
    for i in range(n_tensors):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(per)))
    return TrainState(model=model, rng=False)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_sync(state: TrainState, root: str, runs: int) -> dict:
    stalls = []
    for r in range(runs):
        d = os.path.join(root, f"sync-{r}")
        t0 = time.perf_counter()
        save(d, state, 1)
        stalls.append(time.perf_counter() - t0)
        shutil.rmtree(d)
    return {"stall_s": median(stalls), "total_s": median(stalls), "runs_stall_s": stalls}


def bench_rt_async(state: TrainState, root: str, runs: int) -> dict:
    d = os.path.join(root, "rt-async")
    ck = AsyncCheckpointer(d)
    stalls, totals = [], []
    for r in range(runs + 1):  # run 0 allocates the staging buffers
        t0 = time.perf_counter()
        ck.save(r + 1, state)
        stall = time.perf_counter() - t0
        ck.wait()
        total = time.perf_counter() - t0
        stalls.append(stall)
        totals.append(total)
        shutil.rmtree(os.path.join(d, os.listdir(d)[0]))
    ck.close()
    return {
        "stall_s": median(stalls[1:]),
        "total_s": median(totals[1:]),
        "first_stall_s": stalls[0],
        "runs_stall_s": stalls[1:],
        "runs_total_s": totals[1:],
        "staging_allocations": ck.staging_allocations,
    }


def bench_first_stall(state: TrainState, root: str, runs: int) -> dict:
    """The first save's stall of a fresh AsyncCheckpointer, without and with ``prepare()``
    (staging buffers allocated and touched beforehand), interleaved: A B A B ...; each also
    with its second save's stall (buffers reused) for comparison."""
    out: dict = {"without prepare": {"first": [], "second": []}, "with prepare": {"first": [], "second": [], "prepare_s": []}}
    for r in range(runs):
        for name in out:
            d = os.path.join(root, f"first-{r}-{name.replace(' ', '-')}")
            ck = AsyncCheckpointer(d)
            if name == "with prepare":
                t0 = time.perf_counter()
                ck.prepare(state)
                out[name]["prepare_s"].append(time.perf_counter() - t0)
            for i, key in enumerate(("first", "second")):
                t0 = time.perf_counter()
                ck.save(i + 1, state)
                out[name][key].append(time.perf_counter() - t0)
                ck.wait()
            ck.close()
            del ck
            shutil.rmtree(d)
    return {name: {**{f"{k}_median_s": median(v) for k, v in runs_.items()}, **{f"{k}_runs_s": v for k, v in runs_.items()}} for name, runs_ in out.items()}


def bench_dcp(state: TrainState, root: str, runs: int, mode: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kind = AsyncCheckpointerType.THREAD if mode == "thread" else AsyncCheckpointerType.PROCESS
    sd = {"model": state.model.state_dict()}
    stalls, totals = [], []
    for r in range(runs + 1):  # run 0 warms up (process mode starts its worker there)
        d = os.path.join(root, f"dcp-{mode}-{r}")
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=d, async_checkpointer_type=kind)
        stall = time.perf_counter() - t0
        if hasattr(fut, "upload_completion"):
            fut.upload_completion.result()
        else:
            fut.result()
        totals.append(time.perf_counter() - t0)
        stalls.append(stall)
        shutil.rmtree(d, ignore_errors=True)
    return {"stall_s": median(stalls[1:]), "total_s": median(totals[1:]), "first_stall_s": stalls[0], "runs_stall_s": stalls[1:], "runs_total_s": totals[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--no-process", action="store_true", help="skip DCP's process mode")
    ap.add_argument("--out", default=os.path.join(RESULTS, "async_cpu.json"))
    ap.add_argument("--first-stall", action="store_true", help="only the first save's stall without / with prepare(), interleaved (async_first_stall.json)")
    args = ap.parse_args()

    import torch.distributed as dist

    root = tempfile.mkdtemp(prefix="rt-bench-async-", dir=args.dir)
    store_file = os.path.join(root, "pg")
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=0, world_size=1, timeout=timedelta(seconds=300))
    state = make_state(args.size_mib)
    nbytes = sum(p.numel() * p.element_size() for p in state.model.parameters())
    if args.first_stall:
        try:
            res = bench_first_stall(state, root, args.runs)
        finally:
            dist.destroy_process_group()
            shutil.rmtree(root, ignore_errors=True)
        ratio = res["with prepare"]["first_median_s"] / res["without prepare"]["first_median_s"]
        out = {
            "benchmark": "bench_async --first-stall", "state_bytes": nbytes, "runs": args.runs,
            "order": "interleaved (without, with, without, with, ...), a fresh AsyncCheckpointer each",
            "unit": "seconds save() blocks the loop; first = the checkpointer's first save, second = its next one",
            "machine": machine_info(), "load_average_1m_at_end": os.getloadavg()[0], "results": res,
            "ratios": {"first stall with prepare / without": ratio,
                       "first stall with prepare / second stall with prepare": res["with prepare"]["first_median_s"] / res["with prepare"]["second_median_s"],
                       "first stall without prepare / second stall without": res["without prepare"]["first_median_s"] / res["without prepare"]["second_median_s"]},
            "goal": "the first save stalls like the later ones (first / second ~ 1.0)",
        }
        path = args.out if args.out != os.path.join(RESULTS, "async_cpu.json") else os.path.join(RESULTS, "async_first_stall.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        for name, v in res.items():
            print(f"{name:<18} first {v['first_median_s']:.3f} s, second {v['second_median_s']:.3f} s" + (f", prepare {v['prepare_s_median_s']:.3f} s" if "prepare_s_median_s" in v else ""))
        for k, v in out["ratios"].items():
            print(f"{k:<55} {v:.2f}x")
        print(f"wrote {path}")
        return
    # memcpy into already-allocated memory: the floor of any stall that copies the state
    dst = [torch.empty_like(p) for p in state.model.parameters()]
    copies = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        for a, b in zip(dst, state.model.parameters()):
            a.copy_(b.detach())
        copies.append(time.perf_counter() - t0)
    del dst
    results = {"memcpy into allocated memory": {"stall_s": median(copies), "total_s": median(copies), "runs_stall_s": copies}}
    try:
        results["sync save (rt)"] = bench_sync(state, root, args.runs)
        results["rt AsyncCheckpointer"] = bench_rt_async(state, root, args.runs)
        results["dcp async_save (thread)"] = bench_dcp(state, root, args.runs, "thread")
        if not args.no_process:
            try:
                results["dcp async_save (process)"] = bench_dcp(state, root, args.runs, "process")
            except Exception as exc:  # noqa: BLE001 - reported in the results
                results["dcp async_save (process)"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        dist.destroy_process_group()
        shutil.rmtree(root, ignore_errors=True)

    rt = results["rt AsyncCheckpointer"]["stall_s"]
    ratios = {
        "rt stall / dcp thread stall": rt / results["dcp async_save (thread)"]["stall_s"],
        "rt stall / sync save": rt / results["sync save (rt)"]["stall_s"],
        "rt stall / memcpy": rt / results["memcpy into allocated memory"]["stall_s"],
    }
    if "stall_s" in results.get("dcp async_save (process)", {}):
        ratios["rt stall / dcp process stall"] = rt / results["dcp async_save (process)"]["stall_s"]
    out = {
        "benchmark": "bench_async",
        "state_bytes": nbytes,
        "runs": args.runs,
        "unit": "seconds, medians over runs (first run of each async contender excluded as warm-up)",
        "machine": machine_info(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "results": results,
        "ratios": ratios,
        "goals": {"rt stall / dcp stall": "<= 0.3", "rt stall / sync save": "< 0.1"},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"state {nbytes / 2**20:.0f} MiB, medians of {args.runs}")
    print(f"{'contender':<30} {'stall s':>9} {'total s':>9}")
    for k, v in results.items():
        if "error" in v:
            print(f"{k:<30} error: {v['error'][:80]}")
        else:
            print(f"{k:<30} {v['stall_s']:>9.3f} {v['total_s']:>9.3f}")
    for k, v in ratios.items():
        print(f"{k:<30} {v:>9.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
