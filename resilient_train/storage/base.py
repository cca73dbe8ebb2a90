"""The Store protocol: the only way the rest of the library touches bytes on storage.

A Store is rooted at one URI (a local folder, ``s3://bucket/prefix``, ``memory://x`` ...). Every
method takes a *relative* path with ``/`` separators; paths that try to leave the root are
refused with :class:`~resilient_train.errors.UnsafePathError` before any I/O.

Promises every implementation keeps (checked by ``resilient_train.testing.store_conformance``):

* ``open_write(p)`` yields a binary file; the object exists under ``p`` only once the context
  exits without an exception, and it is durable then (local: flushed and fsynced; object
  stores: the upload completed). If the body raises, nothing readable is left under ``p``
  that could be mistaken for a complete file by a reader that checks sizes and hashes.
* ``open_read(p)`` yields a binary file supporting ``read``, ``readinto``, ``seek``.
* ``list(p)`` returns the names (not paths) of the immediate children of folder ``p``, sorted;
  a missing folder lists as empty.
* ``write_bytes_exclusive(p, data)`` creates ``p`` only if nothing is there (local: exclusive
  create; S3 and Azure: ``If-None-Match: *``; GCS: ``ifGenerationMatch=0``). Of several
  concurrent callers exactly one succeeds; the others raise
  :class:`~resilient_train.errors.StoreConflictError`. It is how a manifest is committed.
* Missing objects raise :class:`~resilient_train.errors.StoreNotFoundError`.
* Error messages name the store by ``name`` and never contain credentials.
"""

from __future__ import annotations

import posixpath
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, runtime_checkable

from ..errors import UnsafePathError

__all__ = ["Store", "check_relpath", "join"]


@runtime_checkable
class Store(Protocol):
    """Byte storage rooted at one URI. See the module docstring for the promises."""

    name: str
    """Short name used in logs and errors (a provider name, or the redacted URI)."""

    @property
    def uri(self) -> str:
        """The root URI with any credentials removed: safe to print."""
        ...

    def open_write(self, path: str) -> AbstractContextManager[BinaryIO]: ...

    def open_read(self, path: str) -> AbstractContextManager[BinaryIO]: ...

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes: ...

    def write_bytes(self, path: str, data: bytes) -> None: ...

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data`` only if no object is there (atomic, durable).
        Raises StoreConflictError when one is, whatever its content."""
        ...

    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int: ...

    def list(self, path: str = "") -> list[str]: ...

    def delete(self, path: str, recursive: bool = False) -> None: ...

    def sync_folder(self, path: str) -> None:
        """Make the folder entries under ``path`` durable (fsync the directory locally)."""
        ...

    def child(self, path: str) -> "Store":
        """A Store rooted at ``path`` below this one (same backend, same credentials)."""
        ...


def check_relpath(path: str, *, allow_empty: bool = False) -> str:
    """Return ``path`` normalised, or raise UnsafePathError if it could leave the root.

    Refused: absolute paths, ``..`` components, backslashes, drive letters, NUL bytes, and
    empty components such as ``a//b``.
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"path must be a str, got {type(path).__name__}")
    if path in ("", ".") and allow_empty:
        return ""
    if not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"unsafe path {path!r}: empty, NUL or backslash")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePathError(f"unsafe path {path!r}: absolute paths are not allowed")
    parts = path.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"unsafe path {path!r}: component {part!r} is not allowed")
    return "/".join(parts)


def join(*parts: str) -> str:
    """Join relative path parts with ``/`` (skipping empty ones) and check the result."""
    joined = posixpath.join(*[p for p in parts if p])
    return check_relpath(joined, allow_empty=True)
