"""WAN emulation: a Communicator wrapper that makes each exchange take latency + bytes/bandwidth.

This is an *emulation* for tests and benchmarks, not a network model: each collective is
charged ``latency_s + bytes_sent / bandwidth`` (``bytes_sent`` as the inner Communicator
counts it, i.e. what a bandwidth-optimal ring sends per rank) on one link per rank, and
exchanges queue behind each other on that link. Real WANs add jitter, loss, TCP slow start,
and per-hop latency (a ring all-reduce pays ``2 (n-1)`` latencies, charged here once), so
the emulation is optimistic for chatty modes such as DDP, which makes the comparison
conservative for the latency-tolerant modes.

Two clocks:

* real (default): ``wait()`` sleeps until the exchange's emulated completion time;
* virtual (``clock=VirtualClock()``): nothing sleeps; the training loop calls
  ``clock.advance(compute_s)`` for its compute, and ``wait()`` moves the clock forward to
  the completion time when it is later. ``clock.now_s`` is then the emulated wall time;
  async exchanges overlap with the compute advanced between start and wait.

Tracing: with ``trace=[]`` the emulator appends one event per exchange start and per wait,
each stamped with the *compute* time so far (the virtual clock less the time blocked), so
:func:`replay` can recompute the emulated wall time of the same run under any other link,
including one slower link per rank (the collective completes when its slowest link delivers).
The training maths never depends on the link (nothing is dropped by a deadline here), so a
replayed time is what the run would have taken on that link.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from ..errors import ConfigError
from .communicator import DEFAULT_TIMEOUT, Communicator, Handle

__all__ = ["LinkProfile", "PROFILES", "get_profile", "VirtualClock", "WanEmulator", "replay"]


@dataclass(frozen=True)
class LinkProfile:
    name: str
    latency_s: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_bytes_per_s <= 0:
            raise ConfigError(f"link profile {self.name!r} needs latency_s >= 0 and bandwidth > 0")

    def delay_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


PROFILES = {
    "intra": LinkProfile("intra", 0.001, 10e9 / 8),   # within a provider: 1 ms, 10 Gbit/s
    "inter": LinkProfile("inter", 0.050, 1e9 / 8),    # between providers: 50 ms, 1 Gbit/s
    "wan": LinkProfile("wan", 0.150, 100e6 / 8),      # far apart: 150 ms, 100 Mbit/s
}


def get_profile(profile: str | LinkProfile) -> LinkProfile:
    if isinstance(profile, LinkProfile):
        return profile
    if profile not in PROFILES:
        raise ConfigError(f"unknown link profile {profile!r}; choose one of {sorted(PROFILES)} or pass a LinkProfile")
    return PROFILES[profile]


class VirtualClock:
    """Emulated time in seconds; advanced by the training loop (compute) and by waits."""

    def __init__(self, start_s: float = 0.0):
        self.now_s = start_s
        self._lock = threading.Lock()

    def advance(self, dt_s: float) -> None:
        with self._lock:
            self.now_s += dt_s

    def advance_to(self, t_s: float) -> None:
        with self._lock:
            self.now_s = max(self.now_s, t_s)


class WanEmulator:
    """Wraps a Communicator; results are the inner one's, delivered no earlier than the
    emulated link allows. ``blocked_s`` sums the time waits were held back by the link."""

    def __init__(self, inner: Communicator, profile: str | LinkProfile = "wan", clock: VirtualClock | None = None,
                 sleep: Callable[[float], None] = time.sleep, monotonic: Callable[[], float] = time.monotonic,
                 trace: list[dict] | None = None):
        if trace is not None and clock is None:
            raise ConfigError("a trace needs the virtual clock (clock=VirtualClock()): its events are stamped "
                              "with compute time")
        self.trace = trace
        self._next_id = 0
        self.inner = inner
        self.profile = get_profile(profile)
        self.clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._link_free_s = float("-inf")
        self.blocked_s = 0.0
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def compute_s(self) -> float:
        """With the virtual clock: the emulated time spent computing (clock less time blocked)."""
        return self._now() - self.blocked_s if self.clock is not None else float("nan")

    def _now(self) -> float:
        return self.clock.now_s if self.clock is not None else self._monotonic()

    def _wrap(self, start: Callable[[], Handle]) -> Handle:
        with self._lock:
            before = self.inner.bytes_sent
            handle = start()
            nbytes = self.inner.bytes_sent - before
            begin = max(self._now(), self._link_free_s)
            ready = begin + self.profile.delay_s(nbytes)
            self._link_free_s = ready
            xid = self._next_id
            self._next_id += 1
            if self.trace is not None:
                self.trace.append({"ev": "start", "id": xid, "compute_s": self.compute_s, "bytes": nbytes})

        def wait(timeout: timedelta = DEFAULT_TIMEOUT):
            result = handle.wait(timeout)
            if self.trace is not None:
                self.trace.append({"ev": "wait", "id": xid, "compute_s": self.compute_s})
            late = ready - self._now()
            if late > 0:
                self.blocked_s += late
                if self.clock is not None:
                    self.clock.advance_to(ready)
                else:
                    self._sleep(late)
            return result

        return Handle(wait)

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        return self._wrap(lambda: self.inner.allreduce_sum(buf))

    def allgather(self, buf: torch.Tensor) -> Handle:
        return self._wrap(lambda: self.inner.allgather(buf))


def replay(trace: list[dict], links: LinkProfile | str | list[LinkProfile | str],
           at_compute_s: list[float] | None = None) -> dict:
    """Recompute a traced run's emulated wall time on other links (pure; see the module doc).

    ``links``: one profile for every rank, or one per rank: an exchange then takes
    ``max_r(latency_r + bytes / bandwidth_r)`` (it completes when its slowest link delivers; every
    rank sends the same bytes). Exchanges queue behind each other on the link, as in
    :class:`WanEmulator`. Returns ``{"total_s", "blocked_s", "at": [...]}`` where ``at`` maps each
    of ``at_compute_s`` (compute-time stamps, e.g. of evaluation points, in order) to the
    emulated wall time at that point."""
    profs = [get_profile(p) for p in (links if isinstance(links, list) else [links])]
    if not profs:
        raise ConfigError("replay needs at least one link profile")
    marks = sorted(at_compute_s or [])
    out_at: list[float] = []
    ready: dict[int, float] = {}
    link_free = float("-inf")
    blocked = 0.0
    compute = 0.0
    for ev in trace:
        while marks and marks[0] < ev["compute_s"]:  # a mark at an event's time comes after it
            out_at.append(marks.pop(0) + blocked)
        compute = ev["compute_s"]
        now = compute + blocked
        if ev["ev"] == "start":
            begin = max(now, link_free)
            ready[ev["id"]] = begin + max(p.delay_s(ev["bytes"]) for p in profs)
            link_free = ready[ev["id"]]
        else:
            late = ready.pop(ev["id"]) - now
            if late > 0:
                blocked += late
    out_at.extend(m + blocked for m in marks)
    return {"total_s": compute + blocked, "blocked_s": blocked, "at": out_at}
