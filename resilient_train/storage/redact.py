"""Remove credentials from anything that may be printed: URIs, messages, option dicts, log records.

:func:`redact` masks what looks like a secret by its shape (URI user-info, signed-URL
parameters, ``key=value`` pairs). :func:`remember_secrets` records the secret values of a
store's options (access key ids, secret keys, account keys, SAS tokens, connection-string
parts) so :func:`redact_log` can also mask them wherever a client library prints them, and
:func:`install_log_redaction` makes every log record of the process (the library's and its
dependencies', whatever the handler) go through :func:`redact_log` when it is created.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Mapping

__all__ = ["redact", "redact_options", "redact_log", "remember_secrets", "install_log_redaction"]

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)\b(sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|token|access_token|sas_token|secret|password|accountkey|sharedaccesssignature)=([^&\s'\";]+)"
)
_KEYLIKE = re.compile(r"(?i)\b(key|secret|token|password|credential|sas|connection_string|account_key)\b(['\"]?\s*[:=]\s*['\"]?)([^'\"\s,;}]+)")

_SECRET_OPTION = re.compile(r"(?i)(key|secret|token|password|credential|sas|connection_string|sig)")


def redact(text: str) -> str:
    """Return ``text`` with URI user-info, signed-URL parameters and key=value secrets masked."""
    if not text:
        return text
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}=***", text)
    text = _KEYLIKE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return text


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of fsspec ``storage_options`` with every secret-looking value replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif _SECRET_OPTION.search(str(k)):
            out[k] = "***"
        else:
            out[k] = v
    return out


_AUTH_HEADER = re.compile(r"(?i)(authorization|x-amz-security-token|x-ms-copy-source-authorization|proxy-authorization|ocp-apim-subscription-key)(['\"]?\s*[:=]\s*b?['\"]?)([^'\"\n,}]+)")
_SIG_PARTS = re.compile(r"(?i)\b(credential|signature|signedheaders)(=)([^,\s'\";&]+)")
_SCHEME_TOKEN = re.compile(r"(?i)\b(sharedkey|sharedkeylite|bearer|aws4-hmac-sha256)(\s+)([^,\s'\";&]+)")
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
_MIN_SECRET_CHARS = 6  # shorter values ("anon", "true") are not secrets and would mask ordinary words


def remember_secrets(options: Mapping[str, Any]) -> None:
    """Note the secret-looking values of ``options`` (nested too) for :func:`redact_log`."""
    found: list[str] = []

    def walk(opts: Mapping[str, Any]) -> None:
        for k, v in opts.items():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, str) and _SECRET_OPTION.search(str(k)):
                found.append(v)
                for part in v.split(";"):  # connection strings: AccountKey=...;SharedAccessSignature=...
                    name, eq, value = part.partition("=")
                    if eq and _SECRET_OPTION.search(name):
                        found.append(value)
                        found.append(value.rstrip("="))

    walk(options)
    with _SECRETS_LOCK:
        _SECRETS.update(v for v in found if len(v) >= _MIN_SECRET_CHARS)


def redact_log(text: str) -> str:
    """:func:`redact` plus authorization headers, signature parts and every remembered secret."""
    if not text:
        return text
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SIG_PARTS.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SCHEME_TOKEN.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return redact(text)


_installed = False
_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Make every log record created in this process carry a redacted message (idempotent).

    Installed as the LogRecord factory, so it applies to every logger (botocore, urllib3,
    azure-core, ...) and every handler, and costs nothing for records below their logger's level.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                msg = record.getMessage()
                clean = redact_log(msg)
                if clean != msg:
                    record.msg, record.args = clean, None
                if record.exc_info and not record.exc_text:
                    import traceback

                    record.exc_text = redact_log("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            except Exception:  # noqa: BLE001 - a message that cannot be formatted is left to logging
                pass
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
