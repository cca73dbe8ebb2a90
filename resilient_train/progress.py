"""Progress of long byte-moving operations: a tqdm bar when asked for and installed, else a log
line every ``every_s`` seconds.

Commands a person watches (``ckpt migrate``, ``replicate``, ``verify``, ``export-hf``) ask for a
bar (``bar=True``); tqdm comes with the ``progress`` extra (``pip install
'resilient-train[progress]'``). Saves and loads inside training never draw a bar (it would
fight the training script's own output and runs on a background thread): when they move at
least :data:`LOG_MIN_BYTES` they log a line every ``every_s`` seconds, at INFO, under the
``resilient_train`` logger.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["Progress", "LOG_MIN_BYTES"]

log = logging.getLogger(__name__)

# Saves and loads smaller than this finish in a few seconds: no progress lines for them.
LOG_MIN_BYTES = 1 << 30

_tqdm_hint_given = False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Thread-safe counter of bytes done out of ``total_bytes``; call it with each amount
    (negative to take bytes back, e.g. a retried file). ``enabled=False`` makes it a no-op."""

    def __init__(self, total_bytes: int, desc: str, *, bar: bool = False, enabled: bool = True, every_s: float = 10.0, min_bytes: int = 0):
        self.total = int(total_bytes)
        self.desc = desc
        self.done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._every_s = every_s
        self._t0 = self._last = time.monotonic()
        self._log = enabled and not bar and self.total >= min_bytes and self.total > 0
        if enabled and bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                global _tqdm_hint_given
                if not _tqdm_hint_given:
                    _tqdm_hint_given = True
                    log.info("progress is logged every %.0f s; pip install 'resilient-train[progress]' (tqdm) for a progress bar", every_s)
                self._log = self.total > 0
            else:
                self._bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, leave=True)
        if self._log:
            log.info("%s: %s to go", desc, _human(self.total))

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            if not self._log:
                return
            now = time.monotonic()
            if now - self._last < self._every_s:
                return
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        log.info("%s: %.0f%% (%s of %s, %s/s)", self.desc, pct, _human(self.done), _human(self.total), _human(rate))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log:
            seconds = time.monotonic() - self._t0
            log.info("%s: done, %s in %.1f s", self.desc, _human(self.done), seconds)
            self._log = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
