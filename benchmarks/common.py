"""Shared benchmark plumbing: machine info, medians, peak-RSS sampling, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    return info


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Samples RSS every 2 ms; ``out['peak_extra_bytes']`` = peak minus the RSS at entry."""
    out = {"peak_extra_bytes": 0}
    base = _rss()
    stop = threading.Event()
    peak = [base]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak_extra_bytes"] = max(0, max(peak[0], _rss()) - base)


def timed(fn: Callable[[], Any], reps: int, setup: Callable[[], Any] | None = None) -> dict[str, Any]:
    times, peaks = [], []
    for _ in range(reps):
        if setup:
            setup()
        with peak_rss() as mem:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peaks.append(mem["peak_extra_bytes"])
    return {"median_s": statistics.median(times), "all_s": times, "peak_extra_bytes": max(peaks)}


def write_result(name: str, payload: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    payload = {"benchmark": name, "machine": machine_info(), "when_unix_s": int(time.time()), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    return path


def import_baseline(commit: str) -> Any:
    """resilient_train as of git ``commit`` (``git archive`` into a temp folder), imported as the
    package ``rt_before`` beside this tree's one: a before/after pair timed in one interleaved
    run. The package imports itself relatively, so the two never mix."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="rt-baseline-")
    tar = subprocess.run(["git", "-C", repo, "archive", commit, "resilient_train"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    pkg = os.path.join(tmp, "resilient_train")
    spec = importlib.util.spec_from_file_location("rt_before", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rt_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def reexec_in_netns(mode: str, script: str, argv: list[str]) -> int | None:
    """Re-run ``script argv`` inside ``unshare -n`` with only the loopback up, for benchmarks that
    start torchft's servers (they bind every interface). ``mode``: "yes", "no" or "auto" (when
    running as root). Returns the child's exit code, or None when the caller should go on here
    (already inside, not wanted, or not possible under "auto")."""
    import shutil
    import subprocess
    import sys

    if mode == "no" or os.environ.get("RT_BENCH_IN_NETNS") or (mode == "auto" and os.geteuid() != 0):
        return None
    if not (shutil.which("unshare") and shutil.which("ip")):
        if mode == "yes":
            raise SystemExit("--netns yes needs unshare and ip (util-linux, iproute2)")
        return None
    env = dict(os.environ, RT_BENCH_IN_NETNS="1")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, os.path.abspath(script), *argv]
    return subprocess.call(cmd, env=env)
