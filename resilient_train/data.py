"""A resumable, shardable sampler whose position survives a change of world size.

The position is global: ``consumed`` counts samples of the current epoch taken by all ranks
together. Each epoch's order is a permutation seeded by ``seed + epoch``; rank ``r`` of ``W``
takes ``perm[consumed + r :: W]``. After a resume on a different world size the remaining
samples ``perm[consumed:]`` are split among the new ranks, so every sample of the epoch is
seen exactly once provided ranks consume in lockstep (as data-parallel training does).

``drop_last`` decides the last, partial round of an epoch, as
:class:`torch.utils.data.DistributedSampler` does: ``None`` (the default) hands out every
remaining sample once, so ranks may get one sample fewer than others; ``False`` pads the round
with samples from the start of the permutation so every rank gets the same count (the
``DistributedSampler`` default, needed when each rank runs a DataLoader over it under DDP);
``True`` drops the partial round.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from .errors import ConfigError, StateMismatchError

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Sampler with ``state_dict()``/``load_state_dict()`` (JSON-able).

    Use with a DataLoader that has ``num_workers=0``, or count consumed batches yourself with
    :meth:`advance`: worker prefetching takes indices before the model sees them.
    """

    def __init__(self, dataset_len: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool | None = None):
        if not isinstance(dataset_len, int) or dataset_len < 0:
            raise ConfigError(f"dataset_len must be a non-negative int, got {dataset_len!r}")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0
        self.track = True
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (no-op if it is the current one, so a resumed position is kept)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def set_world(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not (0 <= rank < world_size):
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    def permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=g).tolist()

    def _end(self) -> int:
        """Where this world's pass over the current epoch ends (past ``dataset_len`` when padded)."""
        left = max(0, self.dataset_len - self.consumed)
        if self.drop_last is None:
            return self.dataset_len
        rounds = left // self.world_size if self.drop_last else -(-left // self.world_size)
        return self.consumed + rounds * self.world_size

    def exhausted(self) -> bool:
        """True when the current epoch has nothing left for this world (the next epoch is due)."""
        return self.consumed >= self._end() or self.consumed >= self.dataset_len

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        start, end = self.consumed, self._end()
        while len(perm) < end and perm:  # padding (drop_last=False) wraps around the permutation
            perm = perm + perm[: end - len(perm)]
        for i in range(start + self.rank, end, self.world_size):
            if self.track:
                # Advance the global position by one sample per rank: ranks consume in lockstep.
                self.consumed = min(self.dataset_len, i - self.rank + self.world_size)
            yield perm[i]

    def advance(self, samples_per_rank: int) -> None:
        """Record consumption explicitly (when indices are prefetched); disables auto-tracking."""
        self.track = False
        self.consumed = min(self.dataset_len, self.consumed + samples_per_rank * self.world_size)

    def __len__(self) -> int:
        return len(range(self.consumed + self.rank, self._end(), self.world_size))

    def state_dict(self) -> dict[str, Any]:
        return {"dataset_len": self.dataset_len, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["dataset_len"] != self.dataset_len:
            raise StateMismatchError(f"sampler was saved for a dataset of {state['dataset_len']} samples, this one has {self.dataset_len}")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.consumed = state["epoch"], state["consumed"]
