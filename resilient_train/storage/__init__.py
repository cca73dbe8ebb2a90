"""Storage: the Store protocol and its backends. The only package that imports fsspec.

* :func:`open_store` turns a URI into a Store (remote ones retry transient failures).
* :mod:`.providers`: providers, a replication policy with data residency, pure placement.
* :mod:`.transfer`: verified streaming copies between stores, run concurrently.
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import Store
from .fsspec_store import FsspecStore
from .local import LocalStore
from .redact import redact
from .retry import NO_RETRY, RetryingStore, RetryPolicy, classify

__all__ = [
    "Store",
    "LocalStore",
    "FsspecStore",
    "RetryingStore",
    "RetryPolicy",
    "NO_RETRY",
    "classify",
    "open_store",
    "redact",
]


def open_store(
    uri: "str | Store",
    storage_options: Mapping[str, Any] | None = None,
    name: str | None = None,
    *,
    retry: RetryPolicy | None = None,
    block_size_bytes: int | None = None,
) -> Store:
    """Return a Store for ``uri``: a local folder (plain path or ``file://``) or any fsspec URL.

    Remote stores are wrapped in :class:`RetryingStore` with ``retry`` (default
    :class:`RetryPolicy`); pass :data:`NO_RETRY` to see every failure. A Store passed in is
    returned unchanged. No I/O happens here.
    """
    if not isinstance(uri, str):
        if isinstance(uri, Store):
            return uri
        raise TypeError(f"expected a URI string or a Store, got {type(uri).__name__}")
    if not uri:
        from ..errors import ConfigError

        raise ConfigError("empty storage URI: pass a local folder or a URL such as s3://bucket/prefix")
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):], name=name)
    if "://" not in uri and "::" not in uri:
        return LocalStore(uri, name=name)
    policy = retry or RetryPolicy()
    kw = {"block_size_bytes": block_size_bytes} if block_size_bytes else {}
    inner = FsspecStore(uri, storage_options, name=name, call_timeout_s=policy.call_timeout_s, **kw)
    return RetryingStore(inner, policy)
