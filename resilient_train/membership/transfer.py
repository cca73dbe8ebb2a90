"""Bring every member of a new epoch to the same state: joiners (and any member left behind by
a failed step) receive it from a live peer in chunks, or from a fallback when no peer has it.

:func:`sync_state` is collective over the epoch's group (every member calls it right after
``Membership.communicator()``). Phases:

1. **exchange**: one all-gather of ``[step, digest, is_joiner, numel, len(meta)]`` per rank.
2. **choose**: the source is the non-joiner with the highest step (ties: the lowest rank), so
   a member that completed one more step before a peer died is not rolled back. When every
   member is a joiner, each calls ``fallback(flat) -> step`` (e.g. "load the latest
   checkpoint"), and the exchange and choice run again over the loaded states.
3. **send**: every rank whose ``(step, digest)`` differs from the source's, and every joiner,
   receives ``flat`` point to point from the source in ``chunk_bytes`` pieces (bounded memory,
   each piece with ``timeout``), then the source's ``meta`` bytes (e.g. the JSON half of a
   sync engine's ``state_dict``, the data loader's position), which may differ in length.
4. **verify**: each receiver recomputes the digest (SHA-256 of the bytes) and compares it with
   the source's; a mismatch raises :class:`DistributedError`.

``flat`` is one contiguous tensor the caller owns; it is overwritten in place on receivers. It
must hold only state that is identical on every member after a completed step (synchronous
training: parameters and optimizer state; DiLoCo: the global weights and the outer optimizer's
state, with ``step`` = completed sync rounds). Per-replica state (DiLoCo's local weights,
error-feedback residuals) must stay out of it, or a difference between survivors is
"repaired" by overwriting it; a joiner starts its local weights from the received globals. Every member must pass the same numel and
dtype (the membership fingerprint guarantees the same model). A peer dying mid-transfer raises
:class:`DistributedError`: wait for the next view and call again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch

from ..errors import ConfigError, DistributedError, MembershipError
from ..sync.communicator import ProcessGroupCommunicator
from .decision import View

__all__ = ["sync_state", "SyncResult", "state_digest", "DEFAULT_CHUNK_BYTES"]

DEFAULT_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class SyncResult:
    """``step``: the step every member now holds; ``source``: the member that served it (None
    when nobody needed anything); ``received_bytes``/``sent_bytes``: this rank's traffic;
    ``used_fallback``: the state came from ``fallback``; ``receivers``: who received it;
    ``meta``: the source's meta bytes on receivers, this rank's own elsewhere."""

    step: int
    source: str | None
    receivers: tuple[str, ...]
    received_bytes: int
    sent_bytes: int
    used_fallback: bool
    meta: bytes = b""


def state_digest(flat: torch.Tensor) -> int:
    """A 63-bit SHA-256 digest of ``flat``'s bytes (fits a signed int64; SHA-256 has CPU support)."""
    data = flat.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return int.from_bytes(hashlib.sha256(memoryview(data)).digest()[:8], "little") >> 1


def _exchange(comm: ProcessGroupCommunicator, flat: torch.Tensor, step: int, joiner: bool, meta: bytes,
              timeout: timedelta) -> list[list[int]]:
    mine = torch.tensor([step, state_digest(flat), int(joiner), flat.numel(), len(meta)], dtype=torch.int64)
    rows = [r.tolist() for r in comm.allgather(mine).wait(timeout)]
    numels = {r: row[3] for r, row in enumerate(rows)}
    if len(set(numels.values())) != 1:
        raise DistributedError("members hold states of different sizes (numel)",
                               {r: f"numel {n}" for r, n in numels.items()})
    return rows


def sync_state(comm: ProcessGroupCommunicator, view: View, member_id: str, flat: torch.Tensor, step: int, *,
               meta: bytes = b"", fallback: Callable[[torch.Tensor], int] | None = None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: timedelta = timedelta(seconds=60),
               source: str | None = None) -> SyncResult:
    """Make ``flat`` and the step equal on every member of ``view`` (module docstring).

    ``source``: a non-joiner member of ``view`` that serves the state; only the joiners receive
    (the other members keep theirs even where it differs: the caller knows that their states
    are equal once each has applied what it holds, e.g. a completed collective whose result a
    member has not applied yet). ``None``: the choice of phase 2."""
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
    if not flat.is_contiguous():
        raise ConfigError("flat must be one contiguous tensor (flatten the state into a buffer first)")
    if comm.world_size != len(view.members) or comm.rank != view.rank_of(member_id):
        raise ConfigError(f"the communicator (rank {comm.rank} of {comm.world_size}) is not the group of "
                          f"view {view.epoch} {list(view.members)}: call sync_state after communicator()")
    if source is not None and (source not in view.members or source in view.joiners):
        raise ConfigError(f"source {source!r} must be a member of view {view.epoch} {list(view.members)} "
                          f"that is not a joiner {list(view.joiners)}")
    rows = _exchange(comm, flat, step, member_id in view.joiners, meta, timeout)
    used_fallback = False
    if source is not None:
        src = view.rank_of(source)
        ref = rows[src][:2]
        return _send(comm, view, flat, meta, rows, src, [r for r, row in enumerate(rows) if row[2]], ref,
                     chunk_bytes, timeout, used_fallback)
    if all(row[2] for row in rows):
        if fallback is None:
            raise MembershipError(f"no member of epoch {view.epoch} holds the state (all are joiners) and "
                                  "no fallback was given: pass fallback=<load the latest checkpoint>")
        step = int(fallback(flat))
        used_fallback = True
        rows = _exchange(comm, flat, step, False, meta, timeout)
    candidates = [r for r, row in enumerate(rows) if not row[2]]
    source = max(candidates, key=lambda r: (rows[r][0], -r))
    ref = rows[source][:2]
    receivers = [r for r, row in enumerate(rows) if r != source and (row[2] or row[:2] != ref)]
    return _send(comm, view, flat, meta, rows, source, receivers, ref, chunk_bytes, timeout, used_fallback)


def _send(comm: ProcessGroupCommunicator, view: View, flat: torch.Tensor, meta: bytes, rows: list[list[int]],
          source: int, receivers: list[int], ref: list[int], chunk_bytes: int, timeout: timedelta,
          used_fallback: bool) -> SyncResult:
    """Phases 3 and 4: ``source`` sends ``flat`` and its meta to ``receivers``, who verify."""
    me = comm.rank
    names = tuple(view.members[r] for r in receivers)
    if not receivers:
        return SyncResult(int(ref[0]), None, (), 0, 0, used_fallback, meta)
    data = flat.detach().reshape(-1).view(torch.uint8)
    chunks = [data[i:i + chunk_bytes] for i in range(0, data.numel(), chunk_bytes)]
    meta_len = int(rows[source][4])
    meta_buf = (torch.frombuffer(bytearray(meta), dtype=torch.uint8) if me == source and meta
                else torch.empty(meta_len, dtype=torch.uint8))
    if meta_len:
        chunks.append(meta_buf)
    sent = received = 0
    try:
        if me == source:
            for dst in receivers:
                for tag, chunk in enumerate(chunks):
                    comm.send(chunk, dst, tag).wait(timeout)
                    sent += chunk.numel()
        elif me in receivers:
            for tag, chunk in enumerate(chunks):
                comm.recv(chunk, source, tag).wait(timeout)
                received += chunk.numel()
    except DistributedError as exc:  # a peer died, or another member reported the epoch's failure
        raise DistributedError(f"state transfer in epoch {view.epoch} from {view.members[source]} failed",
                               exc.failures or {me: str(exc)}) from None
    if me in receivers:
        got = state_digest(flat)
        if got != ref[1]:
            raise DistributedError("received state does not match the source's digest",
                                   {me: f"digest {got:#x} != {ref[1]:#x}"})
    got_meta = bytes(meta_buf.numpy().tobytes()) if me in receivers else meta
    return SyncResult(int(ref[0]), view.members[source], names, received, sent, used_fallback, got_meta)
