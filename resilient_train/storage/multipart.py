"""S3 multipart uploads and Azure staged blocks that a failed attempt leaves resumable, not lost.

:class:`FsspecStore` streams objects above ``single_put_bytes`` as a multipart upload of
``block_size_bytes`` parts. On S3 (s3fs) the upload is driven here, part by part, so that a
failure does not throw the committed parts away:

* Each part is sent with ``Content-MD5`` (the server rejects bytes that changed in transit)
  and its returned ETag is checked against the MD5 of what was sent.
* When an attempt fails with a *transient* error (connection reset, timeout, 5xx, an outage),
  the upload is **parked**: its ``UploadId`` is kept in this process, keyed by filesystem and
  object path, and nothing is aborted. Any other failure (a hash mismatch of the source, a
  permission error, an exception of the caller) aborts the upload as before.
* The next upload of the same path on the same filesystem (the retry of
  :class:`~resilient_train.storage.retry.RetryingStore`, of
  :func:`~resilient_train.storage.transfer.copy_file`, or a later replication catch-up) takes
  the parked upload, asks the server which parts it holds (``ListParts`` on that UploadId),
  and for each part re-reads and hashes its own bytes: a part whose size and ETag equal the
  MD5 of those bytes is reused; any other (a different size, a different ETag, an ETag that is
  not a plain MD5 as under SSE-KMS) is sent again. The caller's bytes are read and hashed
  in full on every attempt, so the whole-file digest checks of ``copy_file`` and the writer
  see every byte; only the network transfer of verified parts is skipped.
* An upload that the server no longer knows (aborted, expired) starts again from part 1.

What is not kept: parked uploads live in this process only (a restarted process starts its
uploads again; the parts it left are invisible and are removed by the bucket's
``AbortIncompleteMultipartUpload`` lifecycle rule, or by ``PARKED_MAX`` eviction below, which
aborts the oldest).

On Azure (adlfs) the blocks are staged here too (:class:`AzureBlockWriter`): a block's id
names its index and the MD5 of its bytes, and each upload first reads the blob's uncommitted
block list, so the blocks an earlier attempt staged from the same bytes are not sent again
(no parking needed: the server keeps uncommitted blocks per blob). GCS (resumable sessions)
still restarts a failed streamed upload from its first byte; see docs/storage.md.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .redact import redact
from .retry import classify

__all__ = ["S3MultipartWriter", "AzureBlockWriter", "is_s3", "is_azure", "parked_uploads", "PARKED_MAX", "MIN_PART_BYTES"]

log = logging.getLogger(__name__)

PARKED_MAX = 64
"""Parked uploads kept per filesystem; parking one more aborts the oldest on the server."""

MIN_PART_BYTES = 5 * 1024 * 1024
"""S3's smallest part (all but the last); smaller ``block_size_bytes`` are raised to it."""


class _OneInFlight:
    """At most one part on the wire, sent from its own thread, so that the caller hashes and
    buffers the next part meanwhile. A send's error is raised by the next ``submit``/``wait``."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._fut: Future | None = None

    def submit(self, fn: Any) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rt-part-upload")
        self._fut = self._pool.submit(fn)

    def wait(self) -> None:
        fut, self._fut = self._fut, None
        if fut is not None:
            fut.result()

    def shutdown(self) -> None:
        """Wait for the part on the wire (its error is dropped: the caller is failing already)."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass(frozen=True)
class _Parked:
    upload_id: str
    part_bytes: int


class _Parking:
    """Parked uploads of one filesystem, oldest first. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: OrderedDict[str, _Parked] = OrderedDict()

    def take(self, full: str) -> _Parked | None:
        with self._lock:
            return self._by_path.pop(full, None)

    def put(self, full: str, parked: _Parked) -> list[tuple[str, _Parked]]:
        """Park ``parked``; returns the entries evicted (the caller aborts them)."""
        with self._lock:
            old = self._by_path.pop(full, None)
            self._by_path[full] = parked
            out = [(full, old)] if old is not None and old.upload_id != parked.upload_id else []
            while len(self._by_path) > PARKED_MAX:
                out.append(self._by_path.popitem(last=False))
            return out

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return {k: v.upload_id for k, v in self._by_path.items()}


_PARKING: "weakref.WeakKeyDictionary[Any, _Parking]" = weakref.WeakKeyDictionary()
_PARKING_LOCK = threading.Lock()


def _parking(fs: Any) -> _Parking:
    with _PARKING_LOCK:
        p = _PARKING.get(fs)
        if p is None:
            p = _PARKING[fs] = _Parking()
        return p


def parked_uploads(fs: Any) -> dict[str, str]:
    """``{object path: UploadId}`` of the uploads parked for ``fs`` (for tests and tools)."""
    return _parking(fs).snapshot()


def is_s3(fs: Any) -> bool:
    """True for an s3fs filesystem (the backend whose multipart uploads are driven here)."""
    return type(fs).__module__.split(".")[0] == "s3fs" and hasattr(fs, "_call_s3")


def _plain_md5(etag: Any) -> str | None:
    """The MD5 hex an ETag carries, or None when it is not a plain MD5 (SSE-KMS, composite)."""
    if not isinstance(etag, str):
        return None
    e = etag.strip().strip('"').lower()
    return e if len(e) == 32 and all(c in "0123456789abcdef" for c in e) else None


class _PartWriter(ABC):
    """A write-only file that cuts what is written into parts of ``_part_bytes`` and hands each
    full part to ``_put_part`` (the last, shorter one is the subclass's ``close``)."""

    _part_bytes: int
    _buf: bytearray

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self._buf += mv
        while len(self._buf) >= self._part_bytes:
            self._put_part(bytes(self._buf[: self._part_bytes]))
            del self._buf[: self._part_bytes]
        return len(mv)

    @abstractmethod
    def _put_part(self, data: bytes) -> None:
        """Send one part (verified, or reused from an earlier attempt) of the object."""


class S3MultipartWriter(_PartWriter):
    """The streamed-upload file of :meth:`FsspecStore.open_write` on S3 (see module doc).

    ``write`` buffers up to one part and sends (or reuses) whole parts, one on the wire at a
    time from a thread while the next is hashed; ``close`` sends the last part and completes
    the upload; ``abort(exc)`` parks the upload when ``exc`` is
    transient and aborts it otherwise. ``bytes_sent`` and ``bytes_reused`` count part bytes
    sent over the network and part bytes found verified on the server.
    """

    def __init__(self, store: Any, full: str, part_bytes: int):
        self._store = store
        self._fs = store.fs
        self._full = full
        self._bucket, self._key, _ = self._fs.split_path(full)
        self._part_bytes = max(int(part_bytes), MIN_PART_BYTES)
        self._parking = _parking(self._fs)
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._on_server: dict[int, tuple[int, str | None]] | None = None
        self.upload_id: str | None = None
        self.resumed = False
        self.bytes_sent = 0
        self.bytes_reused = 0
        self.closed = False
        self._sender = _OneInFlight()
        parked = self._parking.take(full)
        if parked is not None:
            if parked.part_bytes == self._part_bytes:
                self.upload_id = parked.upload_id
                self.resumed = True
            else:  # other part boundaries: its parts cannot line up with ours
                self._abort_quietly(parked.upload_id)

    def _call(self, method: str, **kw: Any) -> Any:
        return self._store._run("call_s3", method, Bucket=self._bucket, Key=self._key, **kw)

    def _start(self) -> None:
        """Create the upload, or list what the server holds of the parked one (lazily: the
        first part, so a failure here is parked by ``abort`` like any other)."""
        if self.upload_id is not None and self._on_server is None and self.resumed:
            try:
                self._on_server = self._list_parts(self.upload_id)
            except Exception as exc:  # noqa: BLE001
                if classify(exc) != "not_found":
                    raise
                log.info("[%s] parked upload of %s is gone from the server (%s); starting it again", self._store.name, redact(self._full), type(exc).__name__)
                self.upload_id, self.resumed, self._on_server = None, False, None
            else:
                have = sum(size for size, _ in self._on_server.values())
                log.info("[%s] resuming the upload of %s: the server holds %d part(s), %d bytes; each is checked against the MD5 of our bytes",
                         self._store.name, redact(self._full), len(self._on_server), have)
        if self.upload_id is None:
            self.upload_id = self._call("create_multipart_upload")["UploadId"]
            self._on_server = {}

    def _list_parts(self, upload_id: str) -> dict[int, tuple[int, str | None]]:
        out: dict[int, tuple[int, str | None]] = {}
        marker = 0
        while True:
            resp = self._call("list_parts", UploadId=upload_id, PartNumberMarker=marker, MaxParts=1000)
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = (int(p["Size"]), _plain_md5(p.get("ETag")))
            if not resp.get("IsTruncated"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    def _put_part(self, data: bytes) -> None:
        if self._on_server is None:
            self._start()
        assert self._on_server is not None and self.upload_id is not None
        n = len(self._parts) + 1
        md5 = hashlib.md5(data, usedforsecurity=False)
        hexd = md5.hexdigest()
        size, etag = self._on_server.get(n, (-1, None))
        if size == len(data) and etag == hexd:
            self.bytes_reused += len(data)
        else:
            if n in self._on_server:
                log.info("[%s] part %d of %s on the server does not match our bytes (size %d vs %d, ETag %s); sending it again",
                         self._store.name, n, redact(self._full), size, len(data), "differs" if etag else "not an MD5")
            content_md5 = base64.b64encode(md5.digest()).decode()

            def send() -> None:
                out = self._call("upload_part", UploadId=self.upload_id, PartNumber=n, Body=data, ContentMD5=content_md5)
                got = _plain_md5(out.get("ETag"))
                if got is not None and got != hexd:
                    from ..errors import StorageError

                    raise StorageError(f"part {n} of {self._full!r}: the server's ETag {got} is not the MD5 {hexd} of the bytes sent",
                                       provider=self._store.name, path=self._full)
                self.bytes_sent += len(data)

            self._sender.submit(send)
        self._parts.append({"PartNumber": n, "ETag": f'"{hexd}"'})

    def close(self) -> None:
        """Send the last part and complete the upload (parts the server holds beyond ours are
        dropped by the completion)."""
        if self.closed:
            return
        if self._buf or not self._parts:
            self._put_part(bytes(self._buf))
            self._buf = bytearray()
        self._sender.wait()
        self._sender.shutdown()
        self._call("complete_multipart_upload", UploadId=self.upload_id, MultipartUpload={"Parts": self._parts})
        self.closed = True
        try:
            self._fs.invalidate_cache(self._full)
        except Exception:  # noqa: BLE001 - the listing cache is only an optimisation
            pass
        if self.resumed:
            log.info("[%s] resumed upload of %s completed: %d bytes reused from the server, %d sent", self._store.name, redact(self._full), self.bytes_reused, self.bytes_sent)

    def abort(self, exc: BaseException | None) -> None:
        """Park the upload when ``exc`` is transient (see module doc), abort it otherwise."""
        self._buf = bytearray()
        self._sender.shutdown()  # no part on the wire while the upload is parked or aborted
        if self.closed:
            return
        self.closed = True
        uid = self.upload_id
        if uid is None:
            return
        if exc is not None and classify(exc) == "transient":
            evicted = self._parking.put(self._full, _Parked(uid, self._part_bytes))
            log.info("[%s] upload of %s failed (%s); %d part(s) kept on the server for the retry", self._store.name, redact(self._full),
                     type(exc).__name__, len(self._parts))
            for path, old in evicted:
                self._abort_quietly(old.upload_id, path)
            return
        self._abort_quietly(uid)

    def _abort_quietly(self, upload_id: str, full: str | None = None) -> None:
        try:
            if full is None or full == self._full:
                self._call("abort_multipart_upload", UploadId=upload_id)
            else:
                bucket, key, _ = self._fs.split_path(full)
                self._store._run("call_s3", "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - best effort; the bucket's lifecycle rule is the backstop
            log.debug("[%s] abort of an upload of %s failed: %s", self._store.name, redact(self._full), redact(str(exc)))


# ---------------------------------------------------------------------------------- Azure


def is_azure(fs: Any) -> bool:
    """True for an adlfs filesystem (block blobs staged and committed here)."""
    return type(fs).__module__.split(".")[0] == "adlfs" and hasattr(fs, "service_client")


def _block_id(n: int, md5_hex: str) -> str:
    """Block ``n`` whose bytes have this MD5: 32 characters (Azure wants one id length per
    blob; adlfs's own ids are 32 too), so a block's id names its content."""
    return f"{n:05d}{md5_hex[:27]}"


class AzureBlockWriter(_PartWriter):
    """The streamed-upload file of :meth:`FsspecStore.open_write` on Azure (block blobs).

    Each part is staged as a block whose id is its index and the MD5 of its bytes
    (:func:`_block_id`), sent with ``validate_content`` (the server checks the MD5). Before the
    first block, the blob's *uncommitted* block list is read: a block there with our id for that
    index and the same size was staged from the same bytes (by an earlier attempt that failed)
    and is not sent again; anything else is sent. ``close`` commits our list (the server drops
    the other uncommitted blocks). Uncommitted blocks cannot be deleted on Azure: a failed
    upload leaves them until a commit of that blob or Azure's 7-day expiry, as adlfs did.
    Limit: a block staged under our id with other bytes of the same size (only a deliberate
    forgery could do that) is not detected here; the copy's whole-file check still reads the
    source, not the blob, so a later read verifies the object against the manifest.
    """

    def __init__(self, store: Any, full: str, part_bytes: int):
        self._store = store
        self._fs = store.fs
        self._full = full
        container, blob, _ = self._fs.split_path(full)
        self._container, self._blob = container, blob
        self._part_bytes = max(int(part_bytes), 1)
        self._buf = bytearray()
        self._ids: list[str] = []
        self._staged: dict[str, int] | None = None
        self._sender = _OneInFlight()
        self.bytes_sent = 0
        self.bytes_reused = 0
        self.closed = False

    def _run(self, fn: Any) -> Any:
        from fsspec.asyn import sync

        async def call() -> Any:
            async with self._fs.service_client.get_blob_client(self._container, self._blob) as bc:
                return await fn(bc)

        return sync(self._fs.loop, call, timeout=self._store.call_timeout_s)

    def _uncommitted(self) -> dict[str, int]:
        try:
            _, uncommitted = self._run(lambda bc: bc.get_block_list(block_list_type="uncommitted"))
        except Exception as exc:  # noqa: BLE001
            if classify(exc) == "not_found":
                return {}
            raise
        return {str(b.id): int(b.size) for b in uncommitted or []}

    def _put_part(self, data: bytes) -> None:
        if self._staged is None:
            self._staged = self._uncommitted()
            if self._staged:
                log.info("[%s] %s has %d uncommitted block(s) of an earlier attempt; blocks whose id names the same bytes are not sent again",
                         self._store.name, redact(self._full), len(self._staged))
        n = len(self._ids) + 1
        bid = _block_id(n, hashlib.md5(data, usedforsecurity=False).hexdigest())
        if self._staged.get(bid) == len(data):
            self.bytes_reused += len(data)
        else:
            def send() -> None:
                self._run(lambda bc: bc.stage_block(block_id=bid, data=data, length=len(data), validate_content=True))
                self.bytes_sent += len(data)

            self._sender.submit(send)
        self._ids.append(bid)

    def close(self) -> None:
        if self.closed:
            return
        if self._buf or not self._ids:
            self._put_part(bytes(self._buf))
            self._buf = bytearray()
        self._sender.wait()
        self._sender.shutdown()
        from azure.storage.blob import BlobBlock

        blocks = [BlobBlock(block_id=i) for i in self._ids]
        self._run(lambda bc: bc.commit_block_list(blocks))
        self.closed = True
        try:
            self._fs.invalidate_cache(self._full)
        except Exception:  # noqa: BLE001 - the listing cache is only an optimisation
            pass
        if self.bytes_reused:
            log.info("[%s] resumed upload of %s committed: %d bytes reused from staged blocks, %d sent", self._store.name, redact(self._full), self.bytes_reused, self.bytes_sent)

    def abort(self, exc: BaseException | None) -> None:
        """Nothing to abort on the server (uncommitted blocks cannot be deleted; see class doc)."""
        self._buf = bytearray()
        self._sender.shutdown()
        self.closed = True
