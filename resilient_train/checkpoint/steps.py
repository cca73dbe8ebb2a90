"""Which checkpoints exist: :func:`newest_committed`, the one name for "committed steps, newest first".

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
  budget is spent), never "no checkpoint". Over several stores, the unreachable ones are
  skipped with a warning as long as one answers; only when none answers is the error raised.

:func:`read_manifest` reads and checks one step's manifest (and its signature, with keys).
:func:`step_folders` lists every step folder, committed or not (retention needs both kinds).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..errors import CheckpointNotFoundError, ManifestError, SignatureError, StorageError, StoreUnavailableError, UnsafeFileError, UnsupportedFormatVersionError
from ..format.manifest import MAX_MANIFEST_BYTES, Manifest
from ..format.names import MANIFEST_NAME, parse_step_dirname, step_dirname
from ..storage import Store, redact
from .collectives import describe
from .location import Location, as_location
from .signatures import check_signature

__all__ = ["newest_committed", "read_manifest", "step_folders", "committed_steps", "latest_step"]

log = logging.getLogger(__name__)


def read_manifest(store: Store, step: int, *, keys: Any = None) -> Manifest:
    """Parse and validate the manifest of ``step`` (CheckpointNotFoundError if uncommitted).
    With verification ``keys``, its signature is checked first (SignatureError)."""
    folder = step_dirname(step)
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        # Bounded: one byte past the limit is enough to refuse an oversized (or endless) manifest.
        data = store.read_bytes(path, 0, MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} under {store.uri} ({path} is missing)") from None
    except UnsafeFileError as exc:
        raise ManifestError(f"{store.uri}/{path} is not a regular file inside the checkpoint: {exc}") from None
    check_signature(store, folder, data, keys)
    manifest = Manifest.from_bytes(data, where=f"{store.uri}/{path}")
    if manifest.step != step:
        raise ManifestError(f"{store.uri}/{path} says step {manifest.step} but lives in folder {folder}")
    return manifest


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


def _has_manifest_bytes(store: Store, step: int) -> bool:
    """A non-empty manifest is there (read, not parsed: sizes may come from a stale cache)."""
    try:
        return MANIFEST_NAME in store.list(step_dirname(step)) and bool(store.read_bytes(f"{step_dirname(step)}/{MANIFEST_NAME}"))
    except FileNotFoundError:
        return False


def _committed_on(store: Store, keys: Any, limit: int | None, parse: bool = True) -> list[int]:
    """Committed steps of one store, newest first, at most ``limit`` (walks down from the newest
    folder and stops there). ``parse=False`` (and no keys): a non-empty manifest is enough."""
    out: list[int] = []
    for step in reversed(step_folders(store)):
        if limit is not None and len(out) >= limit:
            break
        ok = _manifest(store, step, keys) is not None if parse or keys is not None else _has_manifest_bytes(store, step)
        if ok:
            out.append(step)
    return out


def _per_store(stores: tuple[Store, ...], fn: Callable[[Store], Any]) -> list[Any]:
    """``fn`` on every store; unreachable ones are warned about and left out. Raises when none
    could be reached (the one error for one store; StoreUnavailableError naming all)."""
    results, errors = [], []
    for store in stores:
        try:
            results.append(fn(store))
        except (StorageError, OSError) as exc:
            log.warning("provider %s unavailable while looking for checkpoints: %s", store.name, describe(exc))
            errors.append((store, exc))
    if errors and not results:
        if len(errors) == 1:
            raise errors[0][1]
        raise StoreUnavailableError(
            "no checkpoint provider could be reached, so whether a checkpoint exists is unknown: "
            + "; ".join(redact(f"{s.name}: {type(e).__name__}: {e}") for s, e in errors)
        )
    return results


def newest_committed(where: "Location | Any", *, keys: Any = None, limit: int | None = None) -> list[int]:
    """Every step committed on at least one reachable store of ``where`` (a Location, or anything
    :func:`~.location.as_location` takes), newest first; at most ``limit`` of them
    (``limit=1``: the latest). With ``keys``, only steps whose manifest is signed by one of them.
    Raises StorageError when no store can be reached (see module doc), never "none"."""
    loc = as_location(where)
    steps: set[int] = set()
    for found in _per_store(loc.stores, lambda s: _committed_on(s, keys, limit)):
        steps.update(found)
    return sorted(steps, reverse=True)[:limit]


def committed_steps(store: "Store | str", *, validate: bool = True, keys: Any = None) -> list[int]:
    """Deprecated spelling of ``sorted(newest_committed(store))``: committed steps, ascending.
    ``validate=False`` (without ``keys``) only checks that the manifest is non-empty, without
    parsing it."""
    if validate or keys is not None:
        return sorted(newest_committed(store, keys=keys))
    return sorted(_committed_on(as_location(store).primary, None, None, parse=False))


def latest_step(store: "Store | str", *, keys: Any = None) -> int | None:
    """Deprecated spelling of ``newest_committed(store, limit=1)``: the highest committed step,
    or None. Raises StorageError when the store cannot be reached."""
    found = newest_committed(store, keys=keys, limit=1)
    return found[0] if found else None
