"""A Store over any fsspec filesystem (s3://, gs://, az://, abfs://, memory://, ...).

This module and its siblings in ``storage/`` are the only places that import fsspec; cloud
clients (s3fs, gcsfs, adlfs) are imported lazily by fsspec when their scheme is first used.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping

from ..errors import ConfigError, StorageError, StoreConflictError, StoreNotFoundError, StorePermissionError, StoreTransientError
from .base import check_relpath
from .multipart import AzureBlockWriter, S3MultipartWriter, is_azure, is_s3
from .redact import install_log_redaction, redact, redact_options, remember_secrets
from .retry import classify

__all__ = ["FsspecStore", "client_defaults", "DEFAULT_BLOCK_SIZE_BYTES"]

DEFAULT_BLOCK_SIZE_BYTES = 32 * 1024 * 1024
"""Part size of streamed uploads (multipart on S3, staged blocks on Azure, resumable chunks on
GCS). Larger than the clients' defaults (adlfs: 4 MiB) so a file moves in few requests."""

DEFAULT_SINGLE_PUT_BYTES = 64 * 1024 * 1024
"""Objects up to this size are written with one PUT from memory (see FsspecStore.open_write)."""

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
        block_size_bytes: int | None = DEFAULT_BLOCK_SIZE_BYTES,
        single_put_bytes: int = DEFAULT_SINGLE_PUT_BYTES,
    ):
        self._uri = uri.rstrip("/")
        self._options = dict(storage_options or {})
        self.name = name or redact(self._uri)
        self._fs = _fs
        self._root_path = _root
        self.call_timeout_s = call_timeout_s
        self.block_size_bytes = block_size_bytes
        self.single_put_bytes = single_put_bytes

    @property
    def uri(self) -> str:
        return redact(self._uri)

    def __repr__(self) -> str:
        return f"FsspecStore({self.uri!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            # Client libraries print headers and keys at DEBUG: mask this store's secrets in
            # every log record of the process, whoever configured logging.
            remember_secrets(self._options)
            install_log_redaction()
            try:
                self._fs, self._root_path = fsspec.core.url_to_fs(self._uri, **client_defaults(self._uri, self._options))
            except (ImportError, ValueError) as exc:
                scheme = self._uri.split("://", 1)[0]
                extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}.get(scheme)
                hint = f"; install it with: pip install 'resilient-train[{extra}]'" if extra else ""
                raise ConfigError(f"cannot open storage {self.uri!r} for provider {self.name!r}: {redact(str(exc))}{hint}") from None
            self._root_path = self._root_path.rstrip("/")
            _shorten_client_retries(self._fs)
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
        """Objects up to ``single_put_bytes`` are buffered and sent as one PUT on exit (the
        fastest request on every backend: adlfs streams 2-3x slower than one upload); larger
        ones switch to the backend's streamed multipart / block upload of ``block_size_bytes``
        parts. Either way nothing exists under ``path`` until the context exits cleanly.

        On S3 a streamed upload that fails with a transient error is parked, not aborted, and
        the next upload of the same path resumes it: parts already on the server whose size
        and ETag match the MD5 of the new attempt's bytes are not sent again (see
        :mod:`resilient_train.storage.multipart`). Any other failure aborts the upload."""
        full = self._full(path)
        self.fs  # noqa: B018 - resolve the filesystem (ConfigError) before the body runs
        w = _SpoolingWriter(self, full, path)
        try:
            yield w  # type: ignore[misc]
        except BaseException as exc:
            w.abort(exc)
            raise
        try:
            w.finish()
        except BaseException as exc:
            w.abort(exc)  # a failed completion leaves no partial object (S3: parts parked if transient)
            raise

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
            if start in (None, 0) and _range_not_satisfiable(exc):
                return b""  # a ranged read of an empty object: S3 answers 416, not zero bytes
            raise self._wrap(exc, path) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._full(path)
        try:
            self._run("pipe_file", full, bytes(data))
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, path) from exc

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        """One create-only PUT: ``mode="create"`` of s3fs (``If-None-Match: *``), gcsfs
        (``ifGenerationMatch=0``) and adlfs (``overwrite=False``: ``If-None-Match: *``).
        memory:// and local fsspec paths get an exists check under a lock (one process only)."""
        full = self._full(path)
        try:
            fs = self.fs
            if _is_conditional_backend(fs):
                self._run("pipe_file", full, bytes(data), mode="create")
            else:
                with _EXCLUSIVE_LOCK:
                    if fs.exists(full):
                        raise FileExistsError(full)
                    fs.pipe_file(full, bytes(data))
        except Exception as exc:  # noqa: BLE001
            if _is_conflict(exc):
                raise StoreConflictError(f"{path!r} already exists under {self.uri}", provider=self.name, path=path) from None
            raise self._wrap(exc, path) from exc
        finally:
            try:
                self.fs.invalidate_cache(full)
            except Exception:  # noqa: BLE001 - the cache is only an optimisation
                pass

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
            single_put_bytes=self.single_put_bytes,
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        """The options with secrets masked: safe to print."""
        return redact_options(self._options)


_EXCLUSIVE_LOCK = threading.Lock()


def _is_conditional_backend(fs: Any) -> bool:
    """True for the clients whose ``pipe_file(mode="create")`` is a server-side create-only PUT."""
    return type(fs).__module__.split(".")[0] in ("s3fs", "gcsfs", "adlfs")


def _is_conflict(exc: BaseException) -> bool:
    """A create-only write lost: FileExistsError (adlfs, gcsfs), HTTP 412 / PreconditionFailed or
    409 / ConditionalRequestConflict (S3), anywhere in the chain of causes."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FileExistsError):
            return True
        resp = getattr(cur, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status == 412:
                return True
        for attr in ("status_code", "status", "code"):
            if getattr(cur, attr, None) == 412:
                return True
        cur = cur.__cause__ or cur.__context__
    return False


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


class _SpoolingWriter:
    """Write side of :meth:`FsspecStore.open_write`: memory up to ``single_put_bytes``, then a
    streamed upload. Backend errors are mapped to the error tree."""

    def __init__(self, store: FsspecStore, full: str, path: str):
        self._store = store
        self._full = full
        self._path = path
        self._buf = bytearray()
        self._f: Any = None
        self._n = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._n

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._n += n
        if self._f is None:
            if len(self._buf) + n <= self._store.single_put_bytes:
                self._buf += mv
                return n
            try:
                fs = self._store.fs
                if is_s3(fs):
                    self._f = S3MultipartWriter(self._store, self._full, self._store.block_size_bytes or DEFAULT_BLOCK_SIZE_BYTES)
                elif is_azure(fs):
                    self._f = AzureBlockWriter(self._store, self._full, self._store.block_size_bytes or DEFAULT_BLOCK_SIZE_BYTES)
                else:
                    extra = {"block_size": self._store.block_size_bytes} if self._store.block_size_bytes else {}
                    self._f = fs.open(self._full, "wb", **extra)
                self._f.write(self._buf)
            except Exception as exc:  # noqa: BLE001 - every backend error is mapped to the tree
                raise self._store._wrap(exc, self._path) from exc
            self._buf = bytearray()
        try:
            self._f.write(mv)
        except Exception as exc:  # noqa: BLE001
            raise self._store._wrap(exc, self._path) from exc
        return n

    def finish(self) -> None:
        try:
            if self._f is None:
                self._store._run("pipe_file", self._full, bytes(self._buf))
                self._buf = bytearray()
            else:
                self._f.close()
        except Exception as exc:  # noqa: BLE001
            raise self._store._wrap(exc, self._path) from exc

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the upload (multipart parts too; on S3 parked when ``exc`` is transient) and
        make sure no object is left behind."""
        self._buf = bytearray()
        f, fs = self._f, self._store.fs
        try:
            if isinstance(f, (S3MultipartWriter, AzureBlockWriter)):
                f.abort(exc)  # nothing exists under the path before the completion: no check
                return
            if f is not None:
                discard = getattr(f, "discard", None)
                if callable(discard):
                    discard()
                    try:
                        f.closed = True  # a discarded buffered file must not flush again in __del__
                    except AttributeError:
                        pass
                else:
                    f.close()
            # some backends (memory://) create the entry when the file is opened
            if f is not None and fs.exists(self._full):
                fs.rm(self._full)
        except Exception:  # noqa: BLE001 - best effort cleanup; the original error wins
            log.debug("cleanup of partial %s failed", redact(self._full))


def _shorten_client_retries(fs: Any) -> None:
    """Keep the clients' own retry loops short where their options cannot (adlfs, gcsfs):
    RetryingStore above the store owns the retry budget, and a client that retries on its own
    hides a dead provider from it for tens of seconds per call.

    * azure-storage's ExponentialRetry (3 retries after 15 s + 3**n each) made a dead Azure
      endpoint cost ~12 s per attempt and ~80 s per recovery.
    * gcsfs retries every request 6 times with 1+2+4+8+16 s of back-off, fixed when its class
      is defined (``retry_request(retries=6)``): a dead GCS endpoint cost 34 s per call. This
      filesystem instance gets gcsfs's own retry with 2 attempts (as botocore's is configured).
    """
    if type(fs).__module__.split(".")[0] == "gcsfs":
        _shorten_gcsfs_retries(fs)
        return
    client = getattr(fs, "service_client", None)
    policy = getattr(getattr(client, "_config", None), "retry_policy", None)
    if policy is None:
        return
    for attr in ("total_retries", "connect_retries", "read_retries", "status_retries"):
        if isinstance(getattr(policy, attr, None), int):
            setattr(policy, attr, min(getattr(policy, attr), 1))
    if isinstance(getattr(policy, "backoff_max", None), (int, float)):  # azure-core RetryPolicy
        policy.backoff_max = min(policy.backoff_max, 2)
    if isinstance(getattr(policy, "initial_backoff", None), (int, float)):  # azure-storage ExponentialRetry: 15 s + 3**n
        policy.initial_backoff = min(policy.initial_backoff, 0.5)
        policy.increment_base = min(getattr(policy, "increment_base", 2), 2)
        policy.random_jitter_range = min(getattr(policy, "random_jitter_range", 0.5), 0.5)


def _shorten_gcsfs_retries(fs: Any, attempts: int = 2) -> None:
    """Give this gcsfs instance its own request methods with gcsfs's retry rules (what is
    retried, 404 never) but ``attempts`` tries. Idempotent (fsspec caches instances); a gcsfs
    whose methods are not built this way is left as it is (debug log)."""
    try:
        from gcsfs.retry import retry_request
    except ImportError:
        return
    import types

    for name in ("_request", "_get_file_request"):
        if name in vars(fs):
            continue
        raw = getattr(getattr(type(fs), name, None), "__wrapped__", None)
        if raw is None:
            log.debug("gcsfs %s has no undecorated %s: its own retry loop is kept", type(fs).__name__, name)
            continue
        setattr(fs, name, types.MethodType(retry_request(retries=attempts)(raw), fs))


def _range_not_satisfiable(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "range is not satisfiable" in text or "invalidrange" in text or "416" in text.split()
