"""Verified chunks of a checkpoint's files: fetched once, hashed from the buffer they are used from.

The fetch phase of a read (:mod:`.reader`): :class:`Chunks` reads the byte ranges the manifest has
a digest for (format v2's ``chunk_bytes`` ranges; the whole file in v1), concurrently, each from
the first replica whose copy hashes right, and caches them until dropped.
:func:`read_json_file` reads one JSON file of a step, verified and parsed strictly.

Failure behaviour: a chunk no replica serves intact raises the most specific
:class:`~resilient_train.errors.CorruptCheckpointError` seen (hash mismatch, truncated file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CorruptCheckpointError, HashMismatchError, ManifestError, SafetensorsHeaderError, StateFileError, StorageError
from ..format.jsontree import MAX_JSON_BYTES, loads_strict
from ..format.hashing import BLAKE3, SHA256, chunk_hexdigest, new_hasher
from ..format.manifest import FileRecord, Manifest
from ..format.names import MANIFEST_NAME, step_dirname
from ..format.safetensors_io import TensorSlot, parse_header
from ..storage import Store, redact

__all__ = ["Chunks", "read_json_file", "MAX_RUN_BYTES"]

log = logging.getLogger(__name__)

MAX_RUN_BYTES = 64 * 1024**2
"""Largest single ranged read: consecutive chunks of one file are fetched together up to this."""


_LABEL = {SHA256: "SHA-256", BLAKE3: "BLAKE3"}


def _label(algorithm: str) -> str:
    return _LABEL.get(algorithm, algorithm)


_HASH_POOL: ThreadPoolExecutor | None = None


_HASH_POOL_LOCK = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """One process-wide pool, a thread per core, for hashing the chunks of a ranged read."""
    global _HASH_POOL
    with _HASH_POOL_LOCK:
        if _HASH_POOL is None:
            _HASH_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="rt-hash")
        return _HASH_POOL


class Chunks:
    """Verified chunks of the files of one step, fetched once from the first replica whose copy
    hashes right (per chunk), cached until dropped. Thread-safe.

    A chunk is the unit the manifest has a digest for: format v2's ``chunk_bytes`` ranges, or
    the whole file in format v1. Every read is bounded by the manifest's size (the last chunk
    asks for one extra byte, to notice a file that grew).
    """

    def __init__(self, sources: Sequence[Store], manifest: Manifest, pool: ThreadPoolExecutor):
        self.sources = list(sources)
        self.manifest = manifest
        self.folder = step_dirname(manifest.step)
        self.algorithm = manifest.hash_algorithm
        self.pool = pool
        self.cache: dict[tuple[str, int], Any] = {}  # bytes, or memoryviews into one ranged read
        self.bytes_fetched = 0
        self.on_bytes: Callable[[int], None] | None = None  # progress: bytes fetched and hashed
        self.served: dict[str, dict[int, int]] = {}
        self._ranges: dict[str, list[tuple[int, int, str]]] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], threading.Event] = {}

    def ranges(self, file: str) -> list[tuple[int, int, str]]:
        r = self._ranges.get(file)
        if r is None:
            r = self._ranges[file] = self.manifest.chunks(self.manifest.file(file))
        return r

    def covering(self, file: str, start: int, end: int) -> list[int]:
        """Indices of the chunks that hold bytes ``[start, end)`` of ``file``."""
        r = self.ranges(file)
        if len(r) == 1:
            return [0]
        cb = self.manifest.chunk_bytes or 1
        if end <= start:
            return []
        return list(range(start // cb, (end - 1) // cb + 1))

    def _fetch(self, file: str, idx: int) -> bytes:
        start, end, digest = self.ranges(file)[idx]
        rec = self.manifest.file(file)
        last = end == rec.size_bytes
        path = f"{self.folder}/{file}"
        reasons: list[str] = []
        kinds: list[type] = []
        for i, store in enumerate(self.sources):
            try:
                data = store.read_bytes(path, start, end + 1 if last else end)
            except (StorageError, OSError) as exc:
                kinds.append(type(exc))
                reasons.append(redact(f"{store.name}: {type(exc).__name__}: {exc}"))
                continue
            with self._lock:
                self.bytes_fetched += len(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
            if len(data) != end - start:
                kinds.append(HashMismatchError)
                how = "longer" if len(data) > end - start else "shorter"
                reasons.append(f"{store.name}: {file} is {how} than the {rec.size_bytes} bytes the manifest records")
                continue
            if chunk_hexdigest(self.algorithm, data) != digest:
                kinds.append(HashMismatchError)
                what = "" if len(self.ranges(file)) == 1 else f" bytes [{start}, {end})"
                reasons.append(f"{store.name}: {file}{what} differ from the {_label(self.algorithm)} digest in the manifest")
                continue
            if i > 0:
                log.warning("%s chunk %d served by replica %s after: %s", file, idx, store.name, "; ".join(reasons))
            with self._lock:
                by_src = self.served.setdefault(file, {})
                by_src[i] = by_src.get(i, 0) + 1
            return data
        exc_type = next((k for k in kinds if issubclass(k, CorruptCheckpointError)), CorruptCheckpointError)
        raise exc_type(f"no replica has a valid copy of {self.folder}/{file}: " + "; ".join(reasons))

    def get(self, file: str, idx: int) -> Any:
        """The verified chunk, fetched now unless cached (concurrent callers share one fetch)."""
        key = (file, idx)
        while True:
            with self._lock:
                data = self.cache.get(key)
                if data is not None:
                    return data
                ev = self._inflight.get(key)
                if ev is None:
                    ev = self._inflight[key] = threading.Event()
                    break
            ev.wait()
            with self._lock:
                if key in self.cache:
                    return self.cache[key]
            # the other fetch failed: try ourselves
        try:
            data = self._fetch(file, idx)
            with self._lock:
                self.cache[key] = data
            return data
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            ev.set()

    def _fetch_run(self, file: str, idxs: list[int]) -> None:
        """Fetch consecutive chunks ``idxs`` of ``file`` with one ranged read from the first
        replica and verify each from that buffer; a chunk that fails (or a read that fails) is
        fetched alone through :meth:`get`, which tries every replica in order."""
        r = self.ranges(file)
        start, end = r[idxs[0]][0], r[idxs[-1]][1]
        last = end == self.manifest.file(file).size_bytes
        data: Any = None
        try:
            data = self.sources[0].read_bytes(f"{self.folder}/{file}", start, end + 1 if last else end)
            with self._lock:
                self.bytes_fetched += len(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
        except (StorageError, OSError):
            data = None  # get() below records why, per chunk and per replica
        mv = memoryview(data) if data is not None else None

        def digest_of(idx: int) -> str | None:
            c0, c1, _ = r[idx]
            if mv is None or len(mv) < c1 - start or (last and idx == idxs[-1] and len(mv) != end - start):
                return None
            return chunk_hexdigest(self.algorithm, mv[c0 - start:c1 - start])

        # The chunks of one read hash in parallel on every core (hashlib releases the GIL).
        digests = list(_hash_pool().map(digest_of, idxs)) if len(idxs) > 1 else [digest_of(idxs[0])]
        for idx, got in zip(idxs, digests):
            c0, c1, digest = r[idx]
            good = got == digest
            if good:
                with self._lock:
                    self.cache.setdefault((file, idx), mv[c0 - start:c1 - start])  # type: ignore[index]
                    by_src = self.served.setdefault(file, {})
                    by_src[0] = by_src.get(0, 0) + 1
            else:
                self.get(file, idx)

    def read_direct(self, file: str, idx: int, segments: Sequence[Any]) -> None:
        """Read chunk ``idx`` of ``file`` straight into ``segments`` (writable buffers that tile
        the chunk in order: slices of destination tensors, scratch for bytes no one uses) and
        hash those very buffers, in order: no staging copy, every byte hashed where it is used.
        Tries each replica in turn into the same buffers; raises like :meth:`get` when none
        serves the chunk intact (the buffers then hold unverified bytes: the caller's targets
        are partially written). A store with ``read_into`` (local files) scatters the read into
        the buffers; others read the range and copy it in, then the buffers are hashed."""
        start, end, digest = self.ranges(file)[idx]
        rec = self.manifest.file(file)
        last = end == rec.size_bytes
        path = f"{self.folder}/{file}"
        views = [memoryview(b).cast("B") for b in segments]
        if sum(len(v) for v in views) != end - start:
            raise ValueError(f"segments of {file} chunk {idx} hold {sum(len(v) for v in views)} bytes, the chunk {end - start}")
        extra = [bytearray(1)] if last else []  # one more byte: notices a file that grew
        reasons: list[str] = []
        kinds: list[type] = []
        for i, store in enumerate(self.sources):
            try:
                n = _read_into(store, path, start, end, last, views, extra)
            except (StorageError, OSError) as exc:
                kinds.append(type(exc))
                reasons.append(redact(f"{store.name}: {type(exc).__name__}: {exc}"))
                continue
            with self._lock:
                self.bytes_fetched += n
            if self.on_bytes is not None:
                self.on_bytes(n)
            if n != end - start:
                kinds.append(HashMismatchError)
                how = "longer" if n > end - start else "shorter"
                reasons.append(f"{store.name}: {file} is {how} than the {rec.size_bytes} bytes the manifest records")
                continue
            h = new_hasher(self.algorithm)
            for v in views:
                h.update(v)
            if h.hexdigest() != digest:
                kinds.append(HashMismatchError)
                what = "" if len(self.ranges(file)) == 1 else f" bytes [{start}, {end})"
                reasons.append(f"{store.name}: {file}{what} differ from the {_label(self.algorithm)} digest in the manifest")
                continue
            if i > 0:
                log.warning("%s chunk %d served by replica %s after: %s", file, idx, store.name, "; ".join(reasons))
            with self._lock:
                by_src = self.served.setdefault(file, {})
                by_src[i] = by_src.get(i, 0) + 1
            return
        exc_type = next((k for k in kinds if issubclass(k, CorruptCheckpointError)), CorruptCheckpointError)
        raise exc_type(f"no replica has a valid copy of {self.folder}/{file}: " + "; ".join(reasons))

    def read_direct_run(self, file: str, parts: Sequence[tuple[int, Sequence[Any]]]) -> None:
        """:meth:`read_direct` for consecutive chunks ``parts`` (``(index, segments)`` in
        order) of ``file``: one read from the first replica scatters the whole run into every
        chunk's buffers (a few large reads: from a cold page cache the disk serves 64 MiB
        requests about twice as fast as 8 MiB ones), then each chunk is hashed from its own
        buffers. A chunk that fails (or a read that fails) is read again alone through
        :meth:`read_direct`, which tries every replica in order and raises like it."""
        if len(parts) == 1:
            self.read_direct(file, parts[0][0], parts[0][1])
            return
        r = self.ranges(file)
        for (a, _), (b, _) in zip(parts, parts[1:]):
            if b != a + 1:
                raise ValueError(f"chunks {a} and {b} of {file} are not consecutive")
        views = [[memoryview(b).cast("B") for b in segs] for _, segs in parts]
        for (idx, _), vs in zip(parts, views):
            if sum(len(v) for v in vs) != r[idx][1] - r[idx][0]:
                raise ValueError(f"segments of {file} chunk {idx} hold {sum(len(v) for v in vs)} bytes, the chunk {r[idx][1] - r[idx][0]}")
        start, end = r[parts[0][0]][0], r[parts[-1][0]][1]
        last = end == self.manifest.file(file).size_bytes
        flat = [v for vs in views for v in vs]
        extra = [bytearray(1)] if last else []  # one more byte: notices a file that grew
        store = self.sources[0]
        n = -1
        try:
            n = _read_into(store, f"{self.folder}/{file}", start, end, last, flat, extra)
            with self._lock:
                self.bytes_fetched += n
            if self.on_bytes is not None:
                self.on_bytes(n)
        except (StorageError, OSError):
            n = -1  # read_direct below records why, per chunk and per replica

        def good(k: int) -> bool:
            if n != end - start:
                return False
            h = new_hasher(self.algorithm)
            for v in views[k]:
                h.update(v)
            return h.hexdigest() == r[parts[k][0]][2]

        # The chunks of one read hash in parallel on every core (the hashers release the GIL).
        ok = list(_hash_pool().map(good, range(len(parts))))
        for k, (idx, segs) in enumerate(parts):
            if ok[k]:
                with self._lock:
                    by_src = self.served.setdefault(file, {})
                    by_src[0] = by_src.get(0, 0) + 1
            else:
                self.read_direct(file, idx, segs)

    def runs(self, keys: Sequence[tuple[str, int]]) -> list[tuple[str, list[int]]]:
        """``keys`` (file, chunk index), deduplicated and sorted, grouped into runs of
        consecutive chunks of one file of at most :data:`MAX_RUN_BYTES` (each one read)."""
        out: list[tuple[str, list[int]]] = []
        run_bytes = 0
        for f, i in sorted(set(keys)):
            n = self.ranges(f)[i][1] - self.ranges(f)[i][0]
            if out and out[-1][0] == f and out[-1][1][-1] == i - 1 and run_bytes + n <= MAX_RUN_BYTES:
                out[-1][1].append(i)
                run_bytes += n
            else:
                out.append((f, [i]))
                run_bytes = n
        return out

    def prefetch(self, keys: Sequence[tuple[str, int]]) -> None:
        """Fetch and verify ``keys`` concurrently; raise the first failure after all finished.

        Consecutive chunks of a file are fetched as one ranged read of up to
        :data:`MAX_RUN_BYTES` (few, large requests on object stores, as a plain ``cat`` makes),
        each chunk hashed from that buffer, in parallel."""
        runs = self.runs([k for k in keys if k not in self.cache])
        futs = [self.pool.submit(self._fetch_run, f, idxs) for f, idxs in runs]
        first: BaseException | None = None
        for fut in futs:
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after every fetch ended
                first = first or exc
        if first is not None:
            raise first

    def drop(self, key: tuple[str, int]) -> None:
        with self._lock:
            self.cache.pop(key, None)

    def copy_into(self, file: str, start: int, end: int, out: np.ndarray) -> None:
        """Copy bytes ``[start, end)`` of ``file`` into the uint8 array ``out`` (verified chunks)."""
        for idx in self.covering(file, start, end):
            c0, c1, _ = self.ranges(file)[idx]
            data = self.get(file, idx)
            a, b = max(start, c0), min(end, c1)
            if a < b:
                out[a - start:b - start] = np.frombuffer(data, dtype=np.uint8, count=b - a, offset=a - c0)

    def read(self, file: str, start: int, end: int) -> bytes:
        out = np.empty(max(0, end - start), dtype=np.uint8)
        self.copy_into(file, start, end, out)
        return out.tobytes()

    def whole(self, file: str) -> bytes:
        return self.read(file, 0, self.manifest.file(file).size_bytes)

    def header(self, file: str) -> tuple[int, dict[str, TensorSlot]]:
        """Parse and validate the safetensors header of ``file`` against the manifest: every
        tensor the manifest places in the file is there with its dtype and shape, and the file
        holds no other tensor."""
        rec = self.manifest.file(file)
        where = f"{self.folder}/{file}"
        size = rec.size_bytes
        if size < 8:
            raise SafetensorsHeaderError(f"{where}: {size} bytes is too short for a safetensors file")
        prefix = self.read(file, 0, min(size, 8))
        try:
            data_start, slots, _ = parse_header(prefix, size, where=where)
        except SafetensorsHeaderError:
            raise
        except ValueError as exc:
            # parse_header checked the length against its limit and the file size first.
            (n,) = struct.unpack("<Q", prefix[:8])
            data_start, slots, _ = parse_header(self.read(file, 0, 8 + n), size, where=where)
        listed = {t.name: t for t in self.manifest.tensors if t.file == file}
        for name, t in listed.items():
            slot = slots.get(name)
            if slot is None or slot.dtype != t.dtype or slot.shape != t.shape:
                raise CorruptCheckpointError(f"{where}: tensor {name!r} is {slot.dtype + str(list(slot.shape)) if slot else 'missing'} in the file, the manifest says {t.dtype}{list(t.shape)}")
        extra = sorted(set(slots) - set(listed))
        if extra:
            raise CorruptCheckpointError(f"{where}: holds tensors the manifest does not list: {extra[:5]}")
        return data_start, slots

    def json(self, file: str) -> Any:
        rec = self.manifest.file(file)
        where = f"{self.folder}/{file}"
        if rec.size_bytes > MAX_JSON_BYTES:
            raise StateFileError(f"{where}: {rec.size_bytes} bytes exceeds the {MAX_JSON_BYTES}-byte limit for a JSON file")
        return loads_strict(self.whole(file), where=where)

    @property
    def needs_whole_pass(self) -> bool:
        """Formats 1 and 2 record a whole-file SHA-256 that a second pass over a multi-chunk
        file checks; format 3's file digest is the digest of the chunk digests, checked when the
        manifest was parsed, so every byte is hashed exactly once (against its chunk)."""
        return self.manifest.whole_file_digest

    def check_whole(self, file: str, digest: Any = None) -> None:
        """Check the manifest's whole-file SHA-256 of ``file`` against its verified chunks (all
        cached, or hashed into ``digest`` by the caller in order). A file of one chunk was
        checked when the manifest was parsed (its chunk digest must equal the whole-file one),
        and so was every format 3 file (its digest is the digest of its chunk digests).
        The chunks matched their own digests, so a mismatch is the manifest contradicting
        itself: ManifestError."""
        rec = self.manifest.file(file)
        r = self.ranges(file)
        if not self.needs_whole_pass:
            return
        if digest is None:
            if len(r) == 1:
                return
            digest = hashlib.sha256()
            for idx in range(len(r)):
                with self._lock:
                    data = self.cache.get((file, idx))
                if data is None:
                    data = self.get(file, idx)
                digest.update(data)
        got = digest.hexdigest()
        if got != rec.digest:
            raise ManifestError(
                f"{self.folder}/{MANIFEST_NAME}: the whole-file SHA-256 it records for {file} ({rec.digest}) differs from the "
                f"SHA-256 of the bytes its chunk digests verify ({got}): the manifest contradicts itself"
            )

    def source_names(self) -> dict[str, str]:
        return {f: self.sources[max(by, key=lambda i: by[i])].name for f, by in self.served.items() if by}


def _read_into(store: Store, path: str, start: int, end: int, last: bool, views: list[memoryview], extra: list[bytearray]) -> int:
    """Read ``[start, end)`` of ``path`` (one byte more when ``last``, into ``extra``) into
    ``views``, in order: one scatter read on a store with ``read_into`` (local files), else a
    ranged read copied in (only when it has exactly the expected length). Returns the bytes read."""
    if callable(getattr(type(store), "read_into", None)):
        return store.read_into(path, start, views + extra)  # type: ignore[attr-defined]
    data = store.read_bytes(path, start, end + 1 if last else end)
    if len(data) == end - start:
        pos = 0
        for v in views:
            v[:] = memoryview(data)[pos:pos + len(v)]
            pos += len(v)
    return len(data)


def read_json_file(sources: Sequence[Store], folder: str, rec: FileRecord) -> Any:
    """Read one JSON file of a step, verified against its file digest (the whole-file SHA-256 in
    formats 1 and 2, the digest of its chunk digests in format 3), parsed strictly."""
    reasons = []
    where = f"{folder}/{rec.path}"
    if rec.size_bytes > MAX_JSON_BYTES:
        raise StateFileError(f"{where}: {rec.size_bytes} bytes exceeds the {MAX_JSON_BYTES}-byte limit for a JSON file")
    for store in sources:
        try:
            data = store.read_bytes(where, 0, rec.size_bytes + 1)
        except (StorageError, OSError) as exc:
            reasons.append(redact(f"{store.name}: {exc}"))
            continue
        h = rec.new_digester()
        h.update(data)
        if len(data) != rec.size_bytes or h.hexdigest() != rec.digest:
            reasons.append(f"{store.name}: {rec.path} does not match its size and {_label(rec.hash_algorithm)} digest in the manifest")
            continue
        return loads_strict(data, where=where)
    raise CorruptCheckpointError(f"no readable copy of {where}: " + "; ".join(reasons))
