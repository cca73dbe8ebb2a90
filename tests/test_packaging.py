"""The wheel as users install it: it ships the kernel sources, and the int8 codec runs through
the compiled CPU twin built on first use from the installed package (not from this checkout)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
import resilient_train
from resilient_train.compression import _ext, get_codec
here = os.path.dirname(resilient_train.__file__)
assert os.path.realpath(here).startswith(os.path.realpath(sys.argv[1])), here
assert str(_ext.csrc_dir()).startswith(here) and (_ext.csrc_dir() / "quant_cpu.cpp").exists()
t0 = time.perf_counter()
mod = _ext.load_cpu(required=True)
build_s = time.perf_counter() - t0
assert os.path.realpath(mod.__file__).startswith(os.path.realpath(os.environ["TORCH_EXTENSIONS_DIR"])), mod.__file__
x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
cpu, ref = get_codec("int8", backend="cpu"), get_codec("int8", backend="reference")
a, b = cpu.decode(cpu.encode(x)), ref.decode(ref.encode(x))
assert torch.equal(a.view(torch.int32), b.view(torch.int32))
print(f"OK compiled int8 from the wheel; build {build_s:.1f} s; {mod.__file__}")
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wheel_ships_kernels_and_runs_int8_compiled(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), ROOT], check=True, timeout=180, capture_output=True)
    (whl,) = wheels.glob("resilient_train-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert {"resilient_train/csrc/quant_cpu.cpp", "resilient_train/csrc/quant_cuda.cu", "resilient_train/csrc/quant_cuda.cpp"} <= set(names), names

    # A fresh venv holding only the wheel; torch and the other dependencies come from the shared
    # environment's site-packages, added after the venv's own (its editable install of this
    # checkout is a .pth that a plain path entry does not run).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, str(whl)], check=True, timeout=120, capture_output=True)
    shared = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    with open(os.path.join(purelib, "zz_shared_env.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(shared)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RESILIENT_TRAIN_CACHE")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext-cache")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja
    proc = subprocess.run([str(py), "-c", CHECK, purelib], capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the compiled cpu codec once" in proc.stderr
    print(proc.stdout.strip())
