"""The key-value store membership runs on: a four-call protocol and its implementations.

:class:`KVStore` is all the membership service needs: ``set``, ``get`` (``None`` when the key
is missing; never blocks waiting for it), ``add`` (an atomic counter) and ``compare_set`` (an
atomic "set if the value is still what I expect"; ``expected=None`` means "only if missing").
Every call takes ``timeout`` and raises :class:`~resilient_train.errors.MembershipStoreError`
when the store cannot answer in time. Values are bytes; keys are ``str``. ``clone()`` returns a
handle that another thread may use concurrently (the heartbeat thread gets its own).

Implementations:

* :class:`TCPKVStore`: torch's ``TCPStore`` (no extra server: one long-lived process hosts it,
  e.g. the launcher; ``TCPKVStore.host(port=0)`` starts one in this process). Its
  :meth:`torch_store` is the native store, so gloo rendezvous runs in C++.
* :class:`MemoryKVStore`: a dict behind a lock, for unit tests and thread ranks.
* :class:`~.etcd.EtcdKVStore` (``membership/etcd.py``): an etcd v3 cluster, failing over
  between its members.
* Anything else (Consul, Redis...) plugs in by implementing the four calls plus ``clone()``;
  :class:`KVTorchStore` then turns it into a ``torch.distributed.Store`` for the epoch's gloo
  rendezvous (as for etcd). Every implementation runs the same contract test
  (``tests/test_membership_kvstore.py``). :func:`~.urls.open_kvstore` opens one from a URL.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError, MembershipStoreError

__all__ = ["KVStore", "TCPKVStore", "MemoryKVStore", "KVTorchStore", "torch_store_for"]


@runtime_checkable
class KVStore(Protocol):
    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None: ...

    def get(self, key: str, *, timeout: timedelta) -> bytes | None: ...

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int: ...

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        """Atomically: if the key's value is ``expected`` (``None``: the key is missing), set it to
        ``desired``. Returns the value held after the call (``desired`` when this call won)."""
        ...

    def clone(self) -> "KVStore": ...


class TCPKVStore:
    """:class:`KVStore` over torch's ``TCPStore``. The constructor does no I/O: the connection
    opens on first use. ``host``/``port`` name the server; :meth:`host` starts one here."""

    def __init__(self, host: str, port: int, *, connect_timeout: timedelta = timedelta(seconds=30),
                 _store: Any = None):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"port must be an int in 1..65535, got {port!r}")
        self.host_name = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._store = _store
        self._lock = threading.Lock()

    @classmethod
    def host(cls, port: int = 0, *, bind: str = "127.0.0.1",
             connect_timeout: timedelta = timedelta(seconds=30)) -> "TCPKVStore":
        """Start a TCPStore server in this process (``port=0``: a free one) and return a client
        of it. The server lives as long as the returned object (and its clones)."""
        import torch.distributed as dist

        try:
            master = dist.TCPStore(bind, port, None, is_master=True, timeout=connect_timeout,
                                   wait_for_workers=False)
        except Exception as exc:  # RuntimeError / DistStoreError from c10d
            raise MembershipStoreError(f"could not start a TCPStore on {bind}:{port}: {exc}") from exc
        return cls(bind, int(master.port), connect_timeout=connect_timeout, _store=master)

    def _client(self) -> Any:
        if self._store is None:
            import torch.distributed as dist

            left = self._wait_listening()
            try:
                self._store = dist.TCPStore(self.host_name, self.port, None, is_master=False,
                                            timeout=timedelta(seconds=max(left, 1.0)))
            except Exception as exc:
                raise MembershipStoreError(f"cannot reach the TCPStore at {self.host_name}:{self.port} "
                                           f"within {self.connect_timeout}: {exc}") from exc
        return self._store

    def _wait_listening(self) -> float:
        """Wait until the server accepts a plain TCP connection; return the seconds left of
        ``connect_timeout``. torch's client retries a refused connection with random back-off
        and overshot a 1.5 s timeout by up to 3.7 s on a loaded machine, printing a C++ stack
        per try; this check fails within the timeout and with one message."""
        deadline = time.monotonic() + self.connect_timeout.total_seconds()
        while True:
            left = deadline - time.monotonic()
            try:
                socket.create_connection((self.host_name, self.port), timeout=max(0.05, min(left, 1.0))).close()
                return deadline - time.monotonic()
            except OSError as exc:
                if deadline - time.monotonic() <= 0:
                    raise MembershipStoreError(f"cannot reach the TCPStore at {self.host_name}:{self.port} "
                                               f"within {self.connect_timeout}: {exc}") from exc
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _call(self, what: str, key: str, timeout: timedelta, fn: Any) -> Any:
        with self._lock:
            store = self._client()
            try:
                store.set_timeout(timeout)
                return fn(store)
            except Exception as exc:
                raise MembershipStoreError(f"TCPStore {what} {key!r} failed: {type(exc).__name__}: {exc}") from exc

    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
        self._call("set", key, timeout, lambda s: s.set(key, value))

    def get(self, key: str, *, timeout: timedelta) -> bytes | None:
        # check() first: TCPStore.get blocks until the key exists
        return self._call("get", key, timeout, lambda s: bytes(s.get(key)) if s.check([key]) else None)

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int:
        return int(self._call("add", key, timeout, lambda s: s.add(key, amount)))

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        if expected == b"" or desired == b"":
            raise ConfigError("TCPKVStore.compare_set: empty values are reserved for 'missing'")
        return bytes(self._call("compare_set", key, timeout,
                                lambda s: s.compare_set(key, expected if expected is not None else b"", desired)))

    def clone(self) -> "TCPKVStore":
        """A new client connection (its own socket), for use from another thread."""
        return TCPKVStore(self.host_name, self.port, connect_timeout=self.connect_timeout)

    def torch_store(self, prefix: str) -> Any:
        """A native torch Store under ``prefix`` on its own connection (for a gloo rendezvous)."""
        import torch.distributed as dist

        return dist.PrefixStore(prefix, self.clone()._client())


class MemoryKVStore:
    """:class:`KVStore` in this process's memory (tests, thread ranks). Clones share the data."""

    def __init__(self, _shared: tuple[dict, threading.Lock] | None = None):
        self._data, self._lock = _shared or ({}, threading.Lock())

    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
        with self._lock:
            self._data[key] = bytes(value)

    def get(self, key: str, *, timeout: timedelta) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int:
        with self._lock:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            return value

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        with self._lock:
            if self._data.get(key) == expected:
                self._data[key] = bytes(desired)
            return self._data.get(key, b"")

    def clone(self) -> "MemoryKVStore":
        return MemoryKVStore((self._data, self._lock))


_POLL_S = 0.01


def _kv_torch_store_class() -> type:
    import torch.distributed as dist

    class _KVTorchStore(dist.Store):
        """A ``torch.distributed.Store`` over any :class:`KVStore`, for gloo rendezvous.

        Blocking ``get``/``wait`` poll the KV store until ``timeout``. (torch's ``PrefixStore``
        cannot wrap a Python store in torch 2.13, so the prefix is applied here.)"""

        def __init__(self, kv: KVStore, prefix: str, timeout: timedelta, _cancelled: threading.Event | None = None):
            super().__init__()
            self._kv, self._prefix, self._timeout = kv, prefix.rstrip("/") + "/", timeout
            self._cancelled = _cancelled or threading.Event()  # shared with clones

        def cancel(self) -> None:
            """Make every wait of this store and its clones fail now: a rendezvous abandoned by
            its caller (``connect_cancellable``) ends at once instead of at its timeout."""
            self._cancelled.set()

        def _k(self, key: str) -> str:
            return self._prefix + key

        def set(self, key: str, value: Any) -> None:
            self._kv.set(self._k(key), value.encode() if isinstance(value, str) else bytes(value),
                         timeout=self._timeout)

        def get(self, key: str) -> bytes:
            self.wait([key])
            value = self._kv.get(self._k(key), timeout=self._timeout)
            assert value is not None  # internal: wait() returned, so the key exists (keys are never deleted)
            return value

        def add(self, key: str, amount: int) -> int:
            return self._kv.add(self._k(key), amount, timeout=self._timeout)

        def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
            exp = expected.encode() if isinstance(expected, str) else bytes(expected)
            des = desired.encode() if isinstance(desired, str) else bytes(desired)
            return self._kv.compare_set(self._k(key), exp or None, des, timeout=self._timeout)

        def check(self, keys: list[str]) -> bool:
            return all(self._kv.get(self._k(k), timeout=self._timeout) is not None for k in keys)

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
            limit = timeout if timeout is not None else self._timeout
            deadline = time.monotonic() + limit.total_seconds()
            while not self.check(keys):
                if self._cancelled.is_set():
                    raise MembershipStoreError(f"the rendezvous under {self._prefix!r} was abandoned")
                if time.monotonic() > deadline:
                    raise MembershipStoreError(f"keys {keys} did not appear under {self._prefix!r} within {limit}")
                time.sleep(_POLL_S)

        def multi_get(self, keys: list[str]) -> list[bytes]:
            return [self.get(k) for k in keys]

        def multi_set(self, keys: list[str], values: list[Any]) -> None:
            for k, v in zip(keys, values):
                self.set(k, v)

        def set_timeout(self, timeout: timedelta) -> None:
            self._timeout = timeout

        def delete_key(self, key: str) -> bool:
            raise NotImplementedError("membership stores never delete keys")

        def num_keys(self) -> int:
            raise NotImplementedError("KVStore has no key count")

        def has_extended_api(self) -> bool:
            return False

        def clone(self) -> "_KVTorchStore":
            return _KVTorchStore(self._kv.clone(), self._prefix, self._timeout, self._cancelled)

    return _KVTorchStore


_KV_TORCH_STORE: type | None = None


def KVTorchStore(kv: KVStore, prefix: str, timeout: timedelta) -> Any:  # noqa: N802 - a class to its callers
    """A ``torch.distributed.Store`` under ``prefix`` over ``kv`` (torch imported lazily)."""
    global _KV_TORCH_STORE
    if _KV_TORCH_STORE is None:
        _KV_TORCH_STORE = _kv_torch_store_class()
    return _KV_TORCH_STORE(kv, prefix, timeout)


def torch_store_for(kv: KVStore, prefix: str, timeout: timedelta) -> Any:
    """The torch Store a gloo group under ``prefix`` rendezvous on: the native one when ``kv``
    offers ``torch_store(prefix)`` (TCPKVStore), else :func:`KVTorchStore`."""
    native = getattr(kv, "torch_store", None)
    return native(prefix) if native is not None else KVTorchStore(kv, prefix, timeout)
