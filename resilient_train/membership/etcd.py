""":class:`EtcdKVStore`: the :class:`~.kvstore.KVStore` protocol over etcd v3's JSON gateway.

etcd v3 (3.4 and later) serves its KV API as JSON over HTTP at ``/v3/kv/range``, ``/v3/kv/put``
and ``/v3/kv/txn`` on every client URL, keys and values base64-encoded. This module is a small
client of exactly those three calls over ``http.client`` (standard library), rather than a
client package, because what membership needs from the client is failover and bounded calls:

* **Several endpoints.** Each call goes to the endpoint that answered last; on a connection
  error, a reset, a per-request timeout (``request_timeout_s``) or an etcd "unavailable" answer
  (no leader, the member is stopping) it moves to the next endpoint, round after round, until the
  call's own ``timeout`` runs out. Losing one member of three costs a caller at most one
  ``request_timeout_s`` (a hung member) or one refused connection (a dead one), plus etcd's own
  leader election when the lost member led (reads and writes are linearizable).
  (``etcd3gw``, the maintained gateway client, talks to one endpoint and leaves failover,
  per-attempt timeouts and retry safety to the caller: that is all this module does.)
* **compare_set** is one etcd transaction: ``create_revision == 0`` (the key is missing) when
  ``expected`` is ``None``, else ``value == expected``; the failure branch reads the key, so the
  value held afterwards comes back in the same round trip.
* **add** is a transaction loop on the key's ``mod_revision`` that also writes a per-handle
  marker ``<nonce> <new value>`` (key ``<prefix>\\x00rt-add/<handle>``). A request retried after
  a lost answer cannot add twice: the retry's compare fails, and its failure branch returns the
  marker, which says the first attempt landed. (One small marker key per handle that ever
  called ``add``; nothing else is written besides the caller's keys.)
* ``set`` is a put (idempotent, so retried freely); ``get`` a range (``None`` when missing).

Keys are the caller's ``str`` keys under ``prefix`` (UTF-8). Every call raises
:class:`~resilient_train.errors.MembershipStoreError` when no endpoint answers within its
``timeout``, naming the endpoints and the last error. The constructor does no I/O; each handle
keeps one keep-alive connection and serialises its calls; :meth:`clone` gives another thread
its own. No TLS or authentication (see docs/membership.md).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Sequence

from ..errors import ConfigError, MembershipStoreError

__all__ = ["EtcdKVStore", "parse_endpoints"]

log = logging.getLogger(__name__)

# gRPC status codes etcd answers with when another member may do better: UNAVAILABLE ("no
# leader", "server stopped"), DEADLINE_EXCEEDED ("request timed out"), ABORTED, and
# INTERNAL/UNKNOWN that some 3.x versions return while a member shuts down.
_RETRY_CODES = {2, 4, 10, 13, 14}
_ADD_MARKER = "\x00rt-add/"


class _Unavailable(Exception):
    """One endpoint could not answer this attempt (try the next one)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """``"h1:p1,h2:p2"`` -> ``[("h1", p1), ("h2", p2)]``; :class:`ConfigError` saying what to fix."""
    out = []
    for part in text.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not part or not sep or not host:
            raise ConfigError(f"etcd endpoint {part!r} must be host:port (e.g. 127.0.0.1:2379), "
                              f"several separated by commas")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"etcd endpoint {part!r}: the port must be a number in 1..65535")
        out.append((host.strip("[]"), int(port)))
    return out


class EtcdKVStore:
    """:class:`~.kvstore.KVStore` over one etcd v3 cluster (see the module docstring).

    ``endpoints``: ``[(host, port), ...]`` or ``"h1:p1,h2:p2"``, the cluster's client URLs
    (plain HTTP). ``prefix``: prepended to every key (a namespace; ``""`` for none).
    ``request_timeout_s``: the bound on one request to one endpoint, after which the next is
    tried. ``api_path``: the gateway's root (``/v3/`` for etcd >= 3.4)."""

    def __init__(self, endpoints: str | Sequence[tuple[str, int]], *, prefix: str = "",
                 request_timeout_s: float = 1.0, api_path: str = "/v3/"):
        eps = parse_endpoints(endpoints) if isinstance(endpoints, str) else [(str(h), int(p)) for h, p in endpoints]
        if not eps:
            raise ConfigError("EtcdKVStore needs at least one endpoint host:port")
        if not request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
        self.endpoints = eps
        self.prefix = prefix
        self.request_timeout_s = float(request_timeout_s)
        self.api_path = "/" + api_path.strip("/") + "/"
        self._current = 0
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._marker = f"{prefix}{_ADD_MARKER}{os.urandom(8).hex()}"
        self.failovers = 0  # how many times a call moved to another endpoint (for tests and logs)

    def __repr__(self) -> str:
        return f"EtcdKVStore({','.join(f'{h}:{p}' for h, p in self.endpoints)!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ transport

    def _attempt(self, path: str, body: bytes, timeout_s: float) -> dict:
        host, port = self.endpoints[self._current]
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                self._conn.connect()
            else:
                self._conn.timeout = timeout_s  # used if http.client reconnects
                if self._conn.sock is not None:
                    self._conn.sock.settimeout(timeout_s)
            self._conn.request("POST", self.api_path + path, body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, half-closed
            self.close()
            raise _Unavailable(f"{host}:{port}: {type(exc).__name__}: {exc}") from exc
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            self.close()
            raise _Unavailable(f"{host}:{port}: HTTP {resp.status}, not JSON: {raw[:200]!r}") from None
        if resp.status != 200:
            code = doc.get("code") if isinstance(doc, dict) else None
            msg = f"{host}:{port}: HTTP {resp.status} {doc.get('error') or doc.get('message') or raw[:200]!r}"
            if code in _RETRY_CODES or resp.status >= 500:
                raise _Unavailable(msg)
            raise MembershipStoreError(f"etcd refused {path}: {msg} (code {code})")
        return doc

    def _request(self, path: str, payload: dict, what: str, key: str, timeout: timedelta) -> dict:
        """POST to the current endpoint, failing over until ``timeout``. Callers make every
        request safe to repeat (see add())."""
        body = json.dumps(payload).encode()
        deadline = time.monotonic() + timeout.total_seconds()
        errors: list[str] = []
        tried_this_round = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                eps = ",".join(f"{h}:{p}" for h, p in self.endpoints)
                raise MembershipStoreError(f"etcd {what} {key!r}: no endpoint of {eps} answered within "
                                           f"{timeout} (last errors: {'; '.join(errors[-3:]) or 'none'}); "
                                           f"check that etcd runs there and a majority of its members is up")
            try:
                return self._attempt(path, body, min(self.request_timeout_s, remaining))
            except _Unavailable as exc:
                errors.append(str(exc))
                self._current = (self._current + 1) % len(self.endpoints)
                self.failovers += 1
                tried_this_round += 1
                log.debug("etcd %s %r: %s; trying %s:%d", what, key, exc, *self.endpoints[self._current])
                if tried_this_round >= len(self.endpoints):  # every endpoint failed once: back off a little
                    tried_this_round = 0
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _k(self, key: str) -> str:
        return _b64((self.prefix + key).encode())

    @staticmethod
    def _kv_of(range_response: dict) -> dict | None:
        kvs = range_response.get("kvs") or []
        return kvs[0] if kvs else None

    # ------------------------------------------------------------------ KVStore

    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
        with self._lock:
            self._request("kv/put", {"key": self._k(key), "value": _b64(bytes(value))}, "set", key, timeout)

    def get(self, key: str, *, timeout: timedelta) -> bytes | None:
        with self._lock:
            kv = self._kv_of(self._request("kv/range", {"key": self._k(key)}, "get", key, timeout))
        return None if kv is None else _unb64(kv.get("value"))

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        # A retry after a lost answer is safe: if the first attempt landed, the retry's compare
        # fails and its failure branch reads the value the first one wrote.
        k = self._k(key)
        if expected is None:
            compare = {"target": "CREATE", "key": k, "create_revision": "0", "result": "EQUAL"}
        else:
            compare = {"target": "VALUE", "key": k, "value": _b64(bytes(expected)), "result": "EQUAL"}
        txn = {"compare": [compare], "success": [{"request_put": {"key": k, "value": _b64(bytes(desired))}}],
               "failure": [{"request_range": {"key": k}}]}
        with self._lock:
            resp = self._request("kv/txn", txn, "compare_set", key, timeout)
        if resp.get("succeeded"):
            return bytes(desired)
        kv = self._kv_of(resp["responses"][0]["response_range"])
        return b"" if kv is None else _unb64(kv.get("value"))

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int:
        k, marker = self._k(key), _b64(self._marker.encode())
        nonce = os.urandom(8).hex()
        reads = [{"request_range": {"key": k}}, {"request_range": {"key": marker}}]
        deadline = time.monotonic() + timeout.total_seconds()
        with self._lock:
            state = self._request("kv/txn", {"success": reads}, "add", key, timeout)  # read both, atomically
            while True:
                responses = state["responses"]
                mark = self._kv_of(responses[1]["response_range"])
                if mark is not None:
                    mark_nonce, _, mark_value = _unb64(mark.get("value")).decode().partition(" ")
                    if mark_nonce == nonce:  # an earlier attempt of this call landed; its answer was lost
                        return int(mark_value)
                cur = self._kv_of(responses[0]["response_range"])
                if cur is None:
                    compare = {"target": "CREATE", "key": k, "create_revision": "0", "result": "EQUAL"}
                    value = 0
                else:
                    compare = {"target": "MOD", "key": k, "mod_revision": cur["mod_revision"], "result": "EQUAL"}
                    try:
                        value = int(_unb64(cur.get("value")) or b"0")
                    except ValueError:
                        held = _unb64(cur.get("value"))[:40]
                        raise MembershipStoreError(f"etcd add {key!r}: the key holds {held!r}, not a counter") from None
                new = value + amount
                if amount == 0:
                    return new
                txn = {"compare": [compare],
                       "success": [{"request_put": {"key": k, "value": _b64(str(new).encode())}},
                                   {"request_put": {"key": marker, "value": _b64(f"{nonce} {new}".encode())}}],
                       "failure": reads}
                left = timedelta(seconds=max(0.0, deadline - time.monotonic()))
                state = self._request("kv/txn", txn, "add", key, left)
                if state.get("succeeded"):
                    return new

    def clone(self) -> "EtcdKVStore":
        """Another handle (its own connection and add marker), for use from another thread."""
        other = EtcdKVStore(self.endpoints, prefix=self.prefix, request_timeout_s=self.request_timeout_s,
                            api_path=self.api_path)
        other._current = self._current
        return other

    def close(self) -> None:
        """Close this handle's connection (the next call opens a new one). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
