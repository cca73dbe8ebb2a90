"""A Store over any fsspec filesystem (s3://, gs://, az://, abfs://, memory://, ...).

This module and its siblings in ``storage/`` are the only places that import fsspec; cloud
clients (s3fs, gcsfs, adlfs) are imported lazily by fsspec when their scheme is first used.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping

from ..errors import ConfigError, StorageError, StoreNotFoundError, StorePermissionError
from .base import check_relpath
from .redact import redact

__all__ = ["FsspecStore"]

log = logging.getLogger(__name__)


class FsspecStore:
    """Store rooted at ``uri`` on an fsspec filesystem.

    ``storage_options`` are passed to fsspec unchanged (endpoint URLs, credentials, ...). The
    filesystem object is created lazily on first use, so construction does no I/O.
    """

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None, name: str | None = None, _fs: Any = None, _root: str | None = None):
        self._uri = uri.rstrip("/")
        self._options = dict(storage_options or {})
        self.name = name or redact(self._uri)
        self._fs = _fs
        self._root_path = _root

    @property
    def uri(self) -> str:
        return redact(self._uri)

    def __repr__(self) -> str:
        return f"FsspecStore({self.uri!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._root_path = fsspec.core.url_to_fs(self._uri, **self._options)
            except (ImportError, ValueError) as exc:
                scheme = self._uri.split("://", 1)[0]
                extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}.get(scheme)
                hint = f"; install it with: pip install 'resilient-train[{extra}]'" if extra else ""
                raise ConfigError(f"cannot open storage {self.uri!r} for provider {self.name!r}: {redact(str(exc))}{hint}") from None
            self._root_path = self._root_path.rstrip("/")
        return self._fs

    def _full(self, path: str, *, allow_empty: bool = False) -> str:
        fs = self.fs
        rel = check_relpath(path, allow_empty=allow_empty)
        del fs
        return f"{self._root_path}/{rel}" if rel else self._root_path

    def _wrap(self, exc: BaseException, path: str) -> StorageError:
        msg = redact(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, FileNotFoundError):
            return StoreNotFoundError(f"{path!r} does not exist under {self.uri}", provider=self.name, path=path)
        if isinstance(exc, PermissionError):
            return StorePermissionError(f"access denied for {path!r} under {self.uri}: {msg}; check the provider's credentials", provider=self.name, path=path)
        return StorageError(f"{path!r} under {self.uri}: {msg}", provider=self.name, path=path)

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        full = self._full(path)
        try:
            f = self.fs.open(full, "wb")
        except Exception as exc:  # noqa: BLE001 - every backend error is mapped to the tree
            raise self._wrap(exc, path) from exc
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)
            try:
                if callable(discard):
                    discard()
                else:
                    f.close()
                    self.fs.rm(full)
            except Exception:  # noqa: BLE001 - best effort cleanup; the original error wins
                log.debug("cleanup of partial %s failed", redact(full))
            raise
        try:
            f.close()
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        full = self._full(path)
        try:
            f = self.fs.open(full, "rb")
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc
        with f:
            yield f

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        full = self._full(path)
        try:
            return self.fs.cat_file(full, start=start, end=end)
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._full(path)
        try:
            self.fs.pipe_file(full, bytes(data))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def exists(self, path: str) -> bool:
        full = self._full(path, allow_empty=True)
        try:
            return bool(self.fs.exists(full))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def size(self, path: str) -> int:
        full = self._full(path)
        try:
            return int(self.fs.size(full))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def list(self, path: str = "") -> list[str]:
        full = self._full(path, allow_empty=True)
        try:
            self.fs.invalidate_cache(full)
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc
        prefix = full.rstrip("/") + "/"
        names = set()
        for e in entries:
            e = e.rstrip("/")
            if e.startswith(prefix):
                e = e[len(prefix):]
            name = e.split("/")[0] if "/" in e else e.rsplit("/", 1)[-1]
            if name:
                names.add(name)
        return sorted(names)

    def delete(self, path: str, recursive: bool = False) -> None:
        full = self._full(path)
        try:
            self.fs.rm(full, recursive=recursive)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def sync_folder(self, path: str) -> None:
        """Object stores have no folder entries to sync: a completed upload is durable."""

    def child(self, path: str) -> "FsspecStore":
        rel = check_relpath(path)
        return FsspecStore(f"{self._uri}/{rel}", self._options, name=self.name, _fs=self._fs, _root=(f"{self._root_path}/{rel}" if self._fs is not None else None))
