"""The contract every Store keeps, as plain functions a test runs against any Store.

Usage (see ``tests/test_storage_conformance.py``)::

    for check in CHECKS:
        check(store)          # store: an empty Store rooted at a fresh prefix

Each check raises AssertionError with what broke. The checks use only the Store protocol, so
local folders, ``memory://`` and the S3 / Azure / GCS servers all run the same ones.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

from ..errors import StoreNotFoundError, UnsafePathError
from ..storage import Store

__all__ = ["CHECKS", "run_all"]


def check_roundtrip_bytes(store: Store) -> None:
    data = os.urandom(1000)
    store.write_bytes("a/b/c.bin", data)
    assert store.read_bytes("a/b/c.bin") == data
    assert store.size("a/b/c.bin") == 1000
    assert store.exists("a/b/c.bin")
    assert store.exists("a/b") or store.list("a") == ["b"]


def check_ranged_reads(store: Store) -> None:
    data = bytes(range(256)) * 4
    store.write_bytes("r.bin", data)
    assert store.read_bytes("r.bin", 10, 20) == data[10:20]
    assert store.read_bytes("r.bin", 1000) == data[1000:]
    with store.open_read("r.bin") as f:
        f.seek(500)
        assert f.read(4) == data[500:504]
        buf = bytearray(8)
        n = f.readinto(buf)
        assert n == 8 and bytes(buf) == data[504:512]


def check_stream_write_large(store: Store) -> None:
    """A multi-part upload (> one part of every backend's default) reads back bit-exact."""
    chunk = os.urandom(1 << 20)
    h = hashlib.sha256()
    with store.open_write("big/blob.bin") as f:
        for i in range(12):
            piece = chunk[i:] + chunk[:i]
            f.write(piece)
            h.update(piece)
    assert store.size("big/blob.bin") == 12 << 20
    g = hashlib.sha256()
    with store.open_read("big/blob.bin") as f:
        while True:
            b = f.read(3 << 20)
            if not b:
                break
            g.update(b)
    assert g.hexdigest() == h.hexdigest()


def check_failed_write_leaves_nothing(store: Store) -> None:
    class Boom(Exception):
        pass

    try:
        with store.open_write("partial.bin") as f:
            f.write(b"x" * 1000)
            raise Boom()
    except Boom:
        pass
    else:  # pragma: no cover
        raise AssertionError("the body's exception was swallowed")
    assert not store.exists("partial.bin"), "a write whose body raised left an object behind"


def check_list_and_delete(store: Store) -> None:
    for p in ("d/x/1", "d/x/2", "d/y", "d/z/deep/3"):
        store.write_bytes(p, b"1")
    assert store.list("d") == ["x", "y", "z"], store.list("d")
    assert store.list("d/x") == ["1", "2"]
    assert store.list("missing-folder") == []
    store.delete("d/y")
    assert store.list("d") == ["x", "z"]
    store.delete("d/x", recursive=True)
    assert store.list("d") == ["z"]
    store.delete("d/not-there")  # deleting what is gone is not an error


def check_missing_raises_not_found(store: Store) -> None:
    for call in (lambda: store.read_bytes("nope.bin"), lambda: store.size("nope.bin")):
        try:
            call()
        except StoreNotFoundError as exc:
            assert exc.provider == store.name
        else:  # pragma: no cover
            raise AssertionError("reading a missing object did not raise StoreNotFoundError")
    try:
        with store.open_read("nope.bin"):
            pass
    except StoreNotFoundError:
        pass
    else:  # pragma: no cover
        raise AssertionError("open_read of a missing object did not raise StoreNotFoundError")
    assert not store.exists("nope.bin")


def check_unsafe_paths_refused(store: Store) -> None:
    for bad in ("../escape", "/abs", "a/../../b", "a//b", "a\\b"):
        try:
            store.write_bytes(bad, b"x")
        except UnsafePathError:
            continue
        raise AssertionError(f"unsafe path {bad!r} was accepted")


def check_overwrite_and_child(store: Store) -> None:
    store.write_bytes("o/f", b"first")
    store.write_bytes("o/f", b"second")
    assert store.read_bytes("o/f") == b"second"
    child = store.child("o")
    assert child.read_bytes("f") == b"second"
    child.write_bytes("g", b"via child")
    assert store.read_bytes("o/g") == b"via child"
    assert child.name == store.name


def check_empty_object(store: Store) -> None:
    store.write_bytes("empty", b"")
    assert store.size("empty") == 0
    assert store.read_bytes("empty") == b""


def check_exclusive_create(store: Store) -> None:
    """Create-only writes: of 4 concurrent writers of one path exactly one wins, the others get
    StoreConflictError and the object holds the winner's bytes; a second write conflicts."""
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import StoreConflictError

    def one(i: int) -> str:
        try:
            store.write_bytes_exclusive("x/commit", b"writer %d" % i)
            return "won"
        except StoreConflictError:
            return "lost"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, range(4)))
    assert outcomes.count("won") == 1, f"expected exactly one winner, got {outcomes}"
    winner = outcomes.index("won")
    assert store.read_bytes("x/commit") == b"writer %d" % winner
    try:
        store.write_bytes_exclusive("x/commit", b"writer %d" % winner)
    except StoreConflictError:
        pass
    else:
        raise AssertionError("a create-only write over an existing object succeeded")
    assert store.list("x") == ["commit"], f"temporary files left behind: {store.list('x')}"
def _under_faults(store: Store, cut_after_bytes: int, cuts: int) -> tuple[Store, "object"]:
    """``store``'s backend with a mid-transfer fault injector under a fast retry layer.

    An fsspec backend is re-opened with a 1 MiB single-PUT limit and 5 MiB parts, so a cut
    falls in the middle of a real multipart / block / resumable upload."""
    from ..storage import FsspecStore, RetryingStore, RetryPolicy
    from .faults import FaultyStore

    inner = store.inner if isinstance(store, RetryingStore) else store
    if isinstance(inner, FsspecStore):
        inner = FsspecStore(inner._uri, inner._options, name=inner.name, single_put_bytes=1 << 20, block_size_bytes=5 << 20)
    faulty = FaultyStore(inner, cut_after_bytes=cut_after_bytes, cuts=cuts)
    policy = RetryPolicy(max_attempts=4, max_total_s=60, base_wait_s=0.01, max_wait_s=0.05, call_timeout_s=60, breaker_cooldown_s=0)
    return RetryingStore(faulty, policy), faulty


def check_mid_transfer_fault_is_retried(store: Store) -> None:
    """A connection dropped in the middle of an upload or a download is retried: the streamed
    (multipart) upload, the small upload completed at close, and a streamed read all succeed,
    bit-exact, and nothing partial is left."""
    retrying, faulty = _under_faults(store, cut_after_bytes=7 << 20, cuts=1)
    big = os.urandom(12 << 20)
    with retrying.open_write("cut/big.bin") as f:
        for i in range(0, len(big), 1 << 20):
            f.write(big[i : i + (1 << 20)])
    assert faulty.cuts_made == 1, "the upload was not cut: the check did not run"  # type: ignore[attr-defined]
    assert store.size("cut/big.bin") == len(big)
    assert hashlib.sha256(store.read_bytes("cut/big.bin")).digest() == hashlib.sha256(big).digest()

    retrying, faulty = _under_faults(store, cut_after_bytes=1 << 30, cuts=1)  # fails on completion
    small = os.urandom(300_000)
    with retrying.open_write("cut/small.bin") as f:
        f.write(small)
    assert faulty.cuts_made == 1  # type: ignore[attr-defined]
    assert store.read_bytes("cut/small.bin") == small

    retrying, faulty = _under_faults(store, cut_after_bytes=5 << 20, cuts=1)
    g = hashlib.sha256()
    with retrying.open_read("cut/big.bin") as f:
        while True:
            b = f.read(3 << 20)
            if not b:
                break
            g.update(b)
    assert faulty.cuts_made == 1  # type: ignore[attr-defined]
    assert g.digest() == hashlib.sha256(big).digest(), "a resumed download returned different bytes"
    assert store.list("cut") == ["big.bin", "small.bin"], store.list("cut")


CHECKS: list[Callable[[Store], None]] = [
    check_roundtrip_bytes,
    check_ranged_reads,
    check_stream_write_large,
    check_failed_write_leaves_nothing,
    check_list_and_delete,
    check_missing_raises_not_found,
    check_unsafe_paths_refused,
    check_overwrite_and_child,
    check_empty_object,
    check_exclusive_create,
    check_mid_transfer_fault_is_retried,
]


def run_all(store: Store) -> None:
    for check in CHECKS:
        check(store.child(check.__name__.removeprefix("check_")))
