"""CheckpointManager: save on a schedule, keep the last K (:mod:`.retention`), resume from the newest that verifies."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError, StorageError
from ..format.signing import as_keyring
from ..storage import Store, redact
from .collectives import Coordinator
from .loading import load_checkpoint
from .location import as_location, as_store
from .reader import LoadResult
from .retention import apply_retention, retention_plan
from .steps import newest_committed
from .state import TrainState
from .saving import save
from .writer import SaveOptions, SaveResult

__all__ = ["CheckpointManager", "retention_plan"]

log = logging.getLogger(__name__)


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
        self.store = as_store(uri, storage_options)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.protect: Callable[[], Iterable[int]] | None = None
        self.process_group = process_group
        self.options = options or SaveOptions()
        self.last_saved_step: int | None = None
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
        result = load_checkpoint(as_location(self.store), state, step, newest_verifiable=True, on_skip=lambda s, why: self.skipped.append((s, why)),
                                 process_group=self.process_group, verify_keys=self.verify_keys)
        if result is not None:
            self.last_saved_step = result.step
        return result

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(newest_committed(self.store))

    def latest_step(self) -> int | None:
        """The newest committed step (signed by a trusted key, with ``verify_keys``), or None."""
        latest = newest_committed(self.store, keys=self.verify_keys, limit=1)
        return latest[0] if latest else None

    def apply_retention(self) -> list[int]:
        """Apply :func:`~.retention.apply_retention` (``keep_last``, ``verify_keys``, the steps
        ``protect`` names: keep_best, :mod:`.keep_best`); returns the deleted steps. Rank 0 only."""
        protected = set(self.protect()) if self.protect is not None else set()
        return apply_retention(self.store, self.keep_last, verify_keys=self.verify_keys, protect=protected)
