"""Where a checkpoint lives: one type, :class:`Location`, made once at each public entry point.

A user may name a checkpoint's place as a URI (``"s3://bucket/run"``, a local folder), a
:class:`~resilient_train.storage.Store`, a list of them (replicas, in preference order) or a
:class:`~resilient_train.storage.providers.Placement` (providers + replication policy).
:func:`as_location` turns any of those into a :class:`Location`; everything below the public
entry points takes a Location and never converts again. A Placement of one provider and a
single Store behave alike: a Location with one store.

Construction does no I/O (stores are opened lazily by their backends).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import CheckpointError, ConfigError
from ..storage import Store, open_store
from ..storage.providers import Placement

__all__ = ["Location", "as_location", "as_store"]


class Location:
    """The stores a checkpoint is read from and written to.

    ``stores``: every replica, in preference order (for a Placement: its providers in declared
    order). ``placement``: the providers and replication policy when there is one (saves then
    replicate and loads read in the policy's read order), else None.
    """

    __slots__ = ("stores", "placement")

    def __init__(self, stores: Sequence[Store], placement: Placement | None = None):
        if not stores:
            raise CheckpointError("no checkpoint location given")
        self.stores: tuple[Store, ...] = tuple(stores)
        self.placement = placement

    @property
    def primary(self) -> Store:
        """The first store (the one a checkpoint without replication is written to)."""
        return self.stores[0]

    @property
    def uri(self) -> str:
        return ", ".join(s.uri for s in self.stores)

    def read_order(self, health: Mapping[str, bool] | None = None) -> list[Store]:
        """Stores in the order a load tries them: the placement's read order (healthy first,
        then cheapest) or the replicas' preference order."""
        if self.placement is None:
            return list(self.stores)
        return [self.placement.store(n) for n in self.placement.decide(health).read_order]

    def __repr__(self) -> str:
        kind = "placement" if self.placement is not None else "stores"
        return f"Location({kind}: {', '.join(s.name for s in self.stores)})"


def as_location(where: Any, storage_options: Mapping[str, Any] | None = None) -> Location:
    """A :class:`Location` from a URI, a Store, a list of them, a Placement or a Location (returned
    as is). Raises CheckpointError for an empty list, TypeError for anything else, ConfigError
    for an empty URI."""
    if isinstance(where, Location):
        return where
    if isinstance(where, Placement):
        return Location([where.store(p.name) for p in where.providers], where)
    items = list(where) if isinstance(where, (list, tuple)) else [where]
    if not items:
        raise CheckpointError("no checkpoint location given")
    return Location([open_store(u, storage_options) for u in items])


def as_store(where: Any, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The one store of a location that must be a single place (a URI, a Store, or a Location or
    Placement of one provider). Raises ConfigError naming the places when there are several."""
    loc = as_location(where, storage_options)
    if len(loc.stores) != 1:
        raise ConfigError(f"this operation takes one checkpoint location, got {len(loc.stores)}: {loc.uri}")
    return loc.primary
