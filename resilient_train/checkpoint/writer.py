"""Saving: plan -> write shards -> commit the manifest. Collective over the process group.

Every rank calls :func:`save` (or :func:`write_snapshot`) with the same step. Phases:

1. **prepare** (rank 0): refuse a step that is already committed; clear leftovers of an
   earlier, uncommitted attempt at the same step.
2. **plan** (all ranks): gather what each rank holds, run the pure planner; identical result
   everywhere. Replicated tensors are spread across ranks, shards stay with their owners.
3. **write** (all ranks, in parallel, several files per rank on a thread pool): each file is
   hashed while it is written and made durable. Rank 0 also writes ``state.json`` and the
   Hugging Face index; every rank writes its ``rank-NNNNN.json``.
4. **commit** (rank 0): once every rank reported success, write ``manifest.json`` last.

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
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, CheckpointWriteError, ResilientTrainError
from ..progress import LOG_MIN_BYTES, Progress
from ..format.jsontree import dumps_canonical
from ..format.manifest import FileRecord, Manifest, TensorRecord
from ..format.names import HF_INDEX_NAME, MANIFEST_NAME, STATE_NAME, rank_state_filename, step_dirname
from ..format.safetensors_io import write_file
from ..storage import Store, open_store, redact
from .collectives import Coordinator
from .planner import DEFAULT_MAX_FILE_BYTES, FilePlan, SavePlan, plan_save
from .state import Snapshot, TrainState, capture

__all__ = ["save", "write_snapshot", "SaveOptions", "SaveResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveOptions:
    """Tuning knobs of a save. ``io_threads``: files written concurrently per rank."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    io_threads: int = max(1, min(8, os.cpu_count() or 1))

    def __post_init__(self) -> None:
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
    if store.exists(f"{folder}/{MANIFEST_NAME}"):
        raise CheckpointError(f"step folder {folder} under {store.uri} is already committed; refusing to overwrite it")
    if store.list(folder):
        log.info("removing leftovers of an uncommitted save in %s/%s", store.uri, folder)
        store.delete(folder, recursive=True)


def _write_one(store: Store, path: str, items: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None) -> FileRecord:
    cpu_items = [(n, t if t.device.type == "cpu" else t.to("cpu")) for n, t in items]
    with store.open_write(path) as f:
        size, sha = write_file(f, cpu_items, metadata)
    return FileRecord(path.rsplit("/", 1)[-1], size, sha)


def _write_json(store: Store, path: str, obj: Any) -> FileRecord:
    import hashlib

    data = dumps_canonical(obj)
    store.write_bytes(path, data)
    return FileRecord(path.rsplit("/", 1)[-1], len(data), hashlib.sha256(data).hexdigest())


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
    manifest = Manifest(step=step, world_size=coord.world_size, files=tuple(all_records), tensors=tuple(_tensor_records(plan)))

    err = None
    if coord.rank == 0:
        try:
            store.sync_folder(folder)
            store.write_bytes(f"{folder}/{MANIFEST_NAME}", manifest.to_bytes())
            store.sync_folder(folder)
        except Exception as exc:  # noqa: BLE001
            err = _describe(exc)
    _agree(coord, err, f"commit of {folder}")
    seconds = time.perf_counter() - t0
    written = sum(r.size_bytes for r in records)
    log.info("saved step %d to %s: %d files, %.1f MB by rank %d in %.2f s", step, store.uri, len(records), written / 1e6, coord.rank, seconds)
    return SaveResult(step, manifest, written, seconds)


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
            futures = [pool.submit(_write_one, store, path, items, meta) for path, items, meta in jobs]
            for fut in futures:
                records.append(fut.result())
                progress(records[-1].size_bytes)
    if coord.rank == 0:
        records.append(_write_json(store, f"{folder}/{STATE_NAME}", snap.shared))
        if any(f.group == "model" for f in plan.files):
            records.append(_write_json(store, f"{folder}/{HF_INDEX_NAME}", _hf_index(plan)))
    records.append(_write_json(store, f"{folder}/{rank_state_filename(coord.rank)}", snap.rank_state))
    return records
