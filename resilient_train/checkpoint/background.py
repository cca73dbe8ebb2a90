"""Checkpoint work that must stay off the training path: copies, catch-up, retention, probes.

:class:`CheckpointWorker` is one background thread (on rank 0 only: it talks to storage, never
to other ranks, so no collective ever waits on it). After each committed save the
asynchronous checkpointer hands it the step; the worker then, in order:

1. **replicates** the step from the providers that hold it to the policy's other providers
   (each copy verified file by file and committed by its manifest, as ``copy_checkpoint``);
2. notes every provider that could not take its copy in the :class:`HealthBook` (failed + the
   step it missed) and emits an event; training is not told to stop;
3. **catches up** providers that missed copies and answer again: the steps they missed that
   are still committed somewhere, oldest first (the health book's cooldown spaces the tries;
   while idle the worker probes every ``probe_interval_s``);
4. applies **retention** (``keep_last``) on every provider, each under its store's retry
   budget; a provider that cannot be cleaned is logged and skipped.

Every copy is recorded in the :class:`~resilient_train.storage.ledger.Ledger` (purpose
``replication`` or ``catch_up``). Jobs queue up; when the worker falls behind, only the
newest step is copied right away and the skipped ones are owed as missed steps (the catch-up
brings the ones retention keeps). Failures never escape the thread: they are logged, recorded
and reported through ``on_event`` and :attr:`last_error`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

from ..errors import CheckpointNotFoundError, ReplicationError, ResilientTrainError
from ..storage import Store
from ..storage.ledger import Ledger
from ..storage.providers import HealthBook, Placement
from .steps import newest_committed
from .retention import apply_retention
from .collectives import describe
from .replicate import CopyReport, ReplicationReport, candidates, copy_checkpoint, fill_copies

__all__ = ["CheckpointWorker"]

log = logging.getLogger(__name__)

EventSink = Callable[..., None]


class CheckpointWorker:
    """See module doc. ``placement`` (replication + retention on each provider) or ``store``
    (retention only). Construction does no I/O; the thread starts on the first :meth:`submit`
    and is a daemon, so a hung provider never blocks interpreter exit."""

    def __init__(
        self,
        placement: Placement | None = None,
        store: Store | None = None,
        *,
        keep_last: int | None = None,
        verify_keys: Any = None,
        health_book: HealthBook | None = None,
        ledger: Ledger | None = None,
        on_event: EventSink | None = None,
        io_threads: int = 4,
        probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if (placement is None) == (store is None):
            raise ValueError("CheckpointWorker needs exactly one of placement or store")
        self.placement = placement
        self.store = store
        self.keep_last = keep_last
        self.protect: Callable[[], Any] | None = None  # steps retention keeps beside keep_last (keep_best)
        self.verify_keys = verify_keys
        self.health_book = health_book if health_book is not None else HealthBook()
        self.ledger = ledger
        self.on_event = on_event
        self.io_threads = io_threads
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self._jobs: "queue.Queue[tuple[int, list[str]] | None]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        self._closed = False
        self.reports: list[ReplicationReport] = []
        self.last_error: ReplicationError | None = None
        """The shortfall of the newest replicated step (None once a step reaches its copies)."""
        self.copies_made = 0
        self.catch_ups = 0

    # ------------------------------------------------------------------ public

    def submit(self, step: int, committed: Sequence[str]) -> None:
        """Queue committed ``step`` (held by ``committed``) for copies and retention. Non-blocking."""
        if self._closed:
            return
        with self._idle:
            self._pending += 1
        self._jobs.put((step, list(committed)))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rt-ckpt-worker", daemon=True)
            self._thread.start()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job is done; False if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float | None = 60.0) -> bool:
        """Finish the queued jobs (waiting at most ``timeout_s``), then stop the thread."""
        done = self.drain(timeout_s)
        self._closed = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=1.0 if not done else timeout_s)
        if not done:
            log.warning("checkpoint worker still busy after %s s at close; copies left behind are caught up by the next run or `resilient-train ckpt replicate`", timeout_s)
        return done

    @property
    def busy(self) -> bool:
        """Whether a submitted job (copies, catch-up, retention) is queued or running."""
        return self._pending > 0

    @property
    def behind(self) -> dict[str, list[int]]:
        """Providers that miss copies, with the steps (from the health book)."""
        return self.health_book.behind

    # ------------------------------------------------------------------ the thread

    def _emit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, **fields)
            except Exception:  # noqa: BLE001 - an event sink must not stop the worker
                log.debug("event sink failed for %s", event)

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.probe_interval_s if self.health_book.behind else None)
            except queue.Empty:
                self._guard(self._catch_up)
                continue
            if job is None:
                return
            # Fell behind: copy only the newest step now; the skipped ones are owed (caught up later).
            skipped: list[tuple[int, list[str]]] = []
            while True:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                skipped.append(job)
                job = nxt
            try:
                for old_step, held in skipped:
                    self._owe(old_step, held, "the worker fell behind")
                self._guard(lambda: self._replicate(*job))
                self._guard(self._catch_up)
                self._guard(self._retention)
            finally:
                with self._idle:
                    self._pending -= 1 + len(skipped)
                    self._idle.notify_all()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - nothing escapes the worker; reported instead
            log.error("checkpoint worker: %s", describe(exc))
            self._emit("checkpoint_worker_error", error=describe(exc))

    def _owe(self, step: int, held: Sequence[str], why: str) -> None:
        if self.placement is None:
            return
        for p in self.placement.providers:
            if p.name not in held and self.placement.policy.allows(p.region):
                self.health_book.missed(p.name, step)
        log.info("step %d: copies deferred (%s)", step, why)

    def _record(self, rep: CopyReport, purpose: str) -> None:
        if self.ledger is not None and rep.bytes_copied:
            self.ledger.record_copy(rep.source, rep.destination, rep.bytes_copied, purpose)

    def _replicate(self, step: int, held: list[str]) -> None:
        pl = self.placement
        if pl is None:
            return
        now = self._clock()
        names = [p.name for p in pl.providers]
        health = self.health_book.snapshot(names, now)
        report = ReplicationReport(step, committed=list(held))
        failures: dict[str, str] = {}
        t0 = time.perf_counter()
        fill_copies(pl, report, candidates(pl, health), failures, self.io_threads)
        for name, rep in report.copies.items():
            self.copies_made += 1
            self._record(rep, "replication")
            self.health_book.succeeded(name)
        t = self._clock()
        for name, cause in failures.items():
            self.health_book.failed(name, t, _short(cause))
        short = len(report.committed) < pl.policy.copies
        if short:
            # Whoever should have a copy and does not owes it: failed now, or skipped as unhealthy.
            owed = [n for n in failures] + [n for n in names if not health.get(n, True) and n not in report.committed and pl.policy.allows(pl.provider(n).region)]
            for n in dict.fromkeys(owed):
                self.health_book.missed(n, step)
            causes = {n: _short(failures.get(n) or f"skipped: unhealthy after a recent failure ({_short(self.health_book.cause(n), 200) or 'no cause recorded'})") for n in dict.fromkeys(owed)}
            err = ReplicationError(f"step {step} has {len(report.committed)} of {pl.policy.copies} copies (committed on: {', '.join(report.committed)}); the missing copies are caught up when the providers answer", causes)
            err.committed = list(report.committed)  # type: ignore[attr-defined]
            err.report = report  # type: ignore[attr-defined]
            self.last_error = err
            log.warning("%s: %s", err, "; ".join(f"{k}: {v}" for k, v in causes.items()))
            self._emit("replication_degraded", step=step, committed=list(report.committed), failures=causes)
        else:
            self.last_error = None
        self.reports.append(report)
        if report.copies or short:
            self._emit("replicated", step=step, committed=list(report.committed), copied_bytes=sum(r.bytes_copied for r in report.copies.values()), seconds=round(time.perf_counter() - t0, 3))

    def _catch_up(self) -> None:
        pl = self.placement
        if pl is None:
            return
        behind = self.health_book.behind
        if not behind:
            return
        health = self.health_book.snapshot(list(behind), self._clock())
        for name, steps in behind.items():
            if not health.get(name, True):
                continue  # still cooling down after a failure: try later
            dst = pl.store(name)
            try:
                have = set(newest_committed(dst))  # the probe: fails fast (breaker) if still down
            except (ResilientTrainError, OSError) as exc:
                self.health_book.failed(name, self._clock(), describe(exc))
                log.info("catch-up of %s deferred: %s", name, describe(exc))
                continue
            sources = [pl.store(p.name) for p in pl.providers if p.name != name and p.name not in behind]
            sources += [pl.store(p) for p in behind if p != name]
            done: list[int] = []
            for step in steps:
                if step in have:
                    done.append(step)
                    continue
                try:
                    rep = copy_checkpoint(sources, dst, step, io_threads=self.io_threads)
                except CheckpointNotFoundError:
                    done.append(step)  # retention removed it everywhere: nothing to catch up
                    continue
                except ResilientTrainError as exc:
                    self.health_book.failed(name, self._clock(), describe(exc))
                    log.warning("catch-up of step %d on %s failed (tried again later): %s", step, name, describe(exc))
                    break
                done.append(step)
                self.catch_ups += 1
                self._record(rep, "catch_up")
                self._emit("caught_up", provider=name, step=step, bytes=rep.bytes_copied, seconds=round(rep.seconds, 3))
                log.info("caught up step %d on %s (%.1f MB)", step, name, rep.bytes_copied / 1e6)
            self.health_book.caught_up(name, done)
            if not self.health_book.behind.get(name):
                self.health_book.succeeded(name)

    def _retention(self) -> None:
        if not self.keep_last:
            return
        stores: list[Store]
        if self.placement is not None:
            health = self.health_book.snapshot([p.name for p in self.placement.providers], self._clock())
            stores = [self.placement.store(p.name) for p in self.placement.providers if health.get(p.name, True)]
        else:
            assert self.store is not None
            stores = [self.store]
        for store in stores:
            try:
                protected = set(self.protect()) if self.protect is not None else set()  # keep_best
                removed = apply_retention(store, self.keep_last, verify_keys=self.verify_keys, protect=protected)
            except (ResilientTrainError, OSError) as exc:
                log.warning("retention on %s skipped: %s", store.name, describe(exc))
                continue
            if removed:
                self._emit("retention", provider=store.name, removed=removed)



def _short(text: str, limit: int = 400) -> str:
    """Causes go into events and messages: keep them readable (nested copies repeat themselves)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
