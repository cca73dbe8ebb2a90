"""Codec throughput on this machine: encode (with error feedback) + decode, GB/s of fp32 input.

Compares the pure-torch reference codecs, the C++ CPU twin (csrc/quant_cpu.cpp), a plain
``tensor.to(torch.bfloat16)`` cast and the memory-copy rate. Reports the median of --runs
timed runs after one warm-up. Writes benchmarks/results/codecs_cpu.json (or --out).

    python benchmarks/bench_codecs.py --mib 256 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from resilient_train.compression import _ext, get_codec


def machine_info() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up (and JIT build / allocator)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="fp32 input size in MiB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "codecs_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.mib * (1 << 20) // 4
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    nbytes = x.numel() * 4
    twin = _ext.load_cpu(required=False) is not None

    cases = {}
    dst = torch.empty_like(x)
    cases["memcpy (dst.copy_(src))"] = lambda: dst.copy_(x)
    cases["cast tensor.to(bfloat16)"] = lambda: x.to(torch.bfloat16)
    codecs = [("none", {}), ("bf16", {}), ("int8", {"backend": "reference"}), ("int4", {"backend": "reference"}),
              ("topk", {"ratio": 0.01})]
    if twin:
        codecs += [("int8", {"backend": "cpu"}), ("int4", {"backend": "cpu"})]
    for name, opts in codecs:
        codec = get_codec(name, **opts)
        residual = torch.zeros_like(x)
        out = torch.zeros_like(x)

        # decode into a preallocated buffer, as sync does (accumulating peers' payloads)
        def run(codec=codec, residual=residual, out=out):
            codec.decode(codec.encode(x, residual), out=out)

        label = f"{name} encode+EF+decode" + (f" [{opts['backend']}]" if "backend" in opts else "")
        cases[label] = run

    results = {}
    for label, fn in cases.items():
        ts = timed(fn, args.runs)
        med = statistics.median(ts)
        results[label] = {"median_s": med, "gb_per_s": nbytes / med / 1e9, "runs_s": ts}
        print(f"{label:40s} {nbytes / med / 1e9:7.2f} GB/s  (median of {args.runs}: {med * 1e3:.1f} ms)", flush=True)
    speedup = {}
    for bits in (8, 4):
        ref = results.get(f"int{bits} encode+EF+decode [reference]")
        cpu = results.get(f"int{bits} encode+EF+decode [cpu]")
        if ref and cpu:
            speedup[f"int{bits}"] = ref["median_s"] / cpu["median_s"]
            print(f"int{bits}: CPU twin {speedup[f'int{bits}']:.1f}x the reference")
    doc = {"benchmark": "bench_codecs", "input_mib": args.mib, "input_bytes": nbytes, "runs": args.runs,
           "unit": "GB/s of fp32 input (1e9 bytes/s), encode with error feedback then decode",
           "machine": machine_info(), "cpu_twin_built": twin, "results": results, "twin_speedup": speedup,
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
