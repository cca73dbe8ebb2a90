"""Remove credentials from anything that may be printed: URIs, messages, option dicts."""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["redact", "redact_options"]

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
