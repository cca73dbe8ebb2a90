"""Asynchronous checkpoints: training stalls only while the state is copied to CPU staging memory.

:class:`AsyncCheckpointer` call order::

    ckpt = AsyncCheckpointer(uri_or_store_or_placement)
    for step in ...:
        train_step()
        ckpt.save(step, state)     # stall: capture + copy into staging buffers; returns
    ckpt.close()                   # waits for the last write (and rank 0's copies)

Promises:

* **Stall**: ``save`` returns once this rank's share of the tensors is copied into CPU staging
  buffers (pinned when CUDA is available) and the JSON state is deep-copied; the training loop
  may then change the live tensors freely. ``last_stall_s`` records how long that took.
* **Each rank stages what it writes**: the planner's plan (computed once with one small
  collective at the first save, then refreshed by the background write) says which pieces each
  rank writes; only those are staged (``staging_bytes``), about 1/N of replicated state. A rank
  whose tensors changed shape stages everything for that save (no collective on the training
  thread to re-plan).
* **Reuse**: staging buffers are allocated on the first save (or beforehand by
  :meth:`AsyncCheckpointer.prepare`, so the first save stalls like the later ones) and reused
  while tensor shapes and dtypes stay the same (``staging_allocations`` counts allocations).
* **One in flight**: a save while the previous one is still writing either waits for it
  (``when_busy="wait"``) or is skipped and returns False (``when_busy="skip"``).
* **Off the training path** (a :class:`~resilient_train.storage.providers.Placement`): the
  background thread writes to the primary provider (collective on ``process_group``); the
  copies to the other providers, the catch-up of providers that missed copies, and retention
  (``keep_last``) run on rank 0 in a :class:`~resilient_train.checkpoint.background.CheckpointWorker`
  that no collective waits on. With a single Store, retention runs there too.
* **Failures**: with ``on_failure="raise"`` (default) a failed write is raised by the next call
  to ``save``, ``wait`` or ``close``, once; with ``on_failure="continue"`` it is logged, reported
  (``on_event("checkpoint_failed", ...)``) and the next save tries again. A copy that did not
  reach a provider never fails ``save``: the provider is marked in the health book and caught
  up later (``wait``/``close`` on rank 0 raise the newest step's ReplicationError in raise mode).
* **Limits**: ``max_checkpoint_failures`` (consecutive failed saves) and
  ``max_uncommitted_steps`` (steps since the last committed checkpoint, counted from
  ``start_step`` before the first one) stop training: ``save`` raises
  :class:`~resilient_train.errors.CheckpointPolicyError` naming the providers and their causes,
  on every rank at the same step (the outcomes it counts are agreed by the collective write).
* **Ledger**: with ``ledger``, rank 0 records the bytes of every committed checkpoint and
  the worker records every copy.

Distributed: the background write runs the writer's collectives on ``process_group``; pass a
group reserved for checkpoints (e.g. ``dist.new_group(backend="gloo")``) so they never
interleave with the training loop's collectives.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError, CheckpointPolicyError, CheckpointWriteError, ConfigError, ReplicationError
from ..storage import Store
from ..storage.ledger import Ledger
from ..storage.providers import HealthBook, Placement
from .background import CheckpointWorker
from .collectives import Coordinator, describe
from .location import as_location, as_store
from .planner import PieceMeta, plan_save
from .saving import save_checkpoint
from .state import Piece, Snapshot, TrainState, capture
from .writer import SaveOptions

__all__ = ["AsyncCheckpointer", "SaveFailure"]

log = logging.getLogger(__name__)


@dataclass
class _Staged(Snapshot):
    """A snapshot whose ``pieces`` are this rank's share only; ``held`` is everything the rank
    holds (the planner needs it to give every rank the same plan)."""

    held: list[PieceMeta] = field(default_factory=list)

    def metas(self) -> list[PieceMeta]:
        return list(self.held)


@dataclass(frozen=True)
class SaveFailure:
    """A save that committed nowhere: the step, and the cause per provider (or per rank)."""

    step: int
    causes: dict[str, str]
    error: str


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
        on_failure: str = "raise",
        keep_last: int | None = None,
        verify_keys: Any = None,
        max_uncommitted_steps: int | None = None,
        max_checkpoint_failures: int | None = None,
        start_step: int | None = None,
        ledger: Ledger | None = None,
        on_event: Callable[..., None] | None = None,
        health_book: HealthBook | None = None,
        copy_timeout_s: float = 600.0,
        probe_interval_s: float = 5.0,
    ):
        if when_busy not in ("wait", "skip"):
            raise ConfigError(f"when_busy must be 'wait' (the next save waits) or 'skip' (it is skipped), got {when_busy!r}")
        if on_failure not in ("raise", "continue"):
            raise ConfigError(f"on_failure must be 'raise' (the next call raises) or 'continue' (log, report, try again at the next save), got {on_failure!r}")
        for label, v in (("keep_last", keep_last), ("max_uncommitted_steps", max_uncommitted_steps), ("max_checkpoint_failures", max_checkpoint_failures)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{label} must be None (no limit) or an int >= 1, got {v!r}")
        location = as_location(target, storage_options)
        self._placement = location.placement
        self._store = None if self._placement is not None else as_store(location)
        self._location = location
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
        self.on_failure = on_failure
        self.keep_last = keep_last
        self.verify_keys = verify_keys
        self.max_uncommitted_steps = max_uncommitted_steps
        self.max_checkpoint_failures = max_checkpoint_failures
        self.start_step = start_step
        self.ledger = ledger
        self.on_event = on_event
        self.health_book = health_book if health_book is not None else HealthBook(cooldown_s=30.0)
        self.copy_timeout_s = copy_timeout_s
        self.probe_interval_s = probe_interval_s
        self.last_committed_step: int | None = None
        self.last_committed_on: str | None = None
        self.consecutive_failures = 0
        self.failures: list[SaveFailure] = []
        self._share: set[Any] | None = None
        self._share_metas: list[PieceMeta] | None = None
        self._worker: CheckpointWorker | None = None
        self._rank = 0

    # ---------------------------------------------------------------- public

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, state: TrainState) -> bool:
        """Stage this rank's share of ``state`` and start writing it as ``step`` in the background.

        Returns True when a save was started, False when it was skipped (``when_busy="skip"``
        and one was in flight). Raises the previous save's background error in raise mode, and
        CheckpointPolicyError in either mode once a limit is passed.
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
        self._check_limits(step)
        t0 = time.perf_counter()
        coord = Coordinator(self.process_group)
        self._rank = coord.rank
        snap = capture(state, coord.rank, coord.world_size)
        held = snap.metas()
        if self._share is None:
            # First save: one small collective (no background write runs yet) to learn the plan.
            self._learn_share(coord, held)
        share = self._share if held == self._share_metas else None
        chosen = [p for p in snap.pieces if share is None or p.meta.ident in share]
        pieces = [Piece(p.meta, buf) for p, buf in zip(chosen, self._stage_all(chosen))]
        staged = _Staged(pieces, copy.deepcopy(snap.shared), copy.deepcopy(snap.rank_state), held)
        if share is not None:
            for key in [k for k in self._staging if k not in share]:
                del self._staging[key]  # a piece this rank no longer writes: free its buffer
        if any(p.tensor.device.type == "cuda" for p in snap.pieces):
            torch.cuda.synchronize()
        self.last_stall_s = time.perf_counter() - t0
        self.saves_started += 1
        if self.start_step is None:
            self.start_step = step
        self._thread = threading.Thread(target=self._run, args=(staged, step), name=f"rt-async-save-{step}", daemon=True)
        self._thread.start()
        return True

    def prepare(self, state: TrainState) -> int:
        """Do now what the first :meth:`save` would do on the training path: learn the save
        plan (one small collective on ``process_group``: call it on every rank) and allocate
        this rank's staging buffers, touching every page, so the first save stalls like the
        later ones (a fresh buffer's page faults cost more than the copy itself). Call it
        outside the training loop once ``state`` has its final tensors (after a load, or after
        the first optimizer step: AdamW creates its moments there); a later change of shapes
        only means that save allocates again. Returns the bytes of staging memory held.

        Raises TypeError for a ``state`` that is not a TrainState and CheckpointError once
        closed; a save in flight keeps its buffers (only missing ones are allocated)."""
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one")
        coord = Coordinator(self.process_group)
        self._rank = coord.rank
        snap = capture(state, coord.rank, coord.world_size)
        if self.in_flight:
            self._join()  # the background write refreshes the plan with a collective of its own
        self._learn_share(coord, snap.metas())
        share = self._share or set()
        for p in snap.pieces:
            if p.meta.ident in share:
                self._buffer(p).zero_()  # touch every page now, not in the first save's copy
        return self.staging_bytes

    @property
    def staging_bytes(self) -> int:
        """Bytes of CPU staging memory this rank holds (pinned when ``pin_memory``)."""
        return sum(b.numel() * b.element_size() for b in self._staging.values())

    @property
    def behind(self) -> dict[str, list[int]]:
        """Providers that miss copies, with the steps they miss (rank 0; {} elsewhere)."""
        return self.health_book.behind

    @property
    def worker(self) -> CheckpointWorker | None:
        """Rank 0's background worker (copies, catch-up, retention), once started."""
        return self._worker

    def wait(self, include_copies: bool = True, timeout_s: float | None = None) -> Any:
        """Block until the save in flight (if any) is committed and, on rank 0 with
        ``include_copies``, its copies are done (at most ``timeout_s``, default
        ``copy_timeout_s``). In raise mode, raise the write's error, then the newest step's
        replication shortfall (rank 0)."""
        self._join()
        self._raise_pending()
        if include_copies and self._worker is not None:
            self._worker.drain(self.copy_timeout_s if timeout_s is None else timeout_s)
            err = self._worker.last_error
            if err is not None and self.on_failure == "raise":
                self._worker.last_error = None
                raise err
        return self.last_result

    def close(self) -> None:
        """Finish the save in flight and (rank 0) the copies, at most ``copy_timeout_s``, then
        refuse new ones. Raises a pending background error in raise mode."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._staging.clear()
            if self._worker is not None:
                self._worker.close(self.copy_timeout_s)

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _buffer(self, piece: Piece) -> torch.Tensor:
        """The staging buffer of ``piece``: the one held, or a new one when none fits."""
        src = piece.tensor
        key = piece.meta.ident
        buf = self._staging.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self.pin_memory)
            self._staging[key] = buf
            self.staging_allocations += 1
        return buf

    def _stage_all(self, pieces: list[Piece]) -> list[torch.Tensor]:
        """Copy ``pieces`` into their staging buffers (the stall). Device tensors: one
        non-blocking copy each. CPU tensors: one ``_foreach_copy_`` for all of them, so the
        training thread takes the GIL back once, not once per tensor (a background thread
        holding the GIL, such as an upload's event loop, otherwise stretches every tensor's
        copy by up to the interpreter's switch interval); and single-threaded while this
        checkpointer's worker is copying to other providers, so the copy does not fan out onto
        the core that work occupies and wait for its slowest thread (measured, 64 MiB in 8
        tensors beside a busy thread: 65-170 ms at the 90th percentile per tensor and
        multi-threaded, 9-14 ms in one single-threaded foreach copy; alone on 2 cores the
        single thread is half as fast, so it is used only while the worker is busy)."""
        bufs = [self._buffer(p) for p in pieces]
        cpu = [i for i, p in enumerate(pieces) if p.tensor.device.type == "cpu"]
        with torch.no_grad():
            for i, p in enumerate(pieces):
                if p.tensor.device.type != "cpu":
                    bufs[i].copy_(p.tensor, non_blocking=p.tensor.device.type == "cuda")
            if not cpu:
                return bufs
            threads = torch.get_num_threads()
            narrow = threads > 1 and self._worker is not None and self._worker.busy
            if narrow:
                torch.set_num_threads(1)
            try:
                foreach = getattr(torch, "_foreach_copy_", None)
                if foreach is not None:
                    foreach([bufs[i] for i in cpu], [pieces[i].tensor for i in cpu])
                else:  # older torch: one copy per tensor
                    for i in cpu:
                        bufs[i].copy_(pieces[i].tensor)
            finally:
                if narrow:
                    torch.set_num_threads(threads)
        return bufs

    def _learn_share(self, coord: Coordinator, held: list[PieceMeta]) -> None:
        plan = plan_save(coord.all_gather(held), self.options.max_file_bytes)
        self._share = {p.ident for f in plan.for_rank(coord.rank) for p in f.pieces}
        self._share_metas = list(held)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, **fields)
            except Exception:  # noqa: BLE001 - an event sink must not fail a save
                log.debug("event sink failed for %s", event)

    def _ensure_worker(self) -> CheckpointWorker:
        if self._worker is None:
            self._worker = CheckpointWorker(
                self._placement, None if self._placement is not None else self._store, keep_last=self.keep_last, verify_keys=self.verify_keys, health_book=self.health_book,
                ledger=self.ledger, on_event=self.on_event, probe_interval_s=self.probe_interval_s,
            )
            self._worker.protect = getattr(self, "protect", None)  # keep_best: steps retention keeps beside keep_last
        return self._worker

    def _run(self, snap: _Staged, step: int) -> None:
        coord = Coordinator(self.process_group)
        try:
            # Refresh the plan for the next save's staging (one small collective, off the training thread).
            self._learn_share(coord, snap.held)
            # The one save route; copies go to rank 0's worker below, off every collective.
            report = save_checkpoint(self._location, snap, step, process_group=self.process_group, options=self.options, copies="later", health_book=self.health_book)
            committed_on, manifest = report.committed[0], report.manifest
            self.last_result = report if self._placement is not None else report.saved
        except BaseException as exc:  # noqa: BLE001 - kept and raised / reported on the caller's next call
            self._failed(step, exc)
            return
        self.saves_committed += 1
        self.last_committed_step = step
        self.last_committed_on = committed_on
        self.consecutive_failures = 0
        if coord.rank == 0:
            if self.ledger is not None:
                nbytes = sum(f.size_bytes for f in manifest.files) if manifest is not None else _snap_bytes(self.last_result)
                self.ledger.record_write(committed_on, nbytes, "checkpoint")
            if self._placement is not None or self.keep_last:
                self._ensure_worker().submit(step, [committed_on])

    def _failed(self, step: int, exc: BaseException) -> None:
        if isinstance(exc, ReplicationError):
            causes = dict(exc.failures)
        elif isinstance(exc, CheckpointWriteError):
            where = self._store.name if self._store is not None else "storage"
            causes = {where: "; ".join(f"rank {r}: {c}" for r, c in sorted(exc.failures.items())) or describe(exc)}
        else:
            causes = {self._store.name if self._store is not None else "storage": describe(exc)}
        self.consecutive_failures += 1
        self.failures.append(SaveFailure(step, causes, describe(exc)))
        del self.failures[:-20]
        if self.on_failure == "raise":
            log.error("background save of step %d failed (raised on the next call): %s", step, describe(exc))
            self._error = exc
        else:
            log.warning("checkpoint of step %d failed; training goes on and the next interval tries again (%d in a row): %s", step, self.consecutive_failures, describe(exc))
        self._emit("checkpoint_failed", step=step, consecutive=self.consecutive_failures, causes=causes)

    def _check_limits(self, step: int) -> None:
        last = self.failures[-1] if self.failures else None
        causes = dict(last.causes) if last is not None else {}
        since = self.last_committed_step if self.last_committed_step is not None else self.start_step
        if self.max_checkpoint_failures is not None and self.consecutive_failures >= self.max_checkpoint_failures:
            raise CheckpointPolicyError(
                f"{self.consecutive_failures} checkpoints in a row failed (max_checkpoint_failures={self.max_checkpoint_failures}); "
                f"last committed: {_last(self)}; stopping before step {step}. Causes: " + "; ".join(f"{k}: {v}" for k, v in causes.items()),
                causes,
            )
        if self.max_uncommitted_steps is not None and since is not None and step - since > self.max_uncommitted_steps and self.consecutive_failures:
            raise CheckpointPolicyError(
                f"no checkpoint committed for {step - since} steps (max_uncommitted_steps={self.max_uncommitted_steps}); last committed: {_last(self)}; "
                f"{self.consecutive_failures} save(s) failed since. Causes: " + "; ".join(f"{k}: {v}" for k, v in causes.items()),
                causes,
            )

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc


def _last(ck: AsyncCheckpointer) -> str:
    if ck.last_committed_step is None:
        return "none in this run"
    return f"step {ck.last_committed_step} on {ck.last_committed_on}"


def _snap_bytes(result: Any) -> int:
    return int(getattr(result, "bytes_written_by_rank", 0) or 0)
