"""Lanes: the shard-parallel exchange between provider groups.

A provider group whose model is sharded over its ``N`` ranks (FSDP2's ``fully_shard``, HSDP,
tensor parallel: every parameter a DTensor) holds its sync state sharded the same way: rank
``i`` holds the pseudo-gradient, global weights, outer momentum and error-feedback residuals of
its own shard only. Rank ``i`` of every group therefore exchanges its shard with rank ``i`` of
the others, on *lane* ``i``: a gloo group per lane and membership epoch, whose members are the
groups of that epoch's view (rank = the group's position in the view). Cross-provider bytes are
spread over all ``N`` ranks and no rank holds more than its shard plus the exchange's buffers.

Lane 0 is the group leader's own epoch group (:meth:`Membership.communicator`); this module is
the lane of every other rank: :class:`Lane` builds its group for an epoch (rendezvous under
``<prefix>/lane-<i>/epoch-<e>`` in the membership store, so every rank of a sharded group holds
a client of the store), runs the operations, and carries failures both ways:

* **Out.** An operation that fails on this lane publishes ``abort/<epoch>`` (the key every
  group's leader already watches, :meth:`Membership.abort_epoch`) and releases the lane's group,
  so every peer blocked on this rank fails at once.
* **In.** While an operation is in flight a watcher thread reads ``abort/<epoch>`` every
  ``abort_poll_s`` and cancels the wait when it appears, whichever lane or leader reported it.

A replicated (DDP) group is the one-shard case: its model is one shard, held alike by all its
ranks, and it exchanges on lane 0 alone (its leader), whose result the group's ranks receive
over the group's control group.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from ..errors import DistributedError, MembershipStoreError
from ..membership.kvstore import torch_store_for
from ..membership.service import decode_abort_record, encode_abort_record
from ..sync.communicator import ProcessGroupCommunicator

__all__ = ["Lane", "abort_key", "lane_prefix"]

log = logging.getLogger(__name__)


def abort_key(prefix: str, epoch: int) -> str:
    """The store key that reports a failed collective of ``epoch`` (see Membership.abort_epoch)."""
    return f"{prefix}/abort/{epoch}"


def lane_prefix(prefix: str, lane: int, epoch: int) -> str:
    """Where lane ``lane``'s group of ``epoch`` meets (lane 0 uses the epoch's own group)."""
    return f"{prefix}/lane-{lane}/epoch-{epoch}"


class Lane:
    """Lane ``index`` (>= 1) of one group: its rank's cross-group collectives (module docstring).

    ``kv``: a KVStore client of the membership store; ``prefix``: the membership's key prefix;
    ``timeout``: bounds connecting a group and every operation (the round deadline). Thread
    safety: one training thread calls :meth:`comm_for`/:meth:`fail`; the watcher runs alongside."""

    def __init__(self, kv: Any, prefix: str, index: int, member: str, timeout: timedelta, *, abort_poll_s: float = 0.02):
        if index < 1:
            raise ValueError("lane 0 is the leader's epoch group")
        self.kv, self.prefix, self.index, self.member = kv, prefix.rstrip("/"), index, member
        self.timeout = timeout
        self.abort_poll_s = abort_poll_s
        self.epoch = -1
        self.comm: ProcessGroupCommunicator | None = None
        self._failed_epoch = -1
        self._graveyard: list[ProcessGroupCommunicator] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(kv.clone(),), name=f"lane-{index}-watch-{member}", daemon=True)
        self._watcher.start()

    def comm_for(self, epoch: int, rank: int, world: int) -> ProcessGroupCommunicator:
        """This lane's group of ``epoch`` (built on first use; collective over the lane: rank
        ``rank`` of ``world``). Raises DistributedError when it cannot connect (a group died)."""
        with self._lock:
            if self.comm is not None and self.epoch == epoch:
                return self.comm
            if epoch <= self._failed_epoch:
                raise DistributedError(f"lane {self.index}: epoch {epoch} failed", {rank: "aborted before connecting"})
            old, self.comm = self.comm, None
        if old is not None:
            self._retire(old)
        from ..sync.threads import ConnectCancelled, connect_cancellable, make_gloo_group

        store = torch_store_for(self.kv.clone(), lane_prefix(self.prefix, self.index, epoch), self.timeout)
        poll = self.kv.clone()

        def cancelled() -> str | None:  # a member already gave this epoch up: never wait out the timeout
            try:
                raw = poll.get(abort_key(self.prefix, epoch), timeout=self.timeout)
            except MembershipStoreError:
                return None
            if raw is None:
                return None
            who, why = decode_abort_record(raw)
            return f"{who} reported a failed collective in epoch {epoch}: {why[:200]}"

        try:
            pg = connect_cancellable(lambda: make_gloo_group(store, rank, world, self.timeout), cancelled,
                                     abandon=getattr(store, "cancel", None))
        except ConnectCancelled as exc:
            with self._lock:
                self._failed_epoch = max(self._failed_epoch, epoch)
            raise DistributedError(f"lane {self.index}: gave up connecting the group of epoch {epoch}",
                                   {rank: str(exc)}) from None
        except Exception as exc:  # gloo: connect timeout / refused
            raise DistributedError(f"lane {self.index}: could not connect the group of epoch {epoch}",
                                   {rank: f"{type(exc).__name__}: {str(exc)[:300]}"}) from None
        comm = ProcessGroupCommunicator(pg)
        with self._lock:
            self.comm, self.epoch = comm, epoch
        log.debug("%s lane %d: connected epoch %d (rank %d of %d)", self.member, self.index, epoch, rank, world)
        return comm

    def fail(self, epoch: int, error: str) -> None:
        """An operation of ``epoch`` failed here: tell every member (``abort/<epoch>``; the first
        report wins) and release this lane's group so that peers blocked on it fail at once."""
        body = encode_abort_record(f"{self.member} (lane {self.index})", error)
        try:
            self.kv.compare_set(abort_key(self.prefix, epoch), None, body, timeout=self.timeout)
        except MembershipStoreError as exc:
            log.warning("%s lane %d: could not publish the failure of epoch %d: %s", self.member, self.index, epoch, exc)
        with self._lock:
            self._failed_epoch = max(self._failed_epoch, epoch)
            comm = self.comm if self.epoch == epoch else None
            if comm is not None:
                self.comm = None
        if comm is not None:
            comm.abort(f"lane {self.index} of {self.member} saw a collective of epoch {epoch} fail: {error[:300]}")
            self._retire(comm)

    def _retire(self, comm: ProcessGroupCommunicator) -> None:
        comm.abort("superseded by a newer epoch")
        if not comm.release():
            with self._lock:
                self._graveyard.append(comm)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            comm, self.comm = self.comm, None
        if comm is not None:
            self._retire(comm)

    def _watch(self, kv: Any) -> None:
        timeout = timedelta(seconds=min(self.timeout.total_seconds(), 2.0))
        while not self._stop.wait(self.abort_poll_s):
            try:
                self._watch_once(kv, timeout)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one poll
                log.exception("%s lane %d: abort watch failed; polling on", self.member, self.index)

    def _watch_once(self, kv: Any, timeout: timedelta) -> None:
        with self._lock:
            self._graveyard = [c for c in self._graveyard if not c.release()]
            comm, epoch = self.comm, self.epoch
        if comm is None or comm.aborted is not None or not comm.busy:
            return
        try:
            raw = kv.get(abort_key(self.prefix, epoch), timeout=timeout)
        except MembershipStoreError as exc:
            log.debug("%s lane %d: abort watch: store call failed: %s", self.member, self.index, exc)
            return
        if raw is None:
            return
        who, why = decode_abort_record(raw)
        log.info("%s lane %d: %s reported a failed collective in epoch %d; leaving it", self.member, self.index, who, epoch)
        comm.abort(f"{who} reported a failed collective in epoch {epoch}: {why}")
