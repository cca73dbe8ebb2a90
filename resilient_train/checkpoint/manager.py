"""CheckpointManager: save on a schedule, keep the last K, resume from the latest."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError, StorageError
from ..format.names import MANIFEST_NAME, parse_step_dirname, step_dirname
from ..storage import Store, open_store, redact
from .collectives import Coordinator
from .discovery import committed_steps, latest_step, load_newest_verifiable, uncommit
from .reader import LoadResult, load
from .state import TrainState
from .writer import SaveOptions, SaveResult, save

__all__ = ["CheckpointManager", "retention_plan"]

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


class CheckpointManager:
    """Periodic, collective checkpoints under one URI.

    ``every_n_steps``: :meth:`maybe_save` saves when ``step % every_n_steps == 0``.
    ``keep_last``: committed checkpoints kept after each save (>= 1).
    ``verify_keys`` (a KeyRing, key, key file or list of them): only checkpoints whose
    manifest is signed by one of them are loaded (sign with ``SaveOptions(signing_key=...)``).
    Construction does no I/O. Every rank of ``process_group`` calls the same methods in the
    same order.
    """

    def __init__(
        self,
        uri: "str | Store",
        every_n_steps: int,
        keep_last: int = 3,
        *,
        storage_options: Mapping[str, Any] | None = None,
        process_group: Any = None,
        options: SaveOptions | None = None,
        verify_keys: Any = None,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be an int >= 1 (the newest checkpoint is always kept), got {keep_last!r}")
        self.store = open_store(uri, storage_options)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.protect: Callable[[], Iterable[int]] | None = None
        self.process_group = process_group
        self.options = options or SaveOptions()
        self.last_saved_step: int | None = None
        from ..format.signing import as_keyring

        self.verify_keys = as_keyring(verify_keys)
        self.skipped: list[tuple[int, str]] = []
        """Checkpoints :meth:`restore` fell back past: ``(step, reason)``."""

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step

    def save(self, step: int, state: TrainState) -> SaveResult:
        """Save now (collective), then apply retention on rank 0. Once the checkpoint is
        committed, a storage failure of retention is a warning (the next save's retention
        catches up), never an error of the save."""
        result = save(self.store, state, step, process_group=self.process_group, options=self.options)
        self.last_saved_step = step
        if Coordinator(self.process_group).rank == 0:
            try:
                self.apply_retention()
            except StorageError as exc:
                log.warning("step %d is committed under %s, but retention failed (the next save retries it): %s",
                            step, self.store.uri, redact(str(exc)))
        return result

    def maybe_save(self, step: int, state: TrainState) -> SaveResult | None:
        """Save if ``step`` is on the schedule; returns the result or None."""
        return self.save(step, state) if self.should_save(step) else None

    def restore(self, state: TrainState, step: int | None = None) -> LoadResult | None:
        """Load ``step`` (default: the newest checkpoint that verifies) into ``state``; None if
        there is no committed checkpoint yet.

        Without ``step``, a newest checkpoint that fails verification (corrupt, torn, unsigned)
        is skipped with a warning (recorded in :attr:`skipped`) and the next older one is
        loaded. One skipped for a definite verdict on its bytes is also uncommitted (rank 0;
        see :func:`~resilient_train.checkpoint.discovery.uncommit`), since its step will be
        saved again. An unreachable store raises StorageError; it is never "no checkpoint".
        """
        if step is not None:
            result = load(self.store, state, step, process_group=self.process_group, verify_keys=self.verify_keys)
        else:
            result = load_newest_verifiable(
                lambda: list(reversed(committed_steps(self.store))),
                lambda s: load(self.store, state, s, process_group=self.process_group, verify_keys=self.verify_keys),
                process_group=self.process_group,
                on_skip=self._skipped,
            )
            if result is None:
                return None
        self.last_saved_step = result.step
        return result

    def _skipped(self, step: int, reason: str, definite: bool) -> None:
        self.skipped.append((step, reason))
        if definite and Coordinator(self.process_group).rank == 0:
            try:
                uncommit(self.store, step, reason)
            except StorageError as exc:
                log.warning("could not uncommit step %d under %s: %s", step, self.store.uri, redact(str(exc)))

    def steps(self) -> list[int]:
        return committed_steps(self.store)

    def latest_step(self) -> int | None:
        return latest_step(self.store, keys=self.verify_keys)

    def apply_retention(self) -> list[int]:
        """Delete what :func:`retention_plan` says; returns the deleted steps. Rank 0 only."""
        # with verify_keys, a step whose manifest is not signed by a trusted key is not a
        # checkpoint: forged newer steps must not push trusted ones out of keep_last
        committed = set(committed_steps(self.store, keys=self.verify_keys))
        folders = {}
        for name in self.store.list(""):
            step = parse_step_dirname(name)
            if step is not None:
                folders[step] = step in committed
        protected = set(self.protect()) if self.protect is not None else set()  # keep_best (checkpoint/keep_best.py)
        doomed = [s for s in retention_plan(folders, self.keep_last) if s not in protected]
        for step in doomed:
            folder = step_dirname(step)
            try:
                # The manifest goes first so a half-deleted folder is never mistaken for a checkpoint.
                self.store.delete(f"{folder}/{MANIFEST_NAME}")
                self.store.delete(folder, recursive=True)
                log.info("retention removed %s/%s", self.store.uri, folder)
            except StorageError as exc:
                log.warning("retention could not remove %s/%s: %s", self.store.uri, folder, redact(str(exc)))
        return doomed
