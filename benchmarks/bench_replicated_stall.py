"""Training-loop stall per checkpoint: replicated save to two providers (one slow) vs unreplicated.

One process, a state of --size-mib float32. The loop "trains" for --interval-s (a sleep: the
GPU would be busy) and checkpoints, --saves times per run; the stall is how long ``save()``
blocks the loop (it joins the previous save when it is still writing). The first save of a run
allocates the staging buffers and is reported apart.

Contenders, interleaved A B C A B C ... (--reps rounds):

* ``unreplicated async``: ``AsyncCheckpointer(local folder)``.
* ``replicated async (copies in the background worker)``: ``AsyncCheckpointer(Placement)``
  with a local primary and an S3 emulator (moto) behind a TCP proxy throttled to --slow-mbps
  MB/s (the proxy runs in its own process); copies run on the CheckpointWorker, off the
  save thread.
* ``replicated async (copies in the save thread)``: the behaviour before issue 10: the save
  thread writes and then copies (``write_replicated``), so the next save waits for the copy.

The moto server and the proxy run at nice 19: they stand in for a remote provider, and at normal
priority they would take this machine's cores from the process under test.

    python benchmarks/bench_replicated_stall.py --size-mib 64 --saves 4 --reps 3 [--prepare] [--load-procs 2]

``--load-procs N`` runs N CPU-bound processes beside the loop for the whole run (a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from resilient_train import TrainState  # noqa: E402
from resilient_train.checkpoint.async_save import AsyncCheckpointer  # noqa: E402
from resilient_train.checkpoint.saving import write_replicated  # noqa: E402
from resilient_train.storage import LocalStore, RetryPolicy  # noqa: E402
from resilient_train.storage.ledger import Ledger  # noqa: E402
from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy  # noqa: E402
from resilient_train.testing.servers import MotoS3Server  # noqa: E402


class CopiesInSaveThread(AsyncCheckpointer):
    """The pre-issue-10 behaviour: the background save thread also makes the copies."""

    def _run(self, snap, step):  # type: ignore[override]
        try:
            self.last_result = write_replicated(self._placement, snap, step, process_group=self.process_group, options=self.options)
            self.saves_committed += 1
        except BaseException as exc:  # noqa: BLE001
            self._error = exc


def make_state(size_mib: int) -> TrainState:
    n = 8
    per = size_mib * 1024 * 1024 // 4 // n
    model = torch.nn.Module()
    for i in range(n):
        model.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(per)))
    return TrainState(model=model, rng=False)


def run_loop(ck: AsyncCheckpointer, state: TrainState, saves: int, interval_s: float, prepare: bool = False) -> dict:
    stalls, staging = [], []
    prepare_s = None
    if prepare:  # before the loop: the first save then reuses buffers like the later ones
        t0 = time.perf_counter()
        ck.prepare(state)
        prepare_s = time.perf_counter() - t0
    t_start = time.perf_counter()
    for step in range(1, saves + 1):
        time.sleep(interval_s)  # training
        t0 = time.perf_counter()
        ck.save(step, state)
        stalls.append(time.perf_counter() - t0)
        staging.append(ck.last_stall_s)  # the staging copy alone; the rest of the stall is waiting for the previous save
    loop_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    ck.close()
    return {"first_stall_s": stalls[0], "steady_stalls_s": stalls[1:], "steady_staging_s": staging[1:], "loop_s": loop_s, "close_s": time.perf_counter() - t0, "prepare_s": prepare_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interval-s", type=float, default=1.0)
    ap.add_argument("--slow-mbps", type=float, default=50.0)
    ap.add_argument("--prepare", action="store_true", help="call AsyncCheckpointer.prepare(state) before each run's loop (results: replicated_stall_prepared.json)")
    ap.add_argument("--load-procs", type=int, default=0, help="run this many CPU-bound processes beside the loop (a loaded machine)")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results/ (default: replicated_stall, or replicated_stall_prepared with --prepare)")
    args = ap.parse_args()

    state = make_state(args.size_mib)
    nbytes = sum(p.numel() * p.element_size() for p in state.model.parameters())
    root = tempfile.mkdtemp(prefix="rt-bench-repl-")
    srv = MotoS3Server().start()
    srv.create_bucket("bench")
    # The proxy runs in its own process: its forwarding must not compete with the loop for the GIL.
    proxy = subprocess.Popen([sys.executable, "-m", "resilient_train.testing.proxy", str(srv.port), "--bytes-per-s", str(args.slow_mbps * 1e6)], stdout=subprocess.PIPE, text=True)
    proxy_port = int(proxy.stdout.readline())
    # The emulator and the throttling proxy stand in for a remote provider: at the lowest CPU
    # priority, so that on a small machine they do not take the cores from the process under test.
    for pid in (proxy.pid, srv._proc.pid if srv._proc is not None else None):
        if pid is not None:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
    opts = dict(srv.storage_options, endpoint_url=f"http://127.0.0.1:{proxy_port}")
    retry = RetryPolicy(max_attempts=3, max_total_s=120, call_timeout_s=120)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load_procs)]
    raw: dict[str, list[dict]] = {"unreplicated async": [], "replicated async, copies in the background worker": [], "replicated async, copies in the save thread (before)": []}
    ledger_out = None
    try:
        for rep in range(args.reps):
            for name in raw:
                tag = f"r{rep}-{len(raw[name])}-{abs(hash(name)) % 10000}"
                fast_dir = os.path.join(root, tag)
                provs = [Provider("fast", fast_dir, "eu-west-1", egress_cost_per_gb=0.09), Provider("slow", srv.uri("bench", tag), "eu-west-1", egress_cost_per_gb=0.02, storage_options=opts, retry=retry)]
                if name == "unreplicated async":
                    ck = AsyncCheckpointer(LocalStore(fast_dir), keep_last=1)
                elif name.startswith("replicated async, copies in the background"):
                    ledger = Ledger(provs)
                    ck = AsyncCheckpointer(Placement(provs, ReplicationPolicy(copies=2)), keep_last=1, ledger=ledger, copy_timeout_s=600)
                else:
                    ck = CopiesInSaveThread(Placement(provs, ReplicationPolicy(copies=2)))
                res = run_loop(ck, state, args.saves, args.interval_s, args.prepare)
                if name.startswith("replicated async, copies in the background"):
                    ledger_out = ledger.summary()
                raw[name].append(res)
                print(f"round {rep} {name:<55} steady stall median {statistics.median(res['steady_stalls_s']):.3f} s, close {res['close_s']:.2f} s", flush=True)
                shutil.rmtree(fast_dir, ignore_errors=True)
                try:
                    srv.filesystem().rm(f"bench/{tag}", recursive=True)
                except FileNotFoundError:
                    pass
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        proxy.kill()
        proxy.wait()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)

    results = {}
    for name, runs in raw.items():
        steady = [s for r in runs for s in r["steady_stalls_s"]]
        results[name] = {
            "steady_stall_median_s": statistics.median(steady),
            "steady_stall_max_s": max(steady),
            "steady_staging_median_s": statistics.median(s for r in runs for s in r["steady_staging_s"]),
            "first_stall_median_s": statistics.median(r["first_stall_s"] for r in runs),
            "close_median_s": statistics.median(r["close_s"] for r in runs),
            "runs": runs,
        }
    base = results["unreplicated async"]["steady_stall_median_s"]
    ratios = {f"{k} / unreplicated": v["steady_stall_median_s"] / base for k, v in results.items() if k != "unreplicated async"}
    ratios.update({f"{k} first save / unreplicated first save": v["first_stall_median_s"] / results["unreplicated async"]["first_stall_median_s"] for k, v in results.items() if k != "unreplicated async"})
    ratios.update({f"{k} first save / its steady median": v["first_stall_median_s"] / v["steady_stall_median_s"] for k, v in results.items()})
    path = write_result(args.out or ("replicated_stall_prepared" if args.prepare else "replicated_stall"), {
        "prepare_before_loop": args.prepare, "cpu_bound_processes_beside": args.load_procs,
        "state_bytes": nbytes, "saves_per_run": args.saves, "reps": args.reps, "interval_s": args.interval_s, "slow_provider_mb_per_s": args.slow_mbps,
        "unit": "seconds the training loop blocks in save(); medians over steady saves (the first save of each run allocates staging buffers, unless prepare_before_loop)",
        "load_average_1m_at_end": os.getloadavg()[0], "results": results, "ratios": ratios, "ledger_of_one_replicated_run": ledger_out,
        "goal": "replicated stall ~= unreplicated stall (the copy to the slow provider never blocks the loop)",
    })
    print(f"state {nbytes / 2**20:.0f} MiB, slow provider {args.slow_mbps:g} MB/s, {args.saves} saves every {args.interval_s} s, {args.reps} rounds")
    for k, v in results.items():
        print(f"{k:<55} steady stall {v['steady_stall_median_s']:.4f} s (max {v['steady_stall_max_s']:.3f}; staging alone {v['steady_staging_median_s']:.4f}), close {v['close_median_s']:.2f} s")
    for k, v in ratios.items():
        print(f"{k:<70} {v:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
