"""Manifest signatures on storage: read and check ``manifest.sig``, sign a checkpoint.

The pure part (keys, the signature file format, verification) is :mod:`resilient_train.format.signing`;
this module only moves ``manifest.sig`` between a Store and it.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ..errors import CheckpointNotFoundError, SignatureError
from ..format.names import MANIFEST_NAME, step_dirname
from ..format.signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, KeyRing, SigningKey, as_keyring
from ..storage import Store, open_store

__all__ = ["SIGNATURE_NAME", "read_signature", "check_signature", "write_signature", "sign_checkpoint"]

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


def sign_checkpoint(uri: "str | Store", step: int | None, key: SigningKey, *, storage_options: Mapping[str, Any] | None = None) -> tuple[int, str]:
    """Sign committed checkpoint ``step`` (default: the latest) in place: writes its
    ``manifest.sig``; the manifest itself is not changed. Returns ``(step, key_id)``."""
    from .discovery import latest_step
    from .reader import read_manifest

    store = open_store(uri, storage_options)
    if step is None:
        step = latest_step(store)
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
    read_manifest(store, step)  # committed and well-formed; refuses anything else
    folder = step_dirname(step)
    data = store.read_bytes(f"{folder}/{MANIFEST_NAME}")
    write_signature(store, folder, data, key)
    # Read back what is there now: a manifest replaced meanwhile must not end up "signed".
    if KeyRing([key]).verify(store.read_bytes(f"{folder}/{MANIFEST_NAME}"), read_signature(store, folder), where=f"{store.uri}/{folder}") != key.key_id:
        raise SignatureError(f"{store.uri}/{folder}: signature did not verify after writing it")
    log.info("signed %s/%s with key %s", store.uri, folder, key.key_id)
    return step, key.key_id
