"""The one save route: :func:`save_checkpoint`. Every save goes through it.

``rt.save`` / :func:`save` (a live state), :func:`write_snapshot` (an already captured
snapshot), :class:`~.manager.CheckpointManager`, the replicated saves and the asynchronous
checkpointer (which only moves the call off the training thread) all call it. Phases, each run
through :class:`~.collectives.Coordinator` (collective: every rank calls it with the same step):

1. **place**: which stores to write to, decided on rank 0 and broadcast. One store: that one.
   A Placement: its allowed healthy providers in declared order (from ``health`` or the
   ``health_book``); the first that takes the checkpoint is the primary, the next ones stand in
   when it fails (with ``copies="later"`` and none healthy, every allowed provider is tried).
2. per store tried, :mod:`.writer`'s phases: **prepare** (rank 0), **plan** (all ranks, pure),
   **write** (all ranks), **commit** (rank 0, the manifest last and create-only). A failure on
   any rank is the same :class:`~resilient_train.errors.CheckpointWriteError` on every rank
   (:class:`~resilient_train.errors.CommitConflictError` when another writer committed first).
3. **replicate** (Placement with ``copies="now"``, rank 0 only, then broadcast so every rank
   returns the same outcome): copies to the policy's other providers
   (:func:`~.replicate.fill_copies`), on a thread of rank 0 while every rank takes part in a
   small broadcast each ``COPY_BEAT_S`` (no collective waits longer than that for the copies). With ``copies="later"`` the caller hands them to a
   :class:`~.background.CheckpointWorker` instead, so no rank waits while rank 0 copies.

Failure behaviour: one store: its error is raised on every rank as is. A Placement: each
provider that fails is marked in ``health_book`` and the next one is tried;
:class:`~resilient_train.errors.ReplicationError` (``.committed``, ``.report``) names every
provider's cause when fewer than the policy's copies (``copies="now"``) or none at all
(``copies="later"``) committed. The previous committed checkpoint is never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping

from ..errors import CheckpointWriteError, CommitConflictError, ReplicationError, ResilientTrainError, StoreConflictError
from ..format.names import step_dirname
from ..storage import Store
from ..storage.providers import HealthBook, Placement
from .collectives import Coordinator, describe
from .location import Location, as_location, as_store
from .planner import plan_save
from .replicate import ReplicationReport, candidates, fill_copies
from .state import Snapshot, TrainState, capture
from .writer import SaveOptions, SaveResult, build_manifest, commit_manifest, prepare_folder, write_rank_files

__all__ = ["save_checkpoint", "save", "write_snapshot", "save_replicated", "write_replicated"]

log = logging.getLogger(__name__)

COPIES = ("now", "later")


def save_checkpoint(
    location: Location,
    snap: Snapshot,
    step: int,
    *,
    process_group: Any = None,
    options: SaveOptions | None = None,
    copies: str = "now",
    health: Mapping[str, bool] | None = None,
    health_book: HealthBook | None = None,
    now: float | None = None,
    io_threads: int = 4,
) -> ReplicationReport:
    """Save ``snap`` as checkpoint ``step`` to ``location`` (see module doc). Collective.

    Returns a report: ``committed`` (stores holding a committed copy, the primary first),
    ``copies``, ``manifest`` and ``saved`` (this rank's :class:`~.writer.SaveResult`). The
    snapshot's tensors must stay unchanged until this returns (async savers pass copies).
    ``now``: the clock reading for ``health_book`` (default ``time.monotonic()``).
    """
    if copies not in COPIES:
        raise ValueError(f"copies must be one of {COPIES}, got {copies!r}")
    opts = options or SaveOptions()
    coord = Coordinator(process_group)
    t = now if now is not None else time.monotonic()
    pl = location.placement
    names, reason = _place(coord, location, copies, health, health_book, t)
    report = ReplicationReport(step, reason=reason)
    failures: dict[str, str] = {}
    for name in names:
        store = pl.store(name) if pl is not None else location.primary
        try:
            report.saved = _write_step(coord, store, snap, step, opts)
        except (ResilientTrainError, OSError) as exc:
            if pl is None:
                raise
            failures[name] = describe(exc)
            if health_book is not None:
                health_book.failed(name, t, failures[name])
            log.error("save of step %d to %s failed, trying the next provider: %s", step, name, failures[name])
            continue
        report.manifest = report.saved.manifest
        report.committed.append(name)
        if health_book is not None:
            health_book.succeeded(name)
        break
    if pl is not None and copies == "now":
        _replicate(coord, pl, report, names, failures, io_threads, health_book, t)
    if pl is not None:
        _check_copies(pl, report, names, failures, copies, reason)
    return report


def _place(coord: Coordinator, location: Location, copies: str, health: Mapping[str, bool] | None, book: HealthBook | None, t: float) -> tuple[list[str], str]:
    """Phase **place**: the stores to try, in order, as rank 0 sees them; and why."""
    pl = location.placement
    if pl is None:
        return [location.primary.name], f"write to {location.primary.name}"
    if health is None and book is not None:
        health = book.snapshot([p.name for p in pl.providers], t)
    names: Any = None
    if coord.rank == 0:
        names = candidates(pl, health)
        if not names and copies == "later":
            names = candidates(pl, None)  # none healthy: try them all rather than none
    names = coord.broadcast(names)
    reason = pl.decide(health).reason if copies == "now" else f"write to the first of {', '.join(names)}"
    return names, reason


def _write_step(coord: Coordinator, store: Store, snap: Snapshot, step: int, opts: SaveOptions) -> SaveResult:
    """Phases **prepare**, **plan**, **write**, **commit** of one store (:mod:`.writer`)."""
    folder = step_dirname(step)
    t0 = time.perf_counter()
    coord.phase(f"preparation of {folder}", lambda: prepare_folder(store, folder), rank0_only=True, catch=(ResilientTrainError,))
    plan = plan_save(coord.all_gather(snap.metas()), opts.max_file_bytes)
    records = coord.phase(f"write of {folder} to {store.uri}", lambda: write_rank_files(store, folder, snap, plan, coord.rank, opts)) or []
    manifest = build_manifest(step, coord.world_size, [r for rank_records in coord.all_gather(records) for r in rank_records], plan, opts)
    try:
        coord.phase(f"commit of {folder}", lambda: commit_manifest(store, folder, manifest.to_bytes(), opts.signing_key), rank0_only=True)
    except CheckpointWriteError as exc:
        cause = exc.failures.get(0, "")
        if cause.startswith(StoreConflictError.__name__):
            raise CommitConflictError(f"step {step} under {store.uri} was committed by another writer first; this save did not commit ({cause})") from None
        raise
    seconds = time.perf_counter() - t0
    written = sum(r.size_bytes for r in records)
    log.info("saved step %d to %s: %d files, %.1f MB by rank %d in %.2f s", step, store.uri, len(records), written / 1e6, coord.rank, seconds)
    return SaveResult(step, manifest, written, seconds)


COPY_BEAT_S = 0.5
"""While rank 0 makes the copies of ``copies="now"``, every rank takes part in one small
broadcast per this many seconds ("still copying"), so no collective waits longer than this
for the copies, whatever the process group's timeout."""


def _replicate(coord: Coordinator, pl: Placement, report: ReplicationReport, names: list[str], failures: dict[str, str], io_threads: int, book: HealthBook | None, t: float) -> None:
    """Phase **replicate**: rank 0 copies to the policy's count; every rank learns the outcome.

    The copies run on a thread of rank 0 while the ranks exchange a beat every
    ``COPY_BEAT_S``: a copy longer than the process group's collective timeout fails no rank
    (before, the other ranks' one broadcast timed out and every rank failed with gloo's error,
    though the copy went through). A copy that raises is a failure of the phase ("replication").
    """
    if report.committed and coord.rank == 0:
        _copy_beating(coord, lambda: fill_copies(pl, report, names, failures, io_threads), failures)
    elif report.committed:
        _copy_beating(coord, None, failures)
    report.committed, report.copies, shared = coord.broadcast((report.committed, report.copies, dict(failures)) if coord.rank == 0 else None)
    failures.clear()  # rank 0's view, on every rank
    failures.update(shared)
    if book is not None:
        for name in failures:
            book.failed(name, t, failures[name])
        for name in report.committed:
            book.succeeded(name)


def _copy_beating(coord: Coordinator, work: Any, failures: dict[str, str]) -> None:
    """Run ``work`` (rank 0) on a thread; every rank broadcasts rank 0's "done?" each beat until
    it is done. Collective: every rank calls it (``work`` None off rank 0)."""
    if not coord.is_distributed:
        if work is not None:
            work()
        return
    if coord.rank != 0:
        while not coord.broadcast(None):
            pass
        return
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the outcome
            failures["replication"] = describe(exc)
            log.error("replication failed: %s", failures["replication"])
        finally:
            done.set()

    th = threading.Thread(target=run, name="rt-copies-now", daemon=True)
    th.start()
    while not coord.broadcast(done.wait(COPY_BEAT_S)):
        pass
    th.join()


def _check_copies(pl: Placement, report: ReplicationReport, names: list[str], failures: dict[str, str], copies: str, reason: str) -> None:
    """Raise ReplicationError when the save fell short: fewer copies than the policy asks
    (``copies="now"``), or no provider took it (``copies="later"``)."""
    if copies == "now" and len(report.committed) < pl.policy.copies:
        err = ReplicationError(
            f"step {report.step} has {len(report.committed)} of {pl.policy.copies} copies (committed on: {', '.join(report.committed) or 'none'})",
            failures or {"policy": "not enough healthy providers in the allowed regions: " + reason},
        )
    elif copies == "later" and not report.committed:
        err = ReplicationError(f"step {report.step} was committed on no provider (tried {', '.join(names)})", failures or {"policy": "no allowed provider"})
    else:
        return
    err.committed = list(report.committed)  # type: ignore[attr-defined]
    err.report = report  # type: ignore[attr-defined]
    raise err


# ------------------------------------------------------------------ the public spellings


def save(
    uri: Any,
    state: TrainState,
    step: int,
    *,
    process_group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    options: SaveOptions | None = None,
) -> SaveResult:
    """Save ``state`` as checkpoint ``step`` under ``uri`` (a URI, a Store, or a Placement: then
    replicated to the policy's copy count before this returns). Collective: every rank calls it.

    Returns once the manifest is written (the checkpoint is committed) on every rank.
    Raises CheckpointWriteError on every rank if any rank failed; ConfigError for a state
    that cannot be stored (raised on every rank); ReplicationError for a Placement that fell
    short of its copies.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    coord = Coordinator(process_group)
    snap = capture(state, coord.rank, coord.world_size)
    location = as_location(uri, storage_options)
    if location.placement is None:
        as_store(location)  # one store: a list of replicas is for reading
    return save_checkpoint(location, snap, step, process_group=process_group, options=options).saved


def write_snapshot(store: Store, snap: Snapshot, step: int, *, process_group: Any = None, options: SaveOptions | None = None) -> SaveResult:
    """:func:`save_checkpoint` of an already captured :class:`Snapshot` to one store."""
    return save_checkpoint(as_location(store), snap, step, process_group=process_group, options=options).saved


def write_replicated(placement: Placement, snap: Snapshot, step: int, *, process_group: Any = None, options: SaveOptions | None = None,
                     health: Mapping[str, bool] | None = None, io_threads: int = 4, health_book: HealthBook | None = None, now: float | None = None) -> ReplicationReport:
    """Deprecated spelling of :func:`save_checkpoint` of a snapshot to a Placement, copies made now."""
    return save_checkpoint(as_location(placement), snap, step, process_group=process_group, options=options, health=health, io_threads=io_threads, health_book=health_book, now=now)


def save_replicated(placement: Placement, state: TrainState, step: int, *, process_group: Any = None, options: SaveOptions | None = None, health: Mapping[str, bool] | None = None) -> ReplicationReport:
    """Deprecated spelling: capture ``state`` and :func:`write_replicated` it. Collective."""
    coord = Coordinator(process_group)
    return write_replicated(placement, capture(state, coord.rank, coord.world_size), step, process_group=process_group, options=options, health=health)
