"""One replica group (provider) of an in-process elastic cross-provider job.

Every provider runs one :class:`ElasticGroup` around its own model and inner optimizer. The
groups synchronise with DiLoCo over the current membership epoch's process group; when a
provider drops out (its processes and its storage), the survivors agree on a new epoch,
rebuild the group, roll back to the last committed checkpoint (read from whichever providers
still hold a verified copy) and carry on without restarting. A provider that comes back
rejoins at an agreed step and receives the live state from a peer.

Call order::

    group = ElasticGroup(member_id, model, inner_opt, membership, placement, sync_every=H,
                         every_n_steps=K, events=EventLog(...)).start(expect=("a", "b", "c"))
    while group.step_count < total:
        batch = data_for(group.step_count, member_id)   # a function of the step: replayable
        loss(model(batch)).backward(); inner_opt.step(); inner_opt.zero_grad()
        group.step()                                    # may roll back step_count
        if group.step_count == rejoin_step:
            group.admit(("b",))                          # deterministic join point
    group.close()

Rules that make a run reproducible (the tests compare a faulty run with a fault-free run of
the same membership history bit for bit):

* membership changes take effect only at synchronisation steps (multiples of ``sync_every``)
  or at the step where :meth:`admit` is called;
* after a failed synchronisation every survivor restores the last committed checkpoint, so
  no survivor keeps steps its peers lost;
* the inner optimizer must be stateless between synchronisations (plain SGD): its state is
  not part of the shared checkpoint (each provider's would differ).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Sequence

import torch

from ..checkpoint import TrainState
from ..checkpoint.replicate import load_replicated, save_replicated
from ..errors import CheckpointNotFoundError, ConfigError, DistributedError, MembershipError, ReplicationError
from ..membership.transfer import sync_state
from ..storage.providers import Placement
from ..sync import DiLoCo

__all__ = ["ElasticGroup"]

log = logging.getLogger(__name__)


class _NullEvents:
    def emit(self, event: str, **fields: Any) -> None:
        pass


class ElasticGroup:
    """See the module docstring. Construction does no I/O; :meth:`start` joins the job."""

    def __init__(self, member_id: str, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, membership: Any, placement: Placement, *, sync_every: int, every_n_steps: int, codec: str = "none", outer_lr: float = 0.7, outer_momentum: float = 0.9, events: Any = None, change_timeout_s: float = 60.0, collective_timeout_s: float = 30.0):
        if every_n_steps % sync_every:
            raise ConfigError(f"every_n_steps ({every_n_steps}) must be a multiple of sync_every ({sync_every}): checkpoints are taken on synchronised steps")
        for group in inner_optimizer.param_groups:
            if group.get("momentum", 0) or "betas" in group:
                raise ConfigError("the inner optimizer must be stateless (SGD without momentum): its state is not shared across providers, so a rollback could not restore it identically")
        self.member_id = member_id
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.membership = membership
        self.placement = placement
        self.sync_every = sync_every
        self.every_n_steps = every_n_steps
        self.events = events or _NullEvents()
        self.change_timeout_s = change_timeout_s
        self.timeout = timedelta(seconds=collective_timeout_s)
        outer = lambda ps: torch.optim.SGD(ps, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)  # noqa: E731
        self.diloco = DiLoCo(model, None, outer, sync_every=sync_every, comm=_Unset(), codec=codec, timeout=self.timeout)
        self.step_count = 0
        self.extra: dict[str, Any] = {}
        self.recoveries: list[dict[str, Any]] = []
        self.bytes_received = 0

    # ------------------------------------------------------------------ state

    def train_state(self) -> TrainState:
        self.extra["step"] = self.step_count
        return TrainState(model=self.model, stateful={"diloco": self.diloco}, extra=self.extra, rng=False)

    def _flat_tensors(self) -> list[torch.Tensor]:
        ts = [p.data for p in self.model.parameters()]
        for k in range(self.diloco.num_fragments):
            frag = self.diloco._fragments[k]
            ts.append(frag.global_.data)
            for st in frag.outer.state.values():
                ts.extend(v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
        return ts

    def _flatten(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(torch.float32) for t in self._flat_tensors()])

    def _unflatten(self, flat: torch.Tensor) -> None:
        i = 0
        with torch.no_grad():
            for t in self._flat_tensors():
                n = t.numel()
                t.copy_(flat[i:i + n].view_as(t).to(t.dtype))
                i += n

    def _load_latest(self) -> int | None:
        """Restore the latest committed checkpoint from any provider holding a verified copy."""
        t0 = time.perf_counter()
        try:
            result = load_replicated(self.placement, self.train_state(), None, health=self._health())
        except CheckpointNotFoundError:
            return None
        self.step_count = int(self.extra.get("step", result.step))
        served: dict[str, int] = {}
        for prov in result.sources.values():
            served[prov] = served.get(prov, 0) + 1
        self.events.emit("checkpoint_loaded", member=self.member_id, step=result.step, files_by_provider=served, seconds=round(time.perf_counter() - t0, 4))
        return result.step

    def _health(self) -> dict[str, bool]:
        view = self.membership.latest
        # A provider whose replica group left the job is presumed to have lost its storage too.
        return {p.name: (p.name in view.members or p.name not in self._expected) for p in self.placement.providers}

    # ------------------------------------------------------------------ lifetime

    def start(self, expect: Sequence[str], timeout_s: float = 120.0) -> "ElasticGroup":
        """Join the job; wait (bounded) until every member of ``expect`` is in the view."""
        self._expected = set(expect)
        self.membership.wait_for_admission(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self._expected <= set(self.membership.latest.members):
            if self.membership.wait_for_change(max(0.1, deadline - time.monotonic())) is None and time.monotonic() > deadline:
                raise MembershipError(f"{self.member_id}: members {sorted(self._expected - set(self.membership.latest.members))} did not join within {timeout_s} s")
            if self.membership.latest.members and self.member_id not in self.membership.latest.members:
                self.membership.wait_for_admission(max(0.1, deadline - time.monotonic()))
        self._adopt(joining=True)
        return self

    def _adopt(self, joining: bool) -> None:
        """Build the current epoch's group and bring everyone to the same state."""
        comm = self._connect()
        self.diloco.comm = comm
        view = self.membership.view
        if joining:
            self._load_latest()  # the structure (and a recent state) before taking the live one
        flat = self._flatten()
        res = sync_state(comm, view, self.member_id, flat, self.step_count, fallback=self._fallback, timeout=self.timeout)
        if self.member_id in res.receivers:
            self._unflatten(flat)
            self.step_count = res.step
            self.diloco.step_count = res.step
            self.bytes_received += res.received_bytes
        self.events.emit("membership", member=self.member_id, epoch=view.epoch, members=list(view.members), joiners=list(view.joiners), step=self.step_count, state_from=res.source, received_bytes=res.received_bytes, used_checkpoint=res.used_fallback)

    def _connect(self) -> Any:
        """The current epoch's communicator; a member that arrives early (a rejoining provider
        whose peers have not reached the agreed step yet) keeps trying until change_timeout_s."""
        deadline = time.monotonic() + self.change_timeout_s
        while True:
            try:
                return self.membership.communicator()
            except MembershipError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _fallback(self, flat: torch.Tensor) -> int:
        step = self._load_latest()
        flat.copy_(self._flatten())
        return step or 0

    def close(self) -> None:
        self.diloco.close()
        self.membership.close()

    # ------------------------------------------------------------------ loop

    def step(self) -> None:
        """Count one inner step; synchronise, checkpoint and recover as due."""
        self.step_count += 1
        t = self.step_count
        try:
            self.diloco.step()
        except (DistributedError, RuntimeError) as exc:
            self._recover(t, exc)
            return
        if t % self.sync_every == 0:
            self.events.emit("sync", member=self.member_id, step=t, epoch=self.membership.view.epoch, members=list(self.membership.view.members), bytes_sent=self.diloco.comm.bytes_sent)
        if t % self.every_n_steps == 0 and self.membership.view.rank_of(self.member_id) == 0:
            self._save(t)

    def _save(self, step: int) -> None:
        t0 = time.perf_counter()
        try:
            report = save_replicated(self.placement, self.train_state(), step, health=self._health())
            committed = list(report.committed)
            failed: dict[str, str] = {}
        except ReplicationError as exc:
            committed = list(getattr(exc, "committed", []))
            failed = dict(getattr(exc, "failures", {}) or {})
            if not committed:
                raise
        self.events.emit("checkpoint_committed", member=self.member_id, step=step, providers=committed, failed=sorted(failed), seconds=round(time.perf_counter() - t0, 4))

    def _recover(self, failed_step: int, exc: BaseException) -> None:
        """A synchronisation failed: a peer is gone. Agree on the new view, roll back, go on."""
        t0 = time.perf_counter()
        self.events.emit("sync_failed", member=self.member_id, step=failed_step, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        while True:
            view = self.membership.wait_for_change(self.change_timeout_s)
            if view is None:
                raise MembershipError(f"{self.member_id}: a synchronisation failed at step {failed_step} and no new membership view appeared within {self.change_timeout_s} s") from exc
            try:
                self.diloco.comm = self._connect()
                break
            except MembershipError as again:
                log.warning("%s: epoch %d could not connect (%s); waiting for the next", self.member_id, view.epoch, again)
        lost = self.step_count
        step = self._load_latest()
        if step is None:
            raise MembershipError(f"{self.member_id}: no committed checkpoint to roll back to after losing a peer") from exc
        self.diloco.step_count = step
        seconds = time.perf_counter() - t0
        rec = {"member": self.member_id, "failed_step": failed_step, "rolled_back_to": step, "steps_redone": lost - step, "epoch": self.membership.view.epoch, "members": list(self.membership.view.members), "seconds": round(seconds, 4)}
        self.recoveries.append(rec)
        view = self.membership.view
        self.events.emit("membership", member=self.member_id, epoch=view.epoch, members=list(view.members), joiners=list(view.joiners), step=step, state_from="checkpoint", received_bytes=0, used_checkpoint=True)
        self.events.emit("recovered", **rec)

    def admit(self, members: Sequence[str], timeout_s: float = 120.0) -> None:
        """At an agreed step, wait (bounded) until ``members`` are in the view and share the state."""
        want = set(members)
        deadline = time.monotonic() + timeout_s
        while not want <= set(self.membership.latest.members):
            left = deadline - time.monotonic()
            if left <= 0:
                raise MembershipError(f"{self.member_id}: {sorted(want - set(self.membership.latest.members))} did not rejoin within {timeout_s} s")
            self.membership.wait_for_change(min(left, 1.0))
        self._adopt(joining=False)


class _Unset:
    """Placeholder Communicator until the first epoch's group exists."""

    rank, world_size, bytes_sent = 0, 1, 0

    def allreduce_sum(self, buf: torch.Tensor) -> Any:
        raise DistributedError("no membership epoch adopted yet: call ElasticGroup.start() first")

    allgather = allreduce_sum

