"""Signed manifests: who wrote a checkpoint, not only whether its bytes are intact.

A manifest's SHA-256 list proves the files are the ones it names; anyone who can write to the
bucket can write a consistent manifest, though. With a signing key configured, the writer also
writes ``manifest.sig`` (before ``manifest.json``, so a committed signed checkpoint always has
it); readers configured with verification keys refuse a manifest that is unsigned, signed by
a key they do not hold, or changed after signing (:class:`~resilient_train.errors.SignatureError`).

What is signed: ``SIGNATURE_DOMAIN + manifest_bytes``, the exact bytes of ``manifest.json`` as
stored (the canonical JSON the writer produced) behind a fixed domain prefix, so a signature
over a manifest can never be replayed as a signature over anything else. The manifest itself is
unchanged by signing (so signing an existing checkpoint, or migrating it, never touches it).

``manifest.sig`` is canonical JSON (see ``docs/format.md``)::

    {
     "alg": "ed25519",            # or "hmac-sha256"
     "key_id": "ed25519:1f2e...", # which key signed: verifiers hold several keys by id (rotation)
     "sig": "<base64>"            # 64 bytes (Ed25519) or 32 bytes (HMAC-SHA256)
    }

Keys: Ed25519 through ``cryptography`` (a public key verifies; only the private key signs) or
HMAC-SHA256 over a shared secret of at least 32 bytes (the same secret signs and verifies).
Key ids default to a fingerprint (a SHA-256 of the public key; an HMAC of a fixed label under
the secret), so distinct keys get distinct ids without configuration.

Key material never appears in reprs, logs, error messages or files other than the key files
the user provides: the dataclasses hold it in ``repr=False`` fields and every error names a
key by its id only.

Pure: no I/O except :func:`load_signing_key` / :func:`load_verify_keys`, which read key files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import ConfigError, SignatureError
from .jsontree import dumps_canonical

__all__ = [
    "SIGNATURE_NAME",
    "SIGNATURE_DOMAIN",
    "ALG_ED25519",
    "ALG_HMAC_SHA256",
    "MAX_SIGNATURE_BYTES",
    "SigningKey",
    "VerifyKey",
    "KeyRing",
    "sign_manifest",
    "load_signing_key",
    "load_verify_keys",
    "as_keyring",
]

SIGNATURE_NAME = "manifest.sig"
"""The signature of a step folder's ``manifest.json``, next to it."""

SIGNATURE_DOMAIN = b"resilient-train manifest signature v1\n"
"""Prefixed to the manifest bytes before signing (domain separation)."""

ALG_ED25519 = "ed25519"
ALG_HMAC_SHA256 = "hmac-sha256"
_ALGS = (ALG_ED25519, ALG_HMAC_SHA256)
_SIG_LEN = {ALG_ED25519: 64, ALG_HMAC_SHA256: 32}

MAX_SIGNATURE_BYTES = 4096
"""A ``manifest.sig`` larger than this is refused before it is parsed."""

MIN_HMAC_SECRET_BYTES = 32


def _fingerprint(alg: str, material: bytes) -> str:
    if alg == ALG_ED25519:
        return "ed25519:" + hashlib.sha256(material).hexdigest()[:16]
    return "hmac:" + hmac.new(material, b"resilient-train key id", hashlib.sha256).hexdigest()[:16]


def _check_key_id(key_id: Any) -> str:
    if not isinstance(key_id, str) or not key_id or len(key_id) > 128 or not key_id.isprintable():
        raise ConfigError("a key id must be a printable string of 1 to 128 characters")
    return key_id


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise ConfigError("Ed25519 signing needs the 'cryptography' package: pip install 'resilient-train[sign]'") from None
    return ed25519


@dataclass(frozen=True)
class VerifyKey:
    """A key that checks signatures: an Ed25519 public key, or an HMAC secret."""

    key_id: str
    alg: str
    _material: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        if self.alg not in _ALGS:
            raise ConfigError(f"unknown signature algorithm {self.alg!r}; use one of {', '.join(_ALGS)}")

    def check(self, message: bytes, sig: bytes) -> bool:
        if len(sig) != _SIG_LEN[self.alg]:
            return False
        if self.alg == ALG_HMAC_SHA256:
            return hmac.compare_digest(hmac.new(self._material, message, hashlib.sha256).digest(), sig)
        from cryptography.exceptions import InvalidSignature

        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self._material).verify(sig, message)
            return True
        except InvalidSignature:
            return False


@dataclass(frozen=True)
class SigningKey:
    """A key that signs: an Ed25519 private key, or an HMAC secret. Build with
    :meth:`ed25519`, :meth:`generate_ed25519`, :meth:`hmac_sha256` or :func:`load_signing_key`."""

    key_id: str
    alg: str
    _secret: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        if self.alg not in _ALGS:
            raise ConfigError(f"unknown signature algorithm {self.alg!r}; use one of {', '.join(_ALGS)}")

    @classmethod
    def ed25519(cls, private_bytes: bytes, key_id: str | None = None) -> "SigningKey":
        """From the 32 raw bytes of an Ed25519 private key."""
        if len(private_bytes) != 32:
            raise ConfigError("an Ed25519 private key is 32 raw bytes")
        pub = _ed25519().Ed25519PrivateKey.from_private_bytes(bytes(private_bytes)).public_key()
        from cryptography.hazmat.primitives import serialization

        raw_pub = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key_id or _fingerprint(ALG_ED25519, raw_pub), ALG_ED25519, bytes(private_bytes))

    @classmethod
    def generate_ed25519(cls, key_id: str | None = None) -> "SigningKey":
        from cryptography.hazmat.primitives import serialization

        priv = _ed25519().Ed25519PrivateKey.generate()
        raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return cls.ed25519(raw, key_id)

    @classmethod
    def hmac_sha256(cls, secret: bytes, key_id: str | None = None) -> "SigningKey":
        """From a shared secret of at least 32 bytes."""
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_HMAC_SECRET_BYTES:
            raise ConfigError(f"an HMAC-SHA256 secret must be at least {MIN_HMAC_SECRET_BYTES} bytes")
        return cls(key_id or _fingerprint(ALG_HMAC_SHA256, bytes(secret)), ALG_HMAC_SHA256, bytes(secret))

    def verify_key(self) -> VerifyKey:
        """The key that checks this key's signatures (the public half for Ed25519)."""
        if self.alg == ALG_HMAC_SHA256:
            return VerifyKey(self.key_id, self.alg, self._secret)
        from cryptography.hazmat.primitives import serialization

        pub = _ed25519().Ed25519PrivateKey.from_private_bytes(self._secret).public_key()
        return VerifyKey(self.key_id, self.alg, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def private_pem(self) -> bytes:
        """The Ed25519 private key as unencrypted PKCS#8 PEM (what :func:`load_signing_key` reads)."""
        if self.alg != ALG_ED25519:
            raise ConfigError("only an Ed25519 key has a PEM form; an HMAC secret is stored as its raw bytes")
        from cryptography.hazmat.primitives import serialization

        priv = _ed25519().Ed25519PrivateKey.from_private_bytes(self._secret)
        return priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def public_pem(self) -> bytes:
        """The Ed25519 public key as PEM (SubjectPublicKeyInfo): give this to verifiers."""
        if self.alg != ALG_ED25519:
            raise ConfigError("an HMAC secret has no public half: verifiers need the secret itself")
        from cryptography.hazmat.primitives import serialization

        pub = _ed25519().Ed25519PrivateKey.from_private_bytes(self._secret).public_key()
        return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, manifest_bytes: bytes) -> bytes:
        """The bytes of ``manifest.sig`` for ``manifest_bytes``."""
        message = SIGNATURE_DOMAIN + bytes(manifest_bytes)
        if self.alg == ALG_HMAC_SHA256:
            sig = hmac.new(self._secret, message, hashlib.sha256).digest()
        else:
            sig = _ed25519().Ed25519PrivateKey.from_private_bytes(self._secret).sign(message)
        return dumps_canonical({"alg": self.alg, "key_id": self.key_id, "sig": base64.b64encode(sig).decode("ascii")})


def sign_manifest(manifest_bytes: bytes, key: SigningKey) -> bytes:
    """The bytes of ``manifest.sig`` for ``manifest_bytes`` signed with ``key``."""
    return key.sign(manifest_bytes)


def _parse_signature(sig_bytes: bytes, where: str) -> tuple[str, str, bytes]:
    if len(sig_bytes) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{where}: {len(sig_bytes)} bytes exceeds the {MAX_SIGNATURE_BYTES}-byte limit for a signature")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        obj = json.loads(sig_bytes.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{where} is not a valid signature file ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or set(obj) != {"alg", "key_id", "sig"}:
        raise SignatureError(f"{where} must be a JSON object with exactly 'alg', 'key_id' and 'sig'")
    alg, key_id, sig = obj["alg"], obj["key_id"], obj["sig"]
    if alg not in _ALGS:
        raise SignatureError(f"{where}: unknown signature algorithm {alg!r}")
    if not isinstance(key_id, str) or not key_id or len(key_id) > 128 or not key_id.isprintable():
        raise SignatureError(f"{where}: 'key_id' must be a printable string of 1 to 128 characters")
    if not isinstance(sig, str):
        raise SignatureError(f"{where}: 'sig' must be a base64 string")
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureError(f"{where}: 'sig' is not valid base64") from None
    return alg, key_id, raw


class KeyRing:
    """The verification keys a reader trusts, by key id (several: keys rotate).

    :meth:`verify` returns the id of the key whose signature matched, or raises SignatureError.
    """

    def __init__(self, keys: Iterable["VerifyKey | SigningKey"]):
        self._keys: dict[str, VerifyKey] = {}
        for k in keys:
            vk = k.verify_key() if isinstance(k, SigningKey) else k
            if not isinstance(vk, VerifyKey):
                raise ConfigError(f"a KeyRing holds VerifyKey or SigningKey objects, got {type(k).__name__}")
            old = self._keys.get(vk.key_id)
            if old is not None and (old.alg != vk.alg or not hmac.compare_digest(old._material, vk._material)):
                raise ConfigError(f"two different verification keys share the key id {vk.key_id!r}")
            self._keys[vk.key_id] = vk
        if not self._keys:
            raise ConfigError("a KeyRing needs at least one verification key")

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self.key_ids!r})"

    def verify(self, manifest_bytes: bytes, sig_bytes: bytes | None, *, where: str = "manifest.json") -> str:
        """Check ``sig_bytes`` (the content of ``manifest.sig``, None if it is missing) against
        ``manifest_bytes``. Returns the signing key's id; raises SignatureError otherwise."""
        if sig_bytes is None:
            raise SignatureError(f"{where} is not signed ({SIGNATURE_NAME} is missing) and verification keys are configured; refusing it")
        alg, key_id, raw = _parse_signature(sig_bytes, f"{where} signature")
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureError(f"{where} is signed by key {key_id!r}, which is not among the trusted keys {self.key_ids}; refusing it")
        if key.alg != alg:
            raise SignatureError(f"{where} signature says {alg!r} but key {key_id!r} is {key.alg!r}; refusing it")
        if not key.check(SIGNATURE_DOMAIN + bytes(manifest_bytes), raw):
            raise SignatureError(f"{where}: the signature by key {key_id!r} does not match the manifest (it was modified or signed by another key); refusing it")
        return key_id


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > 64 * 1024:
        raise ConfigError(f"key file {path} is larger than 64 KiB; it is not a key")
    return data


def _pem_kind(data: bytes) -> str | None:
    head = data.lstrip()[:40]
    if head.startswith(b"-----BEGIN PRIVATE KEY-----"):
        return "private"
    if head.startswith(b"-----BEGIN PUBLIC KEY-----"):
        return "public"
    if head.startswith(b"-----BEGIN"):
        return "other"
    return None


def load_signing_key(path: str, key_id: str | None = None) -> SigningKey:
    """A signing key from a file: an unencrypted PKCS#8 PEM Ed25519 private key, or else the
    file's raw bytes as an HMAC-SHA256 secret (at least 32 bytes). Errors never quote the file."""
    data = _read_key_file(path)
    kind = _pem_kind(data)
    if kind is None:
        return SigningKey.hmac_sha256(data, key_id)
    if kind != "private":
        raise ConfigError(f"key file {path} is not an unencrypted PKCS#8 private key (BEGIN PRIVATE KEY); a public key can only verify")
    from cryptography.hazmat.primitives import serialization

    try:
        priv = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"key file {path} does not hold a readable unencrypted private key") from None
    if not isinstance(priv, _ed25519().Ed25519PrivateKey):
        raise ConfigError(f"key file {path} holds a {type(priv).__name__.lstrip('_')}; only Ed25519 keys are supported")
    raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return SigningKey.ed25519(raw, key_id)


def _load_verify_key(path: str) -> VerifyKey:
    data = _read_key_file(path)
    kind = _pem_kind(data)
    if kind != "public":
        return load_signing_key(path).verify_key()
    from cryptography.hazmat.primitives import serialization

    try:
        pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"key file {path} does not hold a readable public key") from None
    if not isinstance(pub, _ed25519().Ed25519PublicKey):
        raise ConfigError(f"key file {path} holds a {type(pub).__name__.lstrip('_')}; only Ed25519 keys are supported")
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return VerifyKey(_fingerprint(ALG_ED25519, raw), ALG_ED25519, raw)


def load_verify_keys(paths: "str | Iterable[str]") -> KeyRing:
    """A KeyRing from key files: Ed25519 public keys (PEM), Ed25519 private keys (their public
    half is used) or HMAC secrets (raw bytes). Key ids are the fingerprints."""
    items = [paths] if isinstance(paths, str) else list(paths)
    return KeyRing(_load_verify_key(p) for p in items)


def as_keyring(keys: Any) -> KeyRing | None:
    """None, a KeyRing, a VerifyKey or SigningKey, a key file path, or a list of those ->
    KeyRing or None (no verification)."""
    if keys is None:
        return None
    if isinstance(keys, KeyRing):
        return keys
    if isinstance(keys, (VerifyKey, SigningKey)):
        return KeyRing([keys])
    if isinstance(keys, str):
        return load_verify_keys(keys)
    if isinstance(keys, (list, tuple)):
        out: list[VerifyKey] = []
        for k in keys:
            ring = as_keyring(k)
            if ring is not None:
                out.extend(ring._keys.values())
        return KeyRing(out) if out else None
    raise ConfigError(f"verification keys must be a KeyRing, a key, a key file path or a list of them, got {type(keys).__name__}")
