"""Committed checkpoints across providers: copy, migrate, replicate.

Every copy follows one rule: files first, each streamed (no local staging) and verified against
the source manifest's size and SHA-256; the destination's ``manifest.json`` last, byte for byte
the source's. So each provider's copy commits on its own, and an interrupted copy is an
uncommitted folder that the next run completes: files already present with the right size and
hash are skipped (resumable).

* :func:`copy_checkpoint`: one step, from one or more replicas (a file that is missing or
  corrupt on one source is read from the next) to one destination.
* :func:`migrate`: one step, or all, from SRC to DST (``resilient-train ckpt migrate``).
* :func:`fill_copies`: the ``replicate`` phase of a save
  (:func:`~resilient_train.checkpoint.saving.save_checkpoint`) and of the background worker:
  copy a committed step to the policy's other providers. A provider that fails does not stop
  the others; the caller names it (:class:`ReplicationError`, ``.committed`` lists who has a copy).
* :func:`replicate`: bring existing checkpoints up to the policy's copy count.

Saving to a :class:`~resilient_train.storage.providers.Placement` is
:func:`~resilient_train.checkpoint.saving.save_checkpoint` (the one save route).

Every function that moves bytes takes an optional ``ledger``
(:class:`~resilient_train.storage.ledger.Ledger`) and records what it moved there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError, OperationCancelledError, ReplicationError, ResilientTrainError, StorageError, StoreConflictError, StoreTransientError, StoreUnavailableError
from ..format.manifest import FileRecord, Manifest
from ..format.names import MANIFEST_NAME, step_dirname
from ..progress import LOG_MIN_BYTES, Progress
from ..storage import Store, classify
from ..storage.ledger import Ledger
from ..storage.providers import Placement
from ..storage.transfer import copy_file, file_matches, run_concurrently
from .collectives import describe
from .location import as_store
from ..format.signing import SIGNATURE_NAME, as_keyring
from .steps import newest_committed
from .signatures import read_signature

__all__ = [
    "CopyReport",
    "ReplicationReport",
    "candidates",
    "copy_checkpoint",
    "fill_copies",
    "migrate",
    "replicate",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyReport:
    step: int
    source: str
    destination: str
    files_copied: int
    files_skipped: int
    bytes_copied: int
    seconds: float
    already_committed: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.bytes_copied / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ReplicationReport:
    step: int
    committed: list[str] = field(default_factory=list)
    """Providers holding a committed copy, primary first."""
    copies: dict[str, CopyReport] = field(default_factory=dict)
    reason: str = ""
    manifest: Manifest | None = None
    """The committed manifest, when this process wrote it (a save, not a copy)."""
    saved: Any = None
    """The :class:`~resilient_train.checkpoint.writer.SaveResult` of the write, for a save."""


def _read_source_manifest(sources: Sequence[Store], step: int) -> tuple[Store, bytes, Manifest]:
    path = f"{step_dirname(step)}/{MANIFEST_NAME}"
    reasons = []
    for s in sources:
        try:
            data = s.read_bytes(path)
            manifest = Manifest.from_bytes(data, where=f"{s.name}:{path}")
            if manifest.step != step:
                raise CheckpointError(f"{s.name}:{path} says step {manifest.step}")
            return s, data, manifest
        except (ResilientTrainError, OSError) as exc:
            reasons.append(describe(exc))
    raise CheckpointNotFoundError(f"step {step} is not committed on any source: " + "; ".join(reasons))


def _retry_can_help(exc: BaseException) -> bool:
    """Whether running the copy again may succeed: yes when a store was unreachable or flaky,
    no when access was denied, a file is missing or corrupt, or the configuration is wrong."""
    if isinstance(exc, OperationCancelledError):
        return True
    if isinstance(exc, (CorruptCheckpointError, ConfigError)):
        return False
    if isinstance(exc, (StoreUnavailableError, StoreTransientError)):
        return True
    return classify(exc) == "transient"


def _check_stop(stop: threading.Event | None, what: str) -> None:
    if stop is not None and stop.is_set():
        raise OperationCancelledError(f"stopped before {what}")


def copy_checkpoint(
    sources: "Store | Sequence[Store]",
    dst: Store,
    step: int,
    *,
    io_threads: int = 4,
    progress: bool = False,
    verify_keys: Any = None,
    stop: threading.Event | None = None,
    ledger: Ledger | None = None,
    purpose: str = "replication",
) -> CopyReport:
    """Copy committed checkpoint ``step`` to ``dst`` (see module doc); returns what was done.

    The source's ``manifest.sig``, when there is one, is copied before the manifest. With
    ``verify_keys``, a source manifest whose signature does not verify is refused
    (SignatureError) before anything is copied.

    Raises CheckpointNotFoundError if no source has the step committed; CheckpointError if
    ``dst`` holds a *different* committed checkpoint of that step (never overwritten);
    ReplicationError naming ``dst`` and each file that could not be copied (the destination
    stays uncommitted, and running again resumes; the message says "run again" only when the
    causes were transient). Setting ``stop`` ends the copy within about one chunk per thread
    and raises OperationCancelledError, leaving ``dst`` uncommitted and resumable.
    """
    srcs = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    t0 = time.perf_counter()
    src, manifest_bytes, manifest = _read_source_manifest(srcs, step)
    srcs = [src] + [s for s in srcs if s is not src]
    folder = step_dirname(step)
    mpath = f"{folder}/{MANIFEST_NAME}"
    signature = read_signature(src, folder)
    ring = as_keyring(verify_keys)
    if ring is not None:
        ring.verify(manifest_bytes, signature, where=f"{src.name}:{mpath}")
    try:
        existing = dst.read_bytes(mpath)
    except (StorageError, OSError):
        existing = None
    if existing is not None:
        if existing == manifest_bytes:
            log.info("step %d already committed on %s", step, dst.name)
            _copy_signature(dst, folder, signature)
            return CopyReport(step, src.name, dst.name, 0, len(manifest.files), 0, time.perf_counter() - t0, already_committed=True)
        if existing:  # an empty (torn) manifest is uncommitted and replaced below
            raise CheckpointError(f"{dst.name} already holds a different committed checkpoint for step {step}; refusing to overwrite it (delete {folder} there first)")
        dst.delete(mpath)

    todo, skipped = _files_to_copy(dst, folder, manifest, io_threads)
    sizes = _copy_files(srcs, dst, folder, step, todo, io_threads, progress, stop)
    _commit_copy(dst, folder, step, manifest_bytes, signature)
    seconds = time.perf_counter() - t0
    report = CopyReport(step, src.name, dst.name, len(todo), skipped, sum(s or 0 for s in sizes), seconds)
    if ledger is not None and report.bytes_copied:
        ledger.record_copy(src.name, dst.name, report.bytes_copied, purpose)
    log.info("copied step %d %s -> %s: %d files (%d already there), %.1f MB in %.2f s", step, src.name, dst.name, report.files_copied, skipped, report.bytes_copied / 1e6, seconds)
    return report


def _files_to_copy(dst: Store, folder: str, manifest: Manifest, io_threads: int) -> tuple[list[FileRecord], int]:
    """The files ``dst`` lacks (or holds with another size or hash), and how many it has already."""
    def needs_copy(rec: FileRecord) -> bool:
        return not file_matches(dst, f"{folder}/{rec.path}", rec.size_bytes, rec.digest, rec.new_digester)

    todo: list[FileRecord] = []
    skipped = 0
    flags, _ = run_concurrently(needs_copy, manifest.files, io_threads, "rt-check")
    for rec, flag in zip(manifest.files, flags):
        if flag is False:
            skipped += 1
        else:
            todo.append(rec)  # a failed check means "copy it"
    return todo, skipped


def _copy_files(srcs: list[Store], dst: Store, folder: str, step: int, todo: list[FileRecord], io_threads: int, progress: bool,
                stop: threading.Event | None) -> list[Any]:
    """Stream ``todo`` to ``dst`` concurrently, each file from the first source that serves it
    intact; bytes per file. ReplicationError (or OperationCancelledError) when any failed."""
    bar = Progress(sum(r.size_bytes for r in todo), f"{srcs[0].name} -> {dst.name} {folder}", bar=progress, min_bytes=LOG_MIN_BYTES)

    def on_bytes(n: int) -> None:
        bar(n)
        if n > 0:
            _check_stop(stop, "the end of the file")

    def one(rec: FileRecord) -> int:
        path = f"{folder}/{rec.path}"
        reasons, causes = [], []
        for s in srcs:
            _check_stop(stop, f"copying {rec.path}")
            try:
                n, _ = copy_file(s, path, dst, path, size_bytes=rec.size_bytes, sha256=rec.digest, on_bytes=on_bytes, digester=rec.new_digester)
                if s is not srcs[0]:
                    log.warning("%s: copied from replica %s after: %s", rec.path, s.name, "; ".join(reasons))
                return n
            except OperationCancelledError:
                raise
            except (ResilientTrainError, OSError) as exc:
                reasons.append(describe(exc))
                causes.append(exc)
        err = ReplicationError(f"{rec.path} could not be copied to {dst.name}: " + "; ".join(reasons))
        err.causes = causes
        raise err

    try:
        sizes, failures = run_concurrently(one, todo, io_threads, "rt-copy")
    finally:
        bar.close()
    if failures:
        copied = len(todo) - len(failures)
        if stop is not None and stop.is_set():
            raise OperationCancelledError(f"interrupted: step {step} is not committed on {dst.name} ({copied} of {len(todo)} files copied); run the same command again to resume")
        causes = [c for _, e in failures for c in (getattr(e, "causes", None) or [e])]
        hint = "; run again to resume" if all(_retry_can_help(c) for c in causes) else ""
        err = ReplicationError(
            f"step {step} was not committed on {dst.name}: {len(failures)} of {len(todo)} files failed{hint}",
            {dst.name: "; ".join(describe(e) for _, e in failures[:3])},
        )
        err.causes = causes
        raise err
    return sizes


def _commit_copy(dst: Store, folder: str, step: int, manifest_bytes: bytes, signature: bytes | None) -> None:
    """The signature (if any), then the manifest, create-only: the copy's commit."""
    mpath = f"{folder}/{MANIFEST_NAME}"
    dst.sync_folder(folder)
    if signature is not None:
        dst.write_bytes(f"{folder}/{SIGNATURE_NAME}", signature)
    try:
        dst.write_bytes_exclusive(mpath, manifest_bytes)  # the commit: last, create-only
    except StoreConflictError:
        if dst.read_bytes(mpath) != manifest_bytes:
            raise CheckpointError(f"{dst.name}: another writer committed a different checkpoint for step {step} while it was being copied") from None
    dst.sync_folder(folder)


def _copy_signature(dst: Store, folder: str, signature: bytes | None) -> None:
    """Bring ``dst``'s signature in line with the source's (a copy made before it was signed)."""
    if signature is None:
        return
    if read_signature(dst, folder) != signature:
        dst.write_bytes(f"{folder}/{SIGNATURE_NAME}", signature)


def migrate(
    src: "str | Store",
    dst: "str | Store",
    step: int | None = None,
    *,
    all_steps: bool = False,
    src_options: Mapping[str, Any] | None = None,
    dst_options: Mapping[str, Any] | None = None,
    io_threads: int = 4,
    progress: bool = True,
    verify_keys: Any = None,
    stop: threading.Event | None = None,
    ledger: Ledger | None = None,
) -> list[CopyReport]:
    """Copy step ``step`` (default: the latest committed) or, with ``all_steps``, every
    committed step from ``src`` to ``dst``, oldest first. Resumable; see :func:`copy_checkpoint`
    (``stop`` cancels it). With ``verify_keys`` only signed checkpoints are copied; a named step
    that is not signed by a trusted key raises SignatureError."""
    if step is not None and all_steps:
        raise ConfigError("pass either a step or all_steps=True, not both")
    s = as_store(src, src_options)
    d = as_store(dst, dst_options)
    ring = as_keyring(verify_keys)
    steps = sorted(newest_committed(s, keys=ring if step is None else None))
    if not steps:
        raise CheckpointNotFoundError(f"no committed checkpoint under {s.uri}" + (" signed by a trusted key" if ring is not None else ""))
    if all_steps:
        chosen = steps
    elif step is None:
        chosen = [steps[-1]]
    else:
        if step not in steps:
            raise CheckpointNotFoundError(f"step {step} is not committed under {s.uri}; committed steps: {steps}")
        chosen = [step]
    reports = []
    for st in chosen:
        _check_stop(stop, f"copying step {st}")
        reports.append(copy_checkpoint(s, d, st, io_threads=io_threads, progress=progress, verify_keys=ring, stop=stop, ledger=ledger, purpose="migration"))
    return reports


def candidates(placement: Placement, health: Mapping[str, bool] | None) -> list[str]:
    """Allowed, healthy providers in declared order: the targets first, then substitutes (where
    a save writes, and where copies go)."""
    health = health or {}
    return [p.name for p in placement.providers if placement.policy.allows(p.region) and health.get(p.name, True)]


def fill_copies(placement: Placement, report: ReplicationReport, targets: list[str], failures: dict[str, str], io_threads: int, progress: bool = False) -> None:
    """Copy from the committed providers to further ``targets`` until the policy's count; each
    provider that fails goes into ``failures``. Storage only: run it on one process."""
    want = placement.policy.copies
    rest = [c for c in targets if c not in report.committed and c not in failures]
    while len(report.committed) < want and rest:
        batch, rest = rest[: want - len(report.committed)], rest[want - len(report.committed):]
        sources = [placement.store(n) for n in report.committed]

        def one(name: str) -> CopyReport:
            return copy_checkpoint(sources, placement.store(name), report.step, io_threads=io_threads, progress=progress)

        results, errs = run_concurrently(one, batch, max_workers=len(batch), thread_name_prefix="rt-replicate")
        failed = {name for name, _ in errs}
        for name, exc in errs:
            failures[name] = describe(exc)
            log.error("replication of step %d to %s failed: %s", report.step, name, failures[name])
        for name, res in zip(batch, results):
            if name not in failed and res is not None:
                report.committed.append(name)
                report.copies[name] = res


def replicate(placement: Placement, step: int | None = None, *, all_steps: bool = False, health: Mapping[str, bool] | None = None, io_threads: int = 4, progress: bool = False, ledger: Ledger | None = None) -> list[ReplicationReport]:
    """Bring checkpoints up to the policy's copy count by copying between providers.

    ``step`` None: the newest step committed anywhere; ``all_steps``: every step committed on
    some allowed provider. Raises ReplicationError naming the providers that failed, after
    trying all of them.
    """
    allowed = candidates(placement, health)
    held: dict[int, list[str]] = {}
    unreachable: dict[str, str] = {}
    for name in allowed:
        try:
            for s in newest_committed(placement.store(name)):
                held.setdefault(s, []).append(name)
        except (ResilientTrainError, OSError) as exc:
            unreachable[name] = describe(exc)
    if not held:
        raise CheckpointNotFoundError("no committed checkpoint on any provider" + (f" (unreachable: {unreachable})" if unreachable else ""))
    if all_steps:
        steps = sorted(held)
    elif step is None:
        steps = [max(held)]
    else:
        if step not in held:
            raise CheckpointNotFoundError(f"step {step} is committed on no provider; committed steps: {sorted(held)}")
        steps = [step]
    reports = []
    all_failures: dict[str, str] = {}
    alive = [c for c in allowed if c not in unreachable]
    for s in steps:
        rep = ReplicationReport(s, committed=list(held[s]))
        failures = dict(unreachable)
        fill_copies(placement, rep, alive, failures, io_threads, progress)
        if ledger is not None:
            for c in rep.copies.values():
                if c.bytes_copied:
                    ledger.record_copy(c.source, c.destination, c.bytes_copied, "replication")
        if len(rep.committed) < placement.policy.copies:
            all_failures.update({f"{k} (step {s})": v for k, v in failures.items()})
        reports.append(rep)
    if all_failures:
        err = ReplicationError("some checkpoints are below the policy's copy count", all_failures)
        err.report = reports  # type: ignore[attr-defined]
        raise err
    return reports
