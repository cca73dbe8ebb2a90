"""The digest algorithms of the format: SHA-256 (versions 1 and 2) and BLAKE3 (version 3).

A manifest names its algorithm (``hash.algorithm``); every reader and ``ckpt verify`` hash with
the algorithm the manifest names, never with a default. BLAKE3 is the chunk digest of format 3
because it is the faster hash on the CPUs this library runs on (measured in
``benchmarks/bench_checkpoint.py``, ``hash_rates``: 3.4 GB/s per core with AVX2 against 1.5
GB/s for SHA-256 with the SHA instructions, see docs/format.md). Both release the GIL while they
hash a large buffer, so the chunks of a read hash on every core from a thread pool.

**The file digest of format 3** is the BLAKE3 of the concatenated 32-byte chunk digests, in
order (a digest of digests): one value per file that replicas and audits compare, which a
reader checks from the manifest alone (the chunks it names are the ones every byte is hashed
against) instead of hashing every byte a second time. In formats 1 and 2 the file digest is
the SHA-256 of the whole file.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

try:  # a dependency of the package; the import error is raised where format 3 is used
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is in the package's dependencies
    _blake3 = None

__all__ = ["SHA256", "BLAKE3", "ALGORITHMS", "chunk_hexdigest", "digest_of_digests", "FileDigester", "new_hasher"]

SHA256 = "sha256"
BLAKE3 = "blake3"
ALGORITHMS = (SHA256, BLAKE3)
"""The digest algorithms a manifest may name (each has 32-byte digests, 64 hex digits)."""


def _need_blake3() -> Any:
    if _blake3 is None:
        raise ImportError("format version 3 checkpoints are hashed with BLAKE3: pip install blake3")
    return _blake3


def new_hasher(algorithm: str) -> Any:
    """A fresh incremental hasher (``update``, ``hexdigest``, ``digest``) of ``algorithm``."""
    if algorithm == SHA256:
        return hashlib.sha256()
    if algorithm == BLAKE3:
        return _need_blake3().blake3()
    raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def chunk_hexdigest(algorithm: str, data: Any) -> str:
    """The digest of one buffer, hashed in place (no copy; the GIL is released while it runs)."""
    if algorithm == BLAKE3:
        return _need_blake3().blake3(data).hexdigest()
    if algorithm == SHA256:
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def digest_of_digests(algorithm: str, chunk_hex: Sequence[str]) -> str:
    """Format 3's file digest: the digest of the concatenated binary chunk digests, in order."""
    h = new_hasher(algorithm)
    for d in chunk_hex:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


class FileDigester:
    """A file's digest as the manifest records it, fed the file's bytes in any pieces:
    ``whole=True`` (formats 1 and 2) hashes the stream; otherwise (format 3) the stream is cut
    into ``chunk_bytes`` chunks and the digest of their digests is returned. ``hexdigest()``
    may be called once, at the end."""

    def __init__(self, algorithm: str, chunk_bytes: int | None, whole: bool):
        if not whole and not chunk_bytes:
            raise ValueError("a digest of chunk digests needs chunk_bytes")
        self.algorithm = algorithm
        self._whole = new_hasher(algorithm) if whole else None
        self._cb = chunk_bytes
        self._chunk = None if whole else new_hasher(algorithm)
        self._in_chunk = 0
        self._digests: list[str] = []

    def update(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        if self._whole is not None:
            self._whole.update(mv)
            return
        cb = self._cb
        while len(mv):
            n = min(len(mv), cb - self._in_chunk)  # type: ignore[operator]
            self._chunk.update(mv[:n])  # type: ignore[union-attr]
            self._in_chunk += n
            mv = mv[n:]
            if self._in_chunk == cb:
                self._digests.append(self._chunk.hexdigest())  # type: ignore[union-attr]
                self._chunk = new_hasher(self.algorithm)
                self._in_chunk = 0

    def hexdigest(self) -> str:
        if self._whole is not None:
            return self._whole.hexdigest()
        digests = list(self._digests)
        if self._in_chunk or not digests:
            digests.append(self._chunk.hexdigest())  # type: ignore[union-attr]
        return digest_of_digests(self.algorithm, digests)

