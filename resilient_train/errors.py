"""One exception tree for the whole library.

Every error the library raises on purpose derives from :class:`ResilientTrainError`, so a
training script can catch the library's failures in one place. Configuration mistakes
additionally derive from :class:`ValueError` (they are raised at construction, with the fix
in the message). Messages never contain credentials: anything that may carry a secret goes
through :func:`resilient_train.storage.redact` first.

Tree::

    ResilientTrainError
    +-- ConfigError (also ValueError)            bad arguments / configuration
    +-- StorageError                            a store could not do what was asked
    |   +-- StoreNotFoundError                  the object does not exist (permanent)
    |   +-- StorePermissionError                access denied / missing credentials (permanent)
    |   +-- StoreUnavailableError               endpoint down after retries (transient, exhausted)
    |   +-- UnsafeFileError                     a path is a symlink, FIFO or device, not a regular file inside the root
    |   +-- StoreConflictError                  a create-only write found the object already there
    |   +-- StoreTransientError                 one attempt failed transiently (retried; then StoreUnavailableError)
    +-- CheckpointError                         anything about a checkpoint on storage
    |   +-- CheckpointNotFoundError             no committed checkpoint where one was expected
    |   +-- ManifestError                       manifest.json missing fields, malformed, bad names
    |   |   +-- UnsupportedFormatVersionError   written by a newer (or unknown) format version
    |   |   +-- UnsafePathError                 a file name tries to leave the checkpoint folder
    |   +-- CorruptCheckpointError              bytes on storage are not what the manifest says
    |   |   +-- HashMismatchError               a file's SHA-256 or size differs from the manifest
    |   |   +-- SafetensorsHeaderError          header oversized, not JSON, or lies about offsets
    |   |   +-- StateFileError                  a JSON state file is oversized, not strict JSON, or malformed
    |   +-- PartialLoadError                    a load failed after live tensors were overwritten
    |   +-- StateMismatchError                  checkpoint does not fit the model/optimizer
    |   +-- CheckpointWriteError                a save failed (on one or several ranks)
    |   |   +-- CommitConflictError             another writer committed the same step first
    |   +-- SignatureError                      manifest unsigned, wrongly signed or modified
    |   +-- ReplicationError                    copies to some providers failed
    |   +-- CheckpointPolicyError               checkpoints failed past a user limit: training stops
    +-- DistributedError                        a collective failed on one or more ranks
    |   +-- ReplicaMismatchError                replicas started from different parameters
    |   +-- PayloadMismatchError                a peer sent another codec, size or element count
    |   +-- SyncVetoError                       too many rounds in a row vetoed (non-finite updates)
    |   +-- DroppedFromJobError                 this replica group was dropped from the job
    +-- KernelUnavailableError (also RuntimeError)  a compiled kernel asked for cannot run here
    +-- OperationCancelledError                 the caller stopped an operation (resumable)
    +-- MembershipError                         membership could not do what was asked in time
        +-- MembershipStoreError (also ConnectionError)  the membership KV did not answer in time
        +-- MembershipRefusedError              the members refused this joiner

Former names kept as aliases: ``TruncatedFileError`` is :class:`HashMismatchError`.
"""

from __future__ import annotations

from typing import Mapping

__all__ = [
    "ResilientTrainError",
    "ConfigError",
    "StorageError",
    "StoreNotFoundError",
    "StorePermissionError",
    "StoreUnavailableError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ManifestError",
    "UnsupportedFormatVersionError",
    "UnsafePathError",
    "CorruptCheckpointError",
    "HashMismatchError",
    "TruncatedFileError",
    "SafetensorsHeaderError",
    "StateFileError",
    "UnsafeFileError",
    "PartialLoadError",
    "StateMismatchError",
    "CheckpointWriteError",
    "DistributedError",
    "ReplicaMismatchError",
    "PayloadMismatchError",
    "SyncVetoError",
    "DroppedFromJobError",
    "KernelUnavailableError",
    "StoreTransientError",
    "ReplicationError",
    "CheckpointPolicyError",
    "MembershipError",
    "MembershipStoreError",
    "MembershipRefusedError",
    "StoreConflictError",
    "CommitConflictError",
    "SignatureError",
    "OperationCancelledError",
]


class ResilientTrainError(Exception):
    """Base of every error raised on purpose by resilient_train."""


class ConfigError(ResilientTrainError, ValueError):
    """A configuration or argument that cannot work. The message says what to change."""


# ---------------------------------------------------------------- storage


class StorageError(ResilientTrainError):
    """A storage operation failed. ``provider`` names the store (never its credentials)."""

    def __init__(self, message: str, *, provider: str | None = None, path: str | None = None):
        self.provider = provider
        self.path = path
        prefix = f"[{provider}] " if provider else ""
        super().__init__(prefix + message)


class StoreNotFoundError(StorageError, FileNotFoundError):
    """The object does not exist. Permanent: never retried."""


class StorePermissionError(StorageError, PermissionError):
    """Access was denied or credentials are missing. Permanent: never retried."""


class StoreUnavailableError(StorageError, ConnectionError):
    """The endpoint kept failing with transient errors until the retry budget ran out."""


class UnsafeFileError(StorageError):
    """A path under a local store is not a regular file reached without symlinks (a symlink on
    any component, a FIFO, a device, a socket), so it is not read. Permanent: never retried."""
class StoreConflictError(StorageError, FileExistsError):
    """A create-only write (:meth:`Store.write_bytes_exclusive`) found the object already there.
    Permanent: never retried."""


# ---------------------------------------------------------------- checkpoints


class CheckpointError(ResilientTrainError):
    """Something about a checkpoint on storage is wrong or missing."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (one with a manifest) exists where one was asked for."""


class ManifestError(CheckpointError):
    """The manifest is missing, not JSON, or does not follow the format's schema."""


class UnsupportedFormatVersionError(ManifestError):
    """The manifest declares a format version this library cannot read."""


class UnsafePathError(ManifestError):
    """A file name in the manifest would leave the checkpoint folder (``..``, absolute, ...)."""


class CorruptCheckpointError(CheckpointError):
    """The bytes on storage do not match what the manifest promises."""


class HashMismatchError(CorruptCheckpointError):
    """A file's bytes differ from the manifest's record: its SHA-256, or its size (a file cut
    short or grown; ``TruncatedFileError`` is this class's former name for that case)."""


TruncatedFileError = HashMismatchError
"""Former name of :class:`HashMismatchError` for a size mismatch, merged into it: no caller
handled the two apart (both mean "these bytes are not the ones the manifest promises")."""


class SafetensorsHeaderError(CorruptCheckpointError):
    """A safetensors header is oversized, not JSON, or describes impossible offsets."""


class StateFileError(CorruptCheckpointError):
    """A JSON file of a checkpoint (state, rank state, index, manifest contents) is oversized,
    nested too deep, has duplicate keys or bare NaN/Infinity, or does not follow its schema."""


class PartialLoadError(CheckpointError):
    """A load failed after some live tensors had already been overwritten (the load needed more
    than the staging budget, so verified chunks were copied as they arrived). The training state
    is a mix of the old state and the checkpoint: load another checkpoint before training on.
    ``cause`` is the error that stopped the load."""

    def __init__(self, message: str, cause: BaseException | None = None):
        self.cause = cause
        super().__init__(message)


class StateMismatchError(CheckpointError):
    """The checkpoint does not fit the objects it is loaded into (keys, shapes, dtypes)."""


class CheckpointWriteError(CheckpointError):
    """A save failed. ``failures`` maps each failed rank to its cause's message."""

    def __init__(self, message: str, failures: Mapping[int, str] | None = None):
        self.failures = dict(failures or {})
        if self.failures:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))
            message = f"{message} ({detail})"
        super().__init__(message)


class CommitConflictError(CheckpointWriteError):
    """Another writer committed this step first (the manifest is written create-only, so of two
    writers of one step exactly one commits). The checkpoint that is there is the other one's."""


class SignatureError(CheckpointError):
    """A verification key is configured and the manifest is unsigned, signed by an unknown key,
    or its signature does not match its bytes (it was modified). Never carries key material."""


class DistributedError(ResilientTrainError):
    """A collective step failed. ``failures`` maps each failed rank to its cause's message."""

    def __init__(self, message: str, failures: Mapping[int, str] | None = None):
        self.failures = dict(failures or {})
        if self.failures:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))
            message = f"{message} ({detail})"
        super().__init__(message)


# ---------------------------------------------------------------- sync and compression


class ReplicaMismatchError(DistributedError):
    """Replicas started from different parameters (their digests differ at the first sync)."""


class PayloadMismatchError(DistributedError):
    """A peer sent a payload of another codec, size or element count than this rank expects."""


class SyncVetoError(DistributedError):
    """Too many synchronisation rounds in a row were vetoed by non-finite pseudo-gradients."""


class DroppedFromJobError(DistributedError):
    """This replica group was dropped from the job (it missed a round's deadline or the others
    reconfigured without it). The trainer catches it and rejoins as a joiner; it reaches user
    code only if rejoining is impossible."""


class KernelUnavailableError(ResilientTrainError, RuntimeError):
    """A compiled kernel (CUDA, or the C++ CPU twin) was asked for explicitly and cannot run here."""


# ---------------------------------------------------------------- storage: retries and replication


class StoreTransientError(StorageError):
    """One attempt failed with a transient cause (timeout, throttling, 5xx, reset). Retried;
    once the retry budget is spent it becomes :class:`StoreUnavailableError`."""


class ReplicationError(CheckpointError):
    """Copying a checkpoint to one or more providers failed. ``failures`` maps each failed
    provider's name to its cause; the providers not named did commit their copy."""

    def __init__(self, message: str, failures: Mapping[str, str] | None = None):
        self.failures = dict(failures or {})
        self.summary = message  # the message without the per-provider detail
        if self.failures:
            detail = "; ".join(f"{p}: {m}" for p, m in sorted(self.failures.items()))
            message = f"{message} ({detail})"
        super().__init__(message)


class OperationCancelledError(ResilientTrainError):
    """The caller asked an operation to stop (Ctrl-C on ``ckpt migrate``). What was done is kept
    and nothing half-done is committed: running the same operation again resumes it."""
class CheckpointPolicyError(CheckpointError):
    """Training stopped because checkpoints kept failing past a limit the user set
    (``max_uncommitted_steps`` / ``max_checkpoint_failures``). ``failures`` maps each provider
    (or rank) to its last cause."""

    def __init__(self, message: str, failures: Mapping[str, str] | None = None):
        self.failures = dict(failures or {})
        super().__init__(message)


# ---------------------------------------------------------------- membership


class MembershipError(ResilientTrainError):
    """In-process elastic membership could not do what was asked in time: no view admitted this
    member, the member was dropped from the view, or no view change came after a failure."""


class MembershipStoreError(MembershipError, ConnectionError):
    """The membership KV (the key-value service providers meet in, a
    :class:`~resilient_train.membership.KVStore`) did not answer within the call's timeout."""


class MembershipRefusedError(MembershipError):
    """The members refused this joiner; the message says why (e.g. a different model fingerprint)."""
