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
  result equals a run in which the lost group left cleanly before that round, bit for bit.
* **Admit joiners at round boundaries.** After every round the leaders vote (one tiny
  all-reduce) on whether a newer view exists; if so, all of them switch to it after the same
  round and joiners receive the global state from a live peer (:func:`sync_state`).
* **Rejoin after being dropped.** A group that learns it was dropped (it missed a round's
  deadline) raises :class:`DroppedFromJobError` out of the sync engine; the trainer aborts the
  round and calls :meth:`join` again, which takes the live state from a peer.

What each member holds (and who persists it): the *global* state (DiLoCo's global weights and
outer optimizer momentum, the step) is replicated across groups and is what joiners receive;
the *group* state (local weights, inner optimizer state, error-feedback residuals, data
position) is the group's own and goes to the group's own checkpoint; the *rank* state (RNG)
goes to the rank's file of that checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any, Callable

import torch

from ..errors import ConfigError, DistributedError, DroppedFromJobError, MembershipError
from ..membership import Membership, sync_state
from ..membership.decision import View
from ..sync.communicator import Handle

__all__ = ["ProviderGroup", "open_membership_store"]

log = logging.getLogger(__name__)

# control messages on the group's own gloo group (leader -> the group's other ranks)
_OK, _DROPPED, _STATE, _RESTART_AT = 0, 1, 2, 3

# how many of its newest committed steps each group offers when a job restarts as a whole
_RESUME_POINTS = 64


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
                 join_timeout_s: float = 300.0, events: Any = None, silent_after_s: float | None = None):
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"group must be a non-empty name without '/', got {name!r}")
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
        if self.leader:
            self.membership = Membership(store, name, fingerprint, heartbeat_interval_s=heartbeat_interval_s,
                                         timeout_s=heartbeat_timeout_s, min_members=min_groups,
                                         collective_timeout_s=round_deadline_s,
                                         first_view_after_s=min(heartbeat_timeout_s, 1.0))  # start_groups gathers the rest
        self._comm: Any = None
        self._synced_epoch = -1
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

    # ------------------------------------------------------------------ helpers

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, group=self.name, **fields)

    @property
    def view(self) -> View:
        return self.membership.view if self.membership is not None else View(0)

    def _bcast(self, t: torch.Tensor) -> None:
        if self._control is None:
            return
        import torch.distributed as dist

        dist.broadcast(t, src=0, group=self._control)

    def _bcast_code(self, code: int, *ints: int) -> list[int]:
        buf = torch.tensor([code, *ints, *([0] * (3 - len(ints)))], dtype=torch.int64)
        self._bcast(buf)
        return buf.tolist()

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
        return self

    def close(self) -> None:
        if self.membership is not None:
            self.membership.close()

    def _adopt(self) -> None:
        """Build the communicator of the latest view (leader)."""
        assert self.membership is not None
        self._comm = self.membership.communicator()
        view = self.membership.view
        self.rank, self.world_size = view.rank_of(self.name), len(view.members)

    # ------------------------------------------------------------------ join

    def join(self) -> int:
        """Collective over the group (every rank): get admitted, then make this group's global
        state equal to the job's (joiners receive it from a live peer; at a fresh start the
        member with the highest step serves everyone). Returns the step to continue from."""
        if self.leader:
            t0 = time.perf_counter()
            res = self._leader_join()
            self._bcast_code(_STATE)
            flat, meta = self._bcast_state(self.state.flat(), self.state.meta_bytes())
            self._emit("joined", epoch=self.view.epoch, members=list(self.view.members), step=self.state.step,
                       state_from=res.source if res is not None else None,
                       received_bytes=res.received_bytes if res is not None else 0, seconds=round(time.perf_counter() - t0, 4))
        else:
            while True:
                code, step = self._bcast_code(_OK)[:2]
                if code != _RESTART_AT:
                    break
                self.restart_at(step)
            flat, meta = self._bcast_state(torch.empty(0), b"")
            self.state.apply(flat, meta)
        return self.state.step

    def _leader_join(self) -> Any:
        m = self.membership
        assert m is not None
        deadline = time.monotonic() + self.join_timeout_s
        while True:
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
                self._adopt()
                res = self._sync_view()
                self._vote_loop()  # as the members do after the switch that admitted us
                m.set_flag("started", str(m.view.epoch).encode())
                self._fresh = False  # a later join (after being dropped) keeps the live state
                return res
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

    def _agree_restart_point(self) -> None:
        """Collective over the adopted view's leaders, at every view switch (one small
        all-gather). It acts only when every member is *fresh* (has not trained since it
        loaded its checkpoint): the job (re)starts and nobody holds a live state, whether the
        groups arrived in one view or one by one. Each group resumed from its own newest
        checkpoint, but a job killed as a whole stops between one group's commit of step S and
        another's: resuming each from its own newest would mix the global state of step S with
        the inner state (Adam moments, data position) of an older step. So the groups with a
        checkpoint all go back to the newest step every one of them has, which makes the
        restart equal to an uninterrupted run. A group without any checkpoint (new to the job)
        takes the state from a peer as joiners do. Without a common step the newest state
        serves everyone (warning + ``restart_inconsistent`` event)."""
        fresh = self._fresh and self.resume_points is not None and self.restart_at is not None
        # steps newer than the one loaded did not verify (skipped on resume): not offered
        mine = [int(s) for s in self.resume_points() if s <= self.state.step][:_RESUME_POINTS] if fresh else []
        buf = torch.full((_RESUME_POINTS + 3,), -1, dtype=torch.int64)
        buf[0], buf[1], buf[2] = self.state.step, len(mine), int(fresh)
        if mine:
            buf[3:3 + len(mine)] = torch.tensor(mine, dtype=torch.int64)
        rows = [r.tolist() for r in self._comm.allgather(buf).wait(self.round_deadline)]
        if not all(r[2] == 1 for r in rows):
            return  # a running job: joiners take the live state
        offers = {self.view.members[i]: set(r[3:3 + r[1]]) for i, r in enumerate(rows) if r[1] > 0}
        loaded = {self.view.members[i]: r[0] for i, r in enumerate(rows) if r[1] > 0}
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

    def _sync_view(self) -> Any:
        """sync_state over the adopted view (leader): joiners and lagging members receive."""
        m = self.membership
        assert m is not None
        view = m.view
        self._agree_restart_point()
        flat = self.state.flat()
        res = sync_state(self._comm, view, self.name, flat, self.state.step, meta=self.state.meta_bytes(),
                         fallback=lambda _flat: self.state.step, timeout=self.round_deadline)
        if self.name in res.receivers:
            self.state.apply(flat, res.meta)
        self._synced_epoch = view.epoch
        return res

    # ------------------------------------------------------------------ the Communicator protocol

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        return Handle(lambda timeout: self._collective("allreduce", buf))

    def allgather(self, buf: torch.Tensor) -> Handle:
        return Handle(lambda timeout: self._collective("allgather", buf))

    def _collective(self, op: str, buf: torch.Tensor) -> Any:
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
        # every attempt runs on its own copy of the input: an attempt that was cancelled (a peer
        # reported the failure first) may still be in flight inside gloo and write into it
        original = buf.clone()
        attempt = 0
        while True:
            comm = self._comm
            before = comm.bytes_sent
            mine = original.clone()
            try:
                if op == "allreduce":
                    buf.copy_(comm.allreduce_sum(mine).wait(self.round_deadline))
                    result = buf
                else:
                    result = comm.allgather(mine).wait(self.round_deadline)
                self.bytes_sent += comm.bytes_sent - before
                self._same_members = 0
                break
            except DistributedError as exc:
                self.bytes_sent += comm.bytes_sent - before
                attempt += 1
                try:
                    self._recover(exc, attempt)
                except DroppedFromJobError:
                    self._bcast_code(_DROPPED)
                    raise
        self._bcast_code(_OK)
        if op == "allreduce":
            self._bcast(buf)
            return result
        self._bcast_code(_OK, len(result))
        self._bcast(torch.stack(result))
        return result

    def _recover(self, exc: BaseException, attempt: int, failed: View | None = None) -> None:
        """A cross-group collective (or connecting the group of ``failed``, default the adopted
        view) failed (leader): roll call over that epoch, adopt the next view."""
        m = self.membership
        assert m is not None
        t0 = time.perf_counter()
        failed = failed or m.view
        self._emit("round_failed", epoch=failed.epoch, members=list(failed.members), attempt=attempt,
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
        log.warning("group %s: cross-group round failed in epoch %d (%s); roll call", self.name, failed.epoch, exc)
        rolled = failed  # the epoch whose operation failed: its members answer the roll call
        while True:
            unsynced = tuple(j for j in rolled.joiners if self._synced_epoch < rolled.epoch)
            try:
                view = m.report_failure(deadline_s=self.round_deadline_s, silent_after_s=self.silent_after_s,
                                        exclude=unsynced, view=rolled, error=f"{type(exc).__name__}: {exc}")
            except MembershipError as again:
                raise DroppedFromJobError(f"group {self.name}: no new view after a failed round: {again}") from exc
            if self.name not in view.members or (self.name in m.latest.joiners and m.latest.epoch > failed.epoch):
                # dropped (and perhaps already re-admitted as a joiner): take the state afresh
                raise DroppedFromJobError(f"group {self.name} was dropped from the job in epoch {view.epoch} "
                                          f"(missed the round deadline of {self.round_deadline_s:g} s)") from exc
            if view.members == failed.members:
                self._same_members += 1
                if self._same_members >= 3:
                    # everyone answered, yet the round keeps failing: the members are not in the
                    # same operation (or cannot reach each other). Rejoin: sync_state realigns them.
                    self._same_members = 0
                    raise DroppedFromJobError(f"group {self.name}: the round failed {attempt} times among the same members "
                                              f"{list(view.members)}; rejoining to realign") from exc
            else:
                self._same_members = 0
            try:
                self._adopt()
                break
            except MembershipError as again:
                log.warning("group %s: epoch %d could not connect (%s); roll call again", self.name, view.epoch, again)
                rolled = m.latest  # the group that could not connect is the one to roll next
        seconds = time.perf_counter() - t0
        rec = {"epoch": view.epoch, "members": list(view.members), "dropped": sorted(set(failed.members) - set(view.members)),
               "seconds": round(seconds, 4), "step": self.state.step, "steps_redone": 0}
        self.recoveries.append(rec)
        self._emit("reconfigured", **rec)
        log.warning("group %s: continuing in epoch %d with %s after %.2f s; the round is redone among them",
                    self.name, view.epoch, list(view.members), seconds)

    # ------------------------------------------------------------------ round boundaries

    def after_round(self) -> None:
        """Collective over the group, after every completed round: the leaders vote on switching
        to a newer view (joiners, or members dropped by heartbeat); joiners receive the state."""
        if not self.leader:
            code = self._bcast_code(_OK)[0]
            if code == _STATE:
                flat, meta = self._bcast_state(torch.empty(0), b"")
                self.state.apply(flat, meta)
            elif code == _DROPPED:
                raise DroppedFromJobError(f"group {self.name} was dropped from the job at a round boundary")
            return
        try:
            received = self._vote_loop()
        except DroppedFromJobError:
            self._bcast_code(_DROPPED)
            raise
        if received:
            self._bcast_code(_STATE)
            self._bcast_state(self.state.flat(), self.state.meta_bytes())
        else:
            self._bcast_code(_OK)

    def _vote_loop(self) -> bool:
        """Leaders: vote until nobody sees a newer view; switch (and share the state with
        joiners) after each positive vote. Returns True if this member received the state."""
        m = self.membership
        assert m is not None
        received = False
        while True:
            vote = torch.tensor([1.0 if m.check() else 0.0])
            comm = self._comm
            before = comm.bytes_sent
            try:
                comm.allreduce_sum(vote).wait(self.round_deadline)
                self.bytes_sent += comm.bytes_sent - before
            except DistributedError as exc:
                self._recover(exc, 1)
                continue
            if vote.item() == 0:
                break
            old = m.view
            m.wait_for_change(self.round_deadline_s)
            if self.name not in m.latest.members:
                raise DroppedFromJobError(f"group {self.name} is not in epoch {m.latest.epoch} {list(m.latest.members)}")
            target = m.latest
            try:
                self._adopt()
                res = self._sync_view()
            except (MembershipError, DistributedError) as exc:
                self._recover(exc, 1, failed=target)
                continue
            received = received or self.name in res.receivers
            self._emit("membership", epoch=m.view.epoch, members=list(m.view.members), joiners=list(m.view.joiners),
                       previous=list(old.members), step=self.state.step, state_from=res.source,
                       sent_bytes=res.sent_bytes, received_bytes=res.received_bytes)
        return received


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
