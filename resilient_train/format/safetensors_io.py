"""Writing and strictly validating safetensors files, with their digests computed while writing.

Files written here are plain safetensors: ``safetensors.torch.load_file`` and Hugging Face
loaders read them. The header is JSON with keys in data order, padded with spaces to a multiple
of 8 bytes (as the reference implementation does), so bytes are deterministic for a given state.
"""

from __future__ import annotations

import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import torch

from ..errors import SafetensorsHeaderError
from .hashing import BLAKE3, SHA256, digest_of_digests, new_hasher
from .jsontree import loads_strict

__all__ = [
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "MAX_HEADER_BYTES",
    "TensorSlot",
    "build_header",
    "tensor_bytes",
    "write_file",
    "FileHasher",
    "parse_header",
    "CHUNK_BYTES",
]

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
ITEMSIZE = {st: torch.empty((), dtype=dt).element_size() for dt, st in DTYPE_TO_ST.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Headers above this are refused before they are read (the reference library uses 100 MB)."""

CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorSlot:
    """One tensor as described by a safetensors header: byte range relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if t.device.type != "cpu":
        raise ValueError("tensor_bytes needs a CPU tensor")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def build_header(entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[TensorSlot]]:
    """Return the full header (8-byte length + padded JSON) and the slots, in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    slots = []
    offset = 0
    for name, dtype, shape in entries:
        st = DTYPE_TO_ST.get(dtype)
        if st is None:
            raise TypeError(f"dtype {dtype} of {name!r} cannot be stored in safetensors")
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * ITEMSIZE[st]
        slot = TensorSlot(name, st, tuple(int(s) for s in shape), offset, offset + nbytes)
        header[name] = {"dtype": st, "shape": list(slot.shape), "data_offsets": [slot.begin, slot.end]}
        slots.append(slot)
        offset += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    body += b" " * ((8 - len(body) % 8) % 8)
    return struct.pack("<Q", len(body)) + body, slots


class FileHasher:
    """The digests of a byte stream fed in any pieces, as a manifest records them:
    ``digests()`` returns ``(size_bytes, file_digest, chunk_digests or None)``.

    ``whole=True`` (formats 1 and 2, SHA-256): the file digest is the hash of the whole stream,
    and with ``chunk_bytes`` each ``chunk_bytes`` chunk is hashed too. ``whole=False`` (format
    3): only the chunks are hashed (each byte once) and the file digest is the digest of their
    digests. BLAKE3 chunks hash on every core (its own threads, GIL released)."""

    def __init__(self, chunk_bytes: int | None = None, algorithm: str = SHA256, whole: bool = True):
        if not whole and not chunk_bytes:
            raise ValueError("whole=False needs chunk_bytes")
        self.size = 0
        self.algorithm = algorithm
        self._whole = new_hasher(algorithm) if whole else None
        self._chunk_bytes = chunk_bytes
        self._chunk = self._new_chunk() if chunk_bytes else None
        self._in_chunk = 0
        self._chunks: list[str] = []

    def _new_chunk(self):
        if self.algorithm == BLAKE3:
            import blake3

            return blake3.blake3(max_threads=blake3.blake3.AUTO)
        return new_hasher(self.algorithm)

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        if self._whole is not None:
            self._whole.update(mv)
        self.size += len(mv)
        if self._chunk is None:
            return
        cb = self._chunk_bytes
        while len(mv):
            n = min(len(mv), cb - self._in_chunk)  # type: ignore[operator]
            self._chunk.update(mv[:n])
            self._in_chunk += n
            mv = mv[n:]
            if self._in_chunk == cb:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = self._new_chunk()
                self._in_chunk = 0

    def digests(self) -> tuple[int, str, tuple[str, ...] | None]:
        if self._chunk is None:
            return self.size, self._whole.hexdigest(), None  # type: ignore[union-attr]
        chunks = list(self._chunks)
        if self._in_chunk or not chunks:
            chunks.append(self._chunk.hexdigest())
        if self._whole is None:
            return self.size, digest_of_digests(self.algorithm, chunks), tuple(chunks)
        return self.size, self._whole.hexdigest(), tuple(chunks)


def write_file(f: BinaryIO, tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Write one safetensors file to ``f``; return ``(size_bytes, sha256_hex)``.

    Hashing happens chunk by chunk while writing (hashlib releases the GIL on large buffers, so
    several files written from several threads use several cores). Tensors must be on the CPU.
    """
    hasher = FileHasher()
    write_file_hashed(f, tensors, metadata, hasher)
    size, sha, _ = hasher.digests()
    return size, sha


def write_file_hashed(f: BinaryIO, tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None, hasher: FileHasher) -> None:
    """Write one safetensors file to ``f``, feeding every byte written to ``hasher``.

    The bytes are hashed on a helper thread while they are written, from the same memory (the
    tensors, which must not change until this returns: a save writes from its staged copy);
    nothing is copied for the hash. Pieces reach the hasher in file order."""
    items = list(tensors)
    head, _ = build_header([(n, t.dtype, tuple(t.shape)) for n, t in items], metadata)
    hasher.update(head)
    _write_all(f, head)
    pieces = [mv[start:start + CHUNK_BYTES] for _, t in items for mv in (tensor_bytes(t),) for start in range(0, len(mv), CHUNK_BYTES)]
    if len(pieces) <= 1:
        for piece in pieces:
            hasher.update(piece)
            _write_all(f, piece)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rt-hash-write") as hash_thread:
        done = hash_thread.submit(lambda: [hasher.update(piece) for piece in pieces])
        try:
            offset = len(head)
            for piece in pieces:
                _write_all(f, piece)
                _start_writeback(f, offset, len(piece))
                offset += len(piece)
        finally:
            done.result()  # the hash of what was written (or its error) before the file closes


_SYNC_FILE_RANGE: Any = None


def _start_writeback(f: Any, offset: int, n: int) -> None:
    """Start writing ``[offset, offset + n)`` of a local file to disk now (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous), so the disk works while the next
    piece is written and the final fsync has little left to do. Measured here: 1 GiB written in
    16 MiB pieces then fsynced, 2.6-3.0 s against 3.1-5.4 s without. A no-op elsewhere (not a
    local file, not Linux); durability still comes from the fsync that closes the file."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is False or not isinstance(f, io.FileIO):
        return
    if _SYNC_FILE_RANGE is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _SYNC_FILE_RANGE = fn
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
            return
    _SYNC_FILE_RANGE(f.fileno(), offset, n, 2)  # SYNC_FILE_RANGE_WRITE; an error only means no head start


def _write_all(f: BinaryIO, data) -> None:
    mv = memoryview(data)
    while len(mv):
        n = f.write(mv)
        if n is None:  # buffered/remote writers consume everything and return None
            return
        mv = mv[n:]


def parse_header(prefix: bytes, file_size: int, *, where: str = "", max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[int, dict[str, TensorSlot], dict[str, str]]:
    """Validate a safetensors header. ``prefix`` must hold at least the 8-byte length.

    Returns ``(data_start, slots_by_name, metadata)``. If ``prefix`` is shorter than the whole
    header, raises ValueError carrying the needed length in ``args[1]`` (callers read more).
    Raises SafetensorsHeaderError for anything a well-formed file cannot contain: an oversized
    header, a header past the end of the file, non-JSON, unknown dtypes, negative or
    non-integer shapes, offsets that overlap, leave gaps, disagree with shape x itemsize, or
    run past the end of the file.
    """
    loc = f" in {where}" if where else ""
    if file_size < 8 or len(prefix) < 8:
        raise SafetensorsHeaderError(f"file too short for a safetensors header{loc} ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > max_header_bytes:
        raise SafetensorsHeaderError(f"safetensors header of {n} bytes{loc} exceeds the {max_header_bytes}-byte limit")
    if 8 + n > file_size:
        raise SafetensorsHeaderError(f"safetensors header{loc} claims {n} bytes but the file has only {file_size}")
    if len(prefix) < 8 + n:
        raise ValueError("need more header bytes", 8 + n)
    header = loads_strict(bytes(prefix[8:8 + n]), where=f"safetensors header{loc}", max_bytes=max_header_bytes, error=SafetensorsHeaderError)
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"safetensors header{loc} is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsHeaderError(f"safetensors __metadata__{loc} must map strings to strings")
    data_len = file_size - 8 - n
    slots: dict[str, TensorSlot] = {}
    for name, info in header.items():
        if not name:
            raise SafetensorsHeaderError(f"safetensors header{loc}: empty tensor name")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: entry must have exactly dtype, shape, data_offsets")
        st, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if st not in ITEMSIZE:
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: unknown dtype {st!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: shape {shape!r} is not a list of non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: data_offsets {offs!r} must be two ints")
        b, e = offs
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= b <= e <= data_len):
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: data_offsets {offs} lie outside the {data_len} data bytes")
        if e - b != numel * ITEMSIZE[st]:
            raise SafetensorsHeaderError(f"tensor {name!r}{loc}: {e - b} bytes do not hold shape {shape} of {st}")
        slots[name] = TensorSlot(name, st, tuple(shape), b, e)
    pos = 0
    for slot in sorted(slots.values(), key=lambda s: (s.begin, s.end)):
        if slot.begin != pos:
            raise SafetensorsHeaderError(f"tensor {slot.name!r}{loc}: data_offsets overlap or leave a gap at byte {pos}")
        pos = slot.end
    if pos != data_len:
        raise SafetensorsHeaderError(f"safetensors data{loc} is {data_len} bytes but the tensors cover {pos}")
    return 8 + n, slots, meta
