"""Run a function on N real torch.distributed ranks (gloo, CPU, one process each).

Used by the tests and benchmarks. Every rank runs ``fn(rank, world_size, *args)`` after
``init_process_group``; the return values come back in rank order. An exception on any rank
is re-raised in the caller as RanksFailed naming every failed rank with its traceback. A
rank that does not finish within ``timeout_s`` is killed, so a hung collective cannot hang the
caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

__all__ = ["run_ranks", "RanksFailed"]


class RanksFailed(RuntimeError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))


def _entry(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, args: tuple, out: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue reductions would pass tensors through shared memory
        # that vanishes when this process exits.
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store_path, args, out, dict(env or {})), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(failures) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures[rank] = value
        for r, p in enumerate(procs):
            p.join(timeout=5 if r in results or r in failures else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
                if r not in results:  # a rank that returned but exits slowly is not a failure
                    failures.setdefault(r, f"rank {r} did not finish within {timeout_s} s and was killed")
            elif r not in results and r not in failures:
                failures[r] = f"rank {r} exited with code {p.exitcode} without a result"
        if failures:
            raise RanksFailed(failures)
        return [results[r] for r in range(world_size)]
