"""The `Communicator` protocol: how sync reaches other replicas, and its torch.distributed form.

A Communicator offers two collectives on flat tensors, both asynchronous (they return a
:class:`Handle`; ``handle.wait(timeout)`` blocks and returns the result), and counts the
bytes this rank puts on the wire:

* ``allreduce_sum(buf)``: in place, every rank ends with the elementwise sum.
* ``allgather(buf)``: every rank gets the list of all ranks' ``buf`` in rank order; every
  rank must pass the same number of elements and dtype.

``bytes_sent`` counts what a bandwidth-optimal ring sends per rank: ``2 (n-1)/n * nbytes``
for an all-reduce and ``(n-1) * nbytes`` for an all-gather (0 on one rank).

On top of the protocol, :func:`allreduce_mean` and :func:`allreduce_encoded` (encoded
payloads are all-gathered, then decoded and summed in rank order, so every rank computes the
identical result) are plain functions, so every Communicator (including the WAN emulator)
gets them.
"""

from __future__ import annotations

import logging
import functools
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from ..compression import Codec, Encoded
from ..errors import DistributedError, PayloadMismatchError

__all__ = [
    "Handle",
    "Communicator",
    "ProcessGroupCommunicator",
    "allreduce_mean",
    "allreduce_encoded",
    "DEFAULT_TIMEOUT",
    "CODEC_IDS",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(seconds=300)


class Handle:
    """A pending collective. ``wait(timeout)`` returns its result (once computed, cached);
    a failure or timeout raises :class:`DistributedError`."""

    def __init__(self, wait_fn: Callable[[timedelta], Any]):
        self._wait_fn = wait_fn
        self._done = False
        self._result: Any = None
        self._lock = threading.Lock()

    @classmethod
    def completed(cls, result: Any) -> "Handle":
        h = cls(lambda _t: result)
        h._done, h._result = True, result
        return h

    def wait(self, timeout: timedelta = DEFAULT_TIMEOUT) -> Any:
        with self._lock:
            if not self._done:
                self._result = self._wait_fn(timeout)
                self._done = True
            return self._result

    @property
    def done(self) -> bool:
        """Whether the result is known (a completed handle, or one waited for); never blocks."""
        return self._done

    def then(self, fn: Callable[[Any], Any]) -> "Handle":
        """A handle whose result is ``fn(this result)``, computed on the first wait."""
        return Handle(lambda timeout: fn(self.wait(timeout)))


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int
    bytes_sent: int

    def allreduce_sum(self, buf: torch.Tensor) -> Handle: ...

    def allgather(self, buf: torch.Tensor) -> Handle: ...


class ProcessGroupCommunicator:
    """A Communicator over a torch.distributed process group (gloo on CPU, NCCL on GPU).

    ``group`` is a ``ProcessGroup`` (e.g. ``dist.new_group()``, or a backend such as
    ``ProcessGroupGloo(store, rank, size)``); ``None`` means the default group, looked up on
    first use (the constructor does no I/O).

    **Failure propagation.** Gloo cannot interrupt an operation in flight (``abort()`` and
    ``shutdown()`` return but the operation runs on until its timeout), so this class makes the
    *wait* cancellable instead and lets the caller close the group's connections:

    * :meth:`abort` (any thread): every wait on this communicator, in flight or later, fails at
      once with :class:`DistributedError` naming the reason. The operation itself stays in
      flight inside the backend (:attr:`busy`) until it completes or times out; buffers it
      writes (an all-reduce's input) must therefore not be reused by the caller.
    * :meth:`release`: drop the process group once nothing is in flight, which closes its
      connections: every peer blocked on this member fails at once ("connection closed by
      peer"), so a failure cascades through the group instead of leaving a peer that was waiting
      on *this* member in its collective until the timeout. Returns False (and keeps the group)
      while an operation is still in flight; call again later.

    The only strong reference to an in-flight backend ``Work`` is kept here (errors are raised
    without chaining the backend's exception, whose traceback would keep it and its connections
    alive)."""

    def __init__(self, group: Any = None):
        self._group = group
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._inflight: dict[int, Any] = {}
        self._abandoned: set[int] = set()  # waits that left (abort, timeout) before their work ended
        self._next = 0
        self._aborted: str | None = None
        self._released = False

    @property
    def group(self) -> Any:
        if self._group is None:
            if self._released:
                raise DistributedError(f"this communicator was released ({self._aborted or 'its group is closed'})")
            import torch.distributed as dist

            if not dist.is_initialized():
                raise DistributedError("no process group: call torch.distributed.init_process_group "
                                       "or pass group= to ProcessGroupCommunicator")
            self._group = dist.group.WORLD
        return self._group

    @property
    def rank(self) -> int:
        return int(self.group.rank())

    @property
    def world_size(self) -> int:
        return int(self.group.size())

    @property
    def busy(self) -> bool:
        """An operation started here has not completed in the backend yet."""
        with self._cond:
            return self._pending() > 0

    @property
    def aborted(self) -> str | None:
        """The reason given to :meth:`abort`, or None."""
        return self._aborted

    def abort(self, reason: str) -> None:
        """Fail every wait on this communicator, now and later, with ``reason`` (thread-safe,
        idempotent: the first reason is kept)."""
        with self._cond:
            if self._aborted is None:
                self._aborted = reason
            self._cond.notify_all()

    def release(self) -> bool:
        """Drop the process group (closing its connections) if nothing is in flight; see the
        class docstring. True when released (now or before)."""
        with self._cond:
            if self._pending():
                return False
            if self._aborted is None:
                self._aborted = "released"
            self._released = True
            self._group = None
            self._cond.notify_all()
            return True

    def _pending(self) -> int:
        """Forget works that ended after their waiter left (aborted, timed out); count the rest.
        Caller holds ``_cond``."""
        for key in [k for k in self._abandoned if self._inflight[k].is_completed()]:
            del self._inflight[key]
            self._abandoned.discard(key)
        return len(self._inflight)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes

    def _refused(self, what: str) -> Handle | None:
        """After :meth:`abort` nothing new is posted to the backend: the handle fails at once."""
        reason = self._aborted
        if reason is None:
            return None
        rank = -1 if self._group is None else self.rank

        def fail(_timeout: timedelta) -> None:
            raise DistributedError(f"{what} aborted", {rank: reason})

        return Handle(fail)

    def _track(self, work: Any, what: str, *, completes_in_wait: bool = False) -> Handle:
        """Keep ``work`` and return a handle whose wait is cancellable by :meth:`abort`.
        ``completes_in_wait``: the backend makes progress only inside ``work.wait()`` (gloo's
        send/recv), so a helper thread waits on it and the caller's wait stays cancellable."""
        rank = self.rank
        # The callbacks hold the condition only, never this communicator: a callback that held
        # the last reference to it would destroy the process group on gloo's own worker thread
        # when it returns (the group joins that thread: std::terminate, the whole process aborts).
        wake = functools.partial(_wake, self._cond)
        if completes_in_wait:
            work = _WaitedInThread(work, what, wake)
        poll_s = 0.05  # a safety net: completion wakes the waiter
        if not completes_in_wait:
            try:  # wake the waiter when the backend completes the work
                work.get_future().add_done_callback(lambda _f: wake())
            except Exception:  # noqa: BLE001 - a backend or op without futures: poll instead
                poll_s = 0.002
        with self._cond:
            key = self._next
            self._next += 1
            self._inflight[key] = work

        def wait(timeout: timedelta) -> None:
            self._wait(key, timeout, what, rank, poll_s)

        return Handle(wait)

    def _wait(self, key: int, timeout: timedelta, what: str, rank: int, poll_s: float) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        with self._cond:
            while True:
                work = self._inflight.get(key)
                if work is None:
                    raise DistributedError(f"{what} failed", {rank: "this operation was already waited for"})
                if work.is_completed():
                    del self._inflight[key]
                    break
                del work
                if self._aborted is not None:
                    self._abandoned.add(key)
                    raise DistributedError(f"{what} aborted", {rank: self._aborted})
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(key)
                    raise DistributedError(f"{what} did not complete", {rank: f"timed out after {timeout}"})
                self._cond.wait(min(poll_s, left))
        error = None
        try:
            work.wait()
        except Exception as exc:  # gloo raises RuntimeError on a dead peer or its own timeout
            error = f"{type(exc).__name__}: {exc}"
        del work  # nothing may keep the backend's work (and so the group's connections) alive
        if error is not None:
            raise DistributedError(f"{what} failed", {rank: error})

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        if (refused := self._refused("all-reduce")) is not None:
            return refused
        n = self.world_size
        self._count(int(2 * (n - 1) * buf.numel() * buf.element_size() // n))
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self._track(self.group.allreduce([buf], opts), "all-reduce").then(lambda _: buf)

    def allgather(self, buf: torch.Tensor) -> Handle:
        if (refused := self._refused("all-gather")) is not None:
            return refused
        n = self.world_size
        self._count((n - 1) * buf.numel() * buf.element_size())
        outs = [torch.empty_like(buf) for _ in range(n)]
        return self._track(self.group.allgather([outs], [buf]), "all-gather").then(lambda _: outs)

    def send(self, buf: torch.Tensor, dst: int, tag: int) -> Handle:
        """Point to point (state transfer to a joiner; not counted in ``bytes_sent``, which counts
        the collectives); cancellable like the collectives."""
        if (refused := self._refused(f"send to rank {dst}")) is not None:
            return refused
        return self._track(self.group.send([buf], dst, tag), f"send to rank {dst}", completes_in_wait=True)

    def recv(self, buf: torch.Tensor, src: int, tag: int) -> Handle:
        if (refused := self._refused(f"receive from rank {src}")) is not None:
            return refused
        return self._track(self.group.recv([buf], src, tag), f"receive from rank {src}", completes_in_wait=True)


def _wake(cond: threading.Condition) -> None:
    with cond:
        cond.notify_all()


class _WaitedInThread:
    """A backend work whose ``wait()`` runs on a daemon thread (bounded by the group's own
    timeout), seen through ``is_completed``/``wait``/``get_future`` like a collective's."""

    def __init__(self, work: Any, what: str, notify: Callable[[], None]):
        self._error: str | None = None
        self._done = threading.Event()

        def run(box: list) -> None:
            try:
                box.pop().wait()
            except Exception as exc:  # noqa: BLE001 - reported by wait()
                self._error = f"{type(exc).__name__}: {exc}"
            finally:
                self._done.set()
                notify()

        threading.Thread(target=run, args=([work],), name=f"rt-{what}", daemon=True).start()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)


def allreduce_mean(comm: Communicator, buf: torch.Tensor) -> Handle:
    """Average ``buf`` across ranks in place; the handle's result is ``buf``."""
    n = comm.world_size
    return comm.allreduce_sum(buf).then(lambda b: b.div_(n))


# header of an encoded payload on the wire: magic, codec id, numel, payload bytes, flag
_MAGIC = 0x52544331  # "RTC1"
CODEC_IDS = {"none": 1, "bf16": 2, "int8": 3, "int4": 4, "topk": 5}
"""Each codec's number on the wire (0: a codec not listed). Peers compare it in the payload
header and in DiLoCo's configuration handshake, so a number, once given, never changes."""
_HEADER_INT64 = 5


def _header(codec: Codec, numel: int, flag: int) -> torch.Tensor:
    h = torch.tensor([_MAGIC, CODEC_IDS.get(codec.name, 0), numel, codec.payload_nbytes(numel), flag],
                     dtype=torch.int64)
    return h.view(torch.uint8)


def allreduce_encoded(comm: Communicator, codec: Codec, payload: Encoded, flag: int = 0) -> Handle:
    """Exchange encoded payloads; the handle's result is ``(mean, flags)``.

    ``mean`` is ``sum_r decode(payload_r) / n``, decoded and accumulated in rank order on
    every rank (so the result is bit-identical everywhere). ``flags`` lists each rank's
    ``flag`` (sync uses it to veto a round without a second collective); when any flag is
    non-zero, ``mean`` is ``None`` and nothing is decoded. A peer whose header names another
    codec, size or element count raises :class:`PayloadMismatchError` on every rank.

    Every rank must call this with the same ``numel``; payload sizes are a function of
    ``numel`` and the codec options, so the exchange is one fixed-size all-gather (the
    caller checks sizes once up front, see ``DiLoCo``'s first-sync handshake; a later size
    mismatch surfaces as the backend's error or timeout, as a DistributedError). The
    Communicator's backend must accept tensors on the payload's device.
    """
    body = codec.to_bytes(payload)
    mine = _header(codec, payload.numel, flag)
    expect = mine.view(torch.int64).tolist()[:4]
    buf = torch.cat([mine.to(body.device), body])
    out_device = payload.data.device

    def finish(pieces: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[int]]:
        hlen = _HEADER_INT64 * 8
        # clone: a piece may be a view into one buffer of all pieces at an offset that is not a
        # multiple of 8 (a group's other ranks receive the all-gather so, and a payload of an
        # odd size, e.g. a streaming fragment's, puts the next piece off the int64 alignment)
        headers = [p[:hlen].clone().cpu().view(torch.int64).tolist() for p in pieces]
        bad = {r: f"header [magic, codec, numel, bytes] = {h[:4]}, expected {expect}"
               for r, h in enumerate(headers) if h[:4] != expect}
        if bad:
            raise PayloadMismatchError("peers sent payloads that do not match this rank's codec/size", bad)
        flags = [int(h[4]) for h in headers]
        if any(flags):
            return None, flags
        acc = torch.zeros(payload.numel, dtype=torch.float32, device=out_device)
        for p in pieces:
            codec.decode(codec.from_bytes(p[hlen:].to(out_device), payload.numel), out=acc, accumulate=True)
        return acc.div_(len(pieces)), flags  # the replicas that took part (a redone round has fewer)

    return comm.allgather(buf).then(finish)
