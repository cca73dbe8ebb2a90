"""Providers, a replication policy with data residency, and pure placement decisions.

A :class:`Provider` is one place a checkpoint can live: a name, a URL, the region its data
sits in, what reading a GB out of it costs, and fsspec ``storage_options``. A
:class:`ReplicationPolicy` says how many copies to keep, in which regions they may be stored,
and which providers reads prefer. :class:`Placement` binds the two and refuses, at
construction, a policy that cannot be met.

:func:`place` is the decision, as a pure function (no I/O, no clock of its own): given the
providers, the policy and which providers are healthy, it returns the write targets (first one
is the primary), the read order, and a reason in words. Residency is absolute: a provider
outside the allowed regions is never a write target, healthy or not, whatever else fails.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .base import Store
from .redact import redact, redact_options
from .retry import RetryPolicy

__all__ = ["Provider", "ReplicationPolicy", "Placement", "PlacementDecision", "HealthBook", "place", "placement_from_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The client package each scheme needs, and the extra that installs it.
_CLIENTS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}


def _check_uri(name: str, uri: str) -> None:
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"provider {name!r}: uri must be a non-empty string such as s3://bucket/prefix or a local folder")
    if "://" not in uri:
        return  # a local folder
    scheme = uri.split("://", 1)[0].split("::")[-1].lower()
    if scheme == "file":
        return
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ConfigError(
            f"provider {name!r}: unknown URL scheme {scheme!r} in {redact(uri)}; use s3://, gs://, az:// (or abfs://), "
            "memory://, file:// or a local folder"
        )
    client = _CLIENTS.get(scheme)
    if client and importlib.util.find_spec(client[0]) is None:
        raise ConfigError(f"provider {name!r}: {scheme}:// needs the {client[0]} package; install it with: pip install 'resilient-train[{client[1]}]'")


@dataclass(frozen=True)
class Provider:
    """One storage location. Validated at construction (no I/O); :meth:`open` gives its Store.

    ``egress_cost_per_gb``: what reading 1 GB out of this provider costs (any currency): it
    orders reads and prices the bytes in the :class:`~resilient_train.storage.ledger.Ledger`.
    ``egress_to``: per-destination prices (provider name -> cost per GB) where moving data to
    that provider costs something else (same cloud, a private interconnect). ``retry``: the retry budget of its Store (shorter means a dead
    provider is given up on sooner). ``storage_options`` never appear in ``repr``.
    """

    name: str
    uri: str
    region: str
    egress_cost_per_gb: float = 0.0
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    retry: RetryPolicy | None = field(default=None, compare=False)
    block_size_bytes: int | None = field(default=None, compare=False)
    egress_to: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"provider name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if not isinstance(self.region, str) or not self.region.strip():
            raise ConfigError(f"provider {self.name!r}: region must be a non-empty string such as 'eu-west-1'")
        if not isinstance(self.egress_cost_per_gb, (int, float)) or self.egress_cost_per_gb < 0:
            raise ConfigError(f"provider {self.name!r}: egress_cost_per_gb must be a number >= 0, got {self.egress_cost_per_gb!r}")
        _check_uri(self.name, self.uri)
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        if not isinstance(self.egress_to, Mapping) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in self.egress_to.items()):
            raise ConfigError(f"provider {self.name!r}: egress_to must map provider names to a cost per GB >= 0, got {self.egress_to!r}")
        object.__setattr__(self, "egress_to", dict(self.egress_to))

    def open(self) -> Store:
        """This provider's Store (retrying transient failures). No I/O here."""
        from . import open_store

        return open_store(self.uri, self.storage_options, name=self.name, retry=self.retry, block_size_bytes=self.block_size_bytes)

    def describe(self) -> dict[str, Any]:
        """Printable description: URI and options with secrets masked."""
        out = {"name": self.name, "uri": redact(self.uri), "region": self.region, "egress_cost_per_gb": self.egress_cost_per_gb, "storage_options": redact_options(self.storage_options)}
        if self.egress_to:
            out["egress_to"] = dict(self.egress_to)
        return out


@dataclass(frozen=True)
class ReplicationPolicy:
    """``copies``: how many providers hold each checkpoint (>= 1).
    ``allowed_regions``: region names or glob patterns (``"eu-*"``) a checkpoint may be stored
    in; None allows every region. ``prefer``: provider names that reads try first, in order,
    among providers of equal health (then the cheapest egress, then the declared order)."""

    copies: int = 1
    allowed_regions: tuple[str, ...] | None = None
    prefer: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.copies, int) or isinstance(self.copies, bool) or self.copies < 1:
            raise ConfigError(f"ReplicationPolicy.copies must be an int >= 1, got {self.copies!r}")
        if self.allowed_regions is not None:
            if isinstance(self.allowed_regions, str):
                raise ConfigError("ReplicationPolicy.allowed_regions must be a list of regions, not one string (write ['eu-west-1'])")
            regions = tuple(self.allowed_regions)
            if not regions or not all(isinstance(r, str) and r.strip() for r in regions):
                raise ConfigError("ReplicationPolicy.allowed_regions must be None (any region) or a non-empty list of region names")
            object.__setattr__(self, "allowed_regions", regions)
        object.__setattr__(self, "prefer", tuple(self.prefer))

    def allows(self, region: str) -> bool:
        if self.allowed_regions is None:
            return True
        r = region.lower()
        return any(fnmatch.fnmatchcase(r, pat.lower()) for pat in self.allowed_regions)


@dataclass(frozen=True)
class PlacementDecision:
    write_targets: tuple[str, ...]
    """Providers to hold the checkpoint; the first is the primary (written first)."""
    read_order: tuple[str, ...]
    """Providers to read from, best first."""
    reason: str
    read_saving_per_gb: float = 0.0
    """What reading 1 GB from the first provider of ``read_order`` saves compared with the first
    healthy allowed provider in declared order (0 when they are the same)."""


def place(providers: Sequence[Provider], policy: ReplicationPolicy, health: Mapping[str, bool] | None = None) -> PlacementDecision:
    """Decide where to write and in which order to read. Pure: no I/O, no clock.

    Write targets: the first ``policy.copies`` healthy providers, in declared order, among
    those in allowed regions. With too few healthy ones, every healthy allowed provider is
    used and the reason says the policy is degraded; never a provider outside the allowed
    regions. Read order (allowed providers only): healthy before unhealthy, then
    ``policy.prefer``, then the lowest egress cost, then declared order.
    """
    health = health or {}
    allowed = [p for p in providers if policy.allows(p.region)]
    refused = [p.name for p in providers if not policy.allows(p.region)]
    healthy = [p for p in allowed if health.get(p.name, True)]
    down = [p.name for p in allowed if not health.get(p.name, True)]
    targets = tuple(p.name for p in healthy[: policy.copies])
    rank_pref = {n: i for i, n in enumerate(policy.prefer)}
    order = sorted(
        range(len(allowed)),
        key=lambda i: (not health.get(allowed[i].name, True), rank_pref.get(allowed[i].name, len(rank_pref)), allowed[i].egress_cost_per_gb, i),
    )
    read_order = tuple(allowed[i].name for i in order)
    saving = 0.0
    if healthy and read_order and read_order[0] != healthy[0].name:
        first = next(p for p in allowed if p.name == read_order[0])
        saving = max(0.0, healthy[0].egress_cost_per_gb - first.egress_cost_per_gb)
    parts = [f"write to {', '.join(targets) or 'nobody'}"]
    if len(targets) < policy.copies:
        parts.append(f"DEGRADED: {len(targets)} of {policy.copies} copies possible")
    if down:
        parts.append(f"unhealthy: {', '.join(down)}")
    if refused:
        parts.append(f"outside allowed regions, never written: {', '.join(refused)}")
    parts.append(f"read order {', '.join(read_order)} (health, preference, egress cost)")
    if saving > 0:
        parts.append(f"reading from {read_order[0]} instead of {healthy[0].name} saves {saving:g} per GB")
    return PlacementDecision(targets, read_order, "; ".join(parts), saving)


class Placement:
    """Providers bound to a policy, checked at construction: names unique, enough providers in
    the allowed regions for ``copies``, preferred names known. Raises ConfigError saying what
    to change. No I/O."""

    def __init__(self, providers: Sequence[Provider], policy: ReplicationPolicy | None = None, *, stores: Mapping[str, Store] | None = None):
        """``stores`` overrides the Store of named providers (tests wrap them in fault injectors)."""
        providers = list(providers)
        policy = policy or ReplicationPolicy(copies=len(providers) or 1)
        if not providers:
            raise ConfigError("no providers given: describe at least one Provider(name, uri, region)")
        names = [p.name for p in providers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"provider names must be unique; repeated: {', '.join(dupes)}")
        unknown = [n for n in policy.prefer if n not in names]
        if unknown:
            raise ConfigError(f"ReplicationPolicy.prefer names unknown providers {unknown}; known: {names}")
        allowed = [p for p in providers if policy.allows(p.region)]
        if len(allowed) < policy.copies:
            outside = ", ".join(f"{p.name} ({p.region})" for p in providers if not policy.allows(p.region)) or "none"
            raise ConfigError(
                f"the policy wants {policy.copies} copies in regions {list(policy.allowed_regions or ['any'])}, but only "
                f"{len(allowed)} provider(s) are there ({', '.join(p.name for p in allowed) or 'none'}; outside: {outside}): "
                "add a provider in an allowed region, allow more regions, or lower copies"
            )
        self.providers = providers
        self.policy = policy
        self._by_name = {p.name: p for p in providers}
        self._stores: dict[str, Store] = {}
        self._given_stores = bool(stores)
        for n, st in (stores or {}).items():
            self.provider(n)
            self._stores[n] = st

    def provider(self, name: str) -> Provider:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(f"unknown provider {name!r}; known: {sorted(self._by_name)}") from None

    def store(self, name: str) -> Store:
        """The (cached) Store of provider ``name``."""
        if name not in self._stores:
            self._stores[name] = self.provider(name).open()
        return self._stores[name]

    def decide(self, health: Mapping[str, bool] | None = None) -> PlacementDecision:
        return place(self.providers, self.policy, health)

    def with_subpath(self, sub: str) -> "Placement":
        """The same providers and policy, each URI extended by ``/sub`` (e.g. one replica
        group's own checkpoints). Stores given at construction cannot be re-rooted: ConfigError."""
        if not sub or sub.startswith("/") or ".." in sub.split("/"):
            raise ConfigError(f"sub-path {sub!r} must be relative and must not contain '..'")
        if self._given_stores:
            raise ConfigError("this Placement was built with explicit stores=; build one per sub-path instead")
        import dataclasses

        return Placement([dataclasses.replace(p, uri=p.uri.rstrip("/") + "/" + sub) for p in self.providers], self.policy)


class HealthBook:
    """Which providers are healthy, and which copies each one missed; the clock is passed in.

    A provider is unhealthy for ``cooldown_s`` after its last failure, then tried again.
    ``missed(name, step)`` notes a checkpoint a provider could not take; the background
    replicator copies it there once the provider answers again and calls ``caught_up``.
    Thread-safe.
    """

    def __init__(self, cooldown_s: float = 60.0):
        if cooldown_s < 0:
            raise ConfigError("HealthBook.cooldown_s must be >= 0 seconds")
        self.cooldown_s = cooldown_s
        self._down_at: dict[str, float] = {}
        self._causes: dict[str, str] = {}
        self._missed: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def failed(self, name: str, now: float, cause: str = "") -> None:
        with self._lock:
            self._down_at[name] = now
            if cause:
                self._causes[name] = cause

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._down_at.pop(name, None)

    def snapshot(self, names: Sequence[str], now: float) -> dict[str, bool]:
        with self._lock:
            return {n: not (n in self._down_at and now - self._down_at[n] < self.cooldown_s) for n in names}

    def cause(self, name: str) -> str:
        """The last failure reported for ``name`` ('' if none)."""
        with self._lock:
            return self._causes.get(name, "")

    def missed(self, name: str, step: int) -> None:
        with self._lock:
            self._missed.setdefault(name, set()).add(step)

    def caught_up(self, name: str, steps: Sequence[int] | None = None) -> None:
        """``steps`` are on ``name`` now (None: all it missed)."""
        with self._lock:
            if steps is None:
                self._missed.pop(name, None)
            else:
                left = self._missed.get(name, set()) - set(steps)
                if left:
                    self._missed[name] = left
                else:
                    self._missed.pop(name, None)

    @property
    def behind(self) -> dict[str, list[int]]:
        """Providers that miss copies, with the steps they miss."""
        with self._lock:
            return {n: sorted(s) for n, s in self._missed.items() if s}


def placement_from_config(config: Mapping[str, Any]) -> Placement:
    """A Placement from a JSON-able description (the ``ckpt replicate --config`` file)::

        {"providers": [{"name": "aws", "uri": "s3://b/run", "region": "eu-west-1",
                        "egress_cost_per_gb": 0.09, "egress_to": {"gcp": 0.02},
                        "storage_options": {...}}, ...],
         "policy": {"copies": 2, "allowed_regions": ["eu-*"], "prefer": ["aws"]}}

    Raises ConfigError naming the entry that is wrong.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("providers"), list):
        raise ConfigError('the replication config must be a JSON object with a "providers" list (and an optional "policy" object)')
    known = {"name", "uri", "region", "egress_cost_per_gb", "egress_to", "storage_options"}
    providers = []
    for i, entry in enumerate(config["providers"]):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"providers[{i}] must be an object with name, uri and region")
        extra = set(entry) - known
        if extra:
            raise ConfigError(f"providers[{i}] has unknown keys {sorted(extra)}; allowed: {sorted(known)}")
        missing = [k for k in ("name", "uri", "region") if k not in entry]
        if missing:
            raise ConfigError(f"providers[{i}] lacks {missing}")
        providers.append(Provider(**dict(entry)))
    pol = config.get("policy") or {}
    if not isinstance(pol, Mapping) or set(pol) - {"copies", "allowed_regions", "prefer"}:
        raise ConfigError('"policy" must be an object with copies, allowed_regions and prefer only')
    policy = ReplicationPolicy(
        copies=pol.get("copies", len(providers)),
        allowed_regions=tuple(pol["allowed_regions"]) if pol.get("allowed_regions") is not None else None,
        prefer=tuple(pol.get("prefer", ())),
    )
    return Placement(providers, policy)
