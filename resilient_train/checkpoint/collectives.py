"""The few collectives a checkpoint needs, with a single-process fallback.

Objects exchanged here are small Python values (plans, file records, error messages) moving
between live ranks of one job; checkpoint bytes never go through here and nothing read from
storage is ever unpickled.

:meth:`Coordinator.phase` runs one named phase of a save (``prepare`` and ``commit`` on rank
0, ``write`` on every rank) and makes a failure on any rank the same
:class:`~resilient_train.errors.CheckpointWriteError` on every rank, naming each rank's cause
(DCP's ``reduce_scatter("plan", ...)`` / ``all_reduce("write", ...)`` shape).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from ..errors import CheckpointWriteError
from ..storage import redact

__all__ = ["Coordinator", "describe"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error, secrets redacted: what goes to other ranks, events and logs."""
    return redact(f"{type(exc).__name__}: {exc}")


class Coordinator:
    """Rank, world size and object collectives over ``process_group`` (None: the default
    group if torch.distributed is initialised, else a world of one)."""

    def __init__(self, process_group: Any = None):
        self._pg = process_group
        self._distributed = dist.is_available() and dist.is_initialized()
        if self._distributed:
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
        else:
            if process_group is not None:
                raise ValueError("a process_group was given but torch.distributed is not initialised")
            self.rank, self.world_size = 0, 1

    @property
    def is_distributed(self) -> bool:
        return self._distributed and self.world_size > 1

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from group rank ``src`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._pg, src) if self._pg is not None else src, group=self._pg)
        return box[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self._pg)

    def phase(self, what: str, fn: Callable[[], T], *, rank0_only: bool = False, catch: tuple[type[BaseException], ...] = (Exception,)) -> T | None:
        """Run ``fn`` on every rank (``rank0_only``: on rank 0 only), then agree: if it raised one
        of ``catch`` on any rank, every rank raises ``CheckpointWriteError("checkpoint <what>
        failed", {rank: cause})``. Returns ``fn``'s result where it ran, None elsewhere. Collective:
        every rank calls it, in the same order."""
        result: T | None = None
        error: str | None = None
        if not rank0_only or self.rank == 0:
            try:
                result = fn()
            except catch as exc:
                error = describe(exc)
                log.error("rank %d: checkpoint %s failed: %s", self.rank, what, error)
        failures = {r: e for r, e in enumerate(self.all_gather(error)) if e}
        if failures:
            raise CheckpointWriteError(f"checkpoint {what} failed", failures)
        return result
