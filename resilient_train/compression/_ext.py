"""The one module that builds and loads the compiled codecs in ``resilient_train/csrc/``.

The sources ship inside the package (source checkout, editable install and wheel alike), so
``pip install resilient-train`` needs no compiler. Both extensions are JIT-built with
:func:`torch.utils.cpp_extension.load` on first use, into a cache folder
(``$RESILIENT_TRAIN_CACHE``, else ``$TORCH_EXTENSIONS_DIR/resilient_train``, else
``~/.cache/resilient_train``), keyed by torch version and by where the sources are, so a cached
build is reused across runs and two checkouts or installs sharing the cache never rebuild over
each other.
A build takes ~30-60 s once and says so in one log line. The CUDA kernel is built only where a
CUDA torch and ``nvcc`` exist. Without a C++ compiler, one log line says that the pure-torch
reference codecs are used (slower, same results).

``load_cpu(required)`` / ``load_cuda(required)`` return the module, or ``None`` when it
cannot be built and ``required`` is false (the reason is logged once; callers then use the
pure-torch reference). With ``required`` true a failure raises
:class:`~resilient_train.errors.KernelUnavailableError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from ..errors import KernelUnavailableError

__all__ = ["csrc_dir", "cache_dir", "load_cpu", "load_cuda", "CPU_FLAGS", "NVCC_FLAGS"]

log = logging.getLogger(__name__)

# -ffp-contract=off: the rounding definition forbids fusing `v - q * scale` into one FMA.
CPU_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# The C++ standard is left to cpp_extension (torch 2.13 builds with C++20).
NVCC_FLAGS = ["-O3", "--fmad=false"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def csrc_dir() -> Path:
    """The kernel sources: ``resilient_train/csrc/`` (package data, shipped in the wheel)."""
    return Path(__file__).resolve().parents[1] / "csrc"


def cache_dir() -> Path:
    root = os.environ.get("RESILIENT_TRAIN_CACHE")
    if not root and os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "resilient_train")
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "resilient_train")
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    return Path(root) / f"ext_torch{tag}"


def _simd_flags() -> list[str]:
    # The AVX2 path in quant_cpu.cpp is bit-identical to its scalar path; only enable it where
    # torch itself detected AVX2, so a cached build never meets a CPU that lacks it.
    cap = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2"] if cap in ("AVX2", "AVX512") else []


def _build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension  # lazy: pulls in setuptools

    src = csrc_dir()
    # the build command names the sources' path, and ninja rebuilds when the command changes: one
    # folder per source location, or two checkouts sharing the cache rebuild alternately, and a
    # worker restarted mid-run spent a round's deadline compiling (30 s seen in a test)
    where = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    build = cache_dir() / f"{kind}{'_avx2' if kind == 'cpu' and _simd_flags() else ''}-{where}"
    build.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        sources = [src / "quant_cpu.cpp"]
        flags: dict = {"extra_cflags": CPU_FLAGS + _simd_flags()}
    else:
        sources = [src / "quant_cuda.cpp", src / "quant_cuda.cu"]
        flags = {"extra_cflags": CPU_FLAGS, "extra_cuda_cflags": NVCC_FLAGS}
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {missing} (resilient_train/csrc/ ships with the package; reinstall it)")
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        raise RuntimeError(f"no C++ compiler ({compiler} or g++) on PATH; install one (e.g. apt install g++) and ninja to use the compiled codec")
    if kind == "cuda" and not (shutil.which("nvcc") or cpp_extension.CUDA_HOME):
        raise RuntimeError("no nvcc found (CUDA_HOME unset and nvcc not on PATH)")
    if not any(f.endswith(".so") for f in os.listdir(build)):
        log.warning("building the compiled %s codec once (~30-60 s) into %s", kind, build)
    with _build_lock(build):
        return cpp_extension.load(name=f"resilient_train_quant_{kind}", sources=[str(p) for p in sources],
                                  build_directory=str(build), verbose=False, **flags)


BUILD_LOCK_WAIT_S = 600.0
"""How long a process waits for another one's build of the same folder before it gives up on
the compiled codec (and uses the pure-torch codecs, same results)."""


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Serialise :func:`torch.utils.cpp_extension.load` on one build folder with a kernel lock.

    Every ``load`` (also of a finished build: it runs ninja to check) takes torch's FileBaton, a
    plain ``lock`` file that a process killed while holding it leaves behind; every later load
    then waits for it forever (a worker SIGKILLed in its first round, as torchrun does to a
    group whose peer died, would leave every process started after it hung). An ``flock`` is
    released by the kernel when its holder dies, and torch's baton is only taken under it, so a
    baton found by the holder of the flock was left by a dead process and is removed."""
    path = build / "build.flock"
    with open(path, "a+b") as fh:
        deadline, said = time.monotonic() + BUILD_LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building the codec in {build} for more than "
                                       f"{BUILD_LOCK_WAIT_S:.0f} s") from None
                if not said:
                    log.info("waiting for another process's build of the codec in %s", build)
                    said = True
                time.sleep(0.1)
        try:
            baton = build / "lock"
            if baton.exists():
                log.warning("removing the build lock %s left by a process killed while loading the codec", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load(kind: str, required: bool) -> ModuleType | None:
    with _lock:
        if kind not in _loaded:
            try:
                if kind == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                _loaded[kind] = _build(kind)
            except Exception as exc:  # a compiler/toolchain failure of any kind means "not here"
                _loaded[kind] = None
                _errors[kind] = f"{type(exc).__name__}: {exc}"
                first = _errors[kind].strip().splitlines()[0][:300] if _errors[kind].strip() else type(exc).__name__
                log.warning("compiled %s codec unavailable, using the pure-torch codecs (slower, same results): %s", kind, first)
                log.debug("why the %s codec could not be built: %s", kind, _errors[kind])
        mod = _loaded[kind]
    if mod is None and required:
        raise KernelUnavailableError(f"the {kind} codec kernel cannot be built or loaded here: {_errors[kind]}")
    return mod


def load_cpu(required: bool = False) -> ModuleType | None:
    """The C++ CPU twin (``csrc/quant_cpu.cpp``)."""
    return _load("cpu", required)


def load_cuda(required: bool = False) -> ModuleType | None:
    """The CUDA kernel (``csrc/quant_cuda.cu`` + ``csrc/quant_cuda.cpp``)."""
    return _load("cuda", required)
