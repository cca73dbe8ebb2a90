"""The one script a GPU session runs: build the CUDA kernel, check it, time it.

1. Builds csrc/quant_cuda.{cu,cpp} with torch.utils.cpp_extension (JIT, cached).
2. Bit-equality against the pure-torch reference run on the CPU (the oracle): int8 and int4,
   with and without error feedback, quantise and dequantise(-accumulate), on random inputs of
   many sizes (including sizes not divisible by the block, 0 and 1) and block sizes.
3. Timing (CUDA events, median of --runs): kernel encode+EF and decode-accumulate vs the
   pure-torch reference on the same GPU, and vs the device's measured copy bandwidth
   (``dst.copy_(src)``, counted as read + write bytes). The goal is >= 70% of copy bandwidth,
   counting the bytes each kernel must move (encode+EF: read x and r, write r, codes, scales;
   decode-accumulate: read codes, scales and out, write out).

Writes benchmarks/results/gpu_kernel_check.json (or --out) and exits non-zero if any
bit-equality check fails. Needs a CUDA GPU and nvcc; exits 2 without one.

    python benchmarks/gpu_kernel_check.py --mib 256 --runs 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_equality(ext, get_codec) -> tuple[int, list[str]]:
    failures, checked = [], 0
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1000, 4097, 65_537, (1 << 20) + 7,
             10_000_003]
    for bits in (8, 4):
        for block in (2, 6, 64, 128, 256, 1000):
            ref = get_codec(f"int{bits}", block_size=block, backend="reference")
            for n in sizes:
                if n > 2_000_000 and block not in (128, 256):
                    continue
                x = torch.randn(n, generator=gen) * float(10 ** torch.empty(1).uniform_(-6, 6, generator=gen))
                if n > 100:
                    x[5:90] = 0.0
                    x[90] = 1e-39
                r = torch.randn(n, generator=gen) * 1e-3
                for with_r in (False, True):
                    r_cpu = r.clone() if with_r else None
                    r_gpu = r.cuda() if with_r else None
                    p = ref.encode_reference(x, r_cpu)
                    data, scales = ext.quantize_ef(x.cuda(), r_gpu, block, bits)
                    torch.cuda.synchronize()
                    tag = f"int{bits} block={block} n={n} residual={with_r}"
                    ok = bits_equal(p.data, data) and bits_equal(p.scales, scales)
                    if with_r:
                        ok = ok and bits_equal(r_cpu, r_gpu)
                    base = torch.linspace(-1, 1, n)
                    want = ref.decode_reference(p, base.clone(), accumulate=True)
                    got = base.cuda()
                    ext.dequantize(data, scales, n, block, bits, got, True)
                    ok = ok and bits_equal(want, got)
                    checked += 1
                    if not ok:
                        failures.append(tag)
    return checked, failures


def cuda_time(fn, runs: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_kernel_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from resilient_train.compression import _ext, get_codec

    t0 = time.perf_counter()
    ext = _ext.load_cuda(required=True)
    build_s = time.perf_counter() - t0
    print(f"built/loaded the CUDA extension in {build_s:.1f} s", flush=True)

    t0 = time.perf_counter()
    checked, failures = check_equality(ext, get_codec)
    print(f"bit-equality: {checked - len(failures)}/{checked} cases equal ({time.perf_counter() - t0:.0f} s)")
    for f in failures[:20]:
        print("  MISMATCH", f)

    n = args.mib * (1 << 20) // 4
    x = torch.randn(n, device="cuda")
    r = torch.zeros_like(x)
    out = torch.zeros_like(x)
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    copy_s = cuda_time(lambda: dst.copy_(src), args.runs)
    copy_bw = 2 * n * 4 / copy_s
    timings = {"copy_bandwidth_bytes_per_s": copy_bw}
    print(f"device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    for bits in (8, 4):
        nblocks = -(-n // args.block)
        code_bytes = n if bits == 8 else (n + 1) // 2
        enc_bytes = 12 * n + code_bytes + 4 * nblocks   # read x, r; write r, codes, scales
        dec_bytes = code_bytes + 4 * nblocks + 8 * n    # read codes, scales, out; write out
        data, scales = ext.quantize_ef(x, r, args.block, bits)
        enc_s = cuda_time(lambda: ext.quantize_ef(x, r, args.block, bits), args.runs)
        dec_s = cuda_time(lambda: ext.dequantize(data, scales, n, args.block, bits, out, True), args.runs)
        ref = get_codec(f"int{bits}", block_size=args.block, backend="reference")
        ref_enc_s = cuda_time(lambda: ref.encode_reference(x, r), max(3, args.runs // 4))
        p = ref.encode_reference(x, r)
        ref_dec_s = cuda_time(lambda: ref.decode_reference(p, out, True), max(3, args.runs // 4))
        row = {"encode_ef_s": enc_s, "decode_acc_s": dec_s,
               "encode_ef_bandwidth_frac_of_copy": enc_bytes / enc_s / copy_bw,
               "decode_acc_bandwidth_frac_of_copy": dec_bytes / dec_s / copy_bw,
               "encode_plus_decode_gb_per_s_of_fp32_input": n * 4 / (enc_s + dec_s) / 1e9,
               "reference_encode_ef_s": ref_enc_s, "reference_decode_acc_s": ref_dec_s,
               "speedup_vs_reference": (ref_enc_s + ref_dec_s) / (enc_s + dec_s)}
        timings[f"int{bits}"] = row
        print(f"int{bits}: encode+EF {enc_s * 1e3:.2f} ms ({row['encode_ef_bandwidth_frac_of_copy']:.0%} of copy bw), "
              f"decode-acc {dec_s * 1e3:.2f} ms ({row['decode_acc_bandwidth_frac_of_copy']:.0%}), "
              f"{row['speedup_vs_reference']:.1f}x the torch reference on this GPU")
    doc = {"benchmark": "gpu_kernel_check", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform(), "build_s": build_s,
           "bit_equality": {"cases": checked, "failures": failures}, "input_mib": args.mib, "block": args.block,
           "timings": timings, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
