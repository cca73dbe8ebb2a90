"""The trainer's configuration: :class:`TrainerConfig` and :class:`SyncConfig`.

Both are frozen dataclasses validated at construction (ConfigError saying what to fix); no I/O,
no environment read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import ConfigError
from ..scripts import check_script_options

__all__ = ["SyncConfig", "TrainerConfig"]

_MODES = ("ddp", "localsgd", "diloco")

_RETIRED = {
    "replica_groups": "several providers in one torchrun job are no longer supported (one dead rank restarted everyone): "
                      "launch one torchrun per provider with TrainerConfig(group='<provider>', membership='tcp://host:port' or 'etcd://...')",
}


def _refuse_unknown_fields(cls: type, kwargs: Mapping[str, Any]) -> None:
    """A keyword that is not a field raises ConfigError naming it (and the closest field, or
    what replaced a retired one), not the dataclass's TypeError."""
    known = [f.name for f in fields(cls)]
    for name in kwargs:
        if name in known:
            continue
        if name in _RETIRED:
            raise ConfigError(f"unknown {cls.__name__} field {name!r}: {_RETIRED[name]}")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; the fields are {', '.join(known)}"
        raise ConfigError(f"unknown {cls.__name__} field {name!r}{hint}")


@dataclass(frozen=True)
class SyncConfig:
    """How replica groups synchronise with each other.

    ``mode``: ``ddp`` (all ranks average gradients every step; needs one group), ``localsgd``
    (groups average parameters every ``sync_every`` steps) or ``diloco`` (pseudo-gradients
    averaged every ``sync_every`` steps and applied by an outer Nesterov SGD). ``codec``,
    ``fragments`` and ``overlap_steps`` are passed to :class:`~resilient_train.sync.DiLoCo`
    (``localsgd`` takes no codec: it averages the parameters uncompressed; ``ddp`` takes none
    of the three; a value they would ignore raises ConfigError).
    Streaming (``fragments`` > 1) and overlap (``overlap_steps`` > 0) work with and without
    ``group=``; with ``group=`` overlap must stay below ``sync_every // fragments`` (one round in
    flight at a time; docs/sync.md, "Overlap between providers").
    """

    mode: str = "ddp"
    sync_every: int = 50
    codec: str = "none"
    fragments: int = 1
    overlap_steps: int = 0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    max_vetoes_in_a_row: int = 3

    def __new__(cls, *args: Any, **kwargs: Any) -> "SyncConfig":
        _refuse_unknown_fields(cls, kwargs)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"sync mode {self.mode!r} is unknown; choose one of {', '.join(_MODES)}")
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int) or self.sync_every < 1:
            raise ConfigError(f"sync_every must be an int >= 1, got {self.sync_every!r}")
        if self.mode == "localsgd" and self.codec != "none":
            raise ConfigError(f"sync mode 'localsgd' averages the parameters uncompressed, so codec must be 'none' "
                              f"(got {self.codec!r}); choose mode='diloco' to send compressed pseudo-gradients")
        if self.mode == "ddp" and (self.codec, self.fragments, self.overlap_steps) != ("none", 1, 0):
            raise ConfigError(f"sync mode 'ddp' all-reduces the gradients every step: codec, fragments and "
                              f"overlap_steps apply to 'diloco' and 'localsgd' only (got codec={self.codec!r}, "
                              f"fragments={self.fragments!r}, overlap_steps={self.overlap_steps!r})")


@dataclass(frozen=True)
class TrainerConfig:
    """Everything :func:`wrap` needs. Validated here; no I/O.

    ``checkpoint``: where checkpoints go: a URI (any fsspec URL), a Store, or a
    :class:`~resilient_train.storage.providers.Placement` (providers + replication policy).
    ``every_n_steps``/``keep_last``: the schedule and retention (with a sync mode and no
    ``group=``, ``every_n_steps`` must be a multiple of ``sync.sync_every``; with ``group=`` any
    interval: docs/sync.md, "Checkpoint steps"). One torchrun job is one
    provider's replica group; several providers train together with ``group=``/``membership=``.
    A keyword that is not a field (a typo, or the retired ``replica_groups``) raises ConfigError.
    ``async_save``: write checkpoints in the background (the loop stalls only for the copy).
    ``event_log``: where the JSON-lines event log goes: a local path, any fsspec URL (buffered,
    written at checkpoints, every 30 s and at close) or a callable; ``{rank}`` is replaced by
    the rank. ``on_event``: a callable given every event dict (metrics: TensorBoard, W&B,
    Prometheus). A failing sink is logged and never stops training (see :mod:`.events`).
    ``timeout_s``: bound on every collective, checkpoint copy and membership KV call the wrapper starts.
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

    def __new__(cls, *args: Any, **kwargs: Any) -> "TrainerConfig":
        _refuse_unknown_fields(cls, kwargs)
        return super().__new__(cls)


    def __post_init__(self) -> None:
        check_script_options(self)
        if self.checkpoint is None:
            raise ConfigError("TrainerConfig.checkpoint is required: a folder, an fsspec URL (s3://bucket/run) or a Placement of providers")
        if isinstance(self.checkpoint, str) and not self.checkpoint:
            raise ConfigError("TrainerConfig.checkpoint is an empty string")
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be an int >= 1, got {self.every_n_steps!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last must be an int >= 1, got {self.keep_last!r}")
        if (self.group is None) != (self.membership is None):
            raise ConfigError("group and membership go together: group='<this provider's name>' and membership='tcp://host:port' (a TCPStore hosted by a long-lived process) or 'etcd://h1:p1,h2:p2,h3:p3'")
        if self.group is not None:
            if not isinstance(self.group, str) or not self.group or "/" in self.group:
                raise ConfigError(f"group must be a non-empty provider name without '/', got {self.group!r}")
            if self.sync.mode == "ddp":
                raise ConfigError("with group= (several providers) choose sync mode 'diloco' or 'localsgd': 'ddp' would average gradients across providers every step")
            gap = self.sync.sync_every // max(1, self.sync.fragments)  # the fewest steps between two launches
            if self.sync.overlap_steps and not self.sync.overlap_steps < gap:
                raise ConfigError(f"with group= overlap_steps ({self.sync.overlap_steps}) must be smaller than the steps between two rounds' launches, "
                                  f"sync_every // fragments = {gap}: between providers one round runs at a time, applied and followed by its vote "
                                  f"(where joiners are admitted) before the next launch (docs/sync.md, 'Overlap between providers'); "
                                  f"use overlap_steps <= {gap - 1}" + (" or fewer fragments" if self.sync.fragments > 1 else ""))
            if not self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s:
                raise ConfigError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed 2 * heartbeat_interval_s ({self.heartbeat_interval_s})")
            if not self.round_deadline_s > 0 or not self.join_timeout_s > 0:
                raise ConfigError("round_deadline_s and join_timeout_s must be > 0")
            for name in ("start_groups", "min_groups"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if self.sync.mode != "ddp" and self.group is None:
            # with group= any interval resumes bit for bit (tested off the sync period, inside a
            # round in flight too); without it, resume is tested at these steps only
            if self.every_n_steps % self.sync.sync_every:
                sc = self.sync
                where = (f"step k * sync_every: the last of the {sc.fragments} fragments launches its sync there, the others "
                         "synced earlier in the period" if sc.fragments > 1 else "step k * sync_every: a sync step")
                if sc.overlap_steps:
                    where += f"; with overlap_steps = {sc.overlap_steps} that round is in flight and the checkpoint waits for its result and holds it"
                raise ConfigError(f"every_n_steps ({self.every_n_steps}) must be a multiple of sync.sync_every ({sc.sync_every}) so that every "
                                  f"checkpoint falls at the end of a sync period ({where}), the steps where resume without group= is tested bit for bit "
                                  f"(docs/sync.md, 'Checkpoint steps'); e.g. every_n_steps = {sc.sync_every * max(1, round(self.every_n_steps / sc.sync_every))}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s must be positive")
        for label in ("max_uncommitted_steps", "max_checkpoint_failures"):
            v = getattr(self, label)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{label} must be None (no limit) or an int >= 1, got {v!r}")
        from ..format.signing import SigningKey

        if self.signing_key is not None and not isinstance(self.signing_key, SigningKey):
            raise ConfigError("signing_key must be a SigningKey (resilient_train.format.signing.load_signing_key(path) reads one from a file)")
