"""The C++ CPU twin (csrc/quant_cpu.cpp) equals the pure-torch reference bit for bit.

The first test in a fresh cache JIT-builds the extension (~30-60 s, once; cached under
~/.cache/resilient_train or $RESILIENT_TRAIN_CACHE)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_train.compression import _ext, get_codec
from resilient_train.compression.conformance import check_all, check_error_feedback
from resilient_train.errors import KernelUnavailableError

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    return _ext.load_cpu(required=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _compare(ext, bits: int, block: int, x: torch.Tensor, r: torch.Tensor | None) -> None:
    ref = get_codec(f"int{bits}", block_size=block, backend="reference")
    r1 = r.clone() if r is not None else None
    r2 = r.clone() if r is not None else None
    p = ref.encode_reference(x, r1)
    data, scales = ext.quantize_ef(x, r2, block, bits)
    assert _same(p.data, data), "codes differ"
    assert _same(p.scales, scales), "scales differ"
    if r is not None:
        assert _same(r1, r2), "residuals differ"
    base = torch.linspace(-3, 3, x.numel())
    o1, o2 = base.clone(), base.clone()
    ref.decode_reference(p, o1, accumulate=True)
    ext.dequantize(data, scales, x.numel(), block, bits, o2, True)
    assert _same(o1, o2), "dequantise-accumulate differs"
    ext.dequantize(data, scales, x.numel(), block, bits, o2, False)
    assert _same(ref.decode_reference(p), o2), "dequantise differs"


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2, 6, 64, 128, 1000])
def test_twin_matches_reference_many_sizes(ext, bits, block):
    g = torch.Generator().manual_seed(block * bits)
    for n in [0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 33, block - 1, block, block + 1, 3 * block + 5, 40_001]:
        n = max(n, 0)
        x = torch.randn(n, generator=g) * float(torch.rand(1, generator=g) * 100)
        if n > 40:
            x[3:37] = 0.0  # a zero run: zero blocks and -0/+0 handling
            x[37] = 1e-39
        _compare(ext, bits, block, x, None)
        _compare(ext, bits, block, x, torch.randn(n, generator=g) * 0.01)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 3000), bits=st.sampled_from([8, 4]), half_block=st.integers(1, 200),
       seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-30, 30))
def test_twin_matches_reference_hypothesis(ext, n, bits, half_block, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2.0 ** log_scale
    _compare(ext, bits, 2 * half_block, x, torch.randn(n, generator=g) * 2.0 ** (log_scale - 6))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_cpu_backend_passes_the_codec_conformance_suite(ext, name):
    codec = get_codec(name, backend="cpu", block_size=64)
    for n in [0, 1, 63, 64, 65, 999]:
        check_all(codec, torch.randn(n) * 5)
    check_error_feedback(codec, [torch.randn(555) for _ in range(5)])


def test_auto_falls_back_to_reference_when_the_build_fails(monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_errors", {})

    def broken(kind):
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(_ext, "_build", broken)
    x = torch.randn(1000)
    with caplog.at_level(logging.WARNING, logger="resilient_train.compression._ext"):
        got = get_codec("int8", backend="auto").encode(x)
    assert "no compiler in this test" in caplog.text
    want = get_codec("int8", backend="reference").encode(x)
    assert torch.equal(got.data, want.data) and torch.equal(got.scales, want.scales)
    with pytest.raises(KernelUnavailableError, match="no compiler in this test"):
        get_codec("int8", backend="cpu").encode(x)


@pytest.mark.slow
def test_diloco_with_the_cpu_twin_equals_diloco_with_the_reference(ext):
    from resilient_train.sync import DiLoCo
    from resilient_train.sync.threads import run_thread_ranks

    def train(backend):
        def fn(rank, comm):
            model = torch.nn.Linear(40, 30)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            sync = DiLoCo(model, sync_every=2, comm=comm, codec=get_codec("int4", block_size=16, backend=backend))
            g = torch.Generator().manual_seed(rank)
            for _ in range(6):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 0.1)
                sync.step()
            return [p.detach().clone() for p in model.parameters()]

        return run_thread_ranks(fn, 2)

    for a, b in zip(train("cpu"), train("reference")):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_load():
    """A process SIGKILLed while loading the codec (torch's FileBaton ``lock`` file created, under
    the library's kernel lock) leaves the baton behind; the next process's load removes it and
    loads in seconds, where torch alone would wait for it forever. While the killed process was
    alive, the next load waited for it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from resilient_train.compression import _ext

    assert _ext.load_cpu(required=False) is not None  # built (cached) before the fault
    build = next(p for p in _ext.cache_dir().iterdir() if p.name.startswith("cpu") and p.name.endswith(
        __import__("hashlib").sha256(str(_ext.csrc_dir()).encode()).hexdigest()[:12]))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from resilient_train.compression import _ext\n"
        f"with _ext._build_lock(Path({str(build)!r})):\n"
        f"    Path({str(build / 'lock')!r}).write_bytes(b'')\n"
        "    print('holding', flush=True)\n"
        "    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        load = [sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n"
                "from resilient_train.compression import _ext\nassert _ext.load_cpu(required=True) is not None"]
        waiter = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        assert waiter.poll() is None, "the load did not wait for the live holder"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        assert (build / "lock").exists()  # what torch's baton leaves behind
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, out
        assert "left by a process killed while loading" in out and not (build / "lock").exists(), (out, sorted(os.listdir(build)))
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
