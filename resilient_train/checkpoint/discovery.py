"""The newest checkpoint that verifies, and what happens to the ones that do not.

Which steps are committed is :func:`~resilient_train.checkpoint.steps.newest_committed`
(``steps.py``). This module holds the fallback rules on top of it:

* :func:`load_newest_verifiable` walks the candidates newest first and falls back past a
  checkpoint that fails verification (corrupt, unsigned, torn, missing), warning and calling
  ``on_skip`` for each one skipped. Training then goes on from the older step and will save
  the skipped steps again, so the manager and ``wrap`` :func:`uncommit` each one skipped for a
  definite verdict on its bytes (:data:`DEFINITE_ERRORS`): its
  manifest is kept aside as ``rejected-manifest.json`` (for inspection) and ``manifest.json``
  removed, which makes the folder an uncommitted leftover that the next save of that step
  (or retention) clears.
* :func:`sign_checkpoint` signs a committed checkpoint in place (``resilient-train ckpt sign``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

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
    UnsupportedFormatVersionError,
)
from ..format.names import MANIFEST_NAME, step_dirname
from ..format.signing import SIGNATURE_NAME, KeyRing, SigningKey
from ..storage import Store
from .collectives import Coordinator, describe
from .location import as_store
from .signatures import read_signature, write_signature
from .steps import newest_committed, read_manifest

__all__ = [
    "load_newest_verifiable",
    "FALLBACK_ERRORS",
    "DEFINITE_ERRORS",
    "REJECTED_MANIFEST_NAME",
    "uncommit",
    "sign_checkpoint",
]

log = logging.getLogger(__name__)

FALLBACK_ERRORS: tuple[type[BaseException], ...] = (CorruptCheckpointError, ManifestError, SignatureError, CheckpointNotFoundError)
"""A checkpoint that fails with one of these is skipped for the next older one (except
UnsupportedFormatVersionError: a newer library wrote it; upgrading is the fix, not skipping it)."""

DEFINITE_ERRORS: tuple[type[BaseException], ...] = (HashMismatchError, SafetensorsHeaderError, ManifestError, SignatureError)
"""Verdicts about the checkpoint's bytes themselves. Only a checkpoint skipped for one of these
is uncommitted; a plain CorruptCheckpointError may also stand for a store that failed while
every replica was tried, so such a checkpoint is skipped but left committed."""


REJECTED_MANIFEST_NAME = "rejected-manifest.json"
"""Where :func:`uncommit` keeps the manifest of a checkpoint that failed verification."""


def uncommit(store: Store, step: int, reason: str) -> bool:
    """Turn committed checkpoint ``step`` that failed verification into an uncommitted folder
    (see module doc). Returns False when there was no manifest. Storage errors propagate."""
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
    steps = coord.broadcast(steps if err is None else describe(err))
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
        verdicts = coord.all_gather((_verdict(exc), None if exc is None else describe(exc)[:500]))
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


def sign_checkpoint(uri: "str | Store", step: int | None, key: SigningKey, *, storage_options: Mapping[str, Any] | None = None) -> tuple[int, str]:
    """Sign committed checkpoint ``step`` (default: the latest) in place: writes its
    ``manifest.sig``; the manifest itself is not changed. Returns ``(step, key_id)``."""
    store = as_store(uri, storage_options)
    if step is None:
        latest = newest_committed(store, limit=1)
        if not latest:
            raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
        step = latest[0]
    read_manifest(store, step)  # committed and well-formed; refuses anything else
    folder = step_dirname(step)
    data = store.read_bytes(f"{folder}/{MANIFEST_NAME}")
    write_signature(store, folder, data, key)
    # Read back what is there now: a manifest replaced meanwhile must not end up "signed".
    if KeyRing([key]).verify(store.read_bytes(f"{folder}/{MANIFEST_NAME}"), read_signature(store, folder), where=f"{store.uri}/{folder}") != key.key_id:
        raise SignatureError(f"{store.uri}/{folder}: signature did not verify after writing it")
    log.info("signed %s/%s with key %s", store.uri, folder, key.key_id)
    return step, key.key_id
