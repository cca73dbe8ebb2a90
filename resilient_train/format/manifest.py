"""The manifest: the commit record of a checkpoint (format version 3; versions 1 and 2 are read too).

Version 2 adds, for every file, the SHA-256 of each ``chunk_bytes``-sized chunk
(``chunk_sha256``), so any byte range verifies on its own: a reader hashes exactly the chunks
it fetches, in parallel, from the buffer it then uses. Version 1 has the whole-file digest only.
Version 3 names its digest algorithm (``hash.algorithm``: ``blake3`` by default, ``sha256``
accepted), lists each file's chunk digests as ``chunks`` and its file digest as ``digest``: the
digest of the concatenated chunk digests (see :mod:`.hashing`), which the parser checks against
the chunks, so a reader hashes every byte once, against its chunk, and never a whole file again.

``manifest.json`` is written last, after every file it lists is durable. Its bytes are
canonical (see :func:`~resilient_train.format.jsontree.dumps_canonical`) and pinned by tests.
Parsing validates everything a reader relies on, so a malformed or malicious manifest is
refused before any tensor is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ManifestError, UnsafePathError, UnsupportedFormatVersionError
from .jsontree import dumps_canonical
from .hashing import ALGORITHMS, BLAKE3, SHA256, FileDigester, digest_of_digests
from .names import FORMAT_NAME, FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from .safetensors_io import ITEMSIZE

__all__ = ["FileRecord", "TensorRecord", "Manifest", "check_filename", "chunk_count", "MAX_MANIFEST_BYTES", "MAX_MANIFEST_CONTAINERS", "MAX_MANIFEST_FILES", "MAX_MANIFEST_TENSORS", "TOP_LEVEL_KEYS", "DEFAULT_HASH_CHUNK_BYTES"]

MAX_MANIFEST_BYTES = 256 * 1024 * 1024

MAX_MANIFEST_FILES = 100_000
"""Most files one manifest may list (a step of world size 99,000 with its tensor files fits)."""

MAX_MANIFEST_TENSORS = 1_000_000
"""Most stored tensor pieces one manifest may list."""

MAX_MANIFEST_CONTAINERS = 4 * MAX_MANIFEST_TENSORS + 2 * MAX_MANIFEST_FILES + 16
"""Most JSON objects and arrays (counted as ``{`` and ``[`` bytes, before parsing) a manifest
may hold: each tensor record is an object with three lists, each file record an object with
one list. A manifest padded with millions of empty objects is refused before it is parsed."""

TOP_LEVEL_KEYS = frozenset({"files", "format", "format_version", "hash", "step", "tensors", "world"})
"""The top-level keys of formats 1, 2 and 3. Any other key is refused before its value is parsed
(a writer that needs a new key writes a new format version)."""

DEFAULT_HASH_CHUNK_BYTES = 8 * 1024 * 1024
"""Chunk size of the per-chunk digests written by default (see docs/format.md for the measurement)."""

MIN_HASH_CHUNK_BYTES = 4096
MAX_HASH_CHUNK_BYTES = 1024 * 1024 * 1024


def chunk_count(size_bytes: int, chunk_bytes: int) -> int:
    """Chunks of a file of ``size_bytes``: ``ceil(size / chunk_bytes)``, and 1 for an empty file."""
    return max(1, -(-size_bytes // chunk_bytes))

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_filename(name: Any) -> str:
    """A manifest file name must be a plain name inside the step folder (no folders at all)."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"file name {name!r} in manifest is not a non-empty string")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or ":" in name or not _SAFE_NAME.match(name):
        raise UnsafePathError(f"file name {name!r} in manifest would leave the checkpoint folder or is not a plain file name")
    return name


@dataclass(frozen=True)
class FileRecord:
    """One file: size, file digest and (format 2 and 3) the digest of every chunk, in the
    manifest's algorithm (:attr:`Manifest.hash_algorithm`). The file digest is the SHA-256 of
    the whole file in formats 1 and 2, the digest of the chunk digests in format 3."""

    path: str
    size_bytes: int
    digest: str
    chunk_digests: tuple[str, ...] | None = None
    format_version: int = FORMAT_VERSION
    hash_algorithm: str = SHA256
    chunk_bytes: int | None = None
    """The last three are the manifest's (set by :class:`Manifest`), so a record can check its
    file on its own (:meth:`new_digester`)."""

    def new_digester(self) -> FileDigester:
        """A hasher that, fed this file's bytes in order, returns the digest recorded here."""
        return FileDigester(self.hash_algorithm, self.chunk_bytes, whole=self.format_version < 3)

    @property
    def sha256(self) -> str:
        """The whole-file SHA-256 (formats 1 and 2 only; format 3 records no such digest)."""
        if self.format_version >= 3:
            raise AttributeError(f"{self.path}: a format {self.format_version} file record has no whole-file SHA-256; use .digest (see Manifest.hash_algorithm)")
        return self.digest

    def to_json(self) -> dict[str, Any]:
        if self.format_version >= 3:
            return {"chunks": list(self.chunk_digests or ()), "digest": self.digest, "path": self.path, "size_bytes": self.size_bytes}
        out: dict[str, Any] = {"path": self.path, "sha256": self.digest, "size_bytes": self.size_bytes}
        if self.chunk_digests is not None:
            out["chunk_sha256"] = list(self.chunk_digests)
        return out


@dataclass(frozen=True)
class TensorRecord:
    """One stored piece of a logical tensor.

    ``key`` is the logical name (``model/fc.weight``, ``optimizer/state/fc.weight/exp_avg``);
    ``name`` is its key inside ``file``. A whole tensor has ``offsets`` all zero and
    ``shape == global_shape``; a shard of a sharded tensor covers
    ``[offsets[d], offsets[d] + shape[d])`` in every dimension ``d``.
    """

    key: str
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    @property
    def is_whole(self) -> bool:
        return self.shape == self.global_shape

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "file": self.file,
            "global_shape": list(self.global_shape),
            "key": self.key,
            "name": self.name,
            "offsets": list(self.offsets),
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    files: tuple[FileRecord, ...]
    tensors: tuple[TensorRecord, ...]
    format_version: int = FORMAT_VERSION
    chunk_bytes: int | None = None
    """Formats 2 and 3: size of the chunks whose digests ``FileRecord.chunk_digests`` holds."""
    hash_algorithm: str = BLAKE3
    """The digest algorithm of every digest in the manifest (always SHA-256 in formats 1 and 2)."""
    _by_path: dict[str, FileRecord] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.format_version < 3:
            object.__setattr__(self, "hash_algorithm", SHA256)
        if self.hash_algorithm not in ALGORITHMS:
            raise ValueError(f"hash_algorithm must be one of {ALGORITHMS}, got {self.hash_algorithm!r}")
        stamp = (self.format_version, self.hash_algorithm, self.chunk_bytes)
        files = tuple(f if (f.format_version, f.hash_algorithm, f.chunk_bytes) == stamp else FileRecord(f.path, f.size_bytes, f.digest, f.chunk_digests, *stamp) for f in self.files)
        object.__setattr__(self, "files", tuple(sorted(files, key=lambda f: f.path)))
        object.__setattr__(self, "tensors", tuple(sorted(self.tensors, key=lambda t: (t.key, t.offsets, t.file))))
        object.__setattr__(self, "_by_path", {f.path: f for f in self.files})

    def file(self, path: str) -> FileRecord:
        try:
            return self._by_path[path]
        except KeyError:
            raise ManifestError(f"file {path!r} is not listed in the manifest of step {self.step}") from None

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def whole_file_digest(self) -> bool:
        """True when a file's digest is the hash of its bytes (formats 1 and 2), False when it
        is the digest of its chunk digests (format 3, checked when the manifest is parsed)."""
        return self.format_version < 3

    def chunks(self, rec: FileRecord) -> list[tuple[int, int, str]]:
        """``(start, end, digest)`` of every independently verifiable range of ``rec``: the
        chunks of formats 2 and 3, or the whole file as one range in format 1."""
        if rec.chunk_digests is None or self.chunk_bytes is None:
            return [(0, rec.size_bytes, rec.digest)]
        cb = self.chunk_bytes
        return [(i * cb, min(rec.size_bytes, (i + 1) * cb), d) for i, d in enumerate(rec.chunk_digests)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files": [f.to_json() for f in self.files],
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "tensors": [t.to_json() for t in self.tensors],
            "world": {"world_size": self.world_size},
        }
        if self.format_version >= 2:
            out["hash"] = {"algorithm": self.hash_algorithm, "chunk_bytes": self.chunk_bytes}
        return out

    def to_bytes(self) -> bytes:
        return dumps_canonical(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "manifest.json") -> "Manifest":
        """Parse and validate. Raises ManifestError (or a subclass) naming ``where``.

        Bounded before and while parsing, not only in bytes: at most
        :data:`MAX_MANIFEST_BYTES`, :data:`MAX_MANIFEST_CONTAINERS` objects and arrays (counted
        before parsing), :data:`~resilient_train.format.jsontree.MAX_JSON_DEPTH` levels, only
        the :data:`TOP_LEVEL_KEYS` (another key is refused before its value is parsed), at most
        :data:`MAX_MANIFEST_FILES` files and :data:`MAX_MANIFEST_TENSORS` tensor pieces."""
        obj = _loads_manifest(data, where)
        return cls.from_json(obj, where=where)

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "manifest.json") -> "Manifest":
        def fail(msg: str) -> ManifestError:
            return ManifestError(f"{where}: {msg}")

        if not isinstance(obj, dict):
            raise fail("top level must be a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise fail(f"'format' must be {FORMAT_NAME!r}, got {obj.get('format')!r}")
        version = obj.get("format_version")
        if type(version) is not int:
            raise fail("'format_version' must be an integer")
        if version not in READABLE_FORMAT_VERSIONS:
            raise UnsupportedFormatVersionError(
                f"{where}: format version {version} is not supported by this library (it reads versions "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}); upgrade resilient-train to read it"
            )
        chunk_bytes = None
        algorithm = SHA256
        if version >= 2:
            h = obj.get("hash")
            if not isinstance(h, dict) or set(h) != {"algorithm", "chunk_bytes"}:
                raise fail("'hash' must be an object with exactly 'algorithm' and 'chunk_bytes'")
            accepted = ALGORITHMS if version >= 3 else (SHA256,)
            if h["algorithm"] not in accepted:
                raise UnsupportedFormatVersionError(f"{where}: hash algorithm {str(h['algorithm'])[:40]!r} is not supported in format {version} (this library reads {', '.join(map(repr, accepted))})")
            algorithm = h["algorithm"]
            chunk_bytes = h["chunk_bytes"]
            if type(chunk_bytes) is not int or not MIN_HASH_CHUNK_BYTES <= chunk_bytes <= MAX_HASH_CHUNK_BYTES:
                raise fail(f"'hash.chunk_bytes' must be an integer in [{MIN_HASH_CHUNK_BYTES}, {MAX_HASH_CHUNK_BYTES}]")
        step = obj.get("step")
        if type(step) is not int or step < 0:
            raise fail("'step' must be a non-negative integer")
        world = obj.get("world")
        if not isinstance(world, dict) or type(world.get("world_size")) is not int or world["world_size"] < 1:
            raise fail("'world.world_size' must be a positive integer")
        unknown = sorted(set(obj) - TOP_LEVEL_KEYS)
        if unknown:
            raise fail(f"unknown top-level keys {[k[:40] for k in unknown[:5]]} (format {version} has exactly {sorted(TOP_LEVEL_KEYS)})")
        files_raw, tensors_raw = obj.get("files"), obj.get("tensors")
        if not isinstance(files_raw, list) or not isinstance(tensors_raw, list):
            raise fail("'files' and 'tensors' must be lists")
        if len(files_raw) > MAX_MANIFEST_FILES or len(tensors_raw) > MAX_MANIFEST_TENSORS:
            raise fail(f"lists {len(files_raw)} files and {len(tensors_raw)} tensor pieces; at most {MAX_MANIFEST_FILES} and {MAX_MANIFEST_TENSORS} are read")
        files = []
        seen: set[str] = set()
        for i, f in enumerate(files_raw):
            if not isinstance(f, dict):
                raise fail(f"files[{i}] must be an object")
            path = check_filename(f.get("path"))
            if path in seen:
                raise fail(f"file {path!r} is listed twice")
            seen.add(path)
            digest_key, chunks_key = ("digest", "chunks") if version >= 3 else ("sha256", "chunk_sha256")
            size, sha = f.get("size_bytes"), f.get(digest_key)
            if type(size) is not int or size < 0:
                raise fail(f"file {path!r}: 'size_bytes' must be a non-negative integer")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise fail(f"file {path!r}: '{digest_key}' must be 64 lowercase hex digits")
            chunk_sha = None
            if version >= 3:
                raw = f.get("chunks")
                want = chunk_count(size, chunk_bytes)  # type: ignore[arg-type]
                if not isinstance(raw, list) or len(raw) != want or not all(isinstance(d, str) and _SHA256.match(d) for d in raw):
                    raise fail(f"file {path!r}: 'chunks' must list {want} digests of 64 lowercase hex digits")
                chunk_sha = tuple(raw)
                if digest_of_digests(algorithm, chunk_sha) != sha:
                    raise fail(f"file {path!r}: 'digest' {sha} is not the {algorithm} of its chunk digests (the manifest contradicts itself)")
                extra_keys = set(f) - {"path", "size_bytes", "digest", "chunks"}
            elif chunk_bytes is not None:
                raw = f.get("chunk_sha256")
                want = chunk_count(size, chunk_bytes)
                if not isinstance(raw, list) or len(raw) != want or not all(isinstance(d, str) and _SHA256.match(d) for d in raw):
                    raise fail(f"file {path!r}: 'chunk_sha256' must list {want} digests of 64 lowercase hex digits")
                chunk_sha = tuple(raw)
                if len(chunk_sha) == 1 and chunk_sha[0] != sha:
                    # One chunk is the whole file: the two digests are of the same bytes.
                    raise fail(f"file {path!r}: 'sha256' {sha} differs from the digest of its only chunk {chunk_sha[0]} (the manifest contradicts itself)")
                extra_keys = set(f) - {"path", "sha256", "size_bytes", "chunk_sha256"}
            else:
                extra_keys = set(f) - {"path", "sha256", "size_bytes"}
            if extra_keys:
                raise fail(f"file {path!r}: unknown fields {sorted(extra_keys)}")
            files.append(FileRecord(path, size, sha, chunk_sha, version))
        tensors = []
        pieces: dict[tuple[str, str], str] = {}
        sizes = {f.path: f.size_bytes for f in files}
        first_of_key: dict[str, TensorRecord] = {}
        key_bytes: dict[str, int] = {}
        file_bytes: dict[str, int] = {}
        for i, t in enumerate(tensors_raw):
            if not isinstance(t, dict):
                raise fail(f"tensors[{i}] must be an object")
            key, fname, name, dtype = t.get("key"), t.get("file"), t.get("name"), t.get("dtype")
            if not isinstance(key, str) or not key or not isinstance(name, str) or not name:
                raise fail(f"tensors[{i}]: 'key' and 'name' must be non-empty strings")
            check_filename(fname)
            if fname not in seen:
                raise fail(f"tensor {key!r} lives in {fname!r}, which is not listed in 'files'")
            if dtype not in ITEMSIZE:
                raise fail(f"tensor {key!r}: unknown dtype {dtype!r}")
            shape, gshape, offs = t.get("shape"), t.get("global_shape"), t.get("offsets")
            for label, v in (("shape", shape), ("global_shape", gshape), ("offsets", offs)):
                if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
                    raise fail(f"tensor {key!r}: {label!r} must be a list of non-negative integers")
            if not (len(shape) == len(gshape) == len(offs)):
                raise fail(f"tensor {key!r}: shape, global_shape and offsets must have the same length")
            if any(o + s > g for o, s, g in zip(offs, shape, gshape)):
                raise fail(f"tensor {key!r}: piece at offsets {offs} of shape {shape} exceeds global shape {gshape}")
            if (fname, name) in pieces:
                raise fail(f"name {name!r} appears twice in file {fname!r}")
            pieces[(fname, name)] = key
            rec = TensorRecord(key, fname, name, dtype, tuple(shape), tuple(gshape), tuple(offs))
            # Bounded by the bytes that hold it: no allocation sized by a lying manifest.
            file_bytes[fname] = file_bytes.get(fname, 0) + rec.nbytes
            if file_bytes[fname] > sizes[fname]:
                raise fail(f"tensors of {fname!r} need more than its {sizes[fname]} bytes (at tensor {key!r})")
            first = first_of_key.setdefault(key, rec)
            if first.dtype != rec.dtype or first.global_shape != rec.global_shape:
                raise fail(f"tensor {key!r}: pieces disagree about dtype or global shape")
            key_bytes[key] = key_bytes.get(key, 0) + rec.nbytes
            tensors.append(rec)
        for key, first in first_of_key.items():
            whole = ITEMSIZE[first.dtype]
            for g in first.global_shape:
                whole *= g
            if whole > key_bytes[key]:
                raise fail(f"tensor {key!r}: global shape {list(first.global_shape)} holds more than its stored pieces")
        return cls(step=step, world_size=world["world_size"], files=tuple(files), tensors=tuple(tensors), format_version=version, chunk_bytes=chunk_bytes, hash_algorithm=algorithm)


def _loads_manifest(data: bytes, where: str) -> Any:
    """``loads_strict`` for a manifest, bounded in objects and top-level keys (see
    :meth:`Manifest.from_bytes`). The top-level object is walked key by key with the C
    scanner, so an unknown key is refused before its value is parsed."""
    import gc
    import json

    from .jsontree import MAX_JSON_DEPTH, strict_decoder

    def fail(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg}")

    if len(data) > MAX_MANIFEST_BYTES:
        raise fail(f"{len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit for this JSON file")
    data = bytes(data)
    containers = data.count(b"{") + data.count(b"[")  # an upper bound (brackets inside strings count too)
    if containers > MAX_MANIFEST_CONTAINERS:
        raise fail(f"holds {containers} JSON objects and arrays; a manifest has at most {MAX_MANIFEST_CONTAINERS}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"is not valid JSON (strict: UTF-8): {exc}") from None
    decoder = strict_decoder()
    ws = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    was_enabled = gc.isenabled()
    gc.disable()  # millions of containers, none of them cyclic: no collection passes while parsing
    try:
        i = ws(text, 0).end()
        if text[i:i + 1] != "{":
            raise ValueError("its top level must be a JSON object")
        i = ws(text, i + 1).end()
        if text[i:i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i:i + 1] != '"':
                    raise ValueError(f"expected a key at character {i}")
                key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                if key not in TOP_LEVEL_KEYS:
                    raise fail(f"unknown top-level key {key[:40]!r} (format versions 1 to 3 have exactly {sorted(TOP_LEVEL_KEYS)}); refused before reading its value")
                if key in out:
                    raise ValueError(f"duplicate key {key!r}")
                i = ws(text, i).end()
                if text[i:i + 1] != ":":
                    raise ValueError(f"expected ':' at character {i}")
                i = ws(text, i + 1).end()
                try:
                    out[key], i = decoder.scan_once(text, i)
                except StopIteration as exc:
                    raise ValueError(f"expected a value at character {exc.value}") from None
                i = ws(text, i).end()
                sep = text[i:i + 1]
                i = ws(text, i + 1).end()
                if sep == "}":
                    break
                if sep != ",":
                    raise ValueError(f"expected ',' or '}}' at character {i}")
        if text[i:].strip(" \t\n\r"):
            raise ValueError(f"extra data after the top-level object at character {i}")
    except RecursionError:
        raise fail(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        if isinstance(exc, ManifestError):
            raise
        raise fail(f"is not valid JSON (strict: UTF-8, no duplicate keys, no NaN or Infinity): {exc}") from None
    finally:
        if was_enabled:
            gc.enable()
    stack = [(v, 2) for v in out.values()]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise fail(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return out
