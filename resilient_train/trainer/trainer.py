"""The step loop: :class:`Trainer` (start, step, save, close) and :func:`wrap`.

See the package docstring (:mod:`resilient_train.trainer`) for what :func:`wrap` does, in order.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import adapt
from ..checkpoint import TrainState
from ..checkpoint.async_save import AsyncCheckpointer
from ..checkpoint.location import Location, as_location
from ..checkpoint.state import checkpoint_module
from ..checkpoint.writer import SaveOptions
from ..errors import ConfigError, DroppedFromJobError
from ..events import EventLog
from ..format.signing import as_keyring
from ..scripts import drop_visible_logging, init_script_parts, optimizer_step, script_extras, visible_logging
from ..storage import Store
from ..storage.ledger import Ledger
from ..storage.providers import Placement
from .config import TrainerConfig
from .resume import restart_at, resume, resume_points
from .setup import init_distributed

__all__ = ["Trainer", "wrap"]

log = logging.getLogger(__name__)


class Trainer:
    """See the module docstring. Construct with :func:`wrap` (or ``Trainer(...).start()``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainerConfig, *, scheduler: Any = None, sampler: Any = None, extra: dict[str, Any] | None = None,
                 scaler: Any = None, extra_per_rank: dict[str, Any] | None = None, stateful_per_rank: dict[str, Any] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(config, TrainerConfig):
            raise ConfigError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.config = config
        self.module, self._user_ddp = adapt.unwrap_model(model)  # a script's DDP is kept; FSDP1 refused
        self.layout = adapt.model_layout(self.module)  # "sharded": the script's FSDP2 (fully_shard) averages gradients
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = adapt.adapt_sampler(sampler)  # a DistributedSampler becomes resumable, in place
        self.extra = extra if extra is not None else {}
        self.model: torch.nn.Module = model
        self.step_count = 0
        self.rank, self.world_size = 0, 1
        self.group_index, self.group_rank, self.group_size = 0, 0, 1
        self.sync: Any = None
        self.resumed_from: int | None = None
        self.events = EventLog(None)
        self._ckpt: AsyncCheckpointer | None = None
        self._saves_prepared = False
        self._ckpt_group: Any = None
        self._owns_default_pg = False
        self._started = False
        self._commits_seen = 0
        self._in_flight_step: int | None = None
        self.cross: Any = None
        init_script_parts(self, scaler, extra_per_rank, stateful_per_rank)

    # ------------------------------------------------------------------ start

    def start(self) -> "Trainer":
        cfg = self.config
        timeout = timedelta(seconds=cfg.timeout_s)
        # with group= a one-rank provider needs no process group of its own (the cross-provider
        # groups come from the membership); without it, a sync mode needs torchrun's ranks
        distributed_needed = cfg.group is None and cfg.sync.mode != "ddp"
        if distributed_needed and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
            raise ConfigError(f"sync mode {cfg.sync.mode!r} without group= synchronises the ranks of one job, so it needs several ranks: launch with torchrun (WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT are not set)")
        script_pg = dist.is_initialized()
        if script_pg and self._user_ddp is None:
            self._user_ddp = adapt.find_script_ddp(self.module)  # a bare module inside the script's DDP
            if self._user_ddp is not None:
                self.model = self._user_ddp
        adapt.check_model_layout(self._user_ddp, self.layout, cfg.sync.mode, cfg.group)
        self.rank, self.world_size = init_distributed(timeout, cfg.backend)
        visible_logging(self)
        adapt.check_sharded_mesh(self.module, self.world_size)
        self._owns_default_pg = not script_pg and dist.is_initialized()
        self.events = EventLog(cfg.event_log, self.rank, on_event=cfg.on_event, storage_options=cfg.storage_options)
        if callable(getattr(self.sampler, "set_world", None)):
            self.sampler.set_world(self.rank, self.world_size)
        self._build_groups(timeout)
        self._build_cross(timeout)
        self._build_sync(timeout)
        if script_pg and self.world_size > 1:
            adapt.forget_rendezvous_keys([getattr(self, n, None) for n in ("_intra", "_cross", "_ckpt_group")], timeout)
        self._started = True
        self._resume()
        if self.cross is not None:
            self.sync.skip_handshake()  # the membership fingerprint already compared model and sync config
            self.cross.join()
        self.events.emit("start", rank=self.rank, world_size=self.world_size, group=cfg.group if cfg.group is not None else self.group_index, resumed_from=self.resumed_from, step=self.step_count, mode=cfg.sync.mode)
        return self

    def _build_cross(self, timeout: timedelta) -> None:
        """With ``group=``: this torchrun job is one provider's replica group of a larger job."""
        cfg = self.config
        if cfg.group is None:
            return
        from ..membership import model_fingerprint
        from ..recovery.provider_group import ProviderGroup, open_membership_store

        # a sharded model: every rank exchanges its own shard on its lane, so every rank holds a
        # client of the membership store (opened after the leader's, which may host it)
        lanes = self.world_size if self.layout == "sharded" else 1
        store = open_membership_store(cfg.membership, cfg.timeout_s) if self.rank == 0 else None
        sc = cfg.sync
        # groups exchange shard by shard only with groups sharded alike: the lane count is part of
        # what a joiner must match (refused at join otherwise, without disturbing the others)
        fingerprint = model_fingerprint(checkpoint_module(self.module), f"{cfg.code_version}|{sc.mode}|H={sc.sync_every}|{sc.codec}|K={sc.fragments}|lr={sc.outer_lr}|m={sc.outer_momentum}"
                                        + (f"|d={sc.overlap_steps}" if sc.overlap_steps else ""))  # the groups apply at the same steps
        fingerprint += f":lanes={lanes}"
        # the group's other ranks wait on this group while the leader rejoins: bound it by that
        wait_s = max(cfg.timeout_s, cfg.join_timeout_s + 2 * cfg.round_deadline_s)
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s)) if self.world_size > 1 else None
        if lanes > 1:
            dist.barrier(group=control)
            if self.rank != 0:
                store = open_membership_store(cfg.membership, cfg.timeout_s)
        self.cross = ProviderGroup(cfg.group, store, fingerprint, None, group_rank=self.rank, group_size=self.world_size, control_pg=control, lanes=lanes,
                                   heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                                   round_deadline_s=cfg.round_deadline_s, start_groups=cfg.start_groups, min_groups=cfg.min_groups,
                                   join_timeout_s=cfg.join_timeout_s, events=self.events).start()

    def _build_groups(self, timeout: timedelta) -> None:
        # one torchrun job is one replica group: DDP (or the script's FSDP2) over all its ranks
        self.group_size = self.world_size
        self.group_index, self.group_rank = 0, self.rank
        self._intra = None
        self._cross = None
        if self.world_size == 1:
            return
        # A separate group for checkpoint collectives, which may run on a background thread.
        self._ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        # DDP is added for a replicated model only: a sharded (FSDP2) model's gradients are FSDP2's
        if self._user_ddp is None and self.layout == "replicated":
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, process_group=self._intra)

    def _build_sync(self, timeout: timedelta) -> None:
        sc = self.config.sync
        if sc.mode == "ddp":
            return
        from ..sync import DiLoCo, LocalSGD, ProcessGroupCommunicator

        comm = self.cross if self.cross is not None else ProcessGroupCommunicator(self._cross)
        heal = dict(max_vetoes_in_a_row=sc.max_vetoes_in_a_row, on_local_veto=self._heal_after_veto)
        if sc.mode == "localsgd":
            self.sync = LocalSGD(self.module, None, sync_every=sc.sync_every, comm=comm, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout)
            self.sync.max_vetoes_in_a_row, self.sync.on_local_veto = heal["max_vetoes_in_a_row"], heal["on_local_veto"]
        else:
            outer = lambda ps: torch.optim.SGD(ps, lr=sc.outer_lr, momentum=sc.outer_momentum, nesterov=sc.outer_momentum > 0)  # noqa: E731
            self.sync = DiLoCo(self.module, None, outer, sync_every=sc.sync_every, comm=comm, codec=sc.codec, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout, **heal)
        if self.cross is not None:
            from ..recovery.provider_group import DiLoCoGlobalState

            self.cross.state = DiLoCoGlobalState(self.sync, lambda: self.step_count, self._set_step)
            self.cross.resume_points, self.cross.restart_at = self._resume_points, self._restart_at
            self.cross.background = sc.overlap_steps > 0  # the exchange runs during the d overlapped steps

    def _set_step(self, step: int) -> None:
        self.step_count = step

    def _heal_after_veto(self) -> None:
        """This replica's pseudo-gradient was non-finite: its local weights were reset to the
        global ones; its inner optimizer state (Adam moments...) may hold the poison, so drop it."""
        self.optimizer.state.clear()
        self.events.emit("veto_healed", step=self.step_count)
        log.warning("step %d: this replica's pseudo-gradient was not finite; local weights reset to the global weights and the inner optimizer state cleared", self.step_count)

    # ------------------------------------------------------------------ checkpoints

    def train_state(self) -> TrainState:
        self.extra["resilient_train.step"] = self.step_count
        script_extras(self)
        stateful = {"sync": self.sync} if self.sync is not None else {}
        return TrainState(model=self.module, optimizer=self.optimizer, scheduler=self.scheduler, sampler=self.sampler, stateful=stateful, extra=self.extra,
                          extra_per_rank=self.extra_per_rank, stateful_per_rank=self.stateful_per_rank)

    def _checkpoint(self) -> Any:
        """The configured checkpoint location; with ``group=``, the group's own sub-folder
        (``.../group-<name>``): each provider's checkpoint holds its own inner state."""
        ck, g = self.config.checkpoint, self.config.group
        if g is None:
            return ck
        if isinstance(ck, Placement):
            return ck.with_subpath(f"group-{g}")
        if isinstance(ck, str):
            return ck.rstrip("/") + f"/group-{g}"
        raise ConfigError("with group=, checkpoint must be a URI or a Placement (a Store object cannot be given a per-group sub-folder)")

    def _target(self) -> Location:
        return as_location(self._checkpoint(), self.config.storage_options)

    def _sources(self) -> list[Store]:
        return self._target().read_order()

    def _resume(self, at_most: int | None = None) -> None:
        """See :func:`.resume.resume`."""
        resume(self, at_most)

    def _resume_points(self) -> list[int]:
        """See :func:`.resume.resume_points`."""
        return resume_points(self)

    def _restart_at(self, step: int) -> int:
        """See :func:`.resume.restart_at`."""
        return restart_at(self, step)

    def save(self) -> bool:
        """Checkpoint the current step now (collective). Returns False if skipped.

        Storage trouble does not raise here (see TrainerConfig's limits): copies, catch-up and
        retention run in the background on rank 0."""
        self._checkpointer()
        assert self._ckpt is not None
        started = self._ckpt.save(self.step_count, self.train_state())  # joins the previous save first
        self._note_commits()
        if started:
            self._in_flight_step = self.step_count
        self.events.emit("checkpoint_started" if started else "checkpoint_skipped", step=self.step_count, stall_s=round(self._ckpt.last_stall_s or 0.0, 5), staging_bytes=self._ckpt.staging_bytes,
                         allocations=self._ckpt.staging_allocations)
        if not self.config.async_save:
            self._ckpt.wait(include_copies=False)
            self._note_commits()
        return started

    def _checkpointer(self) -> AsyncCheckpointer:
        """The checkpointer, created at first use (no I/O)."""
        if self._ckpt is None:
            cfg = self.config
            self._ckpt = AsyncCheckpointer(
                self._target(), process_group=self._ckpt_group, options=SaveOptions(signing_key=cfg.signing_key), on_failure="continue", keep_last=cfg.keep_last, verify_keys=as_keyring(cfg.verify_keys),
                max_uncommitted_steps=cfg.max_uncommitted_steps, max_checkpoint_failures=cfg.max_checkpoint_failures,
                start_step=self.resumed_from or 0, ledger=self.ledger, on_event=self.events.emit, copy_timeout_s=cfg.timeout_s,
            )
            if cfg.keep_best:
                self._ckpt.protect = lambda: self._protected_steps  # a snapshot taken at each save (scripts.script_extras)
        return self._ckpt

    def _prepare_saves(self) -> None:
        """Once, after the first optimizer step of this run (the optimizer's state exists now,
        e.g. AdamW's moments), with ``async_save``: learn the save plan and allocate and touch
        this rank's staging buffers (:meth:`AsyncCheckpointer.prepare`), so the first save
        stalls like the later ones instead of paying the allocation and its page faults.
        Collective on the checkpoint group: every rank's ``step()`` reaches it at the same
        step, and every rank takes the same decision: skipped when this run has already started
        a save (the start of a run adopted with ``init_from`` saves at once; that save
        allocated the buffers), decided by the save steps, which every rank shares, never by
        whether a rank's background thread is still writing (that differs between ranks, and
        a collective entered by some ranks only would hang them). A failure is logged and
        reported as ``checkpoint_prepare_failed``: the first save then allocates, as before."""
        self._saves_prepared = True
        if not self.config.async_save or self._in_flight_step is not None:
            return
        ck = self._checkpointer()
        t0 = time.perf_counter()
        try:
            held = ck.prepare(self.train_state())
        except Exception as exc:  # noqa: BLE001 - the training path does not raise for checkpoint work
            log.warning("preparing the checkpoint staging buffers failed (the first save allocates them): %s", exc)
            self.events.emit("checkpoint_prepare_failed", step=self.step_count, error=f"{type(exc).__name__}: {exc}"[:500])
            return
        self.events.emit("checkpoint_prepared", step=self.step_count, staging_bytes=held, allocations=ck.staging_allocations,
                         seconds=round(time.perf_counter() - t0, 5))

    @property
    def ledger(self) -> Ledger:
        """Bytes read and written per provider and per pair, priced (rank 0 records checkpoints
        and copies; ``record_sync`` takes the cross-provider sync bytes)."""
        if getattr(self, "_ledger", None) is None:
            ck = self.config.checkpoint
            self._ledger = Ledger(ck.providers if isinstance(ck, Placement) else (), on_record=lambda rec: self.events.emit("bytes", **rec))
        return self._ledger

    def summary(self) -> dict[str, Any]:
        """What this rank did: steps, checkpoints committed/failed, providers behind, the ledger, and
        with several providers the rounds, membership epoch, recoveries and rejoins."""
        ck = self._ckpt or getattr(self, "_closed_ckpt", None)
        return {
            "step": self.step_count,
            "resumed_from": self.resumed_from,
            "checkpoints_committed": ck.saves_committed if ck is not None else self._commits_seen,
            "checkpoint_failures": [f.__dict__ for f in ck.failures] if ck is not None else [],
            "providers_behind": ck.behind if ck is not None else {},
            "ledger": self.ledger.summary(),
            **({"rounds": self.sync.rounds, "skipped_rounds": self.sync.skipped_rounds, "sync_bytes_sent": self.sync.comm.bytes_sent} if self.sync is not None else {}),
            **({"group": self.config.group, "epoch": self.cross.view.epoch, "members": list(self.cross.view.members),
                "recoveries": list(self.cross.recoveries), "rejoins": self.cross.rejoins} if self.cross is not None else {}),
        }

    def _note_commits(self) -> None:
        """Record a background save that committed since we last looked (retention, copies and
        catch-up run on rank 0's checkpoint worker, not here)."""
        if self._ckpt is None or self._ckpt.saves_committed == self._commits_seen:
            return
        self._commits_seen = self._ckpt.saves_committed
        self.events.emit("checkpoint_committed", step=self._ckpt.last_committed_step, provider=self._ckpt.last_committed_on)

    # ------------------------------------------------------------------ loop

    def step(self) -> None:
        """Call where the loop called ``optimizer.step()``."""
        if not self._started:
            raise ConfigError("Trainer.start() (or resilient_train.wrap) must run before step()")
        if self.finished:
            raise ConfigError(f"the run is finished: step {self.step_count} reached max_steps={self.config.max_steps}; end the loop on `trainer.finished` (e.g. `while not trainer.finished:`)")
        optimizer_step(self)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        if self.sync is not None:
            # with group= a round's boundary (the vote that admits joiners) follows its apply
            # step, so that a joiner takes a global state that holds the round (overlap: t + d)
            count = (lambda: self.sync.completed_rounds) if self.cross is not None else (lambda: self.sync.rounds)
            rounds = count()
            try:
                self.sync.step()
                if count() != rounds:
                    if self.cross is not None:
                        self.cross.after_round()
                        self._record_sync_bytes()
                    self.events.emit("sync", step=self.step_count, rounds=self.sync.rounds, skipped=self.sync.skipped_rounds, bytes_sent=self.sync.comm.bytes_sent,
                                     **({"epoch": self.cross.view.epoch, "members": list(self.cross.view.members)} if self.cross is not None and self.cross.leader else {}))
                if self.cross is not None and self.step_count % self.config.every_n_steps == 0:
                    # a checkpoint saves the result of the round in flight (overlap): wait for it
                    # here, so that this group being dropped in it is handled like any other drop
                    self.sync.wait_in_flight()
            except DroppedFromJobError as exc:
                if self.cross is None:
                    raise
                self._rejoin(exc)
        if self._ckpt is not None and not self._ckpt.in_flight:
            self._note_commits()
        if not self._saves_prepared:
            self._prepare_saves()
        if self.step_count % self.config.every_n_steps == 0:
            self.save()

    def _record_sync_bytes(self) -> None:
        """Ledger: what this rank sent to each other provider since the last round (the leader
        of a replicated group; every rank of a sharded group, each on its own lane)."""
        cross = self.cross
        if not cross.leader and cross.lanes == 1:
            return
        sent, self._sync_bytes_seen = cross.bytes_sent - getattr(self, "_sync_bytes_seen", 0), cross.bytes_sent
        peers = [m for m in cross.view.members if m != cross.name]
        for peer in peers:
            self.ledger.record_sync(cross.name, peer, sent // len(peers))

    def _rejoin(self, exc: BaseException) -> None:
        """This group was dropped (it missed a round's deadline): forget the round, rejoin as a
        joiner and take the live state from a peer."""
        t0 = time.perf_counter()
        self.sync.abort_round()
        before = self.step_count
        self.events.emit("dropped", step=before, error=str(exc)[:300])
        log.warning("this group was dropped from the job at step %d (%s); rejoining", before, exc)
        self.cross.rejoins += 1
        self.cross.join()
        self.events.emit("rejoined", step_before=before, step=self.step_count, seconds=round(time.perf_counter() - t0, 4))

    def close(self, save: bool | None = None) -> None:
        """Checkpoint the final step (collective) unless a checkpoint holds it already or ``save``
        (default ``config.save_on_close``) is false; finish the checkpoint in flight and rank 0's
        copies (bounded by ``timeout_s``); release resources (the process groups it created are
        destroyed, and ``trainer.model`` is the plain module again). A failed checkpoint is in
        the event log and :meth:`summary`, not raised."""
        if self._started and (self.config.save_on_close if save is None else save) and self.step_count not in (self._in_flight_step, self.resumed_from, 0):
            self.save()
        if self._ckpt is not None:
            try:
                self._ckpt.close()
                self._note_commits()
            finally:
                self.events.emit("ledger", **self.ledger.summary())
                self._closed_ckpt, self._ckpt = self._ckpt, None
        if self.sync is not None:
            self.sync.close()
        if self.cross is not None:
            self.cross.close()
        self.events.emit("close", step=self.step_count)
        self._release_groups()
        drop_visible_logging(self)

    def _release_groups(self) -> None:
        """Destroy the process groups this trainer created (all of them, with the default one,
        when wrap initialised it): left to interpreter exit, gloo's threads can be torn down
        in the wrong order and abort the process ("terminate called without an active
        exception": seen in about 1 run in 10 before this). A script's own group is left alone."""
        if not dist.is_initialized():
            return
        try:
            if getattr(self, "_owns_default_pg", False):
                dist.destroy_process_group()
            else:
                for name in ("_ckpt_group", "_intra", "_cross"):
                    pg = getattr(self, name, None)
                    if pg is not None:
                        dist.destroy_process_group(pg)
                        setattr(self, name, None)
        except Exception as exc:  # noqa: BLE001 - closing must not fail the script at its very end
            log.warning("releasing the process groups failed: %s", exc)
        self._drop_group_references()

    def _drop_group_references(self) -> None:
        """Let the process groups' C++ objects go now, while the interpreter is alive.
        ``destroy_process_group`` only unregisters them: they live on while anything refers to
        them (our DDP wrapper's reducer, the checkpointer, the control group...), and the
        trainer sits in reference cycles (event callbacks), so it may be collected only during
        interpreter shutdown. A gloo worker thread that needs the GIL then is killed by CPython
        mid C++ frame: "terminate called without an active exception", SIGABRT, exit code -6
        after a run that finished (about 1 torchrun job in 20 on a loaded machine)."""
        import gc

        from torch.nn.parallel import DistributedDataParallel

        if self._user_ddp is None and isinstance(self.model, DistributedDataParallel):
            self.model = self.module  # after close, trainer.model is the plain module
        for name in ("_ckpt_group", "_intra", "_cross"):
            setattr(self, name, None)
        for ck in (getattr(self, "_closed_ckpt", None), self._ckpt):
            if ck is not None:
                ck.process_group = None
        if self.cross is not None:
            self.cross.drop_process_groups()
        if self.sync is not None and self.cross is None:
            self.sync.comm = None  # a ProcessGroupCommunicator over the cross group
        gc.collect()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(save=None if exc_type is None else False)

    # ------------------------------------------------------------------ scripts (see scripts.py)

    @property
    def finished(self) -> bool:
        """True once ``config.max_steps`` is set and reached (a resumed finished run is finished
        at once); :meth:`step` refuses to go past it."""
        return self.config.max_steps is not None and self.step_count >= self.config.max_steps

    def report_metric(self, value: float, step: int | None = None) -> None:
        """The metric of the checkpoint at ``step`` (default: the current step), e.g. a validation
        loss; with ``keep_best`` retention keeps the best such checkpoints beside the last N."""
        from ..scripts import report_metric

        report_metric(self, value, step)

    def best_steps(self) -> set[int]:
        """The steps ``keep_best`` protects from retention (empty without ``keep_best``)."""
        from ..scripts import protected_steps

        return protected_steps(self)

    # ------------------------------------------------------------------ epochs

    @property
    def start_epoch(self) -> int:
        """The epoch a resumed loop continues (0 on a fresh start); see :func:`adapt.start_epoch`."""
        return adapt.start_epoch(self.sampler, self.extra)

    def epochs(self, count: int) -> Any:
        """``for epoch in trainer.epochs(E): sampler.set_epoch(epoch); ...``: the epochs still to run."""
        return adapt.epochs(self, count)


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainerConfig | None = None, *, scheduler: Any = None, sampler: Any = None, extra: dict[str, Any] | None = None,
         scaler: Any = None, extra_per_rank: dict[str, Any] | None = None, stateful_per_rank: dict[str, Any] | None = None, **config_kwargs: Any) -> Trainer:
    """Wrap a model and optimizer; initialise distributed, resume, and return the started Trainer.

    ``config`` or keyword arguments of :class:`TrainerConfig` (``checkpoint=...`` at least).
    ``scaler``: the script's ``torch.amp.GradScaler``; :meth:`Trainer.step` then replaces
    ``scaler.step(optimizer); scaler.update()``. ``extra_per_rank`` / ``stateful_per_rank``:
    state kept per rank (see :class:`~resilient_train.checkpoint.state.TrainState`), e.g.
    ``stateful_per_rank={"loader": StatefulDataLoader(...)}``. See :mod:`resilient_train.scripts`.
    """
    if config is None:
        config = TrainerConfig(**config_kwargs)
    elif config_kwargs:
        raise ConfigError("pass either config= or TrainerConfig keyword arguments, not both")
    return Trainer(model, optimizer, config, scheduler=scheduler, sampler=sampler, extra=extra, scaler=scaler, extra_per_rank=extra_per_rank, stateful_per_rank=stateful_per_rank).start()
