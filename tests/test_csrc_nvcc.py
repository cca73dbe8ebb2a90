"""csrc/quant_cuda.cu compiles with nvcc against torch's headers for sm_80 and sm_90.

No GPU is needed: this is a compile-only check (``nvcc -c``); bit-equality on a GPU is what
benchmarks/gpu_kernel_check.py checks on a machine that has one."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
import torch

from resilient_train.compression import _ext
from resilient_train.errors import KernelUnavailableError


def _torch_cxx_std() -> str:
    # the standard torch's own cpp_extension builds with (C++20 for torch 2.13, C++17 before)
    from torch.utils import cpp_extension

    src = open(cpp_extension.__file__).read()
    return "-std=c++20" if "-std=c++20" in src else "-std=c++17"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    from torch.utils.cpp_extension import include_paths

    obj = tmp_path / "quant_cuda.o"
    cmd = [nvcc, "-c", str(_ext.csrc_dir() / "quant_cuda.cu"), "-o", str(obj), _torch_cxx_std(),
           *_ext.NVCC_FLAGS, "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    blob = obj.read_bytes()
    assert b"-arch sm_80" in blob and b"-arch sm_90" in blob, "the object lacks one of the two cubins"
    # the host launchers the bindings call are defined in the object
    assert b"quantize_ef_cuda" in blob and b"dequantize_cuda" in blob


def test_asking_for_the_cuda_kernel_without_cuda_is_a_typed_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(KernelUnavailableError):
        _ext.load_cuda(required=True)
    assert _ext.load_cuda(required=False) is None
