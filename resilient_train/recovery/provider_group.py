"""One provider's replica group in a multi-provider job: what :func:`resilient_train.wrap` runs
on when ``TrainerConfig.group`` is set.

Topology: each provider is one replica group, launched by its own ``torchrun`` (N ranks, DDP
inside). Groups find each other through a membership store (``TrainerConfig.membership``) and
synchronise with DiLoCo / local SGD between them. Only the group's rank 0 (the *leader*) takes
part in the membership and in the cross-group collectives; it passes every result to its own
ranks over a gloo group inside the provider (the *control* group), so every rank of a group
applies the same outer step.

:class:`ProviderGroup` is a :class:`~resilient_train.sync.communicator.Communicator` for the
sync engine, with three extra duties:

* **Redo a failed round among the survivors.** A collective that fails (a peer died: its
  sockets reset at once) or times out (``round_deadline_s``: a hung or partitioned peer) runs
  the membership roll call (:meth:`Membership.report_failure`): the members that answer form
  the next view, the others are dropped. The round is then run again over the new view from a
  copy of the exact input buffer taken before the first try, so the pseudo-gradients (and the
  error-feedback residuals, updated once at encoding) are untouched by the failed attempt. The
  result equals a run in which the lost group left cleanly before that round, bit for bit;
  unless a survivor had completed the round before the failure: then the others take its
  result (a clean leave after the round).
* **Start every epoch alike.** Members reach a new epoch by different roads (redoing a failed
  operation, switching after the vote, joining) and a failure can leave them one operation
  apart; members posting different collectives would make gloo abort the process. Every epoch
  therefore starts with the same prologue (:meth:`ProviderGroup._prologue`, docs/membership.md
  "Members at different points").
* **Admit joiners at round boundaries.** After every round the leaders vote (one tiny
  all-reduce) on whether a newer view exists; if so, all of them switch to it after the same
  round and joiners receive the global state from a live peer (:func:`sync_state`).
* **Run the exchange in the background when the engine overlaps it** (``background``, set
  by the trainer when ``overlap_steps > 0``): an exchange starts at the launch, on a thread of
  its own on every rank of the group (the leader's runs the cross-group operation with all of
  its failure handling: roll call, redo, catch-up; the other ranks' receive its result over
  the control group, or, in a sharded group, run their lanes and the commit vote), while the training thread takes its ``d`` overlapped inner steps; the
  engine's wait at the apply step joins that thread. One exchange runs at a time, and the
  training thread touches neither the control group nor the epoch's group until it has waited
  for it (the vote runs after the apply step: the trainer calls :meth:`after_round` when a
  round is *applied*), so no group ever sees collectives from two threads.
* **Rejoin after being dropped.** A group that learns it was dropped (it missed a round's
  deadline) raises :class:`DroppedFromJobError` out of the sync engine; the trainer aborts the
  round and calls :meth:`join` again, which takes the live state from a peer.

What each member holds (and who persists it): the *global* state (DiLoCo's global weights and
outer optimizer momentum, the step) is replicated across groups and is what joiners receive;
the *group* state (local weights, inner optimizer state, error-feedback residuals, data
position) is the group's own and goes to the group's own checkpoint; the *rank* state (RNG)
goes to the rank's file of that checkpoint. With streaming DiLoCo (``fragments`` > 1) the local
weights differ from the global ones between a fragment's syncs, so a group's ranks install a
received global state only when their leader did (:meth:`join`): a group that kept its own
state at a restart keeps its local weights on every rank.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from ..errors import ConfigError, DistributedError, DroppedFromJobError, MembershipError
from ..membership import Membership, sync_state
from ..membership.decision import View
from ..membership.service import decode_view, encode_view
from ..sync.communicator import Handle

__all__ = ["ProviderGroup", "open_membership_store"]

log = logging.getLogger(__name__)

# control messages on the group's own gloo group (leader -> the group's other ranks)
_OK, _DROPPED, _STATE, _RESTART_AT, _LANE_OP, _LANE_STATE, _REDO, _LANE_VIEW = 0, 1, 2, 3, 4, 5, 6, 7

MEMBERSHIP_PREFIX = "rt-membership"  # the membership's keys in the store (lanes meet under it too)

# how many of its newest committed steps each group offers when a job restarts as a whole
_RESUME_POINTS = 64

# the hello of every epoch (ProviderGroup._prologue): one row of int64 per member
_H_STEP, _H_NOFFERS, _H_FRESH, _H_SEQ, _H_JOINING, _H_NEXT, _H_OFFERS = range(7)
_NEXT_VOTE, _NEXT_EXCHANGE = 1, 2  # what a member does after the prologue
_KINDS = {"allreduce": 1, "allgather": 2, "vote": 3}


@dataclass
class _Pending:
    """A cross-group operation in progress: its kind and a copy of its input."""

    kind: str
    original: torch.Tensor


@dataclass
class _Done:
    """The last completed cross-group operation: its sequence number, kind and result."""

    seq: int
    kind: str
    tensors: list[torch.Tensor]


class _Exchange:
    """One cross-group exchange running on its own thread (see ``ProviderGroup.background``).

    The thread is not a daemon: a thread left inside gloo at interpreter exit aborts the
    process, and every exchange ends on its own (each attempt is bounded by the round deadline,
    the roll call by its own). :meth:`wait` joins it and returns its result or re-raises its
    error on the caller's thread."""

    def __init__(self, fn: Callable[[], Any], name: str):
        self._fn = fn
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=False)

    def start(self) -> "_Exchange":
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, re-raised there
            self._error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: timedelta) -> Any:
        self._thread.join(timeout.total_seconds())
        if self._thread.is_alive():
            raise DistributedError(f"the cross-group exchange did not end within {timeout.total_seconds():g} s",
                                   {0: "still running (its attempts and roll calls go on in the background)"})
        if self._error is not None:
            raise self._error
        return self._result


class _JoinersDeferred(DistributedError):
    """The prologue found joiners while the members are inside a round: the members roll the
    epoch without them (they join at the next round boundary)."""

    def __init__(self, joiners: list[str], epoch: int):
        self.joiners = tuple(joiners)
        super().__init__(f"joiners {joiners} arrived in epoch {epoch} while the members are inside a round; "
                         "they join at the next round boundary")


def open_membership_store(url: str, timeout_s: float) -> Any:
    """A KVStore client for ``url``: ``tcp://host:port`` (a TCPStore hosted by a long-lived
    process, e.g. the launcher; ``?host=auto`` hosts it here if nobody does),
    ``etcd://h1:p1,h2:p2,...`` (etcd v3, no single point of failure) or ``memory://name``
    (tests). Unreachable stores raise within ``timeout_s``; see :func:`~..membership.urls.open_kvstore`."""
    from ..membership.urls import open_kvstore

    return open_kvstore(url, timeout_s=timeout_s)


class ProviderGroup:
    """See the module docstring. Construction does no I/O; :meth:`start` joins the membership
    (leader only) and must be followed by :meth:`join` on every rank of the group.

    ``state``: an object with ``flat() -> Tensor`` (the global state, one contiguous fp32 tensor
    of a fixed size), ``meta() -> dict``, ``apply(flat, meta)`` (install a received state) and
    ``step`` (the trainer's step); the trainer provides it. ``control_pg``: a gloo group of this
    provider's ranks (``None`` for a one-rank group)."""

    def __init__(self, name: str, store: Any, fingerprint: str, state: Any, *, group_rank: int, group_size: int,
                 control_pg: Any = None, heartbeat_interval_s: float = 0.1, heartbeat_timeout_s: float = 10.0,
                 round_deadline_s: float = 60.0, start_groups: int = 1, min_groups: int = 1,
                 join_timeout_s: float = 300.0, events: Any = None, silent_after_s: float | None = None,
                 lanes: int = 1):
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"group must be a non-empty name without '/', got {name!r}")
        if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes not in (1, group_size):
            raise ConfigError(f"lanes must be 1 (a replicated model: the leader exchanges it) or the group's size "
                              f"{group_size} (a sharded model: every rank exchanges its shard), got {lanes!r}")
        if lanes > 1 and (store is None or control_pg is None):
            raise ConfigError("a sharded group (lanes > 1) needs a membership store client on every rank and a control group")
        self.name = name
        self.state = state
        self.group_rank = group_rank
        self.group_size = group_size
        self.leader = group_rank == 0
        self._control = control_pg
        self.round_deadline = timedelta(seconds=round_deadline_s)
        self.round_deadline_s = float(round_deadline_s)
        self.start_groups = start_groups
        self.join_timeout_s = float(join_timeout_s)
        self.silent_after_s = silent_after_s
        self.events = events
        self.membership: Membership | None = None
        self.lanes = lanes
        self._lane: Any = None  # this rank's lane (ranks 1.. of a sharded group; see recovery/lanes.py)
        self._lane_view = View(0)  # ranks 1..: the view their lane last ran in (told by the leader)
        self._told_epoch = -1  # the leader: the epoch whose view its ranks were last told
        self._store = store
        if self.leader:
            self.membership = Membership(store, name, fingerprint, prefix=MEMBERSHIP_PREFIX, heartbeat_interval_s=heartbeat_interval_s,
                                         timeout_s=heartbeat_timeout_s, min_members=min_groups,
                                         collective_timeout_s=round_deadline_s,
                                         first_view_after_s=min(heartbeat_timeout_s, 1.0))  # start_groups gathers the rest
        self._comm: Any = None
        self._synced_epoch = -1
        # this member's position in the job's sequence of cross-group operations (exchanges and
        # votes), the result of the last one, and whether it is joining (see _prologue)
        self._seq = 0
        self._last: _Done | None = None
        self._joining = False
        self._received = False
        self._last_sync: Any = None
        self._same_members = 0
        self.bytes_sent = 0
        self.rank = 0
        self.world_size = 1
        self.recoveries: list[dict[str, Any]] = []
        self.rejoins = 0
        # set by the trainer: this group's committed steps, newest first (leader), and a
        # collective over the group's ranks that loads an older one (see _agree_restart_point)
        self.resume_points: Callable[[], list[int]] | None = None
        self.restart_at: Callable[[int], int] | None = None
        self._fresh = True
        # set by the trainer when the engine overlaps its exchanges (overlap_steps > 0): each
        # exchange then starts at once on its own thread (_Exchange), not when it is awaited
        self.background = False
        self._exchange: _Exchange | None = None
        self._op_step: int | None = None  # the step that launched the exchange running now

    # ------------------------------------------------------------------ helpers

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, group=self.name, **fields)

    @property
    def view(self) -> View:
        """The adopted view (a sharded group's other ranks: the view of their last exchange)."""
        return self.membership.view if self.membership is not None else self._lane_view

    def _bcast(self, t: torch.Tensor) -> None:
        if self._control is None:
            return
        import torch.distributed as dist

        dist.broadcast(t, src=0, group=self._control)

    def _bcast_code(self, code: int, *ints: int) -> list[int]:
        buf = torch.tensor([code, *ints, *([0] * (3 - len(ints)))], dtype=torch.int64)
        self._bcast(buf)
        return buf.tolist()

    def _bcast_bytes(self, data: bytes, n: int) -> bytes:
        """Leader: send ``data`` (``n`` bytes) to the group; others: receive ``n`` bytes."""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader else torch.empty(n, dtype=torch.uint8)
        if n:
            self._bcast(buf)
        return bytes(buf.numpy().tobytes())

    def _group_max(self, flag: int) -> int:
        """Every rank of the group: the largest ``flag`` any of them passed (0 or 1: "my lane failed")."""
        t = torch.tensor([int(flag)], dtype=torch.int64)
        if self._control is not None:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return int(t.item())

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank's piece of a pseudo-gradient is finite (a sharded group: one
        non-finite shard vetoes the group's whole contribution, on every lane alike, so no
        lane applies a round that another skips). Collective over the group when it has lanes."""
        if self.lanes == 1:
            return finite
        return self._group_max(0 if finite else 1) == 0

    def _follow(self) -> list[int]:
        """Ranks other than the leader: serve the leader's control messages (a restart point, a
        lane's state transfer) until one that ends the current wait; returns it."""
        while True:
            msg = self._bcast_code(_OK)
            if msg[0] == _RESTART_AT:
                self.restart_at(msg[1])
            elif msg[0] == _LANE_STATE:
                self._lane_state(msg[1], msg[2])
            elif msg[0] == _LANE_VIEW:
                self._lane_view = decode_view(self._bcast_bytes(b"", msg[1]))[0]
            else:
                return msg

    def _bcast_state(self, flat: torch.Tensor, meta: bytes) -> tuple[torch.Tensor, bytes]:
        """Leader: send ``flat`` and ``meta``; others: receive them (shapes from the header)."""
        head = torch.tensor([flat.numel(), len(meta)], dtype=torch.int64)
        self._bcast(head)
        numel, nmeta = head.tolist()
        if not self.leader:
            flat = torch.empty(numel, dtype=torch.float32)
        self._bcast(flat)
        mbuf = torch.frombuffer(bytearray(meta), dtype=torch.uint8) if self.leader and nmeta else torch.empty(nmeta, dtype=torch.uint8)
        if nmeta:
            self._bcast(mbuf)
        return flat, bytes(mbuf.numpy().tobytes()) if nmeta else b""

    # ------------------------------------------------------------------ lifetime

    def start(self) -> "ProviderGroup":
        if self.membership is not None:
            self.membership.start()
        elif self.lanes > 1:
            from .lanes import Lane

            self._lane = Lane(self._store, MEMBERSHIP_PREFIX, self.group_rank, self.name, self.round_deadline)
        return self

    def close(self) -> None:
        if self.membership is not None:
            self.membership.close()
        if self._lane is not None:
            self._lane.close()

    def drop_process_groups(self) -> None:
        """Forget this object's process groups (the control group and the epoch's group) so that
        they are destroyed now, on the calling thread, not at interpreter shutdown (see
        ``Trainer._drop_process_groups``). The object cannot run collectives afterwards."""
        self._control = None
        self._comm = None

    # ------------------------------------------------------------------ entering an epoch

    def _enter(self, pending: _Pending | None) -> Any:
        """Build the group of the latest view and run its prologue (leader). Returns the result
        of ``pending`` when this member caught up on it (see :meth:`_prologue`), else None.
        Raises MembershipError when the group cannot connect, DistributedError when the
        prologue fails (the caller rolls that epoch)."""
        m = self.membership
        assert m is not None
        self._comm = m.communicator()
        view = m.view
        self.rank, self.world_size = view.rank_of(self.name), len(view.members)
        return self._prologue(view, pending)

    def _prologue(self, view: View, pending: _Pending | None) -> Any:
        """The first operations of every epoch, whatever way each member came to it (a joiner,
        a member switching after the vote, a member redoing a failed operation): every member
        runs the same ones, so that no two members ever post different collectives.

        1. *Hello*: one small all-gather of every member's position (:attr:`_seq`, the number
           of cross-group operations it completed; what it does next; whether it is joining)
           and, at a (re)start, its committed steps (:meth:`_agree_restart_point`).
        2. *Joiners wait for a round boundary*: a joiner's first operation is the vote, so when
           the members are in the middle of an exchange, the joiners are left out of this
           epoch (members: roll call without them; joiners: MembershipError, they are admitted
           again by the next view, which the members adopt at the next boundary).
        3. *Catch-up*: an operation can complete on some members and fail on others (a peer
           died after it sent them its last bytes, or a member was cancelled by the store's
           news just too late). Those that completed it are one operation ahead; one of them
           sends its result to those behind, who use it as theirs, so every member continues
           from the same result (it includes the lost member's contribution: equal to a clean
           leave after that operation). Operations are never more than one apart: none
           completes without every member.
        4. *State*: joiners receive the global state from a member that is ahead
           (:func:`sync_state` with an explicit source: the other members never receive).
        """
        self._last_sync = None
        rows = self._hello(pending)
        joining = [r for r, row in enumerate(rows) if row[_H_JOINING]]
        members = [r for r in range(len(rows)) if r not in joining]
        self._agree_restart_point(rows)
        if members:
            hi = max(rows[r][_H_SEQ] for r in members)
            ahead = [r for r in members if rows[r][_H_SEQ] == hi]
            next_kind = rows[ahead[0]][_H_NEXT]
            if joining and next_kind != _NEXT_VOTE:
                names = [view.members[r] for r in joining]
                if self._joining:  # leave the epoch for good (its group closed; never connected again)
                    self.membership.abort_epoch(view.epoch, f"joiners {names} deferred to the next round boundary")
                    raise MembershipError(f"{self.name}: the members of epoch {view.epoch} are inside a round; "
                                          "joining at the next round boundary")
                raise _JoinersDeferred(names, view.epoch)
            caught = self._catch_up(view, rows, members, ahead[0], pending)
            if joining:
                self._transfer_state(view, joining, source=view.members[ahead[0]])
            if self._joining:
                self._seq = hi  # the members' position (those behind count theirs on completing it)
        else:  # a (re)start: nobody holds a live state
            caught = None
            self._transfer_state(view, joining, source=None)
            self._seq = 0
        self._joining = False
        self._synced_epoch = view.epoch
        return caught

    def _hello(self, pending: _Pending | None) -> list[list[int]]:
        fresh = self._fresh and self.resume_points is not None and self.restart_at is not None
        # steps newer than the one loaded did not verify (skipped on resume): not offered
        mine = [int(s) for s in self.resume_points() if s <= self.state.step][:_RESUME_POINTS] if fresh else []
        buf = torch.full((_H_OFFERS + _RESUME_POINTS,), -1, dtype=torch.int64)
        buf[_H_STEP], buf[_H_NOFFERS], buf[_H_FRESH] = self.state.step, len(mine), int(fresh)
        buf[_H_SEQ], buf[_H_JOINING] = self._seq, int(self._joining)
        buf[_H_NEXT] = _NEXT_VOTE if pending is None or pending.kind == "vote" else _NEXT_EXCHANGE
        if mine:
            buf[_H_OFFERS:_H_OFFERS + len(mine)] = torch.tensor(mine, dtype=torch.int64)
        return [r.tolist() for r in self._comm.allgather(buf).wait(self.round_deadline)]

    def _agree_restart_point(self, rows: list[list[int]]) -> None:
        """At every epoch's hello, it acts only when every member is *fresh* (has not trained
        since it loaded its checkpoint): the job (re)starts and nobody holds a live state,
        whether the groups arrived in one view or one by one. Each group resumed from its own
        newest checkpoint, but a job killed as a whole stops between one group's commit of step
        S and another's: resuming each from its own newest would mix the global state of step S
        with the inner state (Adam moments, data position) of an older step. So the groups with
        a checkpoint all go back to the newest step every one of them has, which makes the
        restart equal to an uninterrupted run. A group without any checkpoint (new to the job)
        takes the state from a peer as joiners do. Without a common step the newest state
        serves everyone (warning + ``restart_inconsistent`` event)."""
        if not all(r[_H_FRESH] == 1 for r in rows):
            return  # a running job: joiners take the live state
        offers = {self.view.members[i]: set(r[_H_OFFERS:_H_OFFERS + r[_H_NOFFERS]]) for i, r in enumerate(rows)
                  if r[_H_NOFFERS] > 0}
        loaded = {self.view.members[i]: r[_H_STEP] for i, r in enumerate(rows) if r[_H_NOFFERS] > 0}
        if len(set(loaded.values())) <= 1:
            return  # nothing to agree on: one or no group has a checkpoint, or all loaded the same step
        common = set.intersection(*offers.values())
        if not common:
            log.warning("group %s: the groups' checkpoints have no step in common (%s): the newest state serves "
                        "everyone; the groups behind keep their older inner optimizer state", self.name, loaded)
            self._emit("restart_inconsistent", loaded=loaded)
            return
        agreed = max(common)
        self._emit("restart_point", agreed=agreed, loaded=loaded)
        if self.state.step != agreed:
            self._bcast_code(_RESTART_AT, agreed)
            self.restart_at(agreed)

    def _catch_up(self, view: View, rows: list[list[int]], members: list[int], source: int,
                  pending: _Pending | None) -> Any:
        """Step 3 of the prologue: ``source`` (the lowest-ranked member that is ahead) sends the
        result of its last operation to every member one behind. Returns it on those."""
        hi = rows[source][_H_SEQ]
        behind = [r for r in members if rows[r][_H_SEQ] == hi - 1]
        lost = [view.members[r] for r in members if rows[r][_H_SEQ] < hi - 1]
        if self.rank in [view.rank_of(n) for n in lost]:
            raise DroppedFromJobError(f"group {self.name} is {hi - self._seq} operations behind the others in epoch "
                                      f"{view.epoch}: rejoining to take the live state")
        if not behind:
            return None
        timeout = self.round_deadline
        if self.rank == source:
            last = self._last
            if last is None or last.seq != hi - 1:
                raise DistributedError("cannot serve the catch-up", {self.rank: f"the last completed operation is "
                                       f"{None if last is None else last.seq}, not {hi - 1}"})
            head = torch.tensor([last.seq, _KINDS[last.kind], len(last.tensors), last.tensors[0].numel()], dtype=torch.int64)
            for dst in behind:
                self._comm.send(head, dst, 0).wait(timeout)
                for i, t in enumerate(last.tensors):
                    self._comm.send(t.contiguous(), dst, 1 + i).wait(timeout)
            log.info("group %s: sent the result of operation %d (%s) to %s, who did not complete it", self.name,
                     last.seq, last.kind, [view.members[r] for r in behind])
            return None
        if self.rank not in behind:
            return None
        if pending is None:  # never: a member one operation behind is inside that operation
            raise DroppedFromJobError(f"group {self.name} is one operation behind outside an operation; rejoining")
        head = torch.zeros(4, dtype=torch.int64)
        self._comm.recv(head, source, 0).wait(timeout)
        seq, kind, count, numel = head.tolist()
        like = pending.original
        if seq != self._seq or kind != _KINDS[pending.kind] or numel != like.numel() or (pending.kind != "allgather" and count != 1):
            raise DroppedFromJobError(f"group {self.name}: the members completed another operation than this one "
                                      f"(seq {seq} kind {kind} numel {numel}, here seq {self._seq} {pending.kind} "
                                      f"numel {like.numel()}); rejoining to realign")
        out = [torch.empty_like(like) for _ in range(count)]
        for i, t in enumerate(out):
            self._comm.recv(t, source, 1 + i).wait(timeout)
        log.warning("group %s: operation %d (%s) completed on %s before the failure; took its result", self.name,
                    seq, pending.kind, view.members[source])
        self._emit("caught_up", epoch=view.epoch, seq=seq, op=pending.kind, source=view.members[source])
        return out if pending.kind == "allgather" else out[0]

    def _transfer_state(self, view: View, joining: list[int], source: str | None) -> None:
        """Step 4 of the prologue: joiners receive the global state (all joining: a (re)start,
        the newest state serves everyone, a checkpoint fallback when nobody has one)."""
        if not joining:
            return
        joiners = View(view.epoch, view.members, view.fingerprint, tuple(view.members[r] for r in joining))
        if self.lanes > 1:  # every lane moves its shard; they start together (a lane never waits on lane 0)
            raw, src = encode_view(joiners), (source or "").encode()
            self._bcast_code(_LANE_STATE, len(raw), len(src))
            self._bcast_bytes(raw + src, len(raw) + len(src))
        flat = self.state.flat()
        try:
            res = sync_state(self._comm, joiners, self.name, flat, self.state.step, meta=self.state.meta_bytes(),
                             fallback=lambda _flat: self.state.step, timeout=self.round_deadline, source=source)
        except DistributedError:
            if self.lanes > 1:
                self._group_max(1)
            raise
        if self.lanes > 1 and self._group_max(0):
            raise DistributedError(f"the state transfer of epoch {view.epoch} failed on a lane of group {self.name}",
                                   {self.rank: "another rank of this group reported it"})
        if self.name in res.receivers:
            self.state.apply(flat, res.meta)
            self._received = True
        self._last_sync = res

    def _lane_state(self, nview: int, nsrc: int) -> None:
        """A sharded group's rank >= 1: the leader's :meth:`_transfer_state` on this rank's lane."""
        data = self._bcast_bytes(b"", nview + nsrc)
        view = decode_view(data[:nview])[0]
        source = data[nview:].decode() or None
        failed = 0
        try:
            comm = self._lane.comm_for(view.epoch, view.rank_of(self.name), len(view.members))
            flat = self.state.flat()
            res = sync_state(comm, view, self.name, flat, self.state.step, meta=self.state.meta_bytes(),
                             fallback=lambda _flat: self.state.step, timeout=self.round_deadline, source=source)
            if self.name in res.receivers:
                self.state.apply(flat, res.meta)
        except DistributedError as exc:
            log.warning("group %s lane %d: state transfer in epoch %d failed: %s", self.name, self.group_rank, view.epoch, exc)
            self._lane.fail(view.epoch, f"state transfer: {exc}")
            failed = 1
        self._group_max(failed)

    # ------------------------------------------------------------------ join

    def join(self) -> int:
        """Collective over the group (every rank): get admitted, then make this group's global
        state equal to the job's (joiners receive it from a live peer; at a fresh start the
        member with the highest step serves everyone). Returns the step to continue from."""
        self._settle()
        if self.leader:
            t0 = time.perf_counter()
            self._received = False
            res = self._leader_join()
            # the group's other ranks install the state only where the leader did: a group that
            # kept its own (a restart from the groups' checkpoints) keeps its local weights,
            # which differ from the global ones between a fragment's syncs (streaming)
            received = int(self._received)
            self._bcast_code(_STATE, received)
            if self.lanes == 1 and received:  # a sharded group's ranks took their shards on their lanes
                self._bcast_state(self.state.flat(), self.state.meta_bytes())
            self._emit("joined", epoch=self.view.epoch, members=list(self.view.members), step=self.state.step,
                       state_from=res.source if res is not None else None,
                       received_bytes=res.received_bytes if res is not None else 0, seconds=round(time.perf_counter() - t0, 4))
        else:
            received = self._follow()[1]  # _STATE (the restart point and the lanes' transfers are served meanwhile)
            if self.lanes == 1 and received:
                flat, meta = self._bcast_state(torch.empty(0), b"")
                self.state.apply(flat, meta)
        return self.state.step

    def _leader_join(self) -> Any:
        m = self.membership
        assert m is not None
        deadline = time.monotonic() + self.join_timeout_s
        self._last = None
        while True:
            self._joining, self._last_sync = True, None
            left = deadline - time.monotonic()
            if left <= 0:
                raise MembershipError(f"group {self.name}: could not join the job within {self.join_timeout_s} s "
                                      f"(latest view: epoch {m.latest.epoch} {list(m.latest.members)}; store error: {m.last_error!r})")
            m.wait_for_admission(left)
            # start_groups holds back the job's first step only (and that of a job restarted as
            # a whole, even against a store that remembers the last run); a joiner of a running
            # job joins whatever view admitted it
            if len(m.latest.members) < self.start_groups and not self._job_running():
                time.sleep(0.05)
                continue
            try:
                self._enter(None)
                res = self._last_sync
                self._vote_loop()  # as the members do after the switch that admitted us
                m.set_flag("started", str(m.view.epoch).encode())
                self._fresh = False  # a later join (after being dropped) keeps the live state
                return res
            except DroppedFromJobError as exc:  # dropped in the vote that follows: join again
                log.info("group %s: dropped right after joining (%s); joining again", self.name, exc)
            except (MembershipError, DistributedError) as exc:
                log.info("group %s: joining epoch %d failed (%s); waiting for the next view", self.name, m.latest.epoch, exc)
                m.wait_for_change(min(1.0, max(0.05, deadline - time.monotonic())))

    def _job_running(self) -> bool:
        """The job has taken its first step since its latest (re)start: ``flag/started`` holds
        the epoch of the view that started it, and a (re)start is a view whose members were all
        joiners (``Membership.cold_epoch``). A whole job relaunched against an etcd that kept the
        old run's keys is therefore a fresh start again, held back by ``start_groups``."""
        m = self.membership
        raw = m.flag_value("started")
        if raw is None:
            return False
        try:
            started = int(raw)
        except ValueError:
            started = 0
        return started >= m.cold_epoch

    # ------------------------------------------------------------------ the Communicator protocol

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        return self._start("allreduce", buf)

    def allgather(self, buf: torch.Tensor) -> Handle:
        return self._start("allgather", buf)

    def _start(self, op: str, buf: torch.Tensor) -> Handle:
        """Without :attr:`background` the exchange runs when its handle is waited for (the
        engine waits at once when it does not overlap). With it, the exchange starts now on its
        own thread and the handle's wait joins it; a second exchange while one runs is refused
        (the trainer admits overlap only when rounds cannot overlap each other)."""
        if not self.background:
            return Handle(lambda timeout: self._collective(op, buf))
        if self._exchange is not None and self._exchange.running:
            raise DistributedError("a cross-group exchange was launched while another one runs",
                                   {self.rank: "overlap_steps must be smaller than the steps between two launches"})
        self._op_step = self.state.step if self.state is not None else None

        def run() -> Any:
            try:
                return self._collective(op, buf)
            finally:
                self._op_step = None

        ex = self._exchange = _Exchange(run, f"rt-exchange-{self.name}-{self.group_rank}").start()
        # the exchange bounds itself (each attempt by the round deadline, the roll calls by theirs);
        # the engine's timeout is not made shorter than what a redo after a roll call may take
        floor = timedelta(seconds=self.join_timeout_s + 4 * self.round_deadline_s)
        return Handle(lambda timeout: ex.wait(max(timeout, floor)))

    def _settle(self) -> None:
        """Before the training thread uses the control or the epoch's group: no exchange may
        still run on its thread (never the case when the engine waited for every round before
        its boundary; guarded because two threads in one gloo group abort the process)."""
        ex = self._exchange
        if ex is not None and ex.running:
            log.warning("group %s: an exchange still runs at a round boundary; waiting for it", self.name)
            try:
                ex.wait(timedelta(seconds=self.join_timeout_s + 4 * self.round_deadline_s))
            except Exception as exc:  # noqa: BLE001 - its round is dropped by the caller (abort_round)
                if ex.running:
                    raise
                log.warning("group %s: the exchange left running ended with %s", self.name, exc)

    def _collective(self, op: str, buf: torch.Tensor) -> Any:
        if self.lanes > 1:
            return self._lanes_collective(op, buf)
        if not self.leader:
            code = self._bcast_code(_OK)[0]
            if code == _DROPPED:
                raise DroppedFromJobError(f"group {self.name} was dropped from the job mid-round")
            if op == "allreduce":
                self._bcast(buf)
                return buf
            n = self._bcast_code(_OK)[1]
            out = torch.empty((n, *buf.shape), dtype=buf.dtype)
            self._bcast(out)
            return list(out.unbind(0))
        try:
            result = self._run(op, buf)
        except DroppedFromJobError:
            self._bcast_code(_DROPPED)
            raise
        self._bcast_code(_OK)
        if op == "allreduce":
            buf.copy_(result)
            self._bcast(buf)
            return buf
        self._bcast_code(_OK, len(result))
        self._bcast(torch.stack(result))
        return result

    def _lanes_collective(self, op: str, buf: torch.Tensor) -> Any:
        """A sharded group's exchange (every rank, ``buf`` = its shard's part): each rank runs
        ``op`` on its lane (lane 0: the leader's epoch group), then the group learns whether
        every lane completed (one MAX over the control group), then the leaders run a *commit
        vote* (:meth:`_run` of a one-element sum of "a lane of mine failed"): a cross-group
        operation like any other, redone among the survivors or taken from a member that
        completed it. A sum of 0 means every lane of every group completed the exchange: every
        rank uses its lane's result. Otherwise every rank of every group redoes the exchange
        in the view the commit vote ended in, from a copy of its input taken before the first
        try (equal to a clean leave of the lost groups before the round). A lane that fails
        publishes ``abort/<epoch>`` first, so every lane and leader of every group leaves the
        epoch's collectives at once (recovery/lanes.py)."""
        original = buf.detach().clone()
        while True:
            if self.leader:
                view = self.membership.view
                if self._told_epoch != view.epoch:  # the ranks' ledgers name the peers of their lanes
                    raw = encode_view(view)
                    self._bcast_code(_LANE_VIEW, len(raw))
                    self._bcast_bytes(raw, len(raw))
                    self._told_epoch = view.epoch
                self._bcast_code(_LANE_OP, view.epoch, self.rank, self.world_size)
                epoch, rank, world = view.epoch, self.rank, self.world_size
            else:
                code, epoch, rank, world = self._follow()
                if code == _DROPPED:
                    raise DroppedFromJobError(f"group {self.name} was dropped from the job mid-round")
            result, error = self._lane_op(op, original.clone(), epoch, rank, world)
            failed = self._group_max(0 if error is None else 1)
            if not self.leader:
                code = self._follow()[0]
                if code == _DROPPED:
                    raise DroppedFromJobError(f"group {self.name} was dropped from the job mid-round")
                if code == _REDO:
                    continue
                return self._result(op, buf, result)
            if failed and error is None:  # another lane failed (and told the store): leave the epoch
                self.membership.abort_epoch(epoch, f"lane of group {self.name} failed")
            try:
                total = self._run("allreduce", torch.tensor([float(failed)]))
            except DroppedFromJobError:
                self._bcast_code(_DROPPED)
                raise
            if total.item() == 0:
                self._bcast_code(_OK)
                return self._result(op, buf, result)
            log.warning("group %s: a lane failed in the exchange of epoch %d; every lane redoes it in epoch %d",
                        self.name, epoch, self.membership.view.epoch)
            self._bcast_code(_REDO)

    @staticmethod
    def _result(op: str, buf: torch.Tensor, result: Any) -> Any:
        if op == "allreduce":
            buf.copy_(result)
            return buf
        return result

    def _lane_op(self, op: str, mine: torch.Tensor, epoch: int, rank: int, world: int) -> tuple[Any, str | None]:
        """This rank's part of a sharded exchange on its lane; (result, None) or (None, error)."""
        try:
            comm = self._comm if self.leader else self._lane.comm_for(epoch, rank, world)
            before = comm.bytes_sent
            try:
                h = comm.allgather(mine) if op == "allgather" else comm.allreduce_sum(mine)
                return h.wait(self.round_deadline), None
            finally:
                self.bytes_sent += comm.bytes_sent - before
        except DistributedError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("group %s lane %d: exchange in epoch %d failed: %s", self.name, self.group_rank, epoch, error)
            if self.leader:
                self.membership.abort_epoch(epoch, f"lane 0 of group {self.name}: {error}")
            else:
                self._lane.fail(epoch, error)
            return None, error

    def _run(self, kind: str, buf: torch.Tensor) -> Any:
        """One cross-group operation (leader): ``allreduce`` / ``vote`` (a sum) or ``allgather``
        of ``buf``, redone among the survivors until it completes (or its result is taken from
        a member that completed it: :meth:`_prologue`). ``buf`` is not written; the result is a
        new tensor (a list for ``allgather``), kept as :attr:`_last` until the next operation
        completes, for the members that may need it."""
        # every attempt runs on its own copy of the input: an attempt that was cancelled (a peer
        # reported the failure first) may still be in flight inside gloo and write into it
        pending = _Pending(kind, buf.detach().clone())
        attempt = 0
        while True:
            comm = self._comm
            before = comm.bytes_sent
            mine = pending.original.clone()
            try:
                if kind == "allgather":
                    result = comm.allgather(mine).wait(self.round_deadline)
                else:
                    result = comm.allreduce_sum(mine).wait(self.round_deadline)
                self.bytes_sent += comm.bytes_sent - before
                self._same_members = 0
                break
            except DistributedError as exc:
                self.bytes_sent += comm.bytes_sent - before
                attempt += 1
                caught = self._recover(exc, attempt, pending=pending)
                if caught is not None:
                    result = caught
                    break
        self._last = _Done(self._seq, kind, list(result) if kind == "allgather" else [result])
        self._seq += 1
        return result

    def _recover(self, exc: BaseException, attempt: int, failed: View | None = None,
                 pending: _Pending | None = None) -> Any:
        """A cross-group operation (or connecting the group of ``failed``, default the adopted
        view) failed (leader): roll call over that epoch, enter the next view (its prologue).
        Returns ``pending``'s result when another member had completed it, else None."""
        m = self.membership
        assert m is not None
        t0 = time.perf_counter()
        failed = failed or m.view
        self._emit("round_failed", epoch=failed.epoch, members=list(failed.members), attempt=attempt,
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
        log.warning("group %s: cross-group round failed in epoch %d (%s); roll call", self.name, failed.epoch, exc)
        rolled = failed  # the epoch whose operation failed: its members answer the roll call
        while True:
            view = self._roll_call(exc, attempt, rolled, failed)
            try:
                caught = self._enter(pending)
                break
            except MembershipError as again:
                log.warning("group %s: epoch %d could not connect (%s); roll call again", self.name, view.epoch, again)
                rolled, exc = m.latest, again  # the group that could not connect is the one to roll next
            except DistributedError as again:
                log.warning("group %s: the start of epoch %d failed (%s); roll call again", self.name, m.view.epoch, again)
                rolled, exc = m.view, again
        seconds = time.perf_counter() - t0
        step = self._op_step if self._op_step is not None else self.state.step  # a background exchange: its launch step
        rec = {"epoch": m.view.epoch, "members": list(m.view.members),
               "dropped": sorted(set(failed.members) - set(m.view.members)),
               "seconds": round(seconds, 4), "step": step, "steps_redone": 0}
        self.recoveries.append(rec)
        self._emit("reconfigured", **rec)
        log.warning("group %s: continuing in epoch %d with %s after %.2f s; %s", self.name, m.view.epoch,
                    list(m.view.members), seconds,
                    "took the result from a member that completed it" if caught is not None else "the operation is redone among them")
        return caught

    def _roll_call(self, exc: BaseException, attempt: int, rolled: View, failed: View) -> View:
        """The membership roll call over ``rolled``; raises DroppedFromJobError when this group
        is not in the next view (or keeps failing among the same members)."""
        m = self.membership
        unsynced = tuple(j for j in rolled.joiners if self._synced_epoch < rolled.epoch)
        if isinstance(exc, _JoinersDeferred):
            unsynced += exc.joiners
        try:
            view = m.report_failure(deadline_s=self.round_deadline_s, silent_after_s=self.silent_after_s,
                                    exclude=unsynced, view=rolled, error=f"{type(exc).__name__}: {exc}")
        except MembershipError as again:
            raise DroppedFromJobError(f"group {self.name}: no new view after a failed round: {again}") from exc
        if self.name not in view.members or (self.name in m.latest.joiners and m.latest.epoch > failed.epoch):
            # dropped (and perhaps already re-admitted as a joiner): take the state afresh
            raise DroppedFromJobError(f"group {self.name} was dropped from the job in epoch {view.epoch} "
                                      f"(missed the round deadline of {self.round_deadline_s:g} s)") from exc
        if view.members == failed.members and not isinstance(exc, _JoinersDeferred):
            self._same_members += 1
            if self._same_members >= 3:
                # everyone answered, yet the round keeps failing: the members are not in the
                # same operation (or cannot reach each other). Rejoin: the prologue realigns them.
                self._same_members = 0
                raise DroppedFromJobError(f"group {self.name}: the round failed {attempt} times among the same members "
                                          f"{list(view.members)}; rejoining to realign") from exc
        elif view.members != failed.members:
            self._same_members = 0
        return view

    # ------------------------------------------------------------------ round boundaries

    def after_round(self) -> None:
        """Collective over the group, after every completed round (with overlap: after the round
        is applied, at ``t + d``): the leaders vote on switching to a newer view (joiners, or
        members dropped by heartbeat); joiners receive the state."""
        self._settle()
        if not self.leader:
            code = self._follow()[0]
            if code == _STATE and self.lanes == 1:
                flat, meta = self._bcast_state(torch.empty(0), b"")
                self.state.apply(flat, meta)
            elif code == _DROPPED:
                raise DroppedFromJobError(f"group {self.name} was dropped from the job at a round boundary")
            return
        self._received = False
        try:
            self._vote_loop()
        except DroppedFromJobError:
            self._bcast_code(_DROPPED)
            raise
        if self._received:
            self._bcast_code(_STATE)
            if self.lanes == 1:
                self._bcast_state(self.state.flat(), self.state.meta_bytes())
        else:
            self._bcast_code(_OK)

    def _vote_loop(self) -> None:
        """Leaders: vote until nobody sees a newer view; switch (and share the state with
        joiners) after each positive vote. A vote is a cross-group operation like the
        exchanges (:meth:`_run`): redone among the survivors, or its result taken from a
        member that completed it, in which case this member may already stand in the view the
        others switched to."""
        m = self.membership
        assert m is not None
        while True:
            voted_in = m.view.epoch
            total = self._run("vote", torch.tensor([1.0 if m.check() else 0.0]))
            if total.item() == 0:
                break
            if m.view.epoch != voted_in:
                continue  # a failed vote moved this member to a newer view already: vote again there
            old = m.view
            m.wait_for_change(self.round_deadline_s)
            if self.name not in m.latest.members:
                raise DroppedFromJobError(f"group {self.name} is not in epoch {m.latest.epoch} {list(m.latest.members)}")
            target = m.latest
            try:
                self._enter(None)
            except (MembershipError, DistributedError) as exc:
                self._recover(exc, 1, failed=target)
                continue
            res = self._last_sync
            self._emit("membership", epoch=m.view.epoch, members=list(m.view.members), joiners=list(m.view.joiners),
                       previous=list(old.members), step=self.state.step, state_from=res.source if res else None,
                       sent_bytes=res.sent_bytes if res else 0, received_bytes=res.received_bytes if res else 0)


class DiLoCoGlobalState:
    """The state :func:`sync_state` moves between members: a thin adapter over the DiLoCo
    engine's own replicated state (:meth:`~resilient_train.sync.diloco.DiLoCo.global_flat`, ``global_flat_meta``,
    :meth:`~resilient_train.sync.diloco.DiLoCo.load_global_flat`, the same encoding as its
    checkpoint ``state_dict``) plus the trainer's step in the meta. ``apply`` installs a
    received state and sets the local weights to the global ones."""

    def __init__(self, diloco: Any, get_step: Callable[[], int], set_step: Callable[[int], None]):
        self.diloco = diloco
        self._get_step = get_step
        self._set_step = set_step

    @property
    def step(self) -> int:
        return self._get_step()

    def flat(self) -> torch.Tensor:
        return self.diloco.global_flat()

    def meta_bytes(self) -> bytes:
        return json.dumps({"step": self.step, **self.diloco.global_flat_meta()}, sort_keys=True).encode()

    def apply(self, flat: torch.Tensor, meta: bytes) -> None:
        info = json.loads(meta)
        self.diloco.load_global_flat(flat, info)
        self._set_step(int(info["step"]))
