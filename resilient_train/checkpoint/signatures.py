"""Manifest signatures on storage: read, check and write ``manifest.sig``.

The pure part (keys, the signature file format, verification) is :mod:`resilient_train.format.signing`;
this module only moves ``manifest.sig`` between a Store and it. Signing a committed checkpoint
in place is :func:`~resilient_train.checkpoint.discovery.sign_checkpoint`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import SignatureError
from ..format.names import MANIFEST_NAME
from ..format.signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, SigningKey, as_keyring
from ..storage import Store

__all__ = ["SIGNATURE_NAME", "read_signature", "check_signature", "write_signature"]

log = logging.getLogger(__name__)


def read_signature(store: Store, folder: str) -> bytes | None:
    """The bytes of ``folder/manifest.sig``, or None if there is none. One larger than
    MAX_SIGNATURE_BYTES is refused before it is read (SignatureError). A store that cannot be
    reached raises its StorageError."""
    path = f"{folder}/{SIGNATURE_NAME}"
    try:
        # size first, not a ranged read: S3 answers a range on an empty object with 416
        if store.size(path) > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{store.uri}/{path} is larger than {MAX_SIGNATURE_BYTES} bytes; it is not a signature")
        return store.read_bytes(path)
    except FileNotFoundError:
        return None


def check_signature(store: Store, folder: str, manifest_bytes: bytes, keys: Any) -> str | None:
    """Check the signature of ``manifest_bytes`` (read from ``folder``) when ``keys`` is set.
    Returns the signing key's id (None when no keys are configured); raises SignatureError."""
    ring = as_keyring(keys)
    if ring is None:
        return None
    where = f"{store.uri}/{folder}/{MANIFEST_NAME}"
    key_id = ring.verify(manifest_bytes, read_signature(store, folder), where=where)
    log.debug("%s: signature by key %s verified", where, key_id)
    return key_id


def write_signature(store: Store, folder: str, manifest_bytes: bytes, key: SigningKey) -> None:
    """Write ``folder/manifest.sig`` for ``manifest_bytes`` (overwriting an older signature)."""
    if not isinstance(key, SigningKey):
        raise TypeError(f"a signing key must be a SigningKey, got {type(key).__name__}")
    store.write_bytes(f"{folder}/{SIGNATURE_NAME}", key.sign(manifest_bytes))
