"""A Store over any fsspec filesystem (s3://, gs://, az://, abfs://, memory://, ...).

This module and its siblings in ``storage/`` are the only places that import fsspec; cloud
clients (s3fs, gcsfs, adlfs) are imported lazily by fsspec when their scheme is first used.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping

from ..errors import ConfigError, StorageError, StoreNotFoundError, StorePermissionError, StoreTransientError
from .base import check_relpath
from .redact import redact, redact_options
from .retry import classify

__all__ = ["FsspecStore", "client_defaults"]

log = logging.getLogger(__name__)


class FsspecStore:
    """Store rooted at ``uri`` on an fsspec filesystem.

    ``storage_options`` are passed to fsspec (endpoint URLs, credentials, ...); for s3, gs and
    az/abfs, client-side timeouts are filled in when not given, and the client's own retry
    loop is kept short because :class:`~resilient_train.storage.retry.RetryingStore` above this
    store owns the retry budget. The filesystem object is created lazily on first use, so
    construction does no I/O. ``call_timeout_s`` bounds every call to an async backend (s3fs,
    gcsfs, adlfs); ``block_size_bytes`` is the part size of multipart / block uploads.

    Errors are mapped to the tree: not found -> StoreNotFoundError, access denied or missing
    credentials -> StorePermissionError, timeouts/throttling/5xx/resets -> StoreTransientError
    (retried by RetryingStore), anything else -> StorageError. Messages are redacted.
    """

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        _fs: Any = None,
        _root: str | None = None,
        *,
        call_timeout_s: float = 300.0,
        block_size_bytes: int | None = None,
    ):
        self._uri = uri.rstrip("/")
        self._options = dict(storage_options or {})
        self.name = name or redact(self._uri)
        self._fs = _fs
        self._root_path = _root
        self.call_timeout_s = call_timeout_s
        self.block_size_bytes = block_size_bytes

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
                self._fs, self._root_path = fsspec.core.url_to_fs(self._uri, **client_defaults(self._uri, self._options))
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
        kind = classify(exc)
        if kind == "not_found":
            return StoreNotFoundError(f"{path!r} does not exist under {self.uri}", provider=self.name, path=path)
        if kind == "permission":
            return StorePermissionError(f"access denied for {path!r} under {self.uri}: {msg}; check the provider's credentials", provider=self.name, path=path)
        if kind == "transient":
            return StoreTransientError(f"{path!r} under {self.uri}: {msg}", provider=self.name, path=path)
        return StorageError(f"{path!r} under {self.uri}: {msg}", provider=self.name, path=path)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``fs.method``; on an async backend call its coroutine under ``call_timeout_s``."""
        fs = self.fs
        coro = getattr(fs, f"_{method}", None)
        if getattr(fs, "async_impl", False) and coro is not None:
            from fsspec.asyn import sync

            return sync(fs.loop, coro, *args, timeout=self.call_timeout_s, **kwargs)
        return getattr(fs, method)(*args, **kwargs)

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        full = self._full(path)
        try:
            extra = {"block_size": self.block_size_bytes} if self.block_size_bytes else {}
            f = self.fs.open(full, "wb", **extra)
        except Exception as exc:  # noqa: BLE001 - every backend error is mapped to the tree
            raise self._wrap(exc, path) from exc
        try:
            yield f
        except BaseException:
            # Abort the upload (multipart parts are dropped), then make sure no object is left:
            # some backends (memory://) create the entry at open time.
            discard = getattr(f, "discard", None)
            try:
                if callable(discard):
                    discard()
                    try:
                        f.closed = True  # a discarded buffered file must not flush again in __del__
                    except AttributeError:
                        pass
                else:
                    f.close()
                if self.fs.exists(full):
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
            return self._run("cat_file", full, start=start, end=end)
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._full(path)
        try:
            self._run("pipe_file", full, bytes(data))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def exists(self, path: str) -> bool:
        full = self._full(path, allow_empty=True)
        try:
            return bool(self._run("exists", full))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def size(self, path: str) -> int:
        full = self._full(path)
        try:
            return int(self._run("size", full))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def list(self, path: str = "") -> list[str]:
        full = self._full(path, allow_empty=True)
        try:
            self.fs.invalidate_cache(full)
            entries = self._run("ls", full, detail=False)
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
            self._run("rm", full, recursive=recursive)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def sync_folder(self, path: str) -> None:
        """Object stores have no folder entries to sync: a completed upload is durable."""

    def child(self, path: str) -> "FsspecStore":
        rel = check_relpath(path)
        return FsspecStore(
            f"{self._uri}/{rel}",
            self._options,
            name=self.name,
            _fs=self._fs,
            _root=(f"{self._root_path}/{rel}" if self._fs is not None else None),
            call_timeout_s=self.call_timeout_s,
            block_size_bytes=self.block_size_bytes,
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        """The options with secrets masked: safe to print."""
        return redact_options(self._options)


def client_defaults(uri: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus client timeouts (and a short client-side retry loop) where not given.

    The values only fill gaps: anything the user set wins.
    """
    out = dict(options)
    scheme = uri.split("://", 1)[0].split("::")[-1] if "://" in uri else ""
    if scheme in ("s3", "s3a"):
        cfg = dict(out.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", 10)
        cfg.setdefault("read_timeout", 120)
        cfg.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        out["config_kwargs"] = cfg
    elif scheme in ("gs", "gcs"):
        out.setdefault("requests_timeout", 120)
        out.setdefault("timeout", 300)
    elif scheme in ("az", "abfs", "abfss"):
        out.setdefault("connection_timeout", 10)
        out.setdefault("read_timeout", 120)
    return out
