"""The trainer's event log: JSON lines to a file or URL, a callable, and a metrics callback.

Each event is one dict ``{"t": unix seconds, "event": name, **fields}`` (``rank`` is added).
Where it goes, set by ``TrainerConfig.event_log``:

* a local path: each event is appended at once (``{rank}`` is replaced by the rank);
* an fsspec URL (``s3://bucket/run/events-{rank}.jsonl``, ``gs://``, ``az://``, ``memory://``):
  object stores cannot append, so events are buffered in memory and the whole log object is
  rewritten at each flush: when a checkpoint starts or commits, on ``resume``, every
  ``flush_every_s`` seconds (in the background) and at ``close`` (synchronously). Events are
  few (a handful per checkpoint), so the rewrite stays small;
* a callable: called with each event dict, in the thread that emitted it.

``TrainerConfig.on_event`` is called with every event as well, whatever ``event_log`` is: the
hook for forwarding to TensorBoard, W&B or Prometheus (see ``examples/tensorboard_events.py``).

A sink that fails (storage down, a callback that raises) is logged as a warning (once per
sink until it works again) and never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

from .storage import redact

__all__ = ["EventLog", "FLUSH_EVENTS"]

log = logging.getLogger(__name__)

# Events after which a buffered (URL) log is written out.
FLUSH_EVENTS = frozenset({"checkpoint_started", "checkpoint_committed", "resume", "close"})


def _is_url(path: str) -> bool:
    return "://" in path or "::" in path


class EventLog:
    """Append-only JSON lines: one object per event with ``t`` (unix seconds), ``event``, fields.

    ``sink``: None, a local path, an fsspec URL or a callable (see the module docstring).
    ``on_event``: an extra callable for metrics. ``flush_every_s`` bounds how stale a URL log
    can be while training runs. No I/O happens here.
    """

    def __init__(self, sink: "str | Callable[[dict], Any] | None", rank: int = 0, *, on_event: Callable[[dict], Any] | None = None, storage_options: Mapping[str, Any] | None = None, flush_every_s: float = 30.0):
        if sink is not None and not isinstance(sink, str) and not callable(sink):
            from .errors import ConfigError

            raise ConfigError(f"event_log must be a path, an fsspec URL or a callable, got {type(sink).__name__}")
        if on_event is not None and not callable(on_event):
            from .errors import ConfigError

            raise ConfigError(f"on_event must be callable, got {type(on_event).__name__}")
        self.rank = rank
        self.path: str | None = sink.replace("{rank}", str(rank)) if isinstance(sink, str) and sink else None
        self._call = sink if callable(sink) else None
        self._on_event = on_event
        self._options = dict(storage_options or {})
        self._flush_every_s = flush_every_s
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._url = self.path is not None and _is_url(self.path)
        self._lines: list[str] = []
        self._written = 0  # lines of _lines already in the object
        self._last_flush = time.monotonic()
        self._flusher: threading.Thread | None = None
        self._failing: set[str] = set()
        self._store: Any = None
        self._local_ready = False
        self._label = redact(self.path) if self.path else ""

    @property
    def enabled(self) -> bool:
        return bool(self.path or self._call or self._on_event)

    def _warn(self, sink: str, exc: BaseException) -> None:
        if sink not in self._failing:
            self._failing.add(sink)
            log.warning("event sink %s failed (training goes on; further failures of this sink are logged at debug level until it works again): %s: %s", sink, type(exc).__name__, exc)
        else:
            log.debug("event sink %s failed again: %s", sink, exc)

    def _ok(self, sink: str) -> None:
        if sink in self._failing:
            self._failing.discard(sink)
            log.warning("event sink %s works again", sink)

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"t": round(time.time(), 4), "event": event, **fields}
        record.setdefault("rank", self.rank)
        for name, fn in (("event_log callable", self._call), ("on_event", self._on_event)):
            if fn is None:
                continue
            try:
                fn(dict(record))
                self._ok(name)
            except Exception as exc:  # a user's callback must not stop training
                self._warn(name, exc)
        if not self.path:
            return
        line = json.dumps(record, sort_keys=True, default=str)
        if not self._url:
            self._append_local(line)
            return
        with self._lock:
            self._lines.append(line)
        if event == "close":
            self.flush()
        elif event in FLUSH_EVENTS or time.monotonic() - self._last_flush >= self._flush_every_s:
            self._flush_in_background()

    def _append_local(self, line: str) -> None:
        try:
            with self._lock:
                if not self._local_ready:
                    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                    self._local_ready = True
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            self._ok(self._label)
        except OSError as exc:
            self._warn(self._label, exc)

    def _flush_in_background(self) -> None:
        with self._lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._flusher = threading.Thread(target=self.flush, name="resilient_train-events", daemon=True)
            self._flusher.start()

    def flush(self) -> None:
        """Write a URL log out now (the whole object); a no-op for the other sinks."""
        if not self._url:
            return
        with self._flush_lock:
            with self._lock:
                if self._written == len(self._lines):
                    return
                data = ("\n".join(self._lines) + "\n").encode()
                count = len(self._lines)
            self._last_flush = time.monotonic()
            try:
                if self._store is None:
                    from .storage import open_store

                    parent, _, self._name = self.path.rstrip("/").rpartition("/")
                    self._store = open_store(parent, self._options)
                self._store.write_bytes(self._name, data)
                self._written = count
                self._ok(self._label)
            except Exception as exc:  # storage of any kind: keep the lines, try again next flush
                self._warn(self._label, exc)
