"""Retries for transient storage failures, as a Store wrapper.

What is transient: timeouts, throttling (HTTP 429, S3 ``SlowDown``), server errors (5xx),
connection resets and refusals. What is permanent and never retried: not found, access denied
or missing credentials, bad arguments. :func:`classify` makes that decision from an exception
and its chain (client libraries wrap one another), without importing any cloud client.

:class:`RetryingStore` wraps any Store and retries each call with tenacity: exponential
backoff with full jitter, bounded both in attempts and in total seconds. When the budget is
spent the last failure is raised as :class:`StoreUnavailableError` naming the provider.

Streams are retried too, for the whole transfer:

* ``open_write``: the body's bytes go to the backend as they are written (the first attempt
  streams, nothing waits) and into a re-readable spool (memory up to ``spool_memory_bytes``,
  then a temporary file). A transient failure while streaming or while completing the upload
  (the single PUT of a small object happens at close) aborts that attempt and the spool is
  sent again as a fresh upload, under the same budget and circuit breaker. A spool that
  cannot grow (local disk full) makes the transfer non-replayable: then the failure is raised.
* ``open_read``: a transient failure in the middle of a read re-opens the object and seeks
  back to the position reached (downloads resume), under the same budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

import tenacity

from ..errors import (
    ConfigError,
    StoreConflictError,
    StoreNotFoundError,
    StorePermissionError,
    StoreTransientError,
    StoreUnavailableError,
    UnsafePathError,
)
from .base import Store
from .redact import redact

__all__ = ["RetryPolicy", "RetryingStore", "classify", "call_with_retry", "NO_RETRY"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}
# Class names of client-library exceptions that mean "try again" (matched by name so that no
# cloud client is imported here): botocore, aiohttp, azure-core, google-auth, urllib3, requests.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "ConnectTimeout", "ReadTimeout",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "ServiceRequestError", "ServiceResponseError", "ServiceRequestTimeoutError",
    "ServiceResponseTimeoutError", "TransportError", "ProtocolError", "RemoteDisconnected", "ChunkedEncodingError", "FSTimeoutError",
}
_PERMISSION_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ClientAuthenticationError", "RefreshError", "DefaultCredentialsError", "CredentialRetrievalError"}
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "ServerBusy", "OperationTimedOut", "RequestLimitExceeded", "TooManyRequests"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "BlobNotFound", "ContainerNotFound", "ResourceNotFound"}
_PERMISSION_CODES = {"AccessDenied", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthenticationFailed", "AuthorizationFailure", "ExpiredToken", "InvalidToken"}


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(v, int):
            return v
    return None


def _code_of(exc: BaseException) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        if code is not None:
            return str(code)
    code = getattr(exc, "error_code", None)
    return str(code) if code else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def classify(exc: BaseException) -> str:
    """``"not_found"``, ``"permission"``, ``"transient"`` or ``"permanent"`` for ``exc``.

    Looks at the whole chain of causes; the first link that decides wins, so a wrapper that
    says "not found" outranks the connection error it may have been raised from.
    """
    for e in _chain(exc):
        if isinstance(e, StoreTransientError):
            return "transient"
        if isinstance(e, (StoreUnavailableError, UnsafePathError, ConfigError, StoreConflictError)):
            return "permanent"
        if isinstance(e, StoreNotFoundError):
            return "not_found"
        if isinstance(e, StorePermissionError):
            return "permission"
        name = type(e).__name__
        if name in _PERMISSION_NAMES:
            return "permission"
        code = _code_of(e)
        status = _status_of(e)
        if code in _NOT_FOUND_CODES or status == 404:
            return "not_found"
        if code in _PERMISSION_CODES or status in (401, 403):
            return "permission"
        if code in _TRANSIENT_CODES or status in (408, 429) or (status is not None and status >= 500):
            return "transient"
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return "not_found"
        if isinstance(e, PermissionError):
            return "permission"
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, ConnectionError)) or name in _TRANSIENT_NAMES:
            return "transient"
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return "transient"
    return "permanent"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``max_attempts`` and ``max_total_s`` both bound the retries;
    waits grow as ``base_wait_s * 2**n`` capped at ``max_wait_s``, with full jitter.
    ``call_timeout_s`` bounds each single call (passed to the backend as its timeout).
    ``breaker_cooldown_s``: once a call has spent its whole budget, the store fails every call
    at once for this long (a dead provider costs one budget, not one per file), then tries
    again; 0 disables it."""

    max_attempts: int = 6
    max_total_s: float = 60.0
    base_wait_s: float = 0.2
    max_wait_s: float = 8.0
    call_timeout_s: float = 300.0
    breaker_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_total_s <= 0 or self.call_timeout_s <= 0:
            raise ConfigError("RetryPolicy.max_total_s and call_timeout_s must be positive seconds")
        if self.base_wait_s < 0 or self.max_wait_s < self.base_wait_s:
            raise ConfigError("RetryPolicy needs 0 <= base_wait_s <= max_wait_s")
        if self.breaker_cooldown_s < 0:
            raise ConfigError("RetryPolicy.breaker_cooldown_s must be >= 0 seconds (0 disables the breaker)")


NO_RETRY = RetryPolicy(max_attempts=1, max_total_s=1e9, base_wait_s=0.0, max_wait_s=0.0, breaker_cooldown_s=0.0)


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, *, provider: str, what: str, sleep: Callable[[float], None] | None = None) -> T:
    """Run ``fn`` until it succeeds, fails permanently, or the policy's budget is spent.

    Permanent failures propagate unchanged (after mapping by the Store). Exhausted transient
    failures raise :class:`StoreUnavailableError` naming ``provider`` and ``what``.
    """

    def _log(rs: tenacity.RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        log.warning("[%s] %s failed (attempt %d of %d), retrying: %s", provider, what, rs.attempt_number, policy.max_attempts, redact(f"{type(exc).__name__}: {exc}"))

    kwargs: dict[str, Any] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda e: classify(e) == "transient"),
        stop=tenacity.stop_after_attempt(policy.max_attempts) | tenacity.stop_after_delay(policy.max_total_s),
        wait=tenacity.wait_random_exponential(multiplier=policy.base_wait_s, max=policy.max_wait_s) if policy.base_wait_s > 0 else tenacity.wait_none(),
        before_sleep=_log,
        reraise=True,
        **kwargs,
    )
    try:
        return retrying(fn)
    except BaseException as exc:
        if classify(exc) == "transient":
            raise StoreUnavailableError(
                f"{what} kept failing after retries ({policy.max_attempts} attempts / {policy.max_total_s:g} s at most): "
                f"{redact(f'{type(exc).__name__}: {exc}')}; check that the provider's endpoint is reachable",
                provider=provider,
                path=getattr(exc, "path", None),
            ) from exc
        raise


class _Breaker:
    """Shared by a RetryingStore and its children: until when calls fail fast."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self.cause = ""


class RetryingStore:
    """A Store that retries every call of ``inner`` on transient failures (see module doc),
    with a circuit breaker: after a call exhausts the budget, calls fail at once with
    StoreUnavailableError for ``policy.breaker_cooldown_s``. ``clock`` is injectable."""

    def __init__(self, inner: Store, policy: RetryPolicy | None = None, *, clock: Callable[[], float] = time.monotonic, _breaker: _Breaker | None = None):
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self._breaker = _breaker or _Breaker()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def uri(self) -> str:
        return self.inner.uri

    def __repr__(self) -> str:
        return f"RetryingStore({self.inner!r})"

    @property
    def available(self) -> bool:
        """False while the breaker is open (the provider failed a whole retry budget lately)."""
        return self._clock() >= self._breaker.open_until

    def _call(self, what: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
        b = self._breaker
        now = self._clock()
        if now < b.open_until:
            raise StoreUnavailableError(
                f"{what} not attempted: the provider failed its whole retry budget {self.policy.breaker_cooldown_s - (b.open_until - now):.0f} s ago "
                f"and is skipped for {b.open_until - now:.0f} s more (last cause: {b.cause})",
                provider=self.name,
            )
        try:
            result = call_with_retry(fn, policy or self.policy, provider=self.name, what=what)
        except StoreUnavailableError as exc:
            if self.policy.breaker_cooldown_s > 0:
                b.open_until = self._clock() + self.policy.breaker_cooldown_s
                b.cause = redact(str(exc))[:300]
                log.warning("[%s] marked unavailable for %.0f s after: %s", self.name, self.policy.breaker_cooldown_s, b.cause)
            raise
        b.open_until = 0.0
        return result

    spool_memory_bytes: int = 8 * 1024 * 1024
    """Bytes of an upload kept in memory for a replay; the rest spools to a temporary file."""

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        """See the module doc: the first attempt streams, a failed one is replayed from a spool."""
        first = self._call(f"open {path!r} for writing", lambda: _entered(self.inner.open_write(path)))
        w = _ReplayWriter(self, path, first)
        try:
            yield w  # type: ignore[misc]
        except BaseException as exc:
            w.abort(exc)
            raise
        w.finish()

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        """Reads that fail mid-stream re-open the object and resume at the same offset."""
        cm = self._call(f"open {path!r} for reading", lambda: _entered(self.inner.open_read(path)))
        r = _ResumingReader(self, path, cm)
        try:
            yield r  # type: ignore[misc]
        except BaseException as exc:
            r.close(exc)
            raise
        r.close(None)

    def _rest_of_budget(self, used: int) -> RetryPolicy:
        return dataclasses.replace(self.policy, max_attempts=max(1, self.policy.max_attempts - used))

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._call(f"read {path!r}", lambda: self.inner.read_bytes(path, start, end))

    def write_bytes(self, path: str, data: bytes) -> None:
        self._call(f"write {path!r}", lambda: self.inner.write_bytes(path, data))

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        """Retried like every call; a conflict after an earlier attempt failed in transit is
        checked against the content: if the object holds exactly ``data``, that earlier attempt
        did commit and this is a success, not a conflict."""
        attempts = [0]

        def once() -> None:
            attempts[0] += 1
            try:
                self.inner.write_bytes_exclusive(path, data)
            except StoreConflictError:
                if attempts[0] > 1 and self.inner.read_bytes(path) == bytes(data):
                    log.info("[%s] create-only write of %r had succeeded before its retry", self.name, path)
                    return
                raise

        self._call(f"create {path!r}", once)

    def exists(self, path: str) -> bool:
        return self._call(f"exists {path!r}", lambda: self.inner.exists(path))

    def size(self, path: str) -> int:
        return self._call(f"size of {path!r}", lambda: self.inner.size(path))

    def list(self, path: str = "") -> list[str]:
        return self._call(f"list {path!r}", lambda: self.inner.list(path))

    def delete(self, path: str, recursive: bool = False) -> None:
        self._call(f"delete {path!r}", lambda: self.inner.delete(path, recursive))

    def sync_folder(self, path: str) -> None:
        self._call(f"sync {path!r}", lambda: self.inner.sync_folder(path))

    def child(self, path: str) -> "RetryingStore":
        return RetryingStore(self.inner.child(path), self.policy, clock=self._clock, _breaker=self._breaker)


def _exit_quietly(entered: "_Entered", exc: BaseException) -> None:
    """Abort an attempt (its context exits with ``exc``); a failing cleanup is only logged."""
    try:
        entered.cm.__exit__(type(exc), exc, exc.__traceback__)
    except Exception as cleanup:  # noqa: BLE001 - the attempt failed already; its cause wins
        log.debug("cleanup of a failed transfer attempt failed: %s", redact(str(cleanup)))


class _ReplayWriter:
    """Write side of :meth:`RetryingStore.open_write` (see the module doc)."""

    _COPY_BYTES = 8 * 1024 * 1024

    def __init__(self, store: RetryingStore, path: str, first: "_Entered"):
        self._store = store
        self._path = path
        self._live: _Entered | None = first
        self._spool: Any = tempfile.SpooledTemporaryFile(max_size=store.spool_memory_bytes, prefix="rt-upload-")
        self._replayable = True
        self._n = 0
        self._failures = 0
        self._cause: BaseException | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._n

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self._replayable:
            try:
                self._spool.write(mv)
            except OSError as exc:  # no room to spool: this transfer cannot be replayed
                log.warning("[%s] cannot spool %r for a retry (%s): a failure of this upload will not be retried", self._store.name, self._path, exc)
                self._replayable = False
                self._spool.close()
        if self._live is not None:
            try:
                self._live.value.write(mv)
            except Exception as exc:  # noqa: BLE001 - transient ones are replayed at finish
                self._attempt_failed(exc)
        self._n += n
        return n

    def _attempt_failed(self, exc: BaseException) -> None:
        live, self._live = self._live, None
        if live is not None:
            _exit_quietly(live, exc)
        if classify(exc) != "transient" or not self._replayable:
            raise exc
        self._failures += 1
        self._cause = exc
        log.warning("[%s] upload of %r failed after %d bytes, will send it again: %s", self._store.name, self._path, self._n, redact(f"{type(exc).__name__}: {exc}"))

    def finish(self) -> None:
        try:
            if self._live is not None:
                live, self._live = self._live, None
                try:
                    live.cm.__exit__(None, None, None)  # completes the upload (the PUT / last part)
                    return
                except Exception as exc:  # noqa: BLE001
                    self._live = None
                    if classify(exc) != "transient" or not self._replayable:
                        raise
                    self._failures += 1
                    self._cause = exc
                    log.warning("[%s] completing the upload of %r failed, will send it again: %s", self._store.name, self._path, redact(f"{type(exc).__name__}: {exc}"))
            self._store._call(f"upload of {self._path!r} ({self._n} bytes)", self._replay_once, self._store._rest_of_budget(self._failures))
        finally:
            self._close_spool()

    def _replay_once(self) -> None:
        self._spool.seek(0)
        with self._store.inner.open_write(self._path) as f:
            while True:
                chunk = self._spool.read(self._COPY_BYTES)
                if not chunk:
                    break
                f.write(chunk)

    def abort(self, exc: BaseException) -> None:
        live, self._live = self._live, None
        if live is not None:
            _exit_quietly(live, exc)
        self._close_spool()

    def _close_spool(self) -> None:
        try:
            self._spool.close()
        except OSError:
            pass


class _ResumingReader:
    """Read side of :meth:`RetryingStore.open_read`: re-opens and seeks after a transient failure."""

    def __init__(self, store: RetryingStore, path: str, first: "_Entered"):
        self._store = store
        self._path = path
        self._cur: _Entered | None = first
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _file(self) -> Any:
        if self._cur is None:
            cm = _entered(self._store.inner.open_read(self._path))
            try:
                cm.value.seek(self._pos)
            except BaseException as exc:
                _exit_quietly(cm, exc)
                raise
            self._cur = cm
        return self._cur.value

    def _do(self, what: str, fn: Callable[[Any], T]) -> T:
        def attempt() -> T:
            f = self._file()
            try:
                return fn(f)
            except Exception as exc:
                if classify(exc) == "transient":
                    cur, self._cur = self._cur, None  # re-opened at the same offset by the next attempt
                    if cur is not None:
                        _exit_quietly(cur, exc)
                    log.info("[%s] %s of %r failed at byte %d; resuming: %s", self._store.name, what, self._path, self._pos, redact(f"{type(exc).__name__}: {exc}"))
                raise

        return self._store._call(f"{what} of {self._path!r} at byte {self._pos}", attempt)

    def read(self, n: int = -1) -> bytes:
        data = self._do("read", lambda f: f.read(n))
        self._pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        got = self._do("read", lambda f: f.readinto(buf))
        self._pos += got or 0
        return got

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._do("seek", lambda f: f.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self, exc: BaseException | None) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        if exc is None:
            cur.cm.__exit__(None, None, None)
        else:
            _exit_quietly(cur, exc)


class _Entered:
    """A context manager already entered: holds its value and its exit."""

    def __init__(self, cm: Any, value: Any):
        self.cm = cm
        self.value = value


def _entered(cm: Any) -> _Entered:
    value = cm.__enter__()
    return _Entered(cm, value)
