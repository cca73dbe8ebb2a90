"""Resume: the newest verifiable checkpoint loaded into a trainer, and the job-wide restart agreement.

:func:`resume` loads through the one load route (:func:`~resilient_train.checkpoint.load_checkpoint`,
newest verifiable first); :func:`resume_points` and :func:`restart_at` are what a
:class:`~resilient_train.recovery.ProviderGroup` asks a group's trainer when the whole job
restarts from the newest step every group has committed. Each takes the :class:`~.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..checkpoint import load_checkpoint
from ..checkpoint.discovery import uncommit
from ..checkpoint.steps import newest_committed
from ..errors import StorageError
from ..format.signing import as_keyring
from ..scripts import after_resume, start_from_foreign

__all__ = ["resume", "resume_points", "restart_at"]

log = logging.getLogger(__name__)


def resume(tr: Any, at_most: int | None = None) -> None:
    """Load the newest checkpoint that verifies, on any provider (see checkpoint/loading.py):
    a corrupt or unsigned newest one is skipped (warning + ``resume_fallback`` event) and
    uncommitted, since training will save that step again; an
    unreachable provider is skipped while another answers; when none answers, StorageError.
    With ``group=`` this is the group's own checkpoint folder. ``at_most``: only steps up to
    this one (a job-wide consistent restart, see :func:`restart_at`)."""
    t0 = time.perf_counter()
    result = load_checkpoint(tr._target(), tr.train_state(), newest_verifiable=True, at_most=at_most, process_group=tr._ckpt_group,
                             verify_keys=as_keyring(tr.config.verify_keys), on_skip=lambda step, reason: tr.events.emit("resume_fallback", step=step, reason=reason))
    if result is None:
        tr.events.emit("no_checkpoint")
        if at_most is None and tr.config.init_from is not None:
            start_from_foreign(tr)
        else:
            log.info("no checkpoint under %s: training starts at step 0", tr._checkpoint() if isinstance(tr._checkpoint(), str) else "the checkpoint location")
        return
    after_resume(tr)
    tr.step_count = int(tr.extra.get("resilient_train.step", result.step))
    tr.resumed_from = result.step
    served: dict[str, int] = {}
    for prov in result.sources.values():
        served[prov] = served.get(prov, 0) + 1
    tr.events.emit("resume", step=result.step, seconds=round(time.perf_counter() - t0, 4), world_size=tr.world_size, saved_world_size=result.manifest.world_size, files_by_provider=served)
    log.info("resumed from step %d (saved by %d ranks) on %d ranks", result.step, result.manifest.world_size, tr.world_size)


def resume_points(tr: Any) -> list[int]:
    """This group's committed steps, newest first (the group leader, for a consistent restart)."""
    try:
        return newest_committed(tr._sources()) if tr.resumed_from is not None else []
    except (StorageError, OSError) as exc:
        log.warning("could not list this group's checkpoints for the restart agreement: %s", exc)
        return [tr.resumed_from] if tr.resumed_from is not None else []


def restart_at(tr: Any, step: int) -> int:
    """Collective over this group's ranks: the groups of a job that restarts as a whole agreed
    to resume from ``step`` (the newest step every group has committed), older than the one
    this group loaded. Load it; retire this group's newer checkpoints (their global state is
    from a future the other groups never reached, and training will save those steps again).
    Returns the step loaded."""
    newer = tr.resumed_from
    resume(tr, at_most=step)
    loaded = tr.resumed_from if tr.resumed_from is not None else 0
    tr.events.emit("restart_agreed", step=loaded, agreed=step, loaded_before=newer)
    if tr.rank == 0:
        for store in tr._sources():
            try:
                later = [s for s in newest_committed(store) if s > loaded]
                for s in later:
                    uncommit(store, s, f"newer than step {loaded}, where the job restarted (the other groups had not committed step {s})")
            except (StorageError, OSError) as exc:
                log.warning("could not retire checkpoints newer than step %d on %s: %s", loaded, store.name, exc)
    log.warning("the job restarted from step %d, the newest step every group had committed (this group had loaded step %s)", loaded, newer)
    return loaded
