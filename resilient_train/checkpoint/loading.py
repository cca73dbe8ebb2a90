"""The one load route: :func:`load_checkpoint`. Every load goes through it.

``rt.load`` / :func:`load`, :meth:`~.manager.CheckpointManager.restore`, the trainer's resume
and :func:`load_replicated` all call it. Phases (collective: every rank calls it):

1. **find** (rank 0): the step asked for; or, with ``newest_verifiable``, every committed step
   (:func:`~.steps.newest_committed` over all the location's stores, at most ``at_most``),
   newest first; or else the newest committed one (found inside the read).
2. **read** one step (:func:`~.reader.read_checkpoint`) from the replicas in read order: a
   Placement's policy order (healthy first, then cheapest; providers ``health`` marks down are
   asked only when the healthy ones cannot serve the step, not found or corrupt there), else
   the stores in preference order. Each chunk comes from the first replica whose copy
   verifies; ``on_served`` gets file -> provider, and ``ledger`` the bytes each served
   (purpose ``recovery``) with what reading the cheaper replica saved.
3. **fall back** (``newest_verifiable`` only; :func:`~.discovery.load_newest_verifiable`): a
   step that fails verification on any rank is skipped on every rank (``on_skip(step,
   reason)``) and the next older one read; one skipped for a definite verdict on its bytes is
   uncommitted on every store of the location by rank 0 (:func:`~.discovery.uncommit`), since
   training goes on from the older step and saves that step again.

Failure behaviour: typed errors from :mod:`resilient_train.errors`, the same on every rank.
Without ``newest_verifiable`` no committed checkpoint is CheckpointNotFoundError; with it, None
(and CorruptCheckpointError when committed ones exist and none verifies). An unreachable store
is StorageError, never "no checkpoint".
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ..storage import redact
from ..storage.ledger import Ledger
from ..storage.providers import Placement
from .collectives import Coordinator, describe
from .discovery import load_newest_verifiable, uncommit
from .location import Location, as_location
from .reader import LoadResult, read_checkpoint
from .state import TrainState
from .steps import newest_committed

__all__ = ["load_checkpoint", "load", "load_replicated"]

log = logging.getLogger(__name__)


def load_checkpoint(
    location: Location,
    state: TrainState,
    step: int | None = None,
    *,
    newest_verifiable: bool = False,
    at_most: int | None = None,
    on_skip: Callable[[int, str], None] | None = None,
    process_group: Any = None,
    strict: bool = True,
    verify_keys: Any = None,
    io_threads: int | None = None,
    staging_budget_bytes: int | None = None,
    health: Mapping[str, bool] | None = None,
    on_served: Callable[[dict[str, str]], None] | None = None,
    ledger: Ledger | None = None,
) -> LoadResult | None:
    """Load ``step`` (default: the newest committed; with ``newest_verifiable``, the newest that
    verifies) from ``location`` into ``state``. See the module doc. Collective."""
    def read(s: int | None) -> LoadResult:
        return _read(location, state, s, health, on_served, ledger, dict(
            process_group=process_group, strict=strict, verify_keys=verify_keys, io_threads=io_threads, staging_budget_bytes=staging_budget_bytes))

    if step is not None or not newest_verifiable:
        return read(step)
    coord = Coordinator(process_group)

    def find() -> list[int]:
        return [s for s in newest_committed(location.read_order(health)) if at_most is None or s <= at_most]

    def skipped(s: int, reason: str, definite: bool) -> None:
        if on_skip is not None:
            on_skip(s, reason)
        if definite and coord.rank == 0:
            _uncommit_everywhere(location, s, reason)

    return load_newest_verifiable(find, read, process_group=process_group, on_skip=skipped)


def _uncommit_everywhere(location: Location, step: int, reason: str) -> None:
    for store in location.stores:
        try:
            uncommit(store, step, reason)
        except (StorageError, OSError) as exc:
            log.warning("could not uncommit step %d on %s: %s", step, store.name, describe(exc))


def _read(location: Location, state: TrainState, step: int | None, health: Mapping[str, bool] | None,
          on_served: Callable[[dict[str, str]], None] | None, ledger: Ledger | None, kw: dict[str, Any]) -> LoadResult:
    """Phase **read**: one step from the replicas in read order (see module doc)."""
    pl = location.placement
    if pl is None:
        result = read_checkpoint(location.stores, state, step, **kw)
    else:
        result = _read_placement(pl, state, step, health, ledger, kw)
    if on_served is not None:
        on_served(dict(result.sources))
    return result


def _read_placement(pl: Placement, state: TrainState, step: int | None, health: Mapping[str, bool] | None, ledger: Ledger | None, kw: dict[str, Any]) -> LoadResult:
    decision = pl.decide(health)
    order = decision.read_order
    healthy = [n for n in order if (health or {}).get(n, True)]
    try:
        # Providers known to be unhealthy are not even asked, unless the healthy ones cannot serve.
        result = read_checkpoint([pl.store(n) for n in (healthy or order)], state, step, **kw)
    except (CheckpointNotFoundError, CorruptCheckpointError) as exc:
        if not healthy or len(healthy) == len(order):
            raise
        log.warning("healthy replicas (%s) could not serve the checkpoint (%s); trying the unhealthy ones too", ", ".join(healthy), redact(str(exc))[:300])
        result = read_checkpoint([pl.store(n) for n in order], state, step, **kw)
    by_provider: dict[str, int] = {}
    for prov in result.sources.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
    log.info("step %d loaded; files per provider: %s (read order %s)", result.step, by_provider, ", ".join(order))
    if ledger is not None:
        sizes = {f.path: f.size_bytes for f in result.manifest.files}
        read: dict[str, int] = {}
        for fname, prov in result.sources.items():
            read[prov] = read.get(prov, 0) + sizes.get(fname, 0)
        for prov, n in read.items():
            ledger.record_read(prov, n, "recovery")
        if decision.read_saving_per_gb > 0:
            saved = read.get(order[0], 0) / 1e9 * decision.read_saving_per_gb
            ledger.record_saving(saved)
            log.info("reading from %s instead of the declared first provider saved %.4f", order[0], saved)
    return result


# ------------------------------------------------------------------ the public spellings


def load(
    uri: Any,
    state: TrainState,
    step: int | None = None,
    *,
    process_group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    strict: bool = True,
    io_threads: int | None = None,
    staging_budget_bytes: int | None = None,
    verify_keys: Any = None,
) -> LoadResult:
    """Load checkpoint ``step`` (default: the latest committed) into ``state``. Collective.

    ``uri`` may be a list of replicas (URIs or Stores) in preference order: each chunk is read
    from the first replica whose copy verifies; or a Placement (read in its policy's order).
    ``strict=False`` tolerates checkpoint tensors that the model does not have. ``verify_keys``
    (a KeyRing, key, key file or list of them): refuse a manifest that is not signed by one of
    them (SignatureError).

    Failure behaviour: every failure is a typed error from :mod:`resilient_train.errors`. If
    the bytes this rank needs fit ``staging_budget_bytes`` (default
    :data:`~.reader.DEFAULT_STAGING_BUDGET_BYTES`), nothing in ``state`` changes unless every
    needed byte verified on every rank and the checkpoint fits the state. Beyond the budget, a
    failure after the first live tensor was written raises :class:`PartialLoadError` on every
    rank: load another checkpoint before training on.
    """
    result = load_checkpoint(as_location(uri, storage_options), state, step, process_group=process_group, strict=strict,
                             io_threads=io_threads, staging_budget_bytes=staging_budget_bytes, verify_keys=verify_keys)
    assert result is not None  # without newest_verifiable a missing checkpoint raises
    return result


def load_replicated(
    placement: Placement,
    state: TrainState,
    step: int | None = None,
    *,
    process_group: Any = None,
    health: Mapping[str, bool] | None = None,
    strict: bool = True,
    on_served: Callable[[dict[str, str]], None] | None = None,
    verify_keys: Any = None,
    ledger: Ledger | None = None,
) -> LoadResult:
    """Deprecated spelling of :func:`load_checkpoint` on a Placement (read order, ``health``,
    ``on_served`` and ``ledger`` as there)."""
    result = load_checkpoint(as_location(placement), state, step, process_group=process_group, health=health, strict=strict,
                             on_served=on_served, verify_keys=verify_keys, ledger=ledger)
    assert result is not None
    return result
