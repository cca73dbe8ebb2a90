"""The phases of a save to one store: prepare, plan, write, commit (and the save's options).

The orchestration that runs them (collectively, through :mod:`.collectives`) is
:func:`~resilient_train.checkpoint.saving.save_checkpoint`; every save goes through it. Phases:

1. **prepare** (rank 0): refuse a step that is already committed. A torn or empty
   ``manifest.json`` left by a crash counts as uncommitted and is removed; other files of an
   earlier, uncommitted attempt are overwritten (never deleted: they might be a concurrent
   writer's).
2. **plan** (all ranks): gather what each rank holds, run the pure planner; identical result
   everywhere. Replicated tensors are spread across ranks, shards stay with their owners.
3. **write** (all ranks, in parallel, several files per rank on a thread pool): each file is
   hashed while it is written and made durable. Rank 0 also writes ``state.json`` and the
   Hugging Face index; every rank writes its ``rank-NNNNN.json``.
4. **commit** (rank 0): once every rank reported success, write ``manifest.sig`` when a
   signing key is set, then ``manifest.json`` last with a create-only write
   (:meth:`Store.write_bytes_exclusive`): of two writers of one step exactly one commits, the
   other raises :class:`CommitConflictError` on every rank.

A failure on any rank surfaces on every rank as one :class:`CheckpointWriteError` naming each
rank's cause; the previous committed checkpoint is untouched and the partial folder has no
manifest, so it is invisible to readers and removed by retention later.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ManifestError, ResilientTrainError, StoreConflictError
from ..progress import LOG_MIN_BYTES, Progress
from ..format.jsontree import dumps_canonical
from ..format.manifest import DEFAULT_HASH_CHUNK_BYTES, MAX_HASH_CHUNK_BYTES, MIN_HASH_CHUNK_BYTES, FileRecord, Manifest, TensorRecord
from ..format.hashing import ALGORITHMS, SHA256
from ..format.names import FORMAT_VERSION, HASH_ALGORITHM, HF_INDEX_NAME, MANIFEST_NAME, READABLE_FORMAT_VERSIONS, STATE_NAME, rank_state_filename
from ..format.safetensors_io import FileHasher, write_file_hashed
from ..format.signing import SigningKey
from ..storage import Store, redact
from .signatures import write_signature
from .planner import DEFAULT_MAX_FILE_BYTES, FilePlan, SavePlan
from .state import Snapshot

__all__ = ["SaveOptions", "SaveResult", "prepare_folder", "write_rank_files", "build_manifest", "commit_manifest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveOptions:
    """Tuning knobs of a save. ``io_threads``: files written concurrently per rank.
    ``format_version``: 3 (default: per-chunk digests of ``hash_chunk_bytes`` in
    ``hash_algorithm``, BLAKE3 unless set to ``"sha256"``, and a digest of the chunk digests per
    file), 2 (per-chunk and whole-file SHA-256, for readers older than format 3) or 1 (whole-file
    SHA-256 only, for readers older than format 2); ``hash_algorithm`` applies to format 3 only. ``signing_key``: sign every manifest
    (``manifest.sig``, see format/signing.py); never shown in reprs."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    io_threads: int = max(1, min(8, os.cpu_count() or 1))
    format_version: int = FORMAT_VERSION
    hash_chunk_bytes: int = DEFAULT_HASH_CHUNK_BYTES
    hash_algorithm: str = HASH_ALGORITHM
    signing_key: SigningKey | None = field(default=None, repr=False, compare=False)

    @property
    def _chunk_bytes(self) -> int | None:
        return self.hash_chunk_bytes if self.format_version >= 2 else None

    @property
    def _algorithm(self) -> str:
        return self.hash_algorithm if self.format_version >= 3 else SHA256

    def _hasher(self) -> FileHasher:
        return FileHasher(self._chunk_bytes, self._algorithm, whole=self.format_version < 3)

    def __post_init__(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"format_version must be one of {READABLE_FORMAT_VERSIONS}, got {self.format_version}")
        if self.hash_algorithm not in ALGORITHMS:
            raise ValueError(f"hash_algorithm must be one of {ALGORITHMS}, got {self.hash_algorithm!r}")
        if not MIN_HASH_CHUNK_BYTES <= self.hash_chunk_bytes <= MAX_HASH_CHUNK_BYTES:
            raise ValueError(f"hash_chunk_bytes must be in [{MIN_HASH_CHUNK_BYTES}, {MAX_HASH_CHUNK_BYTES}], got {self.hash_chunk_bytes}")
        if self.signing_key is not None and not isinstance(self.signing_key, SigningKey):
            raise ValueError(f"signing_key must be a resilient_train.format.signing.SigningKey, got {type(self.signing_key).__name__}")
        if self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")


@dataclass(frozen=True)
class SaveResult:
    step: int
    manifest: Manifest
    bytes_written_by_rank: int
    seconds: float


def prepare_folder(store: Store, folder: str) -> None:
    """Refuse a committed step; make a torn manifest (a crash while committing) uncommitted.

    Files of an earlier, uncommitted attempt are not deleted here: the new files overwrite the
    ones of the same name, readers only ever open what the manifest lists, and retention
    removes whole folders. Deleting them could destroy the files of a concurrent writer of the
    same step; the create-only commit decides between such writers instead.
    """
    names = store.list(folder)  # a fresh listing: also renews a client's stale listing cache
    if MANIFEST_NAME not in names:
        return
    try:
        data = store.read_bytes(f"{folder}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return
    try:
        Manifest.from_bytes(data, where=f"{store.uri}/{folder}/{MANIFEST_NAME}")
    except ManifestError as exc:
        log.warning("replacing the uncommitted %s/%s (torn manifest): %s", store.uri, folder, redact(str(exc))[:200])
        store.delete(f"{folder}/{MANIFEST_NAME}")
        return
    raise CheckpointError(f"step folder {folder} under {store.uri} is already committed; refusing to overwrite it")


def _write_one(store: Store, path: str, items: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None, opts: SaveOptions) -> FileRecord:
    cpu_items = [(n, t if t.device.type == "cpu" else t.to("cpu")) for n, t in items]
    hasher = opts._hasher()
    with store.open_write(path) as f:
        write_file_hashed(f, cpu_items, metadata, hasher)
    return FileRecord(path.rsplit("/", 1)[-1], *hasher.digests())


def _write_json(store: Store, path: str, obj: Any, opts: SaveOptions) -> FileRecord:
    data = dumps_canonical(obj)
    store.write_bytes(path, data)
    hasher = opts._hasher()
    hasher.update(data)
    return FileRecord(path.rsplit("/", 1)[-1], *hasher.digests())


def _hf_index(plan: SavePlan) -> dict[str, Any]:
    weight_map = {}
    total = 0
    for f in plan.files:
        if f.group == "model":
            for p in f.pieces:
                weight_map[p.name] = f.filename
                total += p.nbytes
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _tensor_records(plan: SavePlan) -> list[TensorRecord]:
    return [
        TensorRecord(p.key, f.filename, p.name, p.dtype, p.shape, p.global_shape, p.offsets)
        for f in plan.files
        for p in f.pieces
    ]


def build_manifest(step: int, world_size: int, records: list[FileRecord], plan: SavePlan, opts: SaveOptions) -> Manifest:
    """The manifest of a checkpoint whose files are ``records`` (every rank's)."""
    return Manifest(
        step=step, world_size=world_size, files=tuple(records), tensors=tuple(_tensor_records(plan)),
        format_version=opts.format_version, chunk_bytes=opts._chunk_bytes, hash_algorithm=opts._algorithm,
    )


def commit_manifest(store: Store, folder: str, manifest_bytes: bytes, key: SigningKey | None) -> None:
    """Signature first (if any), then the manifest, create-only: the commit point."""
    store.sync_folder(folder)
    if key is not None:
        write_signature(store, folder, manifest_bytes, key)
    mpath = f"{folder}/{MANIFEST_NAME}"
    try:
        store.write_bytes_exclusive(mpath, manifest_bytes)
    except StoreConflictError:
        # A client that lost the response to its PUT retries it inside the same call (botocore
        # does): the retry finds the object the first attempt created. Holding exactly this
        # save's bytes, it is this commit; anything else is another writer's.
        try:
            ours = store.read_bytes(mpath, 0, len(manifest_bytes) + 1) == manifest_bytes
        except (ResilientTrainError, OSError):
            ours = False
        if not ours:
            raise
        log.info("%s: the manifest already holds this save's bytes (a create whose response was lost): committed", mpath)
    store.sync_folder(folder)


def write_rank_files(store: Store, folder: str, snap: Snapshot, plan: SavePlan, rank: int, opts: SaveOptions) -> list[FileRecord]:
    """This rank's share of ``plan`` (several files at once on a thread pool, each hashed while it
    is written), rank 0's ``state.json`` and Hugging Face index, and this rank's rank-state file."""
    by_ident = {p.meta.ident: p.tensor for p in snap.pieces}
    mine: list[FilePlan] = plan.for_rank(rank)
    jobs = []
    for f in mine:
        items = [(p.name, by_ident[p.ident]) for p in f.pieces]
        meta = {"format": "pt"} if f.group in ("model", "model_shards") else None
        jobs.append((f"{folder}/{f.filename}", items, meta))
    json_jobs = [(f"{folder}/{rank_state_filename(rank)}", snap.rank_state)]
    if rank == 0:
        json_jobs.insert(0, (f"{folder}/{STATE_NAME}", snap.shared))
        if any(f.group == "model" for f in plan.files):
            json_jobs.insert(1, (f"{folder}/{HF_INDEX_NAME}", _hf_index(plan)))
    records: list[FileRecord] = []
    total = sum(t.numel() * t.element_size() for _, items, _ in jobs for _, t in items)
    # The JSON files are written (and fsynced) beside the tensor files, not after them: on a
    # busy disk each small fsync waits its turn.
    with ThreadPoolExecutor(max_workers=max(1, min(opts.io_threads, len(jobs))) + 1, thread_name_prefix="rt-save") as pool, \
            Progress(total, f"save {folder} (rank {rank})", min_bytes=LOG_MIN_BYTES) as progress:
        json_futures = [pool.submit(_write_json, store, path, obj, opts) for path, obj in json_jobs]
        futures = [pool.submit(_write_one, store, path, items, meta, opts) for path, items, meta in jobs]
        for fut in futures:
            records.append(fut.result())
            progress(records[-1].size_bytes)
        records.extend(fut.result() for fut in json_futures)
    return records
