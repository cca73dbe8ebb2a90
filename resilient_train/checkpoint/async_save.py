"""Asynchronous checkpoints: training stalls only while the state is copied to CPU staging memory.

:class:`AsyncCheckpointer` call order::

    ckpt = AsyncCheckpointer(uri_or_store_or_placement)
    for step in ...:
        train_step()
        ckpt.save(step, state)     # stall: capture + copy into staging buffers; returns
    ckpt.close()                   # waits for the last write; raises its error if any

Promises:

* **Stall**: ``save`` returns once every tensor is copied into CPU staging buffers (pinned when
  CUDA is available) and the JSON state is deep-copied; the training loop may then change the
  live tensors freely. ``last_stall_s`` records how long that took.
* **Reuse**: staging buffers are allocated on the first save and reused while tensor shapes
  and dtypes stay the same (``staging_allocations`` counts allocations).
* **One in flight**: a save while the previous one is still writing either waits for it
  (``when_busy="wait"``) or is skipped and returns False (``when_busy="skip"``).
* **No silent failure**: an error in the background (write, commit, replication) is raised by
  the next call to ``save``, ``wait`` or ``close``, once.
* Writing, and replication when the target is a :class:`~resilient_train.storage.providers.Placement`,
  run in one background thread.

Distributed: the background write runs the writer's collectives on ``process_group``; pass a
group reserved for checkpoints (e.g. ``dist.new_group(backend="gloo")``) so they never
interleave with the training loop's collectives.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ..storage import Store, open_store
from ..storage.providers import Placement
from .collectives import Coordinator
from .replicate import write_replicated
from .state import Piece, Snapshot, TrainState, capture
from .writer import SaveOptions, write_snapshot

__all__ = ["AsyncCheckpointer"]

log = logging.getLogger(__name__)


class AsyncCheckpointer:
    """See module doc. Construction does no I/O and starts no thread."""

    def __init__(
        self,
        target: "str | Store | Placement",
        *,
        when_busy: str = "wait",
        process_group: Any = None,
        options: SaveOptions | None = None,
        storage_options: Mapping[str, Any] | None = None,
        pin_memory: bool | None = None,
    ):
        if when_busy not in ("wait", "skip"):
            raise ConfigError(f"when_busy must be 'wait' (the next save waits) or 'skip' (it is skipped), got {when_busy!r}")
        self._placement = target if isinstance(target, Placement) else None
        self._store = None if self._placement is not None else open_store(target, storage_options)  # type: ignore[arg-type]
        self.when_busy = when_busy
        self.process_group = process_group
        self.options = options or SaveOptions()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._staging: dict[Any, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.last_stall_s: float | None = None
        self.last_result: Any = None
        self.staging_allocations = 0
        self.saves_started = 0
        self.saves_skipped = 0
        self.saves_committed = 0

    # ---------------------------------------------------------------- public

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, state: TrainState) -> bool:
        """Stage ``state`` and start writing it as ``step`` in the background.

        Returns True when a save was started, False when it was skipped (``when_busy="skip"``
        and one was in flight). Raises the previous save's background error, if any.
        """
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one")
        self._raise_pending()
        if self.in_flight:
            if self.when_busy == "skip":
                self.saves_skipped += 1
                log.info("checkpoint of step %d skipped: the previous save is still writing", step)
                return False
            self._join()
            self._raise_pending()
        t0 = time.perf_counter()
        coord = Coordinator(self.process_group)
        snap = capture(state, coord.rank, coord.world_size)
        staged = Snapshot([Piece(p.meta, self._stage(p)) for p in snap.pieces], copy.deepcopy(snap.shared), copy.deepcopy(snap.rank_state))
        if any(p.tensor.device.type == "cuda" for p in snap.pieces):
            torch.cuda.synchronize()
        self.last_stall_s = time.perf_counter() - t0
        self.saves_started += 1
        self._thread = threading.Thread(target=self._run, args=(staged, step), name=f"rt-async-save-{step}", daemon=True)
        self._thread.start()
        return True

    def wait(self) -> Any:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        self._join()
        self._raise_pending()
        return self.last_result

    def close(self) -> None:
        """Finish the save in flight, then refuse new ones. Raises a pending background error."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._staging.clear()

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _stage(self, piece: Piece) -> torch.Tensor:
        src = piece.tensor
        key = piece.meta.ident
        buf = self._staging.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self.pin_memory)
            self._staging[key] = buf
            self.staging_allocations += 1
        buf.copy_(src, non_blocking=src.device.type == "cuda")
        return buf

    def _run(self, snap: Snapshot, step: int) -> None:
        try:
            if self._placement is not None:
                self.last_result = write_replicated(self._placement, snap, step, process_group=self.process_group, options=self.options)
            else:
                assert self._store is not None
                self.last_result = write_snapshot(self._store, snap, step, process_group=self.process_group, options=self.options)
            self.saves_committed += 1
        except BaseException as exc:  # noqa: BLE001 - kept and raised on the caller's next call
            log.error("background save of step %d failed (raised on the next call): %s", step, exc)
            self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc
