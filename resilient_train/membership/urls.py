"""Membership store URLs: :func:`open_kvstore` turns a URL from the config into a KVStore.

=====================================================  =================================================
``tcp://host:port``                                    a client of the ``TCPStore`` some process hosts
``tcp://host:port?host=1``                             host the ``TCPStore`` in this process (bind to
                                                       ``host``) and use it; fails if the port is taken
``tcp://host:port?host=auto``                          host it if the port is free here, else connect
                                                       (the first group to start on that machine hosts)
``etcd://h1:p1,h2:p2,h3:p3``                           :class:`~.etcd.EtcdKVStore` over those members
``etcd://h1:p1,.../some/prefix``                       the same, every key under ``some/prefix/``
``memory://name``                                      :class:`~.kvstore.MemoryKVStore`, shared by name
                                                       within this process (tests)
=====================================================  =================================================

The store is opened and probed (one read) before it is returned, so a URL that cannot work fails
here, at start, within ``timeout_s``, with an error that says what to change: a bad URL raises
:class:`~resilient_train.errors.ConfigError`, a store that does not answer
:class:`~resilient_train.errors.MembershipStoreError`.
"""

from __future__ import annotations

import threading
import urllib.parse
from datetime import timedelta

from ..errors import ConfigError, MembershipStoreError
from .etcd import EtcdKVStore, parse_endpoints
from .kvstore import KVStore, MemoryKVStore, TCPKVStore

__all__ = ["open_kvstore"]

_SCHEMES = ("tcp", "etcd", "memory")
_MEMORY: dict[str, MemoryKVStore] = {}
_MEMORY_LOCK = threading.Lock()
_PROBE_KEY = "rt-probe"


def _host_port(netloc: str, url: str) -> tuple[str, int]:
    host, sep, port = netloc.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"membership URL {url!r}: give host:port, e.g. tcp://127.0.0.1:29600")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"membership URL {url!r}: the port must be a number in 1..65535, got {port!r}")
    return host.strip("[]"), int(port)


def _open_tcp(url: str, parts: urllib.parse.SplitResult, timeout: timedelta) -> KVStore:
    host, port = _host_port(parts.netloc, url)
    if parts.path not in ("", "/"):
        raise ConfigError(f"membership URL {url!r}: a tcp:// store has no path; namespace members with "
                          f"Membership(prefix=...) instead")
    query = urllib.parse.parse_qs(parts.query)
    unknown = set(query) - {"host"}
    if unknown:
        raise ConfigError(f"membership URL {url!r}: unknown option(s) {sorted(unknown)}; the only one is "
                          f"host=1|0|auto")
    mode = query.get("host", ["0"])[-1].lower()
    if mode not in ("1", "true", "0", "false", "auto"):
        raise ConfigError(f"membership URL {url!r}: host= must be 1, 0 or auto, got {mode!r}")
    if mode in ("1", "true", "auto"):
        try:
            return TCPKVStore.host(port, bind=host, connect_timeout=timeout)
        except MembershipStoreError:
            if mode != "auto":
                raise
    kv = TCPKVStore(host, port, connect_timeout=timeout)
    _probe(kv, url, timeout, "start the process that hosts the TCPStore first (or add ?host=1 to host it "
                             "here), and check host and port")
    return kv


def _probe(kv: KVStore, url: str, timeout: timedelta, fix: str) -> None:
    """One read, so that a store that cannot answer fails at start, within ``timeout``."""
    try:
        kv.get(_PROBE_KEY, timeout=timeout)
    except MembershipStoreError as exc:
        raise MembershipStoreError(f"membership store {url} did not answer within {timeout}: {fix}. ({exc})") from exc


def open_kvstore(url: str, *, timeout_s: float = 10.0, request_timeout_s: float = 1.0) -> KVStore:
    """Open the membership store named by ``url`` (table in the module docstring) and check
    that it answers within ``timeout_s``. ``request_timeout_s``: etcd's per-endpoint bound
    before failing over to the next member."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"membership URL {url!r} must look like tcp://host:port, "
                          f"etcd://host:port[,host:port...] or memory://name")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
    timeout = timedelta(seconds=timeout_s)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"membership URL {url!r}: unknown scheme {parts.scheme!r}; use one of "
                          f"{', '.join(s + '://' for s in _SCHEMES)}")
    if scheme == "memory":
        name = (parts.netloc + parts.path).strip("/")
        if not name:
            raise ConfigError(f"membership URL {url!r}: give a name, e.g. memory://test-job")
        with _MEMORY_LOCK:
            return _MEMORY.setdefault(name, MemoryKVStore()).clone()
    if scheme == "tcp":
        return _open_tcp(url, parts, timeout)
    # etcd: urlsplit cannot parse several host:port in one netloc, so split by hand
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    if parts.query or parts.fragment:
        raise ConfigError(f"membership URL {url!r}: etcd:// takes no options; write "
                          f"etcd://host:port[,host:port...][/key-prefix]")
    try:
        endpoints = parse_endpoints(netloc)
    except ConfigError as exc:
        raise ConfigError(f"membership URL {url!r}: {exc}") from None
    prefix = path.strip("/")
    kv = EtcdKVStore(endpoints, prefix=prefix + "/" if prefix else "", request_timeout_s=request_timeout_s)
    _probe(kv, url, timeout, "check that etcd (v3.4 or later) listens on those client URLs over plain HTTP "
                             "and that a majority of its members is up")
    return kv


def _reset_memory_stores() -> None:  # tests
    with _MEMORY_LOCK:
        _MEMORY.clear()
