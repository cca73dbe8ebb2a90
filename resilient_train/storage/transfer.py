"""Verified streaming copies between Stores, and running many transfers at once.

:func:`copy_file` streams one object from a source Store to a destination Store in chunks
(at most two chunks in memory, nothing staged on local disk), hashing on the way; objects
no larger than one chunk move as one GET and one PUT. When an
expected size and SHA-256 are given, a mismatch aborts the upload (nothing is left under the
destination path) and raises. A transient failure anywhere in the stream retries the whole
file (the source can be read again), under the destination's retry budget.

:func:`file_matches` re-hashes an existing object: the resumable-copy check.
:func:`run_concurrently` maps a function over items on a thread pool and reports every
failure, not only the first.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ..errors import HashMismatchError, StoreNotFoundError
from .base import Store
from .retry import NO_RETRY, RetryPolicy, call_with_retry

__all__ = ["copy_file", "file_matches", "sha256_of", "run_concurrently", "CHUNK_BYTES"]

CHUNK_BYTES = 32 * 1024 * 1024
T = TypeVar("T")
R = TypeVar("R")


def sha256_of(store: Store, path: str, chunk_bytes: int = CHUNK_BYTES, digester: Callable[[], Any] | None = None) -> tuple[int, str]:
    """``(size, sha256 hex)`` of ``path`` in ``store``, read as a stream (with ``digester``:
    the hex digest of that hasher factory instead, e.g. a manifest record's ``new_digester``)."""
    h = (digester or hashlib.sha256)()
    n = 0
    buf = bytearray(chunk_bytes)
    mv = memoryview(buf)
    with store.open_read(path) as f:
        while True:
            got = f.readinto(mv)
            if not got:
                break
            h.update(mv[:got])
            n += got
    return n, h.hexdigest()


def file_matches(store: Store, path: str, size_bytes: int, sha256: str, digester: Callable[[], Any] | None = None) -> bool:
    """True when ``path`` exists with exactly this size and SHA-256 (or ``digester``'s digest;
    cheap size check first)."""
    try:
        if store.size(path) != size_bytes:
            return False
    except StoreNotFoundError:
        return False
    return sha256_of(store, path, digester=digester) == (size_bytes, sha256)


def _verify(src: Store, src_path: str, dst: Store, n: int, digest: str, size_bytes: int | None, sha256: str | None) -> None:
    if size_bytes is not None and n != size_bytes:
        raise HashMismatchError(f"{src.name}:{src_path} is {n} bytes, expected {size_bytes}; not copied to {dst.name}")
    if sha256 is not None and digest != sha256:
        raise HashMismatchError(f"{src.name}:{src_path} has digest {digest}, expected {sha256}; not copied to {dst.name}")


def _copy_once(src: Store, src_path: str, dst: Store, dst_path: str, size_bytes: int | None, sha256: str | None, chunk_bytes: int, on_bytes: Callable[[int], None] | None,
               digester: Callable[[], Any]) -> tuple[int, str]:
    sent = 0
    try:
        if size_bytes is not None and size_bytes <= chunk_bytes:
            # Small object: one ranged GET and one PUT (both retried as single calls).
            data = src.read_bytes(src_path)
            h = digester()
            h.update(data)
            digest = h.hexdigest()
            _verify(src, src_path, dst, len(data), digest, size_bytes, sha256)
            dst.write_bytes(dst_path, data)
            if on_bytes is not None:
                on_bytes(len(data))
            return len(data), digest
        h = digester()
        n = 0
        with src.open_read(src_path) as fin, dst.open_write(dst_path) as fout, ThreadPoolExecutor(1, thread_name_prefix="rt-prefetch") as pre:
            # Read the next chunk while this one is hashed and uploaded.
            nxt = pre.submit(fin.read, chunk_bytes)
            while True:
                chunk = nxt.result()
                if not chunk:
                    break
                nxt = pre.submit(fin.read, chunk_bytes)
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                    sent += len(chunk)
            _verify(src, src_path, dst, n, h.hexdigest(), size_bytes, sha256)
        return n, h.hexdigest()
    except BaseException:
        if on_bytes is not None and sent:
            on_bytes(-sent)  # the progress bar must not count bytes that will be sent again
        raise


def copy_file(
    src: Store,
    src_path: str,
    dst: Store,
    dst_path: str | None = None,
    *,
    size_bytes: int | None = None,
    sha256: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    retry: RetryPolicy | None = None,
    on_bytes: Callable[[int], None] | None = None,
    digester: Callable[[], Any] | None = None,
) -> tuple[int, str]:
    """Stream ``src:src_path`` to ``dst:dst_path``; returns ``(size, sha256)`` of what was copied
    (``sha256`` and the result are ``digester``'s digests when it is given: a factory of hashers
    with ``update`` and ``hexdigest``, such as a manifest record's ``new_digester``).

    Raises HashMismatchError when the bytes (size or SHA-256) differ from the expected ones
    (the destination object is aborted), StoreNotFoundError when the source is missing, and
    StoreUnavailableError when transient failures outlast ``retry``. ``on_bytes`` is called
    with each chunk's size (negative to take back bytes of an attempt that failed).
    """
    dst_path = dst_path or src_path
    # The stores' own budgets: a store that does not retry (local, a test wrapper) is not retried here.
    policy = retry or getattr(dst, "policy", None) or getattr(src, "policy", None) or NO_RETRY
    return call_with_retry(
        lambda: _copy_once(src, src_path, dst, dst_path, size_bytes, sha256, chunk_bytes, on_bytes, digester or hashlib.sha256),
        policy,
        provider=dst.name,
        what=f"copy of {src_path!r} from {src.name}",
    )


def run_concurrently(fn: Callable[[T], R], items: Sequence[T] | Iterable[T], max_workers: int = 4, thread_name_prefix: str = "rt-transfer") -> tuple[list[R | None], list[tuple[T, BaseException]]]:
    """Run ``fn`` on every item with up to ``max_workers`` threads.

    Returns ``(results, failures)``: results in item order (None where it failed) and every
    ``(item, exception)`` that failed. Nothing is cancelled when one item fails.
    """
    items = list(items)
    results: list[Any] = [None] * len(items)
    failures: list[tuple[T, BaseException]] = []
    if not items:
        return results, failures
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))), thread_name_prefix=thread_name_prefix) as pool:
        futures = [pool.submit(fn, it) for it in items]
        for i, fut in enumerate(futures):
            try:
                results[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 - every failure is reported to the caller
                failures.append((items[i], exc))
    return results, failures
