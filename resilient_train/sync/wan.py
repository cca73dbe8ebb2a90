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

__all__ = ["LinkProfile", "PROFILES", "get_profile", "VirtualClock", "WanEmulator"]


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
                 sleep: Callable[[float], None] = time.sleep, monotonic: Callable[[], float] = time.monotonic):
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

        def wait(timeout: timedelta = DEFAULT_TIMEOUT):
            result = handle.wait(timeout)
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
