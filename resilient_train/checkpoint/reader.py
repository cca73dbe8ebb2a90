"""Reading one checkpoint: find -> validate -> parse -> fetch, hash and place each chunk once -> apply.

The **read** phase of the one load route (:func:`~resilient_train.checkpoint.loading.load_checkpoint`,
which ``rt.load`` calls). Collective: every rank calls :func:`read_checkpoint`. Every byte that reaches a live tensor or a JSON
parser is hashed from the very buffer it is then used from; nothing is read twice. Phases:

1. **find**: rank 0 picks the step (the highest with a valid manifest when none is given) on
   the first replica that has it, reads ``state.json`` and the Hugging Face index (verified,
   parsed strictly) and shares the manifest and the state with all ranks.
2. **validate**: the manifest is checked against the live objects (keys, dtypes, global
   shapes, coverage of every target by stored pieces, optimizer parameter groups, the shape of
   every JSON tree). Any mismatch raises StateMismatchError before anything is changed.
3. **parse**: each rank fetches and verifies the chunks holding the safetensors headers of the
   files it needs and its ``rank-NNNNN.json``, validates every header against the manifest and
   decodes every JSON tree. Still nothing is changed.
4. **fetch and place**: each rank fetches exactly the chunks holding the byte ranges it needs
   (ranged reads, concurrently on a thread pool; resharding happens here), hashes each chunk
   (format v2: per chunk; v1: the whole file is one chunk) and tries the next replica for a
   chunk that fails. When everything needed fits ``staging_budget_bytes``, all chunks are
   verified on every rank before the first live tensor is written, so a failed load leaves the
   state untouched. Beyond the budget, verified chunks are placed as they arrive and a later
   failure raises :class:`PartialLoadError` (the state was partially overwritten).
5. **apply**: optimizer, scheduler, sampler and stateful objects (rolled back if one of them
   refuses its state), then model tensors, extras and RNG states.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedError,
    HashMismatchError,
    ManifestError,
    PartialLoadError,
    ResilientTrainError,
    SafetensorsHeaderError,
    SignatureError,
    StateFileError,
    StateMismatchError,
    StorageError,
    TruncatedFileError,
)
from ..format.jsontree import MAX_JSON_BYTES, decode, loads_strict
from ..format.manifest import FileRecord, Manifest, TensorRecord
from ..format.names import HF_INDEX_NAME, MANIFEST_NAME, STATE_NAME, rank_state_filename, step_dirname
from ..format.safetensors_io import ST_TO_DTYPE, TensorSlot, parse_header
from ..progress import LOG_MIN_BYTES, Progress
from ..storage import Store, redact
from .collectives import Coordinator, describe
from .location import Location, as_location
from .planner import ReadOp, plan_reads, region_volume
from .steps import newest_committed, read_manifest
from .state import TrainState, local_piece, optimizer_fqns, rng_state, set_rng_state, checkpoint_module

__all__ = [
    "read_checkpoint",
    "LoadResult",
    "verify_checkpoint",
    "read_tensors",
    "read_whole_tensors",
    "read_json_file",
    "DEFAULT_STAGING_BUDGET_BYTES",
]

log = logging.getLogger(__name__)

DEFAULT_STAGING_BUDGET_BYTES = 4 * 1024**3
"""Bytes a load may hold in CPU buffers so that a failure leaves the live state untouched."""

DEFAULT_IO_THREADS = 8
"""Concurrent ranged reads per rank (I/O and hashing both release the GIL)."""

MAX_RUN_BYTES = 64 * 1024**2
"""Largest single ranged read: consecutive chunks of one file are fetched together up to this."""


@dataclass(frozen=True)
class LoadResult:
    step: int
    manifest: Manifest
    sources: dict[str, str] = field(default_factory=dict)
    """File name -> name of the store (replica) that served it (most of its chunks)."""
    seconds: float = 0.0
    bytes_fetched: int = 0
    """Bytes of checkpoint files this rank fetched and hashed (headers and JSON included; the
    manifest, which has no digest of its own, not)."""


# ------------------------------------------------------------------ finding checkpoints


# ------------------------------------------------------------------ verified chunks


def _sha256_hex(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


_HASH_POOL: ThreadPoolExecutor | None = None
_HASH_POOL_LOCK = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """One process-wide pool, a thread per core, for hashing the chunks of a ranged read."""
    global _HASH_POOL
    with _HASH_POOL_LOCK:
        if _HASH_POOL is None:
            _HASH_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="rt-hash")
        return _HASH_POOL


class _Chunks:
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
                kinds.append(TruncatedFileError)
                how = "longer" if len(data) > end - start else "shorter"
                reasons.append(f"{store.name}: {file} is {how} than the {rec.size_bytes} bytes the manifest records")
                continue
            if _sha256_hex(data) != digest:
                kinds.append(HashMismatchError)
                what = "" if len(self.ranges(file)) == 1 else f" bytes [{start}, {end})"
                reasons.append(f"{store.name}: {file}{what} differ from the SHA-256 in the manifest")
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
            return _sha256_hex(mv[c0 - start:c1 - start])

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

    def prefetch(self, keys: Sequence[tuple[str, int]]) -> None:
        """Fetch and verify ``keys`` concurrently; raise the first failure after all finished.

        Consecutive chunks of a file are fetched as one ranged read of up to
        :data:`MAX_RUN_BYTES` (few, large requests on object stores, as a plain ``cat`` makes),
        each chunk hashed from that buffer, in parallel."""
        missing = sorted({k for k in keys if k not in self.cache})
        cap = MAX_RUN_BYTES
        runs: list[tuple[str, list[int]]] = []
        run_bytes = 0
        for f, i in missing:
            n = self.ranges(f)[i][1] - self.ranges(f)[i][0]
            if runs and runs[-1][0] == f and runs[-1][1][-1] == i - 1 and run_bytes + n <= cap:
                runs[-1][1].append(i)
                run_bytes += n
            else:
                runs.append((f, [i]))
                run_bytes = n
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

    def source_names(self) -> dict[str, str]:
        return {f: self.sources[max(by, key=lambda i: by[i])].name for f, by in self.served.items() if by}


def read_json_file(sources: Sequence[Store], folder: str, rec: FileRecord) -> Any:
    """Read one JSON file of a step, verified against its whole-file SHA-256, parsed strictly."""
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
        if len(data) != rec.size_bytes or _sha256_hex(data) != rec.sha256:
            reasons.append(f"{store.name}: {rec.path} does not match its size and SHA-256 in the manifest")
            continue
        return loads_strict(data, where=where)
    raise CorruptCheckpointError(f"no readable copy of {where}: " + "; ".join(reasons))


def _check_index(index: Any, manifest: Manifest, where: str) -> None:
    """The Hugging Face index must name only model files of this checkpoint, for tensors they hold."""
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not isinstance(index.get("metadata", {}), dict):
        raise StateFileError(f"{where}: must be an object with a 'weight_map' object")
    in_file = {(t.file, t.name) for t in manifest.tensors}
    for name, fname in index["weight_map"].items():
        if not isinstance(fname, str) or (fname, name) not in in_file:
            raise StateFileError(f"{where}: maps {name!r} to {fname!r}, which does not hold it per the manifest")


def _check_state_tree(obj: Any, manifest: Manifest, where: str) -> None:
    """A state / rank-state file: an object whose trees decode (tags well-formed, every
    ``__tensor__`` reference stored in the checkpoint, optimizer tree well-shaped)."""
    if not isinstance(obj, dict):
        raise StateFileError(f"{where}: top level must be a JSON object")
    if "optimizer" in obj and not _optimizer_tree_ok(obj["optimizer"]):
        raise StateFileError(f"{where}: 'optimizer' must hold 'param_groups' (objects with a 'params' list of names) and 'state' (an object of objects)")
    keys = {t.key: None for t in manifest.tensors}
    try:
        decode(obj, keys)  # type: ignore[arg-type]
    except StateFileError as exc:
        raise StateFileError(f"{where}: {exc}") from None


def _manifest_problems(manifest: Manifest) -> list[str]:
    """What a committed manifest must list that this one does not (files named at fault)."""
    names = {f.path for f in manifest.files}
    out = []
    if STATE_NAME not in names:
        out.append(f"{MANIFEST_NAME}: does not list {STATE_NAME}")
    missing = [rank_state_filename(r) for r in range(manifest.world_size) if rank_state_filename(r) not in names]
    if missing:
        out.append(f"{MANIFEST_NAME}: world size {manifest.world_size} but no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return out


def verify_checkpoint(uri: Any, step: int | None = None, *, storage_options: Mapping[str, Any] | None = None, io_threads: int | None = None, verify_keys: Any = None, progress: bool = False) -> tuple[Manifest, list[str]]:
    """Re-hash every byte of a checkpoint and check it against the manifest: every chunk's
    SHA-256, every safetensors header against the tensors the manifest places there, every JSON
    file parsed strictly, and the manifest's own completeness. Returns ``(manifest, problems)``;
    no problems = valid. Each problem names the file at fault. With ``verify_keys`` the
    manifest's signature is checked first (SignatureError)."""
    store = as_location(uri, storage_options).primary
    if step is None:
        latest = newest_committed(store, keys=verify_keys, limit=1)
        if not latest:
            raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
        step = latest[0]
    manifest = read_manifest(store, step, keys=verify_keys)
    problems: list[str] = _manifest_problems(manifest)
    threads = io_threads or DEFAULT_IO_THREADS

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rt-verify") as pool, \
            Progress(manifest.total_bytes, f"verify {step_dirname(step)}", bar=progress, min_bytes=0 if progress else LOG_MIN_BYTES) as bar:
        chunks = _Chunks([store], manifest, pool)
        chunks.on_bytes = bar

        def one(rec: FileRecord) -> str | None:
            try:
                if rec.path.endswith(".safetensors"):
                    chunks.header(rec.path)
                elif rec.path.endswith(".json"):
                    obj = chunks.json(rec.path)
                    if rec.path == HF_INDEX_NAME:
                        _check_index(obj, manifest, rec.path)
                    else:
                        _check_state_tree(obj, manifest, rec.path)
                n = len(chunks.ranges(rec.path))
                for first in range(0, n, threads):  # a window of chunks at a time, hashed in parallel
                    window = [(rec.path, i) for i in range(first, min(n, first + threads))]
                    chunks.prefetch(window)
                    for key in window:
                        chunks.drop(key)
                return None
            except (ResilientTrainError, OSError) as exc:
                return redact(f"{rec.path}: {type(exc).__name__}: {exc}")
            finally:
                for idx in range(len(chunks.ranges(rec.path))):
                    chunks.drop((rec.path, idx))

        # Files one after another, but each file's chunks on every core.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rt-verify-file") as files_pool:
            problems += [p for p in files_pool.map(one, manifest.files) if p]
    return manifest, problems


# ------------------------------------------------------------------ targets


@dataclass
class _Target:
    key: str
    dest: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    live: bool = False
    """True when ``dest`` is a live tensor of the training state (written only once verified)."""


def _records_by_key(manifest: Manifest) -> dict[str, list[TensorRecord]]:
    out: dict[str, list[TensorRecord]] = {}
    for t in manifest.tensors:
        out.setdefault(t.key, []).append(t)
    return out


def _whole_target(key: str, recs: list[TensorRecord], device: torch.device | str = "cpu") -> _Target:
    r = recs[0]
    return _Target(key, torch.empty(r.global_shape, dtype=ST_TO_DTYPE[r.dtype], device=device), (0,) * len(r.global_shape), r.global_shape)


@dataclass
class _LoadPlan:
    targets: list[_Target]
    opt_tensors: dict[str, Any]
    tree_tensor_keys: list[str]


def _optimizer_tree_ok(saved: Any) -> bool:
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state", {}), dict):
        return False
    for g in saved["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or not all(isinstance(n, str) for n in g["params"]):
            return False
    return all(isinstance(k, str) and isinstance(v, dict) for k, v in saved.get("state", {}).items())


def _build_targets(state: TrainState, manifest: Manifest, shared: dict[str, Any], strict: bool) -> _LoadPlan:
    by_key = _records_by_key(manifest)
    problems: list[str] = []
    targets: list[_Target] = []

    def check(key: str, dtype: torch.dtype, gshape: tuple[int, ...]) -> bool:
        recs = by_key.get(key)
        if not recs:
            problems.append(f"{key}: missing from the checkpoint")
            return False
        r = recs[0]
        if ST_TO_DTYPE[r.dtype] != dtype:
            problems.append(f"{key}: checkpoint has dtype {ST_TO_DTYPE[r.dtype]}, the live tensor is {dtype}")
            return False
        if tuple(r.global_shape) != tuple(gshape):
            problems.append(f"{key}: checkpoint has shape {list(r.global_shape)}, the live tensor is {list(gshape)}")
            return False
        return True

    if state.model is not None:
        live = checkpoint_module(state.model).state_dict()
        for name, t in live.items():
            local, gshape, offs = local_piece(t)
            key = f"model/{name}"
            if check(key, local.dtype, gshape):
                targets.append(_Target(key, local, offs, gshape, live=True))
        if strict:
            live_keys = {f"model/{n}" for n in live}
            for key in sorted(k for k in by_key if k.startswith("model/") and k not in live_keys):
                problems.append(f"{key}: in the checkpoint but not in the model (pass strict=False to ignore)")

    opt_tensors: dict[str, Any] = {}
    if state.optimizer is not None:
        saved = shared.get("optimizer")
        if saved is None:
            problems.append("optimizer: the checkpoint holds no optimizer state")
        elif not _optimizer_tree_ok(saved):
            raise StateFileError(f"{STATE_NAME}: 'optimizer' must hold 'param_groups' (objects with a 'params' list of names) and 'state' (an object of objects)")
        else:
            live_groups = optimizer_fqns(state.model, state.optimizer)  # type: ignore[arg-type]
            saved_groups = [g.get("params", []) for g in saved["param_groups"]]
            if len(saved_groups) != len(live_groups):
                problems.append(f"optimizer: checkpoint has {len(saved_groups)} param groups, the optimizer has {len(live_groups)}")
            else:
                for i, (a, b) in enumerate(zip(saved_groups, live_groups)):
                    if set(a) != set(b) or len(a) != len(b):
                        missing = sorted(set(b) - set(a))[:3]
                        extra = sorted(set(a) - set(b))[:3]
                        problems.append(f"optimizer: param group {i} differs (missing {missing}, extra {extra})")
            params = {n: p for n, p in checkpoint_module(state.model).named_parameters(remove_duplicate=False)}  # type: ignore[union-attr]
            for fqn, entry in saved.get("state", {}).items():
                p = params.get(fqn)
                if p is None:
                    problems.append(f"optimizer: state for parameter {fqn!r}, which the model does not have")
                    continue
                for sname, v in entry.items():
                    if not (isinstance(v, dict) and set(v) == {"__tensor__"}):
                        continue
                    key = v["__tensor__"]
                    recs = by_key.get(key)
                    if not recs:
                        problems.append(f"{key}: missing from the checkpoint")
                        continue
                    r = recs[0]
                    local_p, p_gshape, p_offs = local_piece(p.data if not hasattr(p, "device_mesh") else p)
                    if tuple(r.global_shape) == tuple(p_gshape) and len(p_gshape) > 0:
                        dest = torch.empty(local_p.shape, dtype=ST_TO_DTYPE[r.dtype], device=local_p.device)
                        targets.append(_Target(key, dest, p_offs, p_gshape))
                        opt_tensors[key] = (dest, p)
                    else:
                        t = _whole_target(key, recs)
                        targets.append(t)
                        opt_tensors[key] = (t.dest, None)

    tree_keys: list[str] = []
    for label, wanted in (("scheduler", state.scheduler), ("sampler", state.sampler), ("extra", state.extra or None), *((f"stateful.{k}", v) for k, v in state.stateful.items())):
        if wanted is None:
            continue
        if label not in shared:
            if label == "extra":
                continue
            problems.append(f"{label}: the checkpoint holds no {label} state")
            continue
        for key, recs in by_key.items():
            if key == label or key.startswith(label + "/"):
                targets.append(_whole_target(key, recs))
                tree_keys.append(key)
    if state.extra == {} and "extra" in shared:
        for key, recs in by_key.items():
            if key == "extra" or key.startswith("extra/"):
                targets.append(_whole_target(key, recs))
                tree_keys.append(key)

    for t in targets:
        recs = by_key.get(t.key, [])
        _, covered = plan_reads(recs, t.offsets, tuple(t.dest.shape))
        if covered != region_volume(t.dest.shape):
            problems.append(f"{t.key}: stored pieces cover {covered} of the {region_volume(t.dest.shape)} elements this rank needs")
    if problems:
        head = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise StateMismatchError(f"checkpoint step {manifest.step} does not fit the training state: {head}")
    return _LoadPlan(targets, opt_tensors, tree_keys)


# ------------------------------------------------------------------ reading


@dataclass
class _Op:
    """One copy: bytes ``[begin, end)`` of ``file`` are the stored piece ``op.record`` (laid out
    as ``slot``), of which ``op`` places a region into ``target``."""

    target: "_Target"
    op: ReadOp
    file: str
    slot: TensorSlot
    begin: int
    end: int


def _plan_ops(manifest: Manifest, targets: list["_Target"], headers: Mapping[str, tuple[int, dict[str, TensorSlot]]]) -> list[_Op]:
    by_key = _records_by_key(manifest)
    ops = []
    for t in targets:
        read_ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        for op in read_ops:
            data_start, slots = headers[op.record.file]
            slot = slots[op.record.name]
            ops.append(_Op(t, op, op.record.file, slot, data_start + slot.begin, data_start + slot.end))
    ops.sort(key=lambda o: (o.file, o.begin))
    return ops


def _place(chunks: _Chunks, o: _Op) -> None:
    """Copy one op's verified bytes into its target (straight into the tensor when it is a
    whole contiguous CPU piece, else through a temporary of the stored piece)."""
    if o.end == o.begin:
        return
    dtype = ST_TO_DTYPE[o.slot.dtype]
    dest = o.target.dest
    direct = (
        o.op.is_whole_piece
        and tuple(dest.shape) == o.op.size
        and dest.device.type == "cpu"
        and dest.is_contiguous()
        and dest.dtype == dtype
    )
    if direct:
        chunks.copy_into(o.file, o.begin, o.end, dest.reshape(-1).view(torch.uint8).numpy())
        return
    tmp = torch.empty(o.slot.shape, dtype=dtype)
    chunks.copy_into(o.file, o.begin, o.end, tmp.reshape(-1).view(torch.uint8).numpy())
    src = tmp[tuple(slice(s, s + n) for s, n in zip(o.op.src_start, o.op.size))]
    dst = dest[tuple(slice(s, s + n) for s, n in zip(o.op.dst_start, o.op.size))]
    with torch.no_grad():
        dst.copy_(src)


def _batches(chunks: _Chunks, ops: list[_Op], budget: int) -> list[tuple[list[_Op], list[tuple[str, int]]]]:
    """Split ``ops`` (sorted by file and offset) into batches whose new chunks fit ``budget``
    (at least one op each). Each chunk is fetched by exactly one batch."""
    out: list[tuple[list[_Op], list[tuple[str, int]]]] = []
    seen: set[tuple[str, int]] = set()
    cur_ops: list[_Op] = []
    cur_keys: list[tuple[str, int]] = []
    cur_bytes = 0
    for o in ops:
        new = [(o.file, i) for i in chunks.covering(o.file, o.begin, o.end) if (o.file, i) not in seen]
        nbytes = sum(chunks.ranges(f)[i][1] - chunks.ranges(f)[i][0] for f, i in new)
        if cur_ops and cur_bytes + nbytes > budget:
            out.append((cur_ops, cur_keys))
            cur_ops, cur_keys, cur_bytes = [], [], 0
        cur_ops.append(o)
        cur_keys.extend(new)
        seen.update(new)
        cur_bytes += nbytes
    if cur_ops:
        out.append((cur_ops, cur_keys))
    return out


def read_tensors(sources: Sequence[Store], manifest: Manifest, targets: list["_Target"], source_of: Mapping[str, int] | None = None, io_threads: int = DEFAULT_IO_THREADS) -> int:
    """Fill ``targets`` (fresh tensors, not live state) from ``sources``, every byte hashed
    from the buffer it is copied from. Returns bytes fetched. ``source_of`` is ignored (kept
    for callers of the older two-pass reader: replicas are now chosen per chunk)."""
    with ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="rt-load") as pool:
        chunks = _Chunks(sources, manifest, pool)
        files = sorted(_needed_files(manifest, targets))
        headers = dict(zip(files, pool.map(chunks.header, files)))
        ops = _plan_ops(manifest, targets, headers)
        chunks.prefetch([(o.file, i) for o in ops for i in chunks.covering(o.file, o.begin, o.end)])
        for o in ops:
            _place(chunks, o)
        return chunks.bytes_fetched


def read_whole_tensors(sources: Sequence[Store], manifest: Manifest, prefix: str = "", io_threads: int = DEFAULT_IO_THREADS) -> dict[str, torch.Tensor]:
    """Every stored tensor whose key starts with ``prefix``, reassembled whole on the CPU (sharded
    pieces joined), every byte verified: key -> tensor."""
    targets = [_whole_target(key, recs) for key, recs in sorted(_records_by_key(manifest).items()) if key.startswith(prefix)]
    read_tensors(sources, manifest, targets, io_threads=io_threads)
    return {t.key: t.dest for t in targets}


def _needed_files(manifest: Manifest, targets: list["_Target"]) -> set[str]:
    by_key = _records_by_key(manifest)
    files = set()
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        files.update(op.record.file for op in ops)
    return files


def _wholly_needed(manifest: Manifest, targets: list["_Target"]) -> set[str]:
    """Files every stored piece of which some target reads whole."""
    by_key = _records_by_key(manifest)
    read_whole: set[tuple[str, str]] = set()
    partial: set[str] = set()
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        for op in ops:
            if op.is_whole_piece:
                read_whole.add((op.record.file, op.record.name))
            else:
                partial.add(op.record.file)
    in_file: dict[str, set[str]] = {}
    for rec in manifest.tensors:
        in_file.setdefault(rec.file, set()).add(rec.name)
    return {f for f, names in in_file.items() if f not in partial and all((f, n) in read_whole for n in names)}


def _verify_with_fallback(sources: Sequence[Store], folder: str, rec: FileRecord, manifest: Manifest) -> tuple[int | None, str | None, str | None]:
    """Compatibility shim for callers of the older two-pass reader: checks the header only
    (the bytes themselves are hashed when :func:`read_tensors` reads them)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            if rec.path.endswith(".safetensors"):
                _Chunks(sources, manifest, pool).header(rec.path)
            return 0, None, None
        except (ResilientTrainError, OSError) as exc:
            return None, describe(exc), type(exc).__name__


def _find(sources: Sequence[Store], step: int | None, keys: Any = None) -> tuple[int, Manifest]:
    """``step`` (default: the newest committed on any replica) and its manifest, read from the
    first replica that has it committed."""
    if step is None:
        latest = newest_committed(Location(sources), keys=keys, limit=1)
        if not latest:
            raise CheckpointNotFoundError("no committed checkpoint on any of: " + ", ".join(s.uri for s in sources))
        step = latest[0]
    errors: list[BaseException] = []
    for store in sources:
        try:
            return step, read_manifest(store, step, keys=keys)
        except (StorageError, CheckpointError, OSError) as exc:
            errors.append(exc)
    invalid = [e for e in errors if isinstance(e, (ManifestError, SignatureError))]
    if invalid:
        raise invalid[0]
    raise CheckpointNotFoundError(f"step {step} is not committed on any replica: " + "; ".join(redact(str(e)) for e in errors))


def _agree_or_raise(coord: Coordinator, error: BaseException | None) -> None:
    """Every rank raises if any rank failed; a rank's own typed error is re-raised as is."""
    msgs = coord.all_gather(None if error is None else describe(error))
    if error is not None:
        raise error
    failures = {r: m for r, m in enumerate(msgs) if m}
    if failures:
        raise DistributedError("checkpoint load failed on other ranks", failures)


_TYPED = (ResilientTrainError, OSError)


def _typed(exc: BaseException, what: str) -> BaseException:
    """Library errors pass through; anything else a malformed checkpoint can provoke becomes a
    typed error (never a raw KeyError/ValueError/TypeError/RuntimeError/RecursionError)."""
    if isinstance(exc, ResilientTrainError):
        return exc
    if isinstance(exc, MemoryError):
        return CorruptCheckpointError(f"{what}: ran out of memory (the checkpoint asks for more than this process can hold)")
    return CorruptCheckpointError(redact(f"{what}: {type(exc).__name__}: {exc}"))


def read_checkpoint(
    sources: Sequence[Store],
    state: TrainState,
    step: int | None = None,
    *,
    process_group: Any = None,
    strict: bool = True,
    io_threads: int | None = None,
    staging_budget_bytes: int | None = None,
    verify_keys: Any = None,
) -> LoadResult:
    """Read checkpoint ``step`` (default: the latest committed) from the replicas ``sources`` (in
    preference order: each chunk from the first whose copy verifies) into ``state``. Collective.
    The **read** phase of :func:`~resilient_train.checkpoint.loading.load_checkpoint`; see that
    module and this one for the promises and failure behaviour.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    budget = DEFAULT_STAGING_BUDGET_BYTES if staging_budget_bytes is None else staging_budget_bytes
    if budget < 0:
        raise ValueError(f"staging_budget_bytes must be >= 0, got {budget}")
    t0 = time.perf_counter()
    coord = Coordinator(process_group)
    threads = io_threads or DEFAULT_IO_THREADS
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rt-load") as pool:
        return _load(coord, list(sources), state, step, strict, pool, budget, t0, verify_keys)


def _load(coord: Coordinator, sources: list[Store], state: TrainState, step: int | None, strict: bool, pool: ThreadPoolExecutor, budget: int, t0: float, verify_keys: Any = None) -> LoadResult:
    # 1. find
    found: Any = None
    err: BaseException | None = None
    fetched_by_find = 0
    if coord.rank == 0:
        try:
            s, manifest = _find(sources, step, verify_keys)
            chunks0 = _Chunks(sources, manifest, pool)
            small = [STATE_NAME] + [HF_INDEX_NAME for f in manifest.files if f.path == HF_INDEX_NAME]
            chunks0.prefetch([(f, i) for f in small for i in range(len(chunks0.ranges(f)))])  # one round trip
            shared = chunks0.json(manifest.file(STATE_NAME).path)
            if not isinstance(shared, dict):
                raise StateFileError(f"{step_dirname(s)}/{STATE_NAME}: top level must be a JSON object")
            if any(f.path == HF_INDEX_NAME for f in manifest.files):
                _check_index(chunks0.json(HF_INDEX_NAME), manifest, f"{step_dirname(s)}/{HF_INDEX_NAME}")
            found = (manifest.to_bytes(), shared)
            fetched_by_find = chunks0.bytes_fetched
        except (ResilientTrainError, OSError) as exc:
            err = exc
    found = coord.broadcast(found if err is None else describe(err))
    if err is not None:
        raise err
    if isinstance(found, str):
        raise CheckpointError(f"rank 0 could not find the checkpoint: {found}")
    manifest = Manifest.from_bytes(found[0])
    shared = found[1]
    chunks = _Chunks(sources, manifest, pool)
    progress = Progress(manifest.total_bytes, f"load {step_dirname(manifest.step)}", min_bytes=LOG_MIN_BYTES)
    chunks.on_bytes = progress

    # 2. validate and 3. parse: nothing live changes before both passed on every rank.
    err = None
    plan: _LoadPlan | None = None
    prepared: _Prepared | None = None
    headers: dict[str, tuple[int, dict[str, TensorSlot]]] = {}
    try:
        try:
            plan = _build_targets(state, manifest, shared, strict)
            files = sorted(_needed_files(manifest, plan.targets))
            # Files this rank needs whole (the usual case) are fetched in one concurrent round
            # with their headers, within the budget; the others header first, then the ranges.
            whole = _wholly_needed(manifest, plan.targets)
            whole_bytes = sum(manifest.file(f).size_bytes for f in whole)
            rank_file = _rank_state_name(manifest, coord) if state.rng else None
            if rank_file is not None and any(f.path == rank_file for f in manifest.files):
                whole.add(rank_file)
            if whole and whole_bytes <= budget:
                chunks.prefetch([(f, i) for f in sorted(whole) for i in range(len(chunks.ranges(f)))])
            headers = dict(zip(files, pool.map(chunks.header, files)))
            rank_tree = _read_rank_state(chunks, manifest, coord) if state.rng else None
            prepared = _prepare_apply(state, shared, plan, rank_tree)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, MemoryError, RuntimeError) as exc:
            raise _typed(exc, f"checkpoint step {manifest.step}") from exc
    except _TYPED as exc:
        err = exc
    _agree_or_raise(coord, err)
    assert plan is not None and prepared is not None

    # 4. fetch, hash and place
    ops = _plan_ops(manifest, plan.targets, headers)
    refs: dict[tuple[str, int], int] = {}
    for o in ops:
        for i in chunks.covering(o.file, o.begin, o.end):
            refs[(o.file, i)] = refs.get((o.file, i), 0) + 1
    for key in list(chunks.cache):
        if key not in refs:
            chunks.drop(key)
    batches = _batches(chunks, ops, budget)
    staged = len(batches) <= 1

    def place(batch: list[_Op]) -> None:
        # Ops write disjoint regions, and the copies release the GIL: run them concurrently.
        list(pool.map(lambda o: _place(chunks, o), batch))
        for o in batch:
            for i in chunks.covering(o.file, o.begin, o.end):
                refs[(o.file, i)] -= 1
                if refs[(o.file, i)] == 0:
                    chunks.drop((o.file, i))

    touched = False
    err = None
    if staged:
        try:
            if batches:
                chunks.prefetch(batches[0][1])
        except _TYPED as exc:
            err = exc
        _agree_or_raise(coord, err)  # every rank verified everything it needs
        live = [o for o in ops if o.target.live]
        # Non-live targets (optimizer, scheduler, ... tensors) first, then the objects that may
        # still refuse their state (rolled back if one does), then the live tensors.
        place([o for o in ops if not o.target.live])
        undo: Callable[[], None] | None = None
        try:
            undo = _apply_objects(state, prepared)
        except _TYPED as exc:
            err = exc
        try:
            _agree_or_raise(coord, err)  # no rank changes its live tensors unless all objects took their state
        except ResilientTrainError:
            if undo is not None:
                undo()
            raise
        place(live)
        _apply_rest(state, prepared)
    else:
        try:
            for batch, keys in batches:
                chunks.prefetch(keys)
                place(batch)
                touched = touched or any(o.target.live for o in batch)
        except _TYPED as exc:
            err = exc
        flags = coord.all_gather((err is not None, touched))
        if any(f for f, _ in flags):
            if any(t for _, t in flags):
                raise PartialLoadError(
                    f"loading checkpoint step {manifest.step} failed after live tensors were overwritten "
                    f"(the load needed more than the {budget}-byte staging budget); the training state is "
                    f"partially overwritten: load another checkpoint: {redact(str(err)) if err else 'failed on another rank'}",
                    cause=err,
                )
            _agree_or_raise(coord, err)
        try:
            _apply_objects(state, prepared)
            _apply_rest(state, prepared)
        except CheckpointError as exc:
            raise PartialLoadError(f"checkpoint step {manifest.step}: live tensors were overwritten, then: {exc}", cause=exc) from exc
    coord.barrier()
    seconds = time.perf_counter() - t0
    log.info("loaded step %d (%d files, %.1f MB fetched, %s) in %.2f s", manifest.step, len(headers), chunks.bytes_fetched / 1e6, "staged" if staged else "streamed", seconds)
    progress.close()
    return LoadResult(manifest.step, manifest, chunks.source_names(), seconds, chunks.bytes_fetched + fetched_by_find)


def _rank_state_name(manifest: Manifest, coord: Coordinator) -> str:
    """The rank-state file this rank restores: its own, or ``rank % saved world size``."""
    return rank_state_filename(coord.rank if coord.rank < manifest.world_size else coord.rank % manifest.world_size)


def _read_rank_state(chunks: _Chunks, manifest: Manifest, coord: Coordinator) -> Any:
    name = _rank_state_name(manifest, coord)
    if not any(f.path == name for f in manifest.files):
        raise ManifestError(f"{step_dirname(manifest.step)}/{MANIFEST_NAME} lists no {name} (world size {manifest.world_size}): rank {coord.rank}'s RNG state cannot be restored")
    if manifest.world_size != coord.world_size:
        log.info("world size changed %d -> %d: rank %d takes RNG state from %s", manifest.world_size, coord.world_size, coord.rank, name)
    tree = chunks.json(name)
    if not isinstance(tree, dict):
        raise StateFileError(f"{step_dirname(manifest.step)}/{name}: top level must be a JSON object")
    return tree


@dataclass
class _Prepared:
    """Everything :func:`_apply_objects` and :func:`_apply_rest` set, decoded and checked."""

    optimizer: dict[str, Any] | None = None
    objects: list[tuple[Any, Any]] = field(default_factory=list)
    extra: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None


def _prepare_apply(state: TrainState, shared: dict[str, Any], plan: "_LoadPlan", rank_tree: Any) -> _Prepared:
    """Decode every JSON tree against the (not yet filled) target tensors. No side effects."""
    out = _Prepared()
    tensors = {t.key: t.dest for t in plan.targets}
    if state.optimizer is not None:
        saved = shared["optimizer"]
        opt_values: dict[str, Any] = {}
        for key, (dest, param) in plan.opt_tensors.items():
            if param is not None and hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor

                opt_values[key] = DTensor.from_local(dest, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
            else:
                opt_values[key] = dest
        live_groups = optimizer_fqns(state.model, state.optimizer)  # type: ignore[arg-type]
        fqn_to_index = {}
        groups = []
        idx = 0
        for live_fqns, saved_group in zip(live_groups, saved["param_groups"]):
            g = decode({k: v for k, v in saved_group.items() if k != "params"})
            g["params"] = list(range(idx, idx + len(live_fqns)))
            for fqn in live_fqns:
                fqn_to_index[fqn] = idx
                idx += 1
            groups.append(g)
        opt_state = {fqn_to_index[fqn]: decode(entry, opt_values) for fqn, entry in saved["state"].items()}
        out.optimizer = {"state": opt_state, "param_groups": groups}
    if state.scheduler is not None:
        out.objects.append((state.scheduler, decode(shared["scheduler"], tensors)))
    if state.sampler is not None:
        out.objects.append((state.sampler, decode(shared["sampler"], tensors)))
    for name, obj in state.stateful.items():
        out.objects.append((obj, decode(shared[f"stateful.{name}"], tensors)))
    if "extra" in shared:
        extra = decode(shared["extra"], tensors)
        if not isinstance(extra, dict):
            raise StateFileError(f"{STATE_NAME}: 'extra' must be an object")
        out.extra = extra
    if rank_tree is not None and "rng" in rank_tree:
        rng = decode(rank_tree["rng"])
        if not isinstance(rng, dict):
            raise StateFileError("rank state: 'rng' must be an object")
        out.rng = rng
    return out


def _copy_state(sd: Any) -> Any:
    """A copy of a state dict deep enough that a later load_state_dict cannot change it
    (containers copied, tensors kept: loads replace tensors, they do not write into them)."""
    if isinstance(sd, dict):
        return {k: _copy_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_copy_state(v) for v in sd]
    return sd


def _apply_objects(state: TrainState, p: _Prepared) -> Callable[[], None]:
    """Optimizer, scheduler, sampler, stateful objects and RNG: all or none. If one refuses its
    state, the ones already set get their previous state back and StateFileError is raised.
    Returns a function that restores the previous states (for a failure on another rank)."""
    done: list[tuple[Any, Any]] = []
    old_rng = rng_state() if p.rng is not None else None

    def undo() -> None:
        for obj, before in reversed(done):
            try:
                obj.load_state_dict(before)
            except Exception as exc:  # noqa: BLE001 - logged; the caller raises the cause
                log.error("could not restore the previous state of %s: %s", type(obj).__name__, exc)
        if old_rng is not None:
            set_rng_state(old_rng)

    try:
        # Each object's previous state is kept before it is set, so that one that fails
        # half-way through its own load_state_dict is restored too.
        if p.optimizer is not None and state.optimizer is not None:
            done.append((state.optimizer, _copy_state(state.optimizer.state_dict())))
            state.optimizer.load_state_dict(p.optimizer)
        for obj, value in p.objects:
            done.append((obj, _copy_state(obj.state_dict())))
            obj.load_state_dict(value)
        if p.rng is not None:
            set_rng_state(p.rng)
    except Exception as exc:  # noqa: BLE001 - rolled back, then raised typed
        undo()
        raise StateFileError(redact(f"the checkpoint's state was refused ({type(exc).__name__}: {exc}); the previous state was restored")) from exc
    return undo


def _apply_rest(state: TrainState, p: _Prepared) -> None:
    if p.extra is not None:
        state.extra.clear()
        state.extra.update(p.extra)
