"""Retries for transient storage failures, as a Store wrapper.

What is transient: timeouts, throttling (HTTP 429, S3 ``SlowDown``), server errors (5xx),
connection resets and refusals. What is permanent and never retried: not found, access denied
or missing credentials, bad arguments. :func:`classify` makes that decision from an exception
and its chain (client libraries wrap one another), without importing any cloud client.

:class:`RetryingStore` wraps any Store and retries each call with tenacity: exponential
backoff with full jitter, bounded both in attempts and in total seconds. When the budget is
spent the last failure is raised as :class:`StoreUnavailableError` naming the provider.

Streams are the one thing a wrapper cannot replay: a failure in the middle of an
``open_write`` body is raised to the caller, who retries at file granularity (replication and
migration do, since the source can be read again). Opening the stream is retried.
"""

from __future__ import annotations

import asyncio
import errno
import logging
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

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        b = self._breaker
        now = self._clock()
        if now < b.open_until:
            raise StoreUnavailableError(
                f"{what} not attempted: the provider failed its whole retry budget {self.policy.breaker_cooldown_s - (b.open_until - now):.0f} s ago "
                f"and is skipped for {b.open_until - now:.0f} s more (last cause: {b.cause})",
                provider=self.name,
            )
        try:
            result = call_with_retry(fn, self.policy, provider=self.name, what=what)
        except StoreUnavailableError as exc:
            if self.policy.breaker_cooldown_s > 0:
                b.open_until = self._clock() + self.policy.breaker_cooldown_s
                b.cause = redact(str(exc))[:300]
                log.warning("[%s] marked unavailable for %.0f s after: %s", self.name, self.policy.breaker_cooldown_s, b.cause)
            raise
        b.open_until = 0.0
        return result

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        cm = self._call(f"open {path!r} for writing", lambda: _entered(self.inner.open_write(path)))
        with _finish(cm) as f:
            yield f

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        cm = self._call(f"open {path!r} for reading", lambda: _entered(self.inner.open_read(path)))
        with _finish(cm) as f:
            yield f

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


class _Entered:
    """A context manager already entered: holds its value and its exit."""

    def __init__(self, cm: Any, value: Any):
        self.cm = cm
        self.value = value


def _entered(cm: Any) -> _Entered:
    value = cm.__enter__()
    return _Entered(cm, value)


@contextmanager
def _finish(entered: _Entered) -> Iterator[Any]:
    try:
        yield entered.value
    except BaseException as exc:
        if not entered.cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        entered.cm.__exit__(None, None, None)

