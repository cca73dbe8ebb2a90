"""What real training scripts do beyond the example's shape, and how :func:`~resilient_train.wrap` meets it.

Kept out of :mod:`resilient_train.trainer` so the trainer's loop stays short; the trainer calls
these functions at fixed points (construction, start, resume, each step, each save, close).

* **AMP** (``wrap(..., scaler=scaler)``): :meth:`Trainer.step` replaces
  ``scaler.step(optimizer); scaler.update()``. A step whose gradients overflowed stays skipped
  (the optimizer does not run; under DiLoCo the inner step is skipped the same way and the
  round counts it as a step with no change), counted in ``trainer.amp_skipped_steps`` and the
  ``amp_step_skipped`` event. The scaler's state (scale, growth tracker) is checkpointed in
  ``extra`` under ``resilient_train.grad_scaler`` and restored on resume. bf16 autocast needs
  no scaler: wrap nothing, the loop's ``torch.autocast(..., dtype=torch.bfloat16)`` is untouched.
* **torch.compile**: pass the compiled model (or DDP of it); checkpoints, exports and the
  provider fingerprint use the canonical parameter names (no ``_orig_mod.``), so a run may
  resume with compile on or off.
* **finished runs** (``TrainerConfig(max_steps=N)``): ``trainer.finished`` is true once the step
  reaches N, and :meth:`Trainer.step` refuses to go past it (ConfigError), so a relaunched
  finished job trains nothing: ``while not trainer.finished: ...``.
* **adopting a run** (``TrainerConfig(init_from=path, init_step=None)``): only when the
  checkpoint location holds no committed checkpoint, the model (strictly: every name and shape),
  the optimizer where the file holds one, and the step (``init_step``, else the file's own) come
  from the foreign checkpoint (:mod:`resilient_train.foreign`); a torch LR scheduler is
  advanced to that step; the source's kind, path and sha256 digests go into ``extra`` under
  ``resilient_train.provenance`` (in ``state.json``, which the manifest covers by digest), and
  step N is checkpointed at once. Later launches resume from checkpoints and ignore
  ``init_from``. A mismatch raises StateMismatchError before training starts.
* **visible by default** (``TrainerConfig(log="auto")``): see :func:`visible_logging`.
* **keep the best checkpoint** (``TrainerConfig(keep_best=k)`` + :meth:`Trainer.report_metric`):
  the metrics reported for checkpointed steps travel in ``extra`` under
  ``resilient_train.metrics``; :func:`~resilient_train.checkpoint.keep_best.best_steps` picks
  the steps retention keeps beside the last ``keep_last``.

The trainer's hooks: public to the package, not to scripts. The trainer package calls each at
one fixed point, passing the :class:`~resilient_train.trainer.Trainer` as ``tr``:

* :func:`check_script_options`: ``TrainerConfig.__post_init__`` (validates the fields above).
* :func:`init_script_parts`: ``Trainer.__init__`` (checks and keeps ``scaler``,
  ``extra_per_rank``, ``stateful_per_rank``).
* :func:`visible_logging`: ``Trainer.start`` once the rank is known; :func:`drop_visible_logging`
  undoes it in ``Trainer.close``.
* :func:`start_from_foreign`: resume, when nothing is committed yet and ``init_from`` is set.
* :func:`after_resume`: resume, after a checkpoint was loaded.
* :func:`optimizer_step`: ``Trainer.step``, in place of ``optimizer.step()``.
* :func:`script_extras`: before every save.
* :func:`report_metric` / :func:`protected_steps`: ``Trainer.report_metric`` and retention.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from .checkpoint.state import checkpoint_module
from .errors import ConfigError, StateMismatchError

log = logging.getLogger(__name__)

SCALER_KEY = "resilient_train.grad_scaler"
PROVENANCE_KEY = "resilient_train.provenance"
METRICS_KEY = "resilient_train.metrics"
LOG_MODES = ("auto", "off")

__all__ = ["check_script_options", "init_script_parts", "visible_logging", "drop_visible_logging", "start_from_foreign",
           "after_resume", "optimizer_step", "script_extras", "report_metric", "protected_steps",
           "SCALER_KEY", "PROVENANCE_KEY", "METRICS_KEY", "LOG_MODES"]


def check_script_options(cfg: Any) -> None:
    """Validate the script-facing fields of a TrainerConfig (``max_steps``, ``init_from``,
    ``init_step``, ``log``, ``keep_best``, ``keep_best_mode``); ConfigError says what to fix."""
    if cfg.max_steps is not None and (isinstance(cfg.max_steps, bool) or not isinstance(cfg.max_steps, int) or cfg.max_steps < 1):
        raise ConfigError(f"max_steps must be None or an int >= 1, got {cfg.max_steps!r}")
    if cfg.init_from is not None and (not isinstance(cfg.init_from, str) or not cfg.init_from):
        raise ConfigError(f"init_from must be a path (a torch.save file, a Hugging Face folder or a DCP folder), got {cfg.init_from!r}")
    if cfg.init_step is not None and (isinstance(cfg.init_step, bool) or not isinstance(cfg.init_step, int) or cfg.init_step < 0):
        raise ConfigError(f"init_step must be None (the file's own step) or an int >= 0, got {cfg.init_step!r}")
    if cfg.init_step is not None and cfg.init_from is None:
        raise ConfigError("init_step goes with init_from (the checkpoint to start from)")
    if cfg.log not in LOG_MODES:
        raise ConfigError(f"log must be one of {', '.join(LOG_MODES)}, got {cfg.log!r} (configure the 'resilient_train' logger yourself for anything else)")
    if isinstance(cfg.keep_best, bool) or not isinstance(cfg.keep_best, int) or cfg.keep_best < 0:
        raise ConfigError(f"keep_best must be an int >= 0, got {cfg.keep_best!r}")
    if cfg.keep_best_mode not in ("min", "max"):
        raise ConfigError(f"keep_best_mode must be 'min' (lower metric is better) or 'max', got {cfg.keep_best_mode!r}")


def init_script_parts(tr: Any, scaler: Any, extra_per_rank: Any, stateful_per_rank: Any) -> None:
    """Check ``scaler`` (a GradScaler's methods), ``extra_per_rank`` (a dict) and
    ``stateful_per_rank`` (objects with ``state_dict``/``load_state_dict``), raising ConfigError
    before anything starts, and set the attributes the other hooks use on ``tr``."""
    if scaler is not None:
        missing = [m for m in ("step", "update", "get_scale", "is_enabled", "state_dict", "load_state_dict") if not callable(getattr(scaler, m, None))]
        if missing:
            raise ConfigError(f"scaler must be a torch.amp.GradScaler (it lacks {', '.join(missing)})")
    if extra_per_rank is not None and not isinstance(extra_per_rank, dict):
        raise ConfigError(f"extra_per_rank must be a dict, got {type(extra_per_rank).__name__}")
    if stateful_per_rank is not None:
        if not isinstance(stateful_per_rank, dict):
            raise ConfigError(f"stateful_per_rank must be a dict of name -> object with state_dict()/load_state_dict(), got {type(stateful_per_rank).__name__}")
        for name, obj in stateful_per_rank.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(f"stateful_per_rank[{name!r}] ({type(obj).__name__}) has no state_dict()/load_state_dict(); a torchdata StatefulDataLoader has both (a plain DataLoader has not)")
    tr.scaler = scaler
    tr.extra_per_rank = extra_per_rank if extra_per_rank is not None else {}
    tr.stateful_per_rank = dict(stateful_per_rank or {})
    tr.amp_skipped_steps = 0
    tr.imported_from = None
    tr._log_handler = None
    tr._protected_steps = frozenset()


# ---------------------------------------------------------------------- AMP


def optimizer_step(tr: Any) -> None:
    """The optimizer step of :meth:`Trainer.step`: through the scaler when there is one."""
    scaler = tr.scaler
    if scaler is None or not scaler.is_enabled():
        tr.optimizer.step()
        return
    before = scaler.get_scale()
    scaler.step(tr.optimizer)  # skips optimizer.step() when the unscaled gradients hold inf/NaN
    scaler.update()
    if scaler.get_scale() < before:  # update() lowers the scale only after an overflow
        tr.amp_skipped_steps += 1
        tr.events.emit("amp_step_skipped", step=tr.step_count + 1, scale=scaler.get_scale())
        log.info("step %d: gradients overflowed at loss scale %g; the optimizer step was skipped (scale now %g)", tr.step_count + 1, before, scaler.get_scale())


def script_extras(tr: Any) -> None:
    """Before a save: the scaler's state into ``extra`` (rank 0's is stored)."""
    if tr.scaler is not None and tr.scaler.is_enabled():
        tr.extra[SCALER_KEY] = dict(tr.scaler.state_dict())
    if tr.config.keep_best:
        tr._protected_steps = frozenset(protected_steps(tr))  # read by retention on rank 0's worker thread


def after_resume(tr: Any) -> None:
    """After a checkpoint was loaded into ``extra``: the scaler's state back."""
    saved = tr.extra.get(SCALER_KEY)
    if tr.scaler is not None and tr.scaler.is_enabled() and isinstance(saved, dict) and saved:
        tr.scaler.load_state_dict(saved)


# ---------------------------------------------------------------------- adopting a run


def start_from_foreign(tr: Any) -> None:
    """Start from a foreign checkpoint as step N (collective: every rank reads the file and
    the first save commits step N). See the module doc."""
    from .foreign import read_foreign

    cfg = tr.config
    found = read_foreign(cfg.init_from)
    step = cfg.init_step if cfg.init_step is not None else found.step
    if step is None:
        raise ConfigError(f"init_from={cfg.init_from!r} ({found.kind}) records no step: pass init_step=N, the step it was taken at")
    module = checkpoint_module(tr.module)
    try:
        module.load_state_dict(found.model, strict=True)
    except RuntimeError as exc:
        raise StateMismatchError(f"init_from={cfg.init_from!r} does not fit the model: {str(exc)[:800]}") from None
    if found.optimizer is not None:
        try:
            tr.optimizer.load_state_dict(found.optimizer)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise StateMismatchError(f"init_from={cfg.init_from!r}: its optimizer state does not fit the optimizer ({exc}); build the optimizer with the same parameter groups in the same order") from None
    if tr.scheduler is not None and hasattr(tr.scheduler, "last_epoch") and step > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no step is trained here
            for _ in range(step):
                tr.scheduler.step()
    tr.step_count = step
    tr.imported_from = found.provenance(step)
    tr.extra[PROVENANCE_KEY] = tr.imported_from
    tr.events.emit("init_from", **tr.imported_from)
    log.info("started from %s checkpoint %s as step %d (%d tensors%s); sha256 recorded in the checkpoint's provenance",
             found.kind, cfg.init_from, step, len(found.model), ", optimizer state" if found.optimizer is not None else ", no optimizer state")
    tr.save()


# ---------------------------------------------------------------------- keep best


def report_metric(tr: Any, value: float, step: int | None = None) -> None:
    """Record ``value`` for ``step`` (default: the current one) in ``extra`` (saved with the
    next checkpoint), where :func:`protected_steps` reads it."""
    v = float(value)
    s = tr.step_count if step is None else int(step)
    tr.extra.setdefault(METRICS_KEY, {})[str(s)] = v


def protected_steps(tr: Any) -> set[int]:
    """The ``keep_best`` steps with the best reported metric (see :mod:`~resilient_train.checkpoint.keep_best`)."""
    from .checkpoint.keep_best import best_steps

    metrics = {int(k): float(v) for k, v in tr.extra.get(METRICS_KEY, {}).items()}
    return set(best_steps(metrics, tr.config.keep_best, tr.config.keep_best_mode))


# ---------------------------------------------------------------------- logging


class _Visible(logging.StreamHandler):
    """The stderr handler ``log="auto"`` adds (told apart from the script's own handlers)."""


def visible_logging(tr: Any) -> None:
    """``log="auto"``: when neither the root logger nor the ``resilient_train`` logger has a
    handler (the script configured no logging), add a stderr handler to ``resilient_train``:
    rank 0 prints INFO and above (resume, reshard, fallback past a bad checkpoint, storage
    trouble), other ranks WARNING and above, every record redacted. A script that configures
    logging (``logging.basicConfig``, its own handlers) gets the records through its handlers
    instead. Silence: ``TrainerConfig(log="off")``, or
    ``logging.getLogger("resilient_train").setLevel(logging.ERROR)`` (a level set before
    ``wrap`` is kept). Removed by ``close()``."""
    if tr.config.log == "off":
        return
    from .logs import LIBRARY_LOGGER, RedactingFilter
    from .storage.redact import install_log_redaction

    lib = logging.getLogger(LIBRARY_LOGGER)
    if logging.getLogger().handlers or any(not isinstance(h, logging.NullHandler) for h in lib.handlers):
        return
    install_log_redaction()
    handler = _Visible(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[resilient_train rank {tr.rank}] %(levelname)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(logging.INFO if tr.rank == 0 else logging.WARNING)
    lib.addHandler(handler)
    tr._log_handler = (handler, lib.level)
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.INFO)


def drop_visible_logging(tr: Any) -> None:
    """Undo :func:`visible_logging` (``Trainer.close``): remove the handler, restore the level."""
    if getattr(tr, "_log_handler", None) is None:
        return
    from .logs import LIBRARY_LOGGER

    handler, level = tr._log_handler
    lib = logging.getLogger(LIBRARY_LOGGER)
    lib.removeHandler(handler)
    if level == logging.NOTSET and lib.level == logging.INFO:
        lib.setLevel(logging.NOTSET)
    tr._log_handler = None
