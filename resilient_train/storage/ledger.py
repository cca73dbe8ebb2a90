"""A ledger of bytes moved and what they cost, per provider and per pair of providers.

Every transfer the library makes can be recorded here with its purpose:

* ``record_write(provider, nbytes, purpose)``: bytes written into a provider (checkpoints,
  replication and migration copies land there). Ingress is priced at 0.
* ``record_read(provider, nbytes, purpose)``: bytes read out of a provider to the training
  machines (resume / recovery reads), priced at the provider's ``egress_cost_per_gb``.
* ``record_copy(src, dst, nbytes, purpose)``: a copy between providers (replication, catch-up,
  migration): a read out of ``src`` priced at the pair's price, and a write into ``dst``.
* ``record_sync(src, dst, nbytes)``: cross-provider synchronisation traffic (the
  communicator's byte counts), priced per pair.

Prices: ``Provider.egress_cost_per_gb`` (per GB = 1e9 bytes, any currency), overridden for a
destination by ``Provider.egress_to[dst]``. A provider the ledger has no price for costs 0
(and is still counted). The ledger is thread-safe; ``on_record`` is called (outside the lock)
with one JSON-able dict per record, for the event log.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

__all__ = ["Ledger", "PURPOSES"]

PURPOSES = ("checkpoint", "replication", "catch_up", "migration", "recovery", "sync")
GB = 1e9


class Ledger:
    """See module doc. ``providers``: :class:`~resilient_train.storage.providers.Provider`
    objects (or anything with ``name``, ``egress_cost_per_gb`` and optionally ``egress_to``)."""

    def __init__(self, providers: Iterable[Any] = (), *, on_record: Callable[[dict[str, Any]], None] | None = None):
        self._egress: dict[str, float] = {}
        self._pair: dict[tuple[str, str], float] = {}
        for p in providers:
            self._egress[p.name] = float(getattr(p, "egress_cost_per_gb", 0.0) or 0.0)
            for dst, price in dict(getattr(p, "egress_to", None) or {}).items():
                self._pair[(p.name, dst)] = float(price)
        self.on_record = on_record
        self._lock = threading.Lock()
        # (provider, direction, purpose) -> [bytes, cost]
        self._by_provider: dict[tuple[str, str, str], list[float]] = {}
        # (src, dst, purpose) -> [bytes, cost]
        self._by_pair: dict[tuple[str, str, str], list[float]] = {}
        self._saved = 0.0

    # ------------------------------------------------------------------ prices

    def price_per_gb(self, src: str, dst: str | None = None) -> float:
        """What moving 1 GB out of ``src`` costs (to ``dst`` when a pair price is given)."""
        if dst is not None and (src, dst) in self._pair:
            return self._pair[(src, dst)]
        return self._egress.get(src, 0.0)

    # ------------------------------------------------------------------ records

    def _add(self, table: dict, key: tuple, nbytes: int, cost: float) -> None:
        row = table.setdefault(key, [0, 0.0])
        row[0] += nbytes
        row[1] += cost

    def _emit(self, rec: dict[str, Any]) -> None:
        if self.on_record is not None and rec["bytes"]:
            try:
                self.on_record(rec)
            except Exception:  # noqa: BLE001 - an event sink must not break a transfer
                pass

    def record_write(self, provider: str, nbytes: int, purpose: str = "checkpoint") -> None:
        nbytes = int(nbytes)
        with self._lock:
            self._add(self._by_provider, (provider, "write", purpose), nbytes, 0.0)
        self._emit({"kind": "write", "provider": provider, "purpose": purpose, "bytes": nbytes, "cost": 0.0})

    def record_read(self, provider: str, nbytes: int, purpose: str = "recovery") -> float:
        nbytes = int(nbytes)
        cost = nbytes / GB * self.price_per_gb(provider)
        with self._lock:
            self._add(self._by_provider, (provider, "read", purpose), nbytes, cost)
        self._emit({"kind": "read", "provider": provider, "purpose": purpose, "bytes": nbytes, "cost": round(cost, 6)})
        return cost

    def record_copy(self, src: str, dst: str, nbytes: int, purpose: str = "replication") -> float:
        nbytes = int(nbytes)
        cost = nbytes / GB * self.price_per_gb(src, dst)
        with self._lock:
            self._add(self._by_provider, (src, "read", purpose), nbytes, cost)
            self._add(self._by_provider, (dst, "write", purpose), nbytes, 0.0)
            self._add(self._by_pair, (src, dst, purpose), nbytes, cost)
        self._emit({"kind": "copy", "src": src, "dst": dst, "purpose": purpose, "bytes": nbytes, "cost": round(cost, 6)})
        return cost

    def record_sync(self, src: str, dst: str, nbytes: int) -> float:
        """Cross-provider synchronisation bytes sent from ``src``'s group to ``dst``'s."""
        nbytes = int(nbytes)
        cost = nbytes / GB * self.price_per_gb(src, dst)
        with self._lock:
            self._add(self._by_pair, (src, dst, "sync"), nbytes, cost)
        self._emit({"kind": "sync", "src": src, "dst": dst, "purpose": "sync", "bytes": nbytes, "cost": round(cost, 6)})
        return cost

    def record_saving(self, amount: float) -> None:
        """Money not spent because reads went to a cheaper replica (see ``load_replicated``)."""
        with self._lock:
            self._saved += float(amount)

    # ------------------------------------------------------------------ reports

    def bytes(self, provider: str | None = None, direction: str | None = None, purpose: str | None = None) -> int:
        with self._lock:
            return int(sum(v[0] for (p, d, u), v in self._by_provider.items() if (provider is None or p == provider) and (direction is None or d == direction) and (purpose is None or u == purpose)))

    def pair_bytes(self, src: str, dst: str, purpose: str | None = None) -> int:
        with self._lock:
            return int(sum(v[0] for (s, d, u), v in self._by_pair.items() if s == src and d == dst and (purpose is None or u == purpose)))

    @property
    def total_cost(self) -> float:
        with self._lock:
            return sum(v[1] for v in self._by_provider.values()) + sum(v[1] for (s, d, u), v in self._by_pair.items() if u == "sync")

    def summary(self) -> dict[str, Any]:
        """JSON-able totals: per provider (read/write bytes and cost by purpose), per pair, total."""
        with self._lock:
            providers: dict[str, Any] = {}
            for (p, d, u), (n, c) in sorted(self._by_provider.items()):
                row = providers.setdefault(p, {"read_bytes": 0, "write_bytes": 0, "cost": 0.0, "by_purpose": {}})
                row[f"{d}_bytes"] += int(n)
                row["cost"] = round(row["cost"] + c, 6)
                pu = row["by_purpose"].setdefault(u, {"read_bytes": 0, "write_bytes": 0, "cost": 0.0})
                pu[f"{d}_bytes"] += int(n)
                pu["cost"] = round(pu["cost"] + c, 6)
            pairs: dict[str, Any] = {}
            for (s, d, u), (n, c) in sorted(self._by_pair.items()):
                row = pairs.setdefault(f"{s}->{d}", {"bytes": 0, "cost": 0.0, "by_purpose": {}})
                row["bytes"] += int(n)
                row["cost"] = round(row["cost"] + c, 6)
                row["by_purpose"][u] = {"bytes": int(n), "cost": round(c, 6)}
            total = sum(v[1] for v in self._by_provider.values()) + sum(v[1] for (s, d, u), v in self._by_pair.items() if u == "sync")
            return {"providers": providers, "pairs": pairs, "total_cost": round(total, 6), "saved_by_read_order": round(self._saved, 6)}

    def lines(self) -> list[str]:
        """The summary as short human lines (for the CLI)."""
        s = self.summary()
        out = []
        for p, row in s["providers"].items():
            out.append(f"{p}: read {row['read_bytes'] / 1e6:.1f} MB, wrote {row['write_bytes'] / 1e6:.1f} MB, cost {row['cost']:.4f}")
        for pair, row in s["pairs"].items():
            out.append(f"{pair}: {row['bytes'] / 1e6:.1f} MB, cost {row['cost']:.4f} ({', '.join(sorted(row['by_purpose']))})")
        out.append(f"total cost {s['total_cost']:.4f}" + (f" (saved {s['saved_by_read_order']:.4f} by reading from cheaper replicas)" if s["saved_by_read_order"] else ""))
        return out

