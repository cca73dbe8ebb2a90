"""Fault injection: a Store wrapper that fails on purpose.

:class:`FaultyStore` wraps any Store. On each call it draws from a seeded RNG and, with
probability ``rate``, raises a transient failure (``ConnectionResetError``, ``TimeoutError`` or
an HTTP-503-like error) *before* the inner call runs, so an injected failure never leaves a
half-done side effect. With ``corrupt`` it flips a byte of everything read from paths that
match. ``down`` makes every call fail, as an unreachable provider would.

Mid-transfer faults: with ``cut_after_bytes=N`` (and ``cuts=k``), the next ``k`` streamed
transfers (``open_write`` and ``open_read`` bodies) break with a connection reset once ``N``
bytes have passed: the first ``N`` bytes really reach the backend (parts of a multipart
upload are sent), then the stream fails as a dropped connection would. An upload shorter than
``N`` bytes fails when it is completed instead (where small objects are sent). ``cuts_made``
counts them.

Put it *under* the retry layer to test that retries absorb it::

    store = RetryingStore(FaultyStore(inner, rate=0.3, seed=1), policy)
"""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import StoreTransientError
from ..storage import Store

__all__ = ["FaultyStore", "ServiceUnavailable"]


class ServiceUnavailable(Exception):
    """Looks like an HTTP 503 from a client library (``status_code`` is read by the classifier)."""

    status_code = 503


_FAULTS: list[Callable[[str], BaseException]] = [
    lambda what: ConnectionResetError(104, f"injected connection reset during {what}"),
    lambda what: TimeoutError(f"injected timeout during {what}"),
    lambda what: ServiceUnavailable(f"injected 503 Slow Down during {what}"),
]


class FaultyStore:
    """See module doc. ``ops``: which calls may fail (default: all). Thread-safe counters."""

    def __init__(
        self,
        inner: Store,
        rate: float = 0.0,
        *,
        seed: int = 0,
        ops: frozenset[str] | None = None,
        corrupt: Callable[[str], bool] | None = None,
        down: bool = False,
        cut_after_bytes: int | None = None,
        cuts: int = 1,
    ):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.inner = inner
        self.rate = rate
        self.ops = ops
        self.corrupt = corrupt
        self.down = down
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.cut_after_bytes = cut_after_bytes
        self._stats = {"calls": 0, "injected": 0, "cuts_left": cuts if cut_after_bytes is not None else 0, "cuts_made": 0}  # shared with children

    @property
    def calls(self) -> int:
        return self._stats["calls"]

    @property
    def injected(self) -> int:
        """How many failures were raised so far (this store and its children)."""
        return self._stats["injected"]

    @property
    def cuts_made(self) -> int:
        """How many transfers were broken in the middle so far."""
        return self._stats["cuts_made"]

    def _take_cut(self) -> bool:
        with self._lock:
            if self._stats["cuts_left"] <= 0:
                return False
            self._stats["cuts_left"] -= 1
            return True

    def _cut(self, what: str, n: int) -> ConnectionResetError:
        with self._lock:
            self._stats["cuts_made"] += 1
            self._stats["injected"] += 1
        return ConnectionResetError(104, f"injected connection reset after {n} bytes of {what}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def uri(self) -> str:
        return self.inner.uri

    def _maybe_fail(self, op: str, path: str) -> None:
        with self._lock:
            self._stats["calls"] += 1
            if self.down:
                self._stats["injected"] += 1
                raise StoreTransientError(f"injected outage: {op} {path!r}", provider=self.name, path=path) from ConnectionRefusedError(111, "Connection refused")
            if self.ops is not None and op not in self.ops:
                return
            if self._rng.random() >= self.rate:
                return
            self._stats["injected"] += 1
            fault = self._rng.choice(_FAULTS)(f"{op} {path!r}")
        raise fault

    def _flip(self, path: str, data: bytes) -> bytes:
        if self.corrupt is not None and self.corrupt(path) and data:
            b = bytearray(data)
            b[len(b) // 2] ^= 0xFF
            return bytes(b)
        return data

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        self._maybe_fail("open_write", path)
        cut = self.cut_after_bytes is not None and self._take_cut()
        with self.inner.open_write(path) as f:
            if not cut:
                yield f
                return
            w = _CuttingWriter(f, self.cut_after_bytes or 0, lambda n: self._cut(f"the upload of {path!r}", n))
            yield w  # type: ignore[misc]
            if not w.cut:
                raise self._cut(f"completing the upload of {path!r}", w.n)

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        self._maybe_fail("open_read", path)
        cut = self.cut_after_bytes is not None and self._take_cut()
        with self.inner.open_read(path) as f:
            out: Any = _CorruptingReader(f, lambda d: self._flip(path, d)) if self.corrupt and self.corrupt(path) else f
            if cut:
                out = _CuttingReader(out, self.cut_after_bytes or 0, lambda n: self._cut(f"the download of {path!r}", n))
            yield out

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        self._maybe_fail("read_bytes", path)
        data = self.inner.read_bytes(path, start, end)
        return self._flip(path, data)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._maybe_fail("write_bytes", path)
        self.inner.write_bytes(path, data)

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        self._maybe_fail("write_bytes_exclusive", path)
        self.inner.write_bytes_exclusive(path, data)

    def exists(self, path: str) -> bool:
        self._maybe_fail("exists", path)
        return self.inner.exists(path)

    def size(self, path: str) -> int:
        self._maybe_fail("size", path)
        return self.inner.size(path)

    def list(self, path: str = "") -> list[str]:
        self._maybe_fail("list", path)
        return self.inner.list(path)

    def delete(self, path: str, recursive: bool = False) -> None:
        self._maybe_fail("delete", path)
        self.inner.delete(path, recursive)

    def sync_folder(self, path: str) -> None:
        self.inner.sync_folder(path)

    def child(self, path: str) -> "FaultyStore":
        c = FaultyStore(self.inner.child(path), self.rate, ops=self.ops, corrupt=self.corrupt, down=self.down, cut_after_bytes=self.cut_after_bytes)
        c._rng, c._lock, c._stats = self._rng, self._lock, self._stats
        return c


class _CorruptingReader:
    """A read-only file whose every read goes through ``flip`` (corrupts the middle byte)."""

    def __init__(self, f: Any, flip: Callable[[bytes], bytes]):
        self._f = f
        self._flip = flip

    def read(self, n: int = -1) -> bytes:
        return self._flip(self._f.read(n))

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        mv = memoryview(buf).cast("B")
        mv[: len(data)] = data
        return len(data)

    def seek(self, *args: Any) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()


class _CuttingWriter:
    """Passes the first ``limit`` bytes to ``f``, then raises ``make(n)`` (a dropped connection)."""

    def __init__(self, f: Any, limit: int, make: Callable[[int], BaseException]):
        self._f, self._limit, self._make = f, limit, make
        self.n = 0
        self.cut = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        room = self._limit - self.n
        if len(mv) > room or self.cut:
            if room > 0 and not self.cut:
                self._f.write(mv[:room])
                self.n += room
            self.cut = True
            raise self._make(self.n)
        self._f.write(mv)
        self.n += len(mv)
        return len(mv)


class _CuttingReader:
    """Returns the first ``limit`` bytes of ``f``, then raises ``make(n)`` on further reads."""

    def __init__(self, f: Any, limit: int, make: Callable[[int], BaseException]):
        self._f, self._limit, self._make = f, limit, make
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        room = self._limit - self.n
        if room <= 0:
            raise self._make(self.n)
        data = self._f.read(room if n is None or n < 0 else min(n, room))
        self.n += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(memoryview(buf).cast("B")))
        mv = memoryview(buf).cast("B")
        mv[: len(data)] = data
        return len(data)

    def seek(self, *args: Any) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()
