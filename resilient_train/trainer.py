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
   set) it joins the job's store (under a prefix per restart attempt when the store is the
   agent's, shared by every attempt: see :func:`init_distributed`), so a restarted gloo job
   never reads the previous attempt's peer addresses, and initialises the default process
   group. A group the script
   initialised itself is adopted instead, and a script's DDP or FSDP2 (``fully_shard``) model and DistributedSampler are
   accepted (see :mod:`resilient_train.adapt`).
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

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist

from . import adapt
from .checkpoint import TrainState, load_checkpoint
from .checkpoint.state import checkpoint_module
from .scripts import _after_resume, _check_script_options, _drop_visible_logging, _init_from, _init_script_parts, _optimizer_step, _script_extras, _visible_logging
from .checkpoint.async_save import AsyncCheckpointer
from .checkpoint.location import Location, as_location
from .checkpoint.discovery import uncommit
from .checkpoint.steps import newest_committed
from .checkpoint.writer import SaveOptions
from .format.signing import as_keyring
from .errors import ConfigError, DroppedFromJobError, StorageError
from .events import EventLog
from .storage import Store
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
    max_vetoes_in_a_row: int = 3

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
    ``event_log``: where the JSON-lines event log goes: a local path, any fsspec URL (buffered,
    written at checkpoints, every 30 s and at close) or a callable; ``{rank}`` is replaced by
    the rank. ``on_event``: a callable given every event dict (metrics: TensorBoard, W&B,
    Prometheus). A failing sink is logged and never stops training (see :mod:`.events`).
    ``timeout_s``: bound on every collective and store operation the wrapper starts.
    ``signing_key``: a :class:`~resilient_train.format.signing.SigningKey` that signs every
    checkpoint saved. ``verify_keys``: a KeyRing, key, key file path or list of them; resume
    then loads only checkpoints signed by one of them (the newest such). Neither is ever shown.
    ``max_uncommitted_steps`` / ``max_checkpoint_failures``: a failed checkpoint never stops
    training (it is logged, reported in the event log and tried again at the next interval)
    until no checkpoint committed for more than this many steps / this many saves in a row
    failed; then :meth:`Trainer.step` raises CheckpointPolicyError naming the providers and
    causes. None (default): no limit.

    Training scripts (see :mod:`resilient_train.scripts`): ``max_steps``: the run is finished
    at this step (:attr:`Trainer.finished`; :meth:`Trainer.step` refuses to go past it, so a
    relaunched finished job trains no extra step). ``init_from`` (+ ``init_step``): when the
    checkpoint location holds no committed checkpoint yet, start from this torch.save file,
    Hugging Face folder or DCP folder as step N (see :mod:`resilient_train.foreign`).
    ``log``: ``"auto"`` (default) prints the library's messages (resume, fallback past a bad
    checkpoint, reshard, storage trouble) to stderr, rank 0 from INFO and other ranks from
    WARNING, when the script configured no logging; ``"off"`` never adds a handler.
    ``keep_best``/``keep_best_mode``: retention also keeps the ``keep_best`` checkpoints with the
    lowest (``"min"``) or highest (``"max"``) metric given to :meth:`Trainer.report_metric`.
    """

    checkpoint: Any = None
    every_n_steps: int = 100
    keep_last: int = 3
    replica_groups: int = 1
    sync: SyncConfig = field(default_factory=SyncConfig)
    async_save: bool = True
    event_log: Any = None
    timeout_s: float = 300.0
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    backend: str | None = None
    group: str | None = None
    membership: str | None = None
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 10.0
    round_deadline_s: float = 60.0
    start_groups: int = 1
    min_groups: int = 1
    join_timeout_s: float = 300.0
    code_version: str = ""
    signing_key: Any = field(default=None, repr=False, compare=False)
    verify_keys: Any = field(default=None, repr=False, compare=False)
    # ``save_on_close``: close() checkpoints the final step when no checkpoint holds it yet.
    save_on_close: bool = True
    on_event: Any = field(default=None, repr=False)
    max_uncommitted_steps: int | None = None
    max_checkpoint_failures: int | None = None
    # see "Training scripts" in the class docstring
    max_steps: int | None = None
    init_from: str | None = None
    init_step: int | None = None
    log: str = "auto"
    keep_best: int = 0
    keep_best_mode: str = "min"

    def __post_init__(self) -> None:
        _check_script_options(self)
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
        if self.replica_groups > 1:
            raise ConfigError(f"replica_groups={self.replica_groups}: several providers in one torchrun job are no longer supported (one dead rank restarted everyone); launch one torchrun per provider with TrainerConfig(group='<provider>', membership='tcp://host:port' or 'etcd://...')")
        if (self.group is None) != (self.membership is None):
            raise ConfigError("group and membership go together: group='<this provider's name>' and membership='tcp://host:port' (a TCPStore hosted by a long-lived process) or 'etcd://h1:p1,h2:p2,h3:p3'")
        if self.group is not None:
            if not isinstance(self.group, str) or not self.group or "/" in self.group:
                raise ConfigError(f"group must be a non-empty provider name without '/', got {self.group!r}")
            if self.sync.mode == "ddp":
                raise ConfigError("with group= (several providers) choose sync mode 'diloco' or 'localsgd': 'ddp' would average gradients across providers every step")
            if self.sync.overlap_steps:
                raise ConfigError("with group= the overlapped outer step (overlap_steps > 0) is not supported yet: a provider lost mid-overlap could not be redone exactly; use overlap_steps=0")
            if not self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s:
                raise ConfigError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed 2 * heartbeat_interval_s ({self.heartbeat_interval_s})")
            if not self.round_deadline_s > 0 or not self.join_timeout_s > 0:
                raise ConfigError("round_deadline_s and join_timeout_s must be > 0")
            for name in ("start_groups", "min_groups"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
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
        from .format.signing import SigningKey

        if self.signing_key is not None and not isinstance(self.signing_key, SigningKey):
            raise ConfigError("signing_key must be a SigningKey (resilient_train.format.signing.load_signing_key(path) reads one from a file)")


def init_distributed(timeout: timedelta, backend: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment, if not done yet.

    Returns ``(rank, world_size)``; ``(0, 1)`` without a distributed environment. The store's
    prefix is :func:`_store_prefix`'s.
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
    use_agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    host = rank == 0 and not use_agent_store
    try:
        base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=host, timeout=timeout, wait_for_workers=False)
    except Exception as exc:
        if host and "EADDRINUSE" in str(exc):
            # torchrun picked this port and released it before this process could bind it
            log.error("MASTER_PORT %s, which torchrun chose for this round's store, was taken by another process "
                      "in between (a race inside torch when TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). torchrun's next "
                      "attempt picks another port: launch with --max-restarts >= 1, or keep the agent's store "
                      "(unset the variable) where a provider runs on one node", env["MASTER_PORT"])
        raise
    prefix = _store_prefix(env)
    store = dist.PrefixStore(prefix, base)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info("process group up: rank %d of %d, store prefix %s, backend %s", rank, world, prefix, backend)
    return rank, world


def _store_prefix(env: Mapping[str, str]) -> str:
    """The prefix under which the workers of one torchrun attempt meet in its store.

    The agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``, torch's default) outlives the
    attempts: gloo workers of a restarted attempt would read the previous attempt's peer
    addresses and fail in connectFullMesh or hang, so each attempt gets
    ``resilient_train/attempt-N`` (N = ``TORCHELASTIC_RESTART_COUNT``). That count is the
    agent's own, though: with several agents (``--nnodes``) a membership change restarts
    workers without counting and an agent that comes back starts again at 0, so agents of one
    round can disagree on N. Without the agent's store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``)
    rank 0 of each round hosts a new store on a port its agent just chose: nothing of an
    earlier attempt is in it, and the prefix names no attempt, so workers of agents with
    different counts meet. Either way the prefix names the job (``TORCHELASTIC_RUN_ID``: random
    per ``--standalone`` launch, ``--rdzv-id`` otherwise), so a worker that reaches another job's
    store (two agents on one machine can pick the same free port for it) waits for its own peers
    instead of taking a rank in that job.
    """
    run = env.get("TORCHELASTIC_RUN_ID", "")
    base = f"resilient_train/{run}" if run else "resilient_train"
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return f"{base}/attempt-{int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))}"
    return base


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
        self._ckpt_group: Any = None
        self._owns_default_pg = False
        self._started = False
        self._commits_seen = 0
        self._in_flight_step: int | None = None
        self.cross: Any = None
        _init_script_parts(self, scaler, extra_per_rank, stateful_per_rank)

    # ------------------------------------------------------------------ start

    def start(self) -> "Trainer":
        cfg = self.config
        timeout = timedelta(seconds=cfg.timeout_s)
        # with group= a one-rank provider needs no process group of its own (the cross-provider
        # groups come from the membership); without it, a sync mode needs torchrun's ranks
        distributed_needed = cfg.group is None and (cfg.replica_groups > 1 or cfg.sync.mode != "ddp")
        if distributed_needed and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
            raise ConfigError(f"sync mode {cfg.sync.mode!r} with {cfg.replica_groups} replica group(s) needs several ranks: launch with torchrun (WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT are not set)")
        script_pg = dist.is_initialized()
        if script_pg and self._user_ddp is None:
            self._user_ddp = adapt.find_script_ddp(self.module)  # a bare module inside the script's DDP
            if self._user_ddp is not None:
                self.model = self._user_ddp
        adapt.check_model_layout(self._user_ddp, cfg.replica_groups, self.layout, cfg.sync.mode, cfg.group)
        self.rank, self.world_size = init_distributed(timeout, cfg.backend)
        _visible_logging(self)
        adapt.check_sharded_mesh(self.module, self.world_size)
        self._owns_default_pg = not script_pg and dist.is_initialized()
        if self.world_size % cfg.replica_groups:
            raise ConfigError(f"world size {self.world_size} does not divide into {cfg.replica_groups} replica groups: launch a multiple of {cfg.replica_groups} ranks or change replica_groups")
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
            self.sync._handshake_done = True  # the membership fingerprint already compared model and sync config
            self.cross.join()
        self.events.emit("start", rank=self.rank, world_size=self.world_size, group=cfg.group if cfg.group is not None else self.group_index, resumed_from=self.resumed_from, step=self.step_count, mode=cfg.sync.mode)
        return self

    def _build_cross(self, timeout: timedelta) -> None:
        """With ``group=``: this torchrun job is one provider's replica group of a larger job."""
        cfg = self.config
        if cfg.group is None:
            return
        from .membership import model_fingerprint
        from .recovery.provider_group import ProviderGroup, open_membership_store

        store = open_membership_store(cfg.membership, cfg.timeout_s) if self.rank == 0 else None
        sc = cfg.sync
        fingerprint = model_fingerprint(checkpoint_module(self.module), f"{cfg.code_version}|{sc.mode}|H={sc.sync_every}|{sc.codec}|K={sc.fragments}|lr={sc.outer_lr}|m={sc.outer_momentum}")
        # the group's other ranks wait on this group while the leader rejoins: bound it by that
        wait_s = max(cfg.timeout_s, cfg.join_timeout_s + 2 * cfg.round_deadline_s)
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s)) if self.world_size > 1 else None
        self.cross = ProviderGroup(cfg.group, store, fingerprint, None, group_rank=self.rank, group_size=self.world_size, control_pg=control,
                                   heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                                   round_deadline_s=cfg.round_deadline_s, start_groups=cfg.start_groups, min_groups=cfg.min_groups,
                                   join_timeout_s=cfg.join_timeout_s, events=self.events).start()

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
        # DDP is added for a replicated model only: a sharded (FSDP2) model's gradients are FSDP2's
        if (self.group_size > 1 or (groups == 1 and self.world_size > 1)) and self._user_ddp is None and self.layout == "replicated":
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, process_group=self._intra)

    def _build_sync(self, timeout: timedelta) -> None:
        sc = self.config.sync
        if sc.mode == "ddp":
            return
        from .sync import DiLoCo, LocalSGD, ProcessGroupCommunicator

        comm = self.cross if self.cross is not None else ProcessGroupCommunicator(self._cross)
        heal = dict(max_vetoes_in_a_row=sc.max_vetoes_in_a_row, on_local_veto=self._heal_after_veto)
        if sc.mode == "localsgd":
            self.sync = LocalSGD(self.module, None, sync_every=sc.sync_every, comm=comm, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout)
            self.sync.max_vetoes_in_a_row, self.sync.on_local_veto = heal["max_vetoes_in_a_row"], heal["on_local_veto"]
        else:
            outer = lambda ps: torch.optim.SGD(ps, lr=sc.outer_lr, momentum=sc.outer_momentum, nesterov=sc.outer_momentum > 0)  # noqa: E731
            self.sync = DiLoCo(self.module, None, outer, sync_every=sc.sync_every, comm=comm, codec=sc.codec, fragments=sc.fragments, overlap_steps=sc.overlap_steps, timeout=timeout, **heal)
        if self.cross is not None:
            from .recovery.provider_group import DiLoCoGlobalState

            self.cross.state = DiLoCoGlobalState(self.sync, lambda: self.step_count, self._set_step)
            self.cross.resume_points, self.cross.restart_at = self._resume_points, self._restart_at

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
        _script_extras(self)
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
        """Load the newest checkpoint that verifies, on any provider (see checkpoint/loading.py):
        a corrupt or unsigned newest one is skipped (warning + ``resume_fallback`` event) and
        uncommitted, since training will save that step again; an
        unreachable provider is skipped while another answers; when none answers, StorageError.
        With ``group=`` this is the group's own checkpoint folder. ``at_most``: only steps up to
        this one (a job-wide consistent restart, see :meth:`_restart_at`)."""
        t0 = time.perf_counter()
        result = load_checkpoint(self._target(), self.train_state(), newest_verifiable=True, at_most=at_most, process_group=self._ckpt_group,
                                 verify_keys=as_keyring(self.config.verify_keys), on_skip=lambda step, reason: self.events.emit("resume_fallback", step=step, reason=reason))
        if result is None:
            self.events.emit("no_checkpoint")
            if at_most is None and self.config.init_from is not None:
                _init_from(self)
            else:
                log.info("no checkpoint under %s: training starts at step 0", self._checkpoint() if isinstance(self._checkpoint(), str) else "the checkpoint location")
            return
        _after_resume(self)
        self.step_count = int(self.extra.get("resilient_train.step", result.step))
        self.resumed_from = result.step
        served: dict[str, int] = {}
        for prov in result.sources.values():
            served[prov] = served.get(prov, 0) + 1
        self.events.emit("resume", step=result.step, seconds=round(time.perf_counter() - t0, 4), world_size=self.world_size, saved_world_size=result.manifest.world_size, files_by_provider=served)
        log.info("resumed from step %d (saved by %d ranks) on %d ranks", result.step, result.manifest.world_size, self.world_size)

    def _resume_points(self) -> list[int]:
        """This group's committed steps, newest first (the group leader, for a consistent restart)."""
        try:
            return newest_committed(self._sources()) if self.resumed_from is not None else []
        except (StorageError, OSError) as exc:
            log.warning("could not list this group's checkpoints for the restart agreement: %s", exc)
            return [self.resumed_from] if self.resumed_from is not None else []

    def _restart_at(self, step: int) -> int:
        """Collective over this group's ranks: the groups of a job that restarts as a whole agreed
        to resume from ``step`` (the newest step every group has committed), older than the one
        this group loaded. Load it; retire this group's newer checkpoints (their global state is
        from a future the other groups never reached, and training will save those steps again).
        Returns the step loaded."""
        newer = self.resumed_from
        self._resume(at_most=step)
        loaded = self.resumed_from if self.resumed_from is not None else 0
        self.events.emit("restart_agreed", step=loaded, agreed=step, loaded_before=newer)
        if self.rank == 0:
            for store in self._sources():
                try:
                    later = [s for s in newest_committed(store) if s > loaded]
                    for s in later:
                        uncommit(store, s, f"newer than step {loaded}, where the job restarted (the other groups had not committed step {s})")
                except (StorageError, OSError) as exc:
                    log.warning("could not retire checkpoints newer than step %d on %s: %s", loaded, store.name, exc)
        log.warning("the job restarted from step %d, the newest step every group had committed (this group had loaded step %s)", loaded, newer)
        return loaded

    def save(self) -> bool:
        """Checkpoint the current step now (collective). Returns False if skipped.

        Storage trouble does not raise here (see TrainerConfig's limits): copies, catch-up and
        retention run in the background on rank 0."""
        if self._ckpt is None:
            cfg = self.config
            self._ckpt = AsyncCheckpointer(
                self._target(), process_group=self._ckpt_group, options=SaveOptions(signing_key=cfg.signing_key), on_failure="continue", keep_last=cfg.keep_last, verify_keys=as_keyring(cfg.verify_keys),
                max_uncommitted_steps=cfg.max_uncommitted_steps, max_checkpoint_failures=cfg.max_checkpoint_failures,
                start_step=self.resumed_from or 0, ledger=self.ledger, on_event=self.events.emit, copy_timeout_s=cfg.timeout_s,
            )
            if cfg.keep_best:
                self._ckpt.protect = lambda: self._protected_steps  # a snapshot taken at each save (scripts._script_extras)
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
        _optimizer_step(self)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_count += 1
        if self.sync is not None:
            rounds = self.sync.rounds
            try:
                self.sync.step()
                if self.sync.rounds != rounds:
                    if self.cross is not None:
                        self.cross.after_round()
                        self._record_sync_bytes()
                    self.events.emit("sync", step=self.step_count, rounds=self.sync.rounds, skipped=self.sync.skipped_rounds, bytes_sent=self.sync.comm.bytes_sent,
                                     **({"epoch": self.cross.view.epoch, "members": list(self.cross.view.members)} if self.cross is not None and self.cross.leader else {}))
            except DroppedFromJobError as exc:
                if self.cross is None:
                    raise
                self._rejoin(exc)
        if self._ckpt is not None and not self._ckpt.in_flight:
            self._note_commits()
        if self.step_count % self.config.every_n_steps == 0:
            self.save()

    def _record_sync_bytes(self) -> None:
        """Ledger: what this provider's leader sent to each other provider since the last round."""
        cross = self.cross
        if not cross.leader:
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
        _drop_visible_logging(self)

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
            self.cross._control = None
            self.cross._comm = None
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
        from .scripts import report_metric

        report_metric(self, value, step)

    def best_steps(self) -> set[int]:
        """The steps ``keep_best`` protects from retention (empty without ``keep_best``)."""
        from .scripts import protected_steps

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

