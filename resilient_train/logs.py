"""Logging set-up for programs built on the library (the CLI, examples): no secret at any level.

:func:`configure_logging` is what ``resilient-train -v/-vv`` calls:

* verbosity 0: WARNING everywhere; 1 (``-v``): the library's own loggers (``resilient_train``)
  at INFO; 2 (``-vv``): at DEBUG. Dependencies stay at WARNING: botocore, urllib3, azure-core's
  HTTP logging policy, s3fs, gcsfs, adlfs, google-auth ... print request headers (the access
  key id, ``Authorization``, signatures) at DEBUG.
* 3 (``-vvv``): dependencies at DEBUG too.

At every level, every record of the process goes through
:func:`~resilient_train.storage.redact.redact_log` when it is created (the values of the
stores' credentials, authorization headers, signatures and signed-URL parameters are masked),
whatever handler prints it.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from .storage.redact import install_log_redaction, redact_log

__all__ = ["configure_logging", "RedactingFilter", "LIBRARY_LOGGER", "CREDENTIAL_LOGGERS"]

LIBRARY_LOGGER = "resilient_train"

CREDENTIAL_LOGGERS = (
    "botocore", "boto3", "s3transfer", "aiobotocore", "s3fs", "urllib3", "requests", "aiohttp", "httpx", "httpcore",
    "azure", "azure.core.pipeline.policies.http_logging_policy", "azure.identity", "adlfs",
    "gcsfs", "google", "google.auth", "google.auth.transport", "google_auth_httplib2", "google.resumable_media", "fsspec",
)
"""Loggers of dependencies that print request headers or credentials when verbose."""

_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG)
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in a record's message (for handlers that may see
    records created before :func:`install_log_redaction` ran)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_log(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def configure_logging(verbosity: int = 0, *, stream: IO[str] | None = None, fmt: str = _FORMAT) -> logging.Handler:
    """Set up logging for ``verbosity`` (see module doc); returns the handler it added to the
    root logger (a stream handler on ``stream``, default stderr, with a redacting filter).
    Calling it again replaces the handler it added before."""
    install_log_redaction()
    v = max(0, min(int(verbosity), 3))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_resilient_train", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    handler._resilient_train = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if v < 3 else logging.DEBUG)
    logging.getLogger(LIBRARY_LOGGER).setLevel(_LEVELS[v])
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if v >= 3 else logging.WARNING)
    return handler
