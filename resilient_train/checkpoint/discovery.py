"""Finding checkpoints: which steps are committed, and which is the newest one that verifies.

Rules (``docs/format.md``, "Which checkpoint is the latest"):

* A step folder is committed when its ``manifest.json`` exists **and parses**; a torn or empty
  manifest (a crash while committing on a store without atomic writes) counts as uncommitted:
  it is ignored here and a new save of that step replaces it.
* Commits are found by listing each step folder and reading its manifest, never by
  ``exists``/``size`` alone: fsspec clients answer those (and s3fs even sizes a whole-object
  read) from a listing cache that may predate another client's commit. :meth:`Store.list`
  drops the client's cached listing of that folder and lists it afresh, which also renews the
  cache every later read of the folder consults.
* With verification keys, a manifest whose signature does not verify is not a candidate.
* A store that cannot be reached is an error (:class:`StoreUnavailableError` once its retry
  budget is spent), never "no checkpoint". Over several providers, the unreachable ones are
  skipped with a warning as long as one answers; only when none answers is the error raised.
* :func:`load_newest_verifiable` walks the candidates newest first and falls back past a
  checkpoint that fails verification (corrupt, unsigned, torn, missing), warning and calling
  ``on_skip`` for each one skipped. Training then goes on from the older step and will save
  the skipped steps again, so the manager and ``wrap`` :func:`uncommit` each one skipped for a
  definite verdict on its bytes (:data:`DEFINITE_ERRORS`): its
  manifest is kept aside as ``rejected-manifest.json`` (for inspection) and ``manifest.json``
  removed, which makes the folder an uncommitted leftover that the next save of that step
  (or retention) clears.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HashMismatchError,
    ManifestError,
    SafetensorsHeaderError,
    SignatureError,
    StorageError,
    StoreUnavailableError,
    TruncatedFileError,
    UnsupportedFormatVersionError,
)
from ..format.manifest import Manifest
from ..format.names import MANIFEST_NAME, parse_step_dirname, step_dirname
from ..storage import Store, redact
from .collectives import Coordinator

__all__ = [
    "step_folders",
    "committed_steps",
    "latest_step",
    "steps_newest_first",
    "find_latest",
    "load_newest_verifiable",
    "FALLBACK_ERRORS",
    "DEFINITE_ERRORS",
    "REJECTED_MANIFEST_NAME",
    "uncommit",
]

log = logging.getLogger(__name__)

FALLBACK_ERRORS: tuple[type[BaseException], ...] = (CorruptCheckpointError, ManifestError, SignatureError, CheckpointNotFoundError)
"""A checkpoint that fails with one of these is skipped for the next older one (except
UnsupportedFormatVersionError: a newer library wrote it; upgrading is the fix, not skipping it)."""

DEFINITE_ERRORS: tuple[type[BaseException], ...] = (HashMismatchError, TruncatedFileError, SafetensorsHeaderError, ManifestError, SignatureError)
"""Verdicts about the checkpoint's bytes themselves. Only a checkpoint skipped for one of these
is uncommitted; a plain CorruptCheckpointError may also stand for a store that failed while
every replica was tried, so such a checkpoint is skipped but left committed."""


REJECTED_MANIFEST_NAME = "rejected-manifest.json"
"""Where :func:`uncommit` keeps the manifest of a checkpoint that failed verification."""


def uncommit(store: Store, step: int, reason: str) -> bool:
    """Turn committed checkpoint ``step`` that failed verification into an uncommitted folder
    (see module doc). Returns False when there was no manifest. Storage errors propagate."""
    from .signatures import SIGNATURE_NAME

    folder = step_dirname(step)
    try:
        data = store.read_bytes(f"{folder}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return False
    store.write_bytes(f"{folder}/{REJECTED_MANIFEST_NAME}", data)
    store.delete(f"{folder}/{MANIFEST_NAME}")
    store.delete(f"{folder}/{SIGNATURE_NAME}")
    log.warning("uncommitted checkpoint step %d under %s (its manifest is kept as %s): %s", step, store.uri, REJECTED_MANIFEST_NAME, reason)
    return True


def step_folders(store: Store) -> list[int]:
    """Steps of every ``step-NNNNNNNNNN`` folder under ``store``, ascending (committed or not)."""
    steps = []
    for name in store.list(""):
        step = parse_step_dirname(name)
        if step is not None:
            steps.append(step)
    return sorted(steps)


def _manifest(store: Store, step: int, keys: Any) -> Manifest | None:
    """The manifest of ``step`` if committed (and signed, with ``keys``); None otherwise."""
    from .reader import read_manifest

    if MANIFEST_NAME not in store.list(step_dirname(step)):  # fresh listing: renews the client's cache
        return None
    try:
        return read_manifest(store, step, keys=keys)
    except CheckpointNotFoundError:
        return None
    except UnsupportedFormatVersionError:
        raise  # a newer library wrote it: upgrading is the fix, not falling back to an older step
    except (ManifestError, SignatureError) as exc:
        log.warning("ignoring step %d under %s: %s", step, store.uri, redact(str(exc)))
        return None


def committed_steps(store: Store, *, validate: bool = True, keys: Any = None) -> list[int]:
    """Committed steps under ``store``, ascending (see module doc). ``validate=False`` only
    checks that the manifest is non-empty, without parsing it (it is still read: sizes may
    come from a stale cache)."""
    out = []
    for step in step_folders(store):
        if validate or keys is not None:
            ok = _manifest(store, step, keys) is not None
        else:
            try:
                ok = MANIFEST_NAME in store.list(step_dirname(step)) and bool(store.read_bytes(f"{step_dirname(step)}/{MANIFEST_NAME}"))
            except FileNotFoundError:
                ok = False
        if ok:
            out.append(step)
    return out


def latest_step(store: Store, *, keys: Any = None) -> int | None:
    """The highest committed step (signed, with ``keys``) or None if there is none.
    Raises StorageError when the store cannot be reached."""
    for step in reversed(step_folders(store)):
        if _manifest(store, step, keys) is not None:
            return step
    return None


def _per_source(sources: Sequence[Store], fn: Callable[[Store], Any]) -> list[tuple[Store, Any]]:
    """``fn`` on every source; unreachable ones are warned about and left out. Raises when
    none could be reached (the one error for one source; StoreUnavailableError naming all)."""
    results, errors = [], []
    for store in sources:
        try:
            results.append((store, fn(store)))
        except (StorageError, OSError) as exc:
            log.warning("provider %s unavailable while looking for checkpoints: %s", store.name, redact(f"{type(exc).__name__}: {exc}"))
            errors.append((store, exc))
    if errors and not results:
        if len(errors) == 1:
            raise errors[0][1]
        raise StoreUnavailableError(
            "no checkpoint provider could be reached, so whether a checkpoint exists is unknown: "
            + "; ".join(redact(f"{s.name}: {type(e).__name__}: {e}") for s, e in errors)
        )
    return results


def steps_newest_first(sources: Sequence[Store], *, keys: Any = None) -> list[int]:
    """Every step committed on at least one reachable source, newest first."""
    steps: set[int] = set()
    for _, found in _per_source(sources, lambda s: committed_steps(s, keys=keys)):
        steps.update(found)
    return sorted(steps, reverse=True)


def find_latest(sources: Sequence[Store], *, keys: Any = None) -> tuple[int, Manifest]:
    """The newest committed step over ``sources`` and its manifest (from the first source that
    has it). CheckpointNotFoundError when none has one; StorageError when none is reachable."""
    best: tuple[int, Store] | None = None
    for store, s in _per_source(sources, lambda st: latest_step(st, keys=keys)):
        if s is not None and (best is None or s > best[0]):
            best = (s, store)
    if best is None:
        raise CheckpointNotFoundError("no committed checkpoint on any of: " + ", ".join(s.uri for s in sources))
    from .reader import read_manifest

    return best[0], read_manifest(best[1], best[0], keys=keys)


def _verdict(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, UnsupportedFormatVersionError):
        return "error"
    if isinstance(exc, DEFINITE_ERRORS):
        return "definite"
    if isinstance(exc, FALLBACK_ERRORS):
        return "fallback"
    return "error"


def load_newest_verifiable(
    find_steps: Callable[[], list[int]],
    load_step: Callable[[int], Any],
    *,
    process_group: Any = None,
    on_skip: Callable[[int, str, bool], None] | None = None,
) -> Any:
    """Load the newest checkpoint that verifies. Collective: every rank calls it.

    ``find_steps`` (run on rank 0 only) returns candidate steps newest first and raises
    StorageError when no store can be reached; ``load_step(step)`` is the collective load. A
    candidate that fails on any rank with one of :data:`FALLBACK_ERRORS` is skipped on every
    rank (a warning, then ``on_skip(step, reason, definite)``, ``definite`` when the failure is
    one of :data:`DEFINITE_ERRORS`) and the next older one is tried. Returns
    the load's result, or None when there is no committed checkpoint at all. Raises
    CorruptCheckpointError when there are candidates and none loads; any other error (an
    unreachable store, a checkpoint that does not fit the state) is raised as is.
    """
    coord = Coordinator(process_group)
    steps: Any = None
    err: BaseException | None = None
    if coord.rank == 0:
        try:
            steps = list(find_steps())
        except (StorageError, OSError) as exc:
            err = exc
    steps = coord.broadcast(steps if err is None else redact(f"{type(err).__name__}: {err}"))
    if err is not None:
        raise err
    if isinstance(steps, str):
        raise StoreUnavailableError(f"rank 0 could not list the checkpoints: {steps}")
    if not steps:
        return None
    skipped: list[str] = []
    for step in steps:
        result, exc = None, None
        try:
            result = load_step(step)
        except (CheckpointError, StorageError, OSError, ValueError) as e:  # judged below, on every rank
            exc = e
        verdicts = coord.all_gather((_verdict(exc), None if exc is None else redact(f"{type(exc).__name__}: {exc}")[:500]))
        if all(v == "ok" for v, _ in verdicts):
            return result
        if any(v in ("fallback", "definite") for v, _ in verdicts):
            reason = next(m for v, m in verdicts if v in ("fallback", "definite"))
            definite = all(v == "definite" for v, _ in verdicts if v in ("fallback", "definite"))
            log.warning("checkpoint step %d cannot be used (%s); falling back to the next older one", step, reason)
            skipped.append(f"step {step}: {reason}")
            if on_skip is not None:
                on_skip(step, reason, definite)
            continue
        if exc is not None:
            raise exc
        raise CheckpointError("checkpoint load failed on other ranks: " + "; ".join(m for v, m in verdicts if m))
    raise CorruptCheckpointError(f"none of the {len(steps)} committed checkpoints could be loaded: " + "; ".join(skipped[:5]))
