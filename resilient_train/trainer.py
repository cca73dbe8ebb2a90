"""The drop-in wrapper: a training script keeps its model, optimizer and loop.

::

    trainer = resilient_train.wrap(model, optimizer, TrainerConfig(checkpoint="s3://b/run"))
    for xb, yb in loader:
        loss = loss_fn(trainer.model(xb), yb)
        loss.backward()
        trainer.step()          # where the loop called optimizer.step()
    trainer.close()

What :func:`wrap` does, in order (the phases of :meth:`Trainer.start`):

1. **distributed**: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
   set) it joins the job's store under a prefix per restart attempt
   (``TORCHELASTIC_RESTART_COUNT``), so a restarted gloo job never reads the previous
   attempt's peer addresses, and initialises the default process group.
2. **layout**: ranks are split into ``replica_groups`` contiguous groups (one per provider).
   Inside a group gradients are averaged every step by DDP over fast local links; between
   groups the configured latency-tolerant mode synchronises (``localsgd``/``diloco``) over a
   process group of the ranks that hold the same position in every group. One group and
   mode ``ddp`` is plain DDP.
3. **resume**: the latest committed checkpoint on any provider is loaded (resharded to this
   world size): model, optimizer, scheduler, sampler, sync state, RNG, step.
4. **loop**: :meth:`Trainer.step` runs the optimizer step, the scheduler, the cross-group
   sync, and the checkpoint schedule (asynchronous: training stalls only for the copy to CPU
   staging memory; writing and replication run in the background).

Every phase appends to the event log (JSON lines) when one is configured.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .checkpoint import TrainState, load
from .checkpoint.async_save import AsyncCheckpointer
from .checkpoint.reader import latest_step
from .checkpoint.replicate import load_replicated
from .errors import ConfigError, StorageError
from .storage import Store, open_store
from .storage.ledger import Ledger
from .storage.providers import Placement

__all__ = ["SyncConfig", "TrainerConfig", "Trainer", "wrap", "EventLog", "init_distributed"]

log = logging.getLogger(__name__)

_MODES = ("ddp", "localsgd", "diloco")


@dataclass(frozen=True)
class SyncConfig:
    """How replica groups synchronise with each other.

    ``mode``: ``ddp`` (all ranks average gradients every step; needs one group), ``localsgd``
    (groups average parameters every ``sync_every`` steps) or ``diloco`` (pseudo-gradients
    averaged every ``sync_every`` steps and applied by an outer Nesterov SGD). ``codec``,
    ``fragments`` and ``overlap_steps`` are passed to :class:`~resilient_train.sync.DiLoCo`.
    """

    mode: str = "ddp"
    sync_every: int = 50
    codec: str = "none"
    fragments: int = 1
    overlap_steps: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"sync mode {self.mode!r} is unknown; choose one of {', '.join(_MODES)}")
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ConfigError(f"sync_every must be an int >= 1, got {self.sync_every!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """Everything :func:`wrap` needs. Validated here; no I/O.

    ``checkpoint``: where checkpoints go: a URI (any fsspec URL), a Store, or a
    :class:`~resilient_train.storage.providers.Placement` (providers + replication policy).
    ``every_n_steps``/``keep_last``: the schedule and retention. ``replica_groups``: how many
    groups the world is split into (one per provider); the world size must be divisible by it.
    ``async_save``: write checkpoints in the background (the loop stalls only for the copy).
    ``event_log``: a path for the JSON-lines event log; ``{rank}`` is replaced by the rank.
    ``timeout_s``: bound on every collective and store operation the wrapper starts.
    ``max_uncommitted_steps`` / ``max_checkpoint_failures``: a failed checkpoint never stops
    training (it is logged, reported in the event log and tried again at the next interval)
    until no checkpoint committed for more than this many steps / this many saves in a row
    failed; then :meth:`Trainer.step` raises CheckpointPolicyError naming the providers and
    causes. None (default): no limit.
    """

    checkpoint: Any = None
    every_n_steps: int = 100
    keep_last: int = 3
    replica_groups: int = 1
    sync: SyncConfig = field(default_factory=SyncConfig)
    async_save: bool = True
    event_log: str | None = None
    timeout_s: float = 300.0
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    backend: str | None = None
    max_uncommitted_steps: int | None = None
    max_checkpoint_failures: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            raise ConfigError("TrainerConfig.checkpoint is required: a folder, an fsspec URL (s3://bucket/run) or a Placement of providers")
        if isinstance(self.checkpoint, str) and not self.checkpoint:
            raise ConfigError("TrainerConfig.checkpoint is an empty string")
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an int >= 1, got {self.every_n_steps!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last must be an int >= 1, got {self.keep_last!r}")
        if not isinstance(self.replica_groups, int) or self.replica_groups < 1:
            raise ConfigError(f"replica_groups must be an int >= 1, got {self.replica_groups!r}")
        if self.sync.mode == "ddp" and self.replica_groups > 1:
            raise ConfigError("sync mode 'ddp' averages gradients across all ranks every step, so it needs replica_groups=1; use mode 'diloco' or 'localsgd' between providers")
        if self.sync.mode != "ddp":
            if self.sync.fragments != 1:
                raise ConfigError("checkpoints need every replica group to hold the same weights at the checkpointed step; streaming (fragments > 1) does not give that yet: use fragments=1 with the trainer")
            if self.every_n_steps % self.sync.sync_every:
                raise ConfigError(f"every_n_steps ({self.every_n_steps}) must be a multiple of sync.sync_every ({self.sync.sync_every}) so that checkpoints fall on synchronised steps")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s must be positive")
        for label in ("max_uncommitted_steps", "max_checkpoint_failures"):
            v = getattr(self, label)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{label} must be None (no limit) or an int >= 1, got {v!r}")


class EventLog:
    """Append-only JSON lines: one object per event with ``t`` (unix seconds), ``event``, fields."""

    def __init__(self, path: str | None, rank: int = 0):
        self.path = path.replace("{rank}", str(rank)) if path else None
        self._lock = threading.Lock()
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def emit(self, event: str, **fields: Any) -> None:
        if not self.path:
            return
        line = json.dumps({"t": round(time.time(), 4), "event": event, **fields}, sort_keys=True, default=str)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")


def init_distributed(timeout: timedelta, backend: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment, if not done yet.

    Returns ``(rank, world_size)``; ``(0, 1)`` without a distributed environment. Under
    torchrun the job's store is reused under the prefix ``resilient_train/attempt-N`` (N from
    ``TORCHELASTIC_RESTART_COUNT``): gloo workers of a restarted attempt would otherwise read
    the previous attempt's peer addresses and fail in connectFullMesh or hang.
    """
    env = os.environ if env is None else env
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in env:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun (or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    use_agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=(rank == 0 and not use_agent_store), timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore(f"resilient_train/attempt-{attempt}", base)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info("process group up: rank %d of %d, attempt %d, backend %s", rank, world, attempt, backend)
    return rank, world


class Trainer:
    """See the module docstring. Construct with :func:`wrap` (or ``Trainer(...).start()``)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainerConfig, *, scheduler: Any = None, sampler: Any = None, extra: dict[str, Any] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(config, TrainerConfig):
            raise ConfigError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.config = config
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.extra = extra if extra is not None else {}
        self.model: torch.nn.Module = model
        self.step_count = 0
        self.rank, self.world_size = 0, 1
        self.group_index, self.group_rank, self.group_size = 0, 0, 1
        self.sync: Any = None
        self.resumed_from: int | None = None
        self.events = EventLog(None)
        self._ckpt: AsyncCheckpointer | None = None
        self._ckpt_group: Any = None
        self._started = False
        self._commits_seen = 0
        self._in_flight_step: int | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> "Trainer":
        cfg = self.config
        timeout = timedelta(seconds=cfg.timeout_s)
        distributed_needed = cfg.replica_groups > 1 or cfg.sync.mode != "ddp"
        if distributed_needed and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
            raise ConfigError(f"sync mode {cfg.sync.mode!r} with {cfg.replica_groups} replica group(s) needs several ranks: launch with torchrun (WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT are not set)")
        self.rank, self.world_size = init_distributed(timeout, cfg.backend)
        if self.world_size % cfg.replica_groups:
            raise ConfigError(f"world size {self.world_size} does not divide into {cfg.replica_groups} replica groups: launch a multiple of {cfg.replica_groups} ranks or change replica_groups")
        self.events = EventLog(cfg.event_log, self.rank)
        if callable(getattr(self.sampler, "set_world", None)):
            self.sampler.set_world(self.rank, self.world_size)
        self._build_groups(timeout)
        self._build_sync(timeout)
        self._started = True
        self._resume()
        self.events.emit("start", rank=self.rank, world_size=self.world_size, group=self.group_index, resumed_from=self.resumed_from, step=self.step_count, mode=cfg.sync.mode)
        return self

    def _build_groups(self, timeout: timedelta) -> None:
        groups = self.config.replica_groups
        self.group_size = self.world_size // groups
        self.group_index, self.group_rank = divmod(self.rank, self.group_size)
        self._intra = None
        self._cross = None
        if self.world_size == 1:
            return
        # Every rank must create every group, in the same order.
        for g in range(groups):
            ranks = list(range(g * self.group_size, (g + 1) * self.group_size))
            pg = dist.new_group(ranks, timeout=timeout) if groups > 1 else None
            if g == self.group_index:
                self._intra = pg
        if groups > 1:
            for j in range(self.group_size):
                pg = dist.new_group([g * self.group_size + j for g in range(groups)], timeout=timeout)
                if j == self.group_rank:
                    self._cross = pg
        # A separate group for checkpoint collectives, which may run on a background thread.
        self._ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        if self.group_size > 1 or (groups == 1 and self.world_size > 1):
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, process_group=self._intra)

    def _build_sync(self, timeout: timedelta) -> None:
        sc = self.config.sync
        if sc.mode == "ddp":
            return
        from .sync import DiLoCo, LocalSGD, ProcessGroupCommunicator

        comm = ProcessGroupCommunicator(self._cross)
        if sc.mode == "localsgd":
            self.sync = LocalSGD(self.module, None, sync_every=sc.sync_every, comm=comm, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout)
        else:
            outer = lambda ps: torch.optim.SGD(ps, lr=sc.outer_lr, momentum=sc.outer_momentum, nesterov=sc.outer_momentum > 0)  # noqa: E731
            self.sync = DiLoCo(self.module, None, outer, sync_every=sc.sync_every, comm=comm, codec=sc.codec, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout)

    # ------------------------------------------------------------------ checkpoints

    def train_state(self) -> TrainState:
        self.extra["resilient_train.step"] = self.step_count
        stateful = {"sync": self.sync} if self.sync is not None else {}
        return TrainState(model=self.module, optimizer=self.optimizer, scheduler=self.scheduler, sampler=self.sampler, stateful=stateful, extra=self.extra)

    def _target(self) -> Any:
        ck = self.config.checkpoint
        if isinstance(ck, Placement):
            return ck
        return open_store(ck, self.config.storage_options)

    def _sources(self) -> list[Store]:
        ck = self.config.checkpoint
        if isinstance(ck, Placement):
            return [ck.store(n) for n in ck.decide().read_order]
        return [open_store(ck, self.config.storage_options)]

    def _resume(self) -> None:
        ck = self.config.checkpoint
        pg = self._ckpt_group
        latest = None
        if self.rank == 0:
            for store in self._sources():
                try:
                    s = latest_step(store)
                except (StorageError, OSError) as exc:
                    log.warning("provider %s unavailable while looking for checkpoints: %s", store.name, exc)
                    continue
                if s is not None and (latest is None or s > latest):
                    latest = s
        if self.world_size > 1:
            box = [latest]
            dist.broadcast_object_list(box, src=0, group=pg)
            latest = box[0]
        if latest is None:
            self.events.emit("no_checkpoint")
            return
        t0 = time.perf_counter()
        state = self.train_state()
        if isinstance(ck, Placement):
            result = load_replicated(ck, state, latest, process_group=pg)
        else:
            result = load(self._sources(), state, latest, process_group=pg)
        self.step_count = int(self.extra.get("resilient_train.step", result.step))
        self.resumed_from = result.step
        served: dict[str, int] = {}
        for prov in result.sources.values():
            served[prov] = served.get(prov, 0) + 1
        self.events.emit("resume", step=result.step, seconds=round(time.perf_counter() - t0, 4), world_size=self.world_size, saved_world_size=result.manifest.world_size, files_by_provider=served)
        log.info("resumed from step %d (saved by %d ranks) on %d ranks", result.step, result.manifest.world_size, self.world_size)

    def save(self) -> bool:
        """Checkpoint the current step now (collective). Returns False if skipped.

        Storage trouble does not raise here (see TrainerConfig's limits): copies, catch-up and
        retention run in the background on rank 0."""
        if self._ckpt is None:
            cfg = self.config
            self._ckpt = AsyncCheckpointer(
                self._target(), process_group=self._ckpt_group, on_failure="continue", keep_last=cfg.keep_last,
                max_uncommitted_steps=cfg.max_uncommitted_steps, max_checkpoint_failures=cfg.max_checkpoint_failures,
                start_step=self.resumed_from or 0, ledger=self.ledger, on_event=self.events.emit, copy_timeout_s=cfg.timeout_s,
            )
        started = self._ckpt.save(self.step_count, self.train_state())  # joins the previous save first
        self._note_commits()
        if started:
            self._in_flight_step = self.step_count
        self.events.emit("checkpoint_started" if started else "checkpoint_skipped", step=self.step_count, stall_s=round(self._ckpt.last_stall_s or 0.0, 5), staging_bytes=self._ckpt.staging_bytes)
        if not self.config.async_save:
            self._ckpt.wait(include_copies=False)
            self._note_commits()
        return started

    @property
    def ledger(self) -> Ledger:
        """Bytes read and written per provider and per pair, priced (rank 0 records checkpoints
        and copies; ``record_sync`` takes the cross-provider sync bytes)."""
        if getattr(self, "_ledger", None) is None:
            ck = self.config.checkpoint
            self._ledger = Ledger(ck.providers if isinstance(ck, Placement) else (), on_record=lambda rec: self.events.emit("bytes", **rec))
        return self._ledger

    def summary(self) -> dict[str, Any]:
        """What this rank did: steps, checkpoints committed/failed, providers behind, the ledger."""
        ck = self._ckpt or getattr(self, "_closed_ckpt", None)
        return {
            "step": self.step_count,
            "resumed_from": self.resumed_from,
            "checkpoints_committed": ck.saves_committed if ck is not None else self._commits_seen,
            "checkpoint_failures": [f.__dict__ for f in ck.failures] if ck is not None else [],
            "providers_behind": ck.behind if ck is not None else {},
            "ledger": self.ledger.summary(),
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
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        if self.sync is not None:
            rounds = self.sync.rounds
            self.sync.step()
            if self.sync.rounds != rounds:
                self.events.emit("sync", step=self.step_count, rounds=self.sync.rounds, skipped=self.sync.skipped_rounds, bytes_sent=self.sync.comm.bytes_sent)
        if self._ckpt is not None and not self._ckpt.in_flight:
            self._note_commits()
        if self.step_count % self.config.every_n_steps == 0:
            self.save()

    def close(self) -> None:
        """Finish the checkpoint in flight and rank 0's copies (bounded by ``timeout_s``), then
        release resources. A failed checkpoint is in the event log and :meth:`summary`."""
        if self._ckpt is not None:
            try:
                self._ckpt.close()
                self._note_commits()
            finally:
                self.events.emit("ledger", **self.ledger.summary())
                self._closed_ckpt, self._ckpt = self._ckpt, None
        if self.sync is not None:
            self.sync.close()
        self.events.emit("close", step=self.step_count)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainerConfig | None = None, *, scheduler: Any = None, sampler: Any = None, extra: dict[str, Any] | None = None, **config_kwargs: Any) -> Trainer:
    """Wrap a model and optimizer; initialise distributed, resume, and return the started Trainer.

    ``config`` or keyword arguments of :class:`TrainerConfig` (``checkpoint=...`` at least).
    """
    if config is None:
        config = TrainerConfig(**config_kwargs)
    elif config_kwargs:
        raise ConfigError("pass either config= or TrainerConfig keyword arguments, not both")
    return Trainer(model, optimizer, config, scheduler=scheduler, sampler=sampler, extra=extra).start()

