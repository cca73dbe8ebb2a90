"""The few collectives a checkpoint needs, with a single-process fallback.

Objects exchanged here are small Python values (plans, file records, error messages) moving
between live ranks of one job; checkpoint bytes never go through here and nothing read from
storage is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["Coordinator"]


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
