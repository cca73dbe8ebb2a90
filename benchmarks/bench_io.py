"""Issue 22's checkpoint I/O benchmarks in one run: every goal's ratio, measured back to back.

    python benchmarks/bench_io.py                 # about 50 minutes on 2 cores
    python benchmarks/bench_io.py --quick         # a few minutes: small sizes, fewer rounds (a smoke test)

Runs, one after the other, each interleaved inside (A B C ... A B C ...):

1. ``bench_checkpoint.py --sizes 1,8 --ranks 1,2``: saves and warm and cold loads of 1 GiB and
   8 GiB states, 1 rank and 2 FSDP2 ranks, against torch.save/load, safetensors, DCP and the
   ceilings (memcpy, dd with fdatasync, hash rates) -> ``results/checkpoint.json``;
2. ``bench_checkpoint.py --load-only``: the warm 1 GiB loads with CPU time per load and the
   least CPU a verified byte can cost here -> ``results/checkpoint_load.json``;
3. ``bench_replicated_stall.py``: the training loop's stall per checkpoint, replicated to a
   local and a 50 MB/s S3 provider against unreplicated, with and without ``prepare()``, and
   with ``prepare()`` on a loaded machine (2 CPU-bound processes beside) ->
   ``results/replicated_stall.json``, ``replicated_stall_prepared.json``, ``replicated_stall_loaded.json``;
4. ``bench_storage.py --load-only``: verified loads from the S3, Azure and GCS emulators
   against a plain concurrent ``fs.cat`` of the same files -> ``results/storage_load_format3.json``.

Then writes ``results/io.json``: every goal with its ratio and whether it is met, the load
average sampled every 5 s over the whole run, the machine, and how long each part took; and
prints the goals as a markdown table (the README's). A part that fails is reported as failed
(with its exit code) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import RESULTS, machine_info, write_result  # noqa: E402


def _parts(quick: bool) -> list[tuple[str, list[str], list[str]]]:
    """(label, argv after the script, result files it writes)."""
    if quick:
        return [
            ("checkpoint", ["bench_checkpoint.py", "--sizes", "0.125", "--ranks", "1,2", "--reps", "1", "--out", "io_quick_checkpoint"], ["io_quick_checkpoint.json"]),
            ("replicated stall", ["bench_replicated_stall.py", "--size-mib", "16", "--saves", "3", "--reps", "1", "--interval-s", "0.3", "--out", "io_quick_stall"], ["io_quick_stall.json"]),
            ("object stores", ["bench_storage.py", "--load-only", "--size-mib", "16", "--runs", "1", "--servers", "s3", "--out", os.path.join(RESULTS, "io_quick_storage.json")], ["io_quick_storage.json"]),
        ]
    return [
        ("checkpoint", ["bench_checkpoint.py", "--sizes", "1,8", "--ranks", "1,2", "--reps", "3"], ["checkpoint.json"]),
        ("load CPU", ["bench_checkpoint.py", "--load-only", "--size-gib", "1", "--reps", "5"], ["checkpoint_load.json"]),
        ("replicated stall", ["bench_replicated_stall.py", "--saves", "13", "--reps", "4"], ["replicated_stall.json"]),
        ("replicated stall, prepared", ["bench_replicated_stall.py", "--saves", "13", "--reps", "4", "--prepare"], ["replicated_stall_prepared.json"]),
        ("replicated stall, prepared, loaded (2 CPU-bound processes beside)", ["bench_replicated_stall.py", "--saves", "13", "--reps", "4", "--prepare", "--load-procs", "2",
                                                                                 "--out", "replicated_stall_loaded"], ["replicated_stall_loaded.json"]),
        ("object stores", ["bench_storage.py", "--load-only", "--size-mib", "256", "--runs", "5", "--servers", "s3,azure,gcs",
                           "--out", os.path.join(RESULTS, "storage_load_format3.json")], ["storage_load_format3.json"]),
    ]


def _goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of issue 22 with its measured ratio, per configuration."""
    rows: list[dict[str, Any]] = []
    ck = results.get("checkpoint")
    if ck:
        for label, c in ck["configs"].items():
            r = c["ratios"]
            rows.append({"goal": "hashed, fsynced save >= 1.0x safetensors.save_file+fsync", "where": label, "ratio": r["save_vs_safetensors"], "target": 1.0})
            rows.append({"goal": "hashed, fsynced save >= 1.2x dcp.save", "where": label, "ratio": r["save_vs_dcp"], "target": 1.2})
            for cache in ("warm", "cold"):
                for kind in ("default", "streamed"):
                    if f"load_{cache}_{kind}_vs_dcp" not in r:
                        continue
                    row = next((v for k, v in c["rows"].items() if k.startswith(f"load {cache} | rt.load") and "format 2" not in k
                                and ("default" in k) == (kind == "default")), {})
                    mode = f" ({row['rt_load_mode']})" if kind == "default" and "rt_load_mode" in row else ""
                    how = f"{label}, page cache {cache}, rt.load {kind}{mode}"
                    rows.append({"goal": "verified load >= 3x dcp.load", "where": how, "ratio": r[f"load_{cache}_{kind}_vs_dcp"], "target": 3.0})
                    rows.append({"goal": "verified load >= 0.5x safetensors.load_file+copy", "where": how, "ratio": r[f"load_{cache}_{kind}_vs_safetensors"], "target": 0.5})
    for key in [k for k in results if k.startswith("replicated stall")]:
        st = results.get(key)
        if st:
            res = st["results"]
            base, rep = res["unreplicated async"], res["replicated async, copies in the background worker"]
            rows.append({"goal": "replicated stall <= 1.2x unreplicated (median)", "where": key, "ratio": rep["steady_stall_median_s"] / base["steady_stall_median_s"], "target": 1.2, "lower_is_better": True})
            rows.append({"goal": "replicated stall <= 1.2x unreplicated (worst)", "where": key, "ratio": rep["steady_stall_max_s"] / base["steady_stall_max_s"], "target": 1.2, "lower_is_better": True})
    so = results.get("object stores")
    if so:
        for k, v in so["results"].items():
            if "ratio rt / fs.cat (speed)" in v:
                rows.append({"goal": "object-store load >= 0.9x plain concurrent fs.cat", "where": k, "ratio": v["ratio rt / fs.cat (speed)"], "target": 0.9})
    for row in rows:
        row["met"] = row["ratio"] <= row["target"] if row.get("lower_is_better") else row["ratio"] >= row["target"]
    return rows


def _print_table(goals: list[dict[str, Any]]) -> None:
    print("\n| goal | where | ratio | met |\n|---|---|---|---|")
    for g in goals:
        print(f"| {g['goal']} | {g['where']} | {g['ratio']:.2f}x | {'**met**' if g['met'] else 'not met'} |")


def retable(name: str, quick: bool) -> int:
    """Recompute ``goals`` of results/<name>.json from the part files it names."""
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path) as f:
        run = json.load(f)
    results = {}
    for label, part in run["parts"].items():
        if part["exit_code"] == 0:
            with open(os.path.join(RESULTS, part["results_files"][0])) as f:
                results[label] = json.load(f)
    run["goals"] = _goals(results)
    with open(path, "w") as f:
        json.dump(run, f, indent=1, sort_keys=True)
    _print_table(run["goals"])
    print(f"rewrote {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and one round each: checks the harness, not the machine")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results/ (no .json; default io, io_quick with --quick)")
    ap.add_argument("--retable", action="store_true", help="rebuild the goals and the table from the result files of the last run (runs nothing)")
    args = ap.parse_args()
    name = args.out or ("io_quick" if args.quick else "io")
    if args.retable:
        return retable(name, args.quick)

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.time(), os.getloadavg()[0]))
            stop.wait(5.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_start = time.time()
    parts: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for label, argv, files in _parts(args.quick):
        print(f"== {label}: {' '.join(argv)}", flush=True)
        t0 = time.time()
        rc = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], cwd=os.path.dirname(HERE)).returncode
        parts[label] = {"argv": argv, "exit_code": rc, "seconds": time.time() - t0, "results_files": files}
        if rc == 0:
            with open(os.path.join(RESULTS, files[0])) as f:
                results[label] = json.load(f)
        else:
            print(f"== {label} failed (exit code {rc}); the other parts still run", flush=True)
    stop.set()
    sampler.join()
    goals = _goals(results)
    loads = [v for _, v in samples]
    _print_table(goals)
    out = write_result(name, {
        "what": "issue 22's goals, every part run back to back in one run (each part interleaved inside)",
        "seconds": time.time() - t_start, "parts": parts, "goals": goals,
        "load_average_1m": {"median": sorted(loads)[len(loads) // 2] if loads else None, "max": max(loads) if loads else None,
                            "samples_every_5_s": [[round(t - t_start, 1), v] for t, v in samples]},
    })
    print(f"\nload average (1 min) over the run: median {sorted(loads)[len(loads) // 2] if loads else 0:.1f}, max {max(loads) if loads else 0:.1f}; machine {machine_info().get('cpu_count')} cores")
    print(f"wrote {out}")
    return 0 if all(p["exit_code"] == 0 for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
