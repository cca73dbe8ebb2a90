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
import threading
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


def _wait_work(work: Any, timeout: timedelta, what: str, rank: int) -> None:
    try:
        ok = work.wait(timeout)
    except Exception as exc:  # gloo raises RuntimeError on timeout or a dead peer
        raise DistributedError(f"{what} failed", {rank: f"{type(exc).__name__}: {exc}"}) from exc
    if ok is False:
        raise DistributedError(f"{what} did not complete", {rank: f"timed out after {timeout}"})


class ProcessGroupCommunicator:
    """A Communicator over a torch.distributed process group (gloo on CPU, NCCL on GPU).

    ``group`` is a ``ProcessGroup`` (e.g. ``dist.new_group()``, or a backend such as
    ``ProcessGroupGloo(store, rank, size)``); ``None`` means the default group, looked up on
    first use (the constructor does no I/O)."""

    def __init__(self, group: Any = None):
        self._group = group
        self.bytes_sent = 0
        self._lock = threading.Lock()

    @property
    def group(self) -> Any:
        if self._group is None:
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

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        n = self.world_size
        self._count(int(2 * (n - 1) * buf.numel() * buf.element_size() // n))
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = self.group.allreduce([buf], opts)
        rank = self.rank

        def wait(timeout: timedelta) -> torch.Tensor:
            _wait_work(work, timeout, "all-reduce", rank)
            return buf

        return Handle(wait)

    def allgather(self, buf: torch.Tensor) -> Handle:
        n = self.world_size
        self._count((n - 1) * buf.numel() * buf.element_size())
        outs = [torch.empty_like(buf) for _ in range(n)]
        work = self.group.allgather([outs], [buf])
        rank = self.rank

        def wait(timeout: timedelta) -> list[torch.Tensor]:
            _wait_work(work, timeout, "all-gather", rank)
            return outs

        return Handle(wait)


def allreduce_mean(comm: Communicator, buf: torch.Tensor) -> Handle:
    """Average ``buf`` across ranks in place; the handle's result is ``buf``."""
    n = comm.world_size
    return comm.allreduce_sum(buf).then(lambda b: b.div_(n))


# header of an encoded payload on the wire: magic, codec id, numel, payload bytes, flag
_MAGIC = 0x52544331  # "RTC1"
CODEC_IDS = {"none": 1, "bf16": 2, "int8": 3, "int4": 4, "topk": 5}
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
        headers = [p[:hlen].cpu().view(torch.int64).tolist() for p in pieces]
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
