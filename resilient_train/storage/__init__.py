"""Storage: the Store protocol and its backends. The only package that imports fsspec."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Store, check_relpath, join
from .fsspec_store import FsspecStore
from .local import LocalStore
from .redact import redact, redact_options

__all__ = ["Store", "LocalStore", "FsspecStore", "open_store", "check_relpath", "join", "redact", "redact_options"]


def open_store(uri: "str | Store", storage_options: Mapping[str, Any] | None = None, name: str | None = None) -> Store:
    """Return a Store for ``uri``: a local folder (plain path or ``file://``) or any fsspec URL.

    A Store passed in is returned unchanged. No I/O happens here.
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
    return FsspecStore(uri, storage_options, name=name)
