"""Retention: which step folders to delete (:func:`retention_plan`, pure) and deleting them
(:func:`apply_retention`). The one code path for :class:`~.manager.CheckpointManager` and the
background :class:`~.background.CheckpointWorker`.

Promises: the ``keep_last`` newest committed checkpoints stay (never fewer than one: the newest
committed checkpoint is never deleted), and so do uncommitted folders above the newest committed
step (a save may be writing there). With verification keys, a step whose manifest is not signed
by a trusted key is not a checkpoint: forged newer steps cannot push trusted ones out of
``keep_last``. Steps in ``protect`` (keep_best: :mod:`.keep_best`) are kept too. A manifest is deleted before the rest of its folder, so a half-deleted folder is
never mistaken for a checkpoint.

Failure behaviour: a storage error while listing raises (StorageError); a folder that cannot be
deleted is logged and skipped (the next call tries it again).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, StorageError
from ..format.names import MANIFEST_NAME, step_dirname
from ..format.signing import as_keyring
from ..storage import Store, redact
from .steps import newest_committed, step_folders

__all__ = ["retention_plan", "apply_retention"]

log = logging.getLogger(__name__)


def retention_plan(folders: Mapping[int, bool], keep_last: int) -> list[int]:
    """Steps whose folders to delete. ``folders`` maps step -> committed.

    Keeps the ``keep_last`` highest committed steps (never fewer than one: the newest committed
    checkpoint is never deleted) and uncommitted folders above the newest committed step (a
    save may be writing there). Deletes older committed steps and uncommitted leftovers below.
    """
    committed = sorted(s for s, ok in folders.items() if ok)
    if not committed:
        return []
    keep = set(committed[-max(1, keep_last):])
    newest = committed[-1]
    return sorted(s for s, ok in folders.items() if (ok and s not in keep) or (not ok and s < newest))


def apply_retention(store: Store, keep_last: int, *, verify_keys: Any = None, protect: Iterable[int] = ()) -> list[int]:
    """Delete what :func:`retention_plan` says for ``store``, except the steps in ``protect``;
    returns the deleted steps. Call it on one process (rank 0): it is not collective. See the
    module doc for promises and failures."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be an int >= 1 (the newest checkpoint is always kept), got {keep_last!r}")
    committed = set(newest_committed(store, keys=as_keyring(verify_keys)))
    folders = {step: step in committed for step in step_folders(store)}
    protected = set(protect)
    doomed = [s for s in retention_plan(folders, keep_last) if s not in protected]
    for step in doomed:
        folder = step_dirname(step)
        try:
            store.delete(f"{folder}/{MANIFEST_NAME}")
            store.delete(folder, recursive=True)
            log.info("retention removed %s/%s", store.uri, folder)
        except StorageError as exc:
            log.warning("retention could not remove %s/%s: %s", store.uri, folder, redact(str(exc)))
    return doomed
