"""Saving: plan -> write shards -> commit the manifest. Collective over the process group.

Every rank calls :func:`save` (or :func:`write_snapshot`) with the same step. Phases:

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

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, CheckpointWriteError, CommitConflictError, ManifestError, ResilientTrainError, StoreConflictError
from ..progress import LOG_MIN_BYTES, Progress
from ..format.jsontree import dumps_canonical
from ..format.manifest import DEFAULT_HASH_CHUNK_BYTES, MAX_HASH_CHUNK_BYTES, MIN_HASH_CHUNK_BYTES, FileRecord, Manifest, TensorRecord
from ..format.names import FORMAT_VERSION, HF_INDEX_NAME, MANIFEST_NAME, READABLE_FORMAT_VERSIONS, STATE_NAME, rank_state_filename, step_dirname
from ..format.safetensors_io import FileHasher, write_file_hashed
from ..format.signing import SigningKey
from ..storage import Store, open_store, redact
from .collectives import Coordinator
from .planner import DEFAULT_MAX_FILE_BYTES, FilePlan, SavePlan, plan_save
from .state import Snapshot, TrainState, capture

__all__ = ["save", "write_snapshot", "SaveOptions", "SaveResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveOptions:
    """Tuning knobs of a save. ``io_threads``: files written concurrently per rank.
    ``format_version``: 2 (default, per-chunk digests of ``hash_chunk_bytes``) or 1 (whole-file
    digests only, for readers older than format 2). ``signing_key``: sign every manifest
    (``manifest.sig``, see format/signing.py); never shown in reprs."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    io_threads: int = max(1, min(8, os.cpu_count() or 1))
    format_version: int = FORMAT_VERSION
    hash_chunk_bytes: int = DEFAULT_HASH_CHUNK_BYTES
    signing_key: SigningKey | None = field(default=None, repr=False, compare=False)

    @property
    def _chunk_bytes(self) -> int | None:
        return self.hash_chunk_bytes if self.format_version >= 2 else None

    def __post_init__(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"format_version must be one of {READABLE_FORMAT_VERSIONS}, got {self.format_version}")
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


def save(
    uri: "str | Store",
    state: TrainState,
    step: int,
    *,
    process_group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    options: SaveOptions | None = None,
) -> SaveResult:
    """Save ``state`` as checkpoint ``step`` under ``uri``. Collective: every rank calls it.

    Returns once the manifest is written (the checkpoint is committed) on every rank.
    Raises CheckpointWriteError on every rank if any rank failed; ConfigError for a state
    that cannot be stored (raised on every rank).
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    coord = Coordinator(process_group)
    snap = capture(state, coord.rank, coord.world_size)
    return write_snapshot(open_store(uri, storage_options), snap, step, process_group=process_group, options=options)


def _prepare(store: Store, folder: str) -> None:
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


def _write_one(store: Store, path: str, items: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None, chunk_bytes: int | None = None) -> FileRecord:
    cpu_items = [(n, t if t.device.type == "cpu" else t.to("cpu")) for n, t in items]
    hasher = FileHasher(chunk_bytes)
    with store.open_write(path) as f:
        write_file_hashed(f, cpu_items, metadata, hasher)
    return FileRecord(path.rsplit("/", 1)[-1], *hasher.digests())


def _write_json(store: Store, path: str, obj: Any, chunk_bytes: int | None = None) -> FileRecord:
    data = dumps_canonical(obj)
    store.write_bytes(path, data)
    hasher = FileHasher(chunk_bytes)
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


def _agree(coord: Coordinator, error: str | None, what: str) -> None:
    """Raise the same CheckpointWriteError on every rank if any rank reports an error."""
    errors = coord.all_gather(error)
    failures = {r: e for r, e in enumerate(errors) if e}
    if failures:
        raise CheckpointWriteError(f"checkpoint {what} failed", failures)


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


def write_snapshot(
    store: Store,
    snap: Snapshot,
    step: int,
    *,
    process_group: Any = None,
    options: SaveOptions | None = None,
) -> SaveResult:
    """Write an already captured :class:`Snapshot` as checkpoint ``step`` (see module doc).

    The snapshot's tensors must stay unchanged until this returns (async savers pass copies).
    """
    opts = options or SaveOptions()
    coord = Coordinator(process_group)
    folder = step_dirname(step)
    t0 = time.perf_counter()

    err = None
    if coord.rank == 0:
        try:
            _prepare(store, folder)
        except ResilientTrainError as exc:
            err = _describe(exc)
    _agree(coord, err, f"preparation of {folder}")

    plan = plan_save(coord.all_gather(snap.metas()), opts.max_file_bytes)

    records: list[FileRecord] = []
    err = None
    try:
        records = _write_rank_files(store, folder, snap, plan, coord, opts)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        log.error("rank %d failed writing %s: %s", coord.rank, folder, _describe(exc))
        err = _describe(exc)
    _agree(coord, err, f"write of {folder} to {store.uri}")
    all_records = [r for rank_records in coord.all_gather(records) for r in rank_records]
    manifest = Manifest(
        step=step, world_size=coord.world_size, files=tuple(all_records), tensors=tuple(_tensor_records(plan)),
        format_version=opts.format_version, chunk_bytes=opts._chunk_bytes,
    )

    err = None
    if coord.rank == 0:
        try:
            _commit(store, folder, manifest.to_bytes(), opts.signing_key)
        except Exception as exc:  # noqa: BLE001
            err = _describe(exc)
    errs = coord.all_gather(err)
    if errs[0] and errs[0].startswith(StoreConflictError.__name__):
        raise CommitConflictError(f"step {step} under {store.uri} was committed by another writer first; this save did not commit ({errs[0]})")
    failures = {r: e for r, e in enumerate(errs) if e}
    if failures:
        raise CheckpointWriteError(f"checkpoint commit of {folder} failed", failures)
    seconds = time.perf_counter() - t0
    written = sum(r.size_bytes for r in records)
    log.info("saved step %d to %s: %d files, %.1f MB by rank %d in %.2f s", step, store.uri, len(records), written / 1e6, coord.rank, seconds)
    return SaveResult(step, manifest, written, seconds)


def _commit(store: Store, folder: str, manifest_bytes: bytes, key: SigningKey | None) -> None:
    """Signature first (if any), then the manifest, create-only: the commit point."""
    from .signatures import write_signature

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


def _write_rank_files(store: Store, folder: str, snap: Snapshot, plan: SavePlan, coord: Coordinator, opts: SaveOptions) -> list[FileRecord]:
    by_ident = {p.meta.ident: p.tensor for p in snap.pieces}
    mine: list[FilePlan] = plan.for_rank(coord.rank)
    jobs = []
    for f in mine:
        items = [(p.name, by_ident[p.ident]) for p in f.pieces]
        meta = {"format": "pt"} if f.group in ("model", "model_shards") else None
        jobs.append((f"{folder}/{f.filename}", items, meta))
    records: list[FileRecord] = []
    if jobs:
        total = sum(t.numel() * t.element_size() for _, items, _ in jobs for _, t in items)
        with ThreadPoolExecutor(max_workers=min(opts.io_threads, len(jobs)), thread_name_prefix="rt-save") as pool, \
                Progress(total, f"save {folder} (rank {coord.rank})", min_bytes=LOG_MIN_BYTES) as progress:
            futures = [pool.submit(_write_one, store, path, items, meta, opts._chunk_bytes) for path, items, meta in jobs]
            for fut in futures:
                records.append(fut.result())
                progress(records[-1].size_bytes)
    if coord.rank == 0:
        records.append(_write_json(store, f"{folder}/{STATE_NAME}", snap.shared, opts._chunk_bytes))
        if any(f.group == "model" for f in plan.files):
            records.append(_write_json(store, f"{folder}/{HF_INDEX_NAME}", _hf_index(plan), opts._chunk_bytes))
    records.append(_write_json(store, f"{folder}/{rank_state_filename(coord.rank)}", snap.rank_state, opts._chunk_bytes))
    return records
