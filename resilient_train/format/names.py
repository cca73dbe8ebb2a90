"""Names that are part of the on-disk format (version 3; versions 1 and 2 stay readable). Changing any of them changes the format."""

from __future__ import annotations

import re

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "HASH_ALGORITHM",
    "MANIFEST_NAME",
    "STATE_NAME",
    "HF_INDEX_NAME",
    "GROUPS",
    "step_dirname",
    "parse_step_dirname",
    "shard_filename",
    "rank_state_filename",
]

FORMAT_NAME = "resilient-train-checkpoint"
FORMAT_VERSION = 3
"""Written by default. Version 2 adds per-chunk SHA-256 digests of every file; version 3 names
its digest algorithm (BLAKE3 by default) and records a file's digest as the digest of its
chunk digests."""

READABLE_FORMAT_VERSIONS = (1, 2, 3)

HASH_ALGORITHM = "blake3"
"""The digest algorithm written by default (``hash.algorithm`` of a format 3 manifest; format 2
manifests name ``sha256``, the only one they may name)."""

MANIFEST_NAME = "manifest.json"
"""The commit marker: a step folder is a checkpoint only once this file exists."""

STATE_NAME = "state.json"
"""Non-tensor state shared by all ranks (step, optimizer hyper-parameters, scheduler, extras)."""

HF_INDEX_NAME = "model.safetensors.index.json"

# Tensor groups and the file-name stem each one is written under.
GROUPS = {
    "model": "model",  # whole model tensors: Hugging Face layout, listed in the HF index
    "model_shards": "model-shards",  # pieces of sharded (DTensor / FSDP2) model tensors
    "optimizer": "optimizer",
    "extra": "extra",  # tensors from user extras, scheduler state, sync state, ...
}

_STEP_RE = re.compile(r"^step-(\d{10})$")


def step_dirname(step: int) -> str:
    """``step-0000000042`` for step 42."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step >= 10**10:
        raise ValueError(f"step must be an int in [0, 1e10), got {step!r}")
    return f"step-{step:010d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a folder named like :func:`step_dirname`, or None for any other name."""
    m = _STEP_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def shard_filename(group: str, index: int, count: int) -> str:
    """``model-00001-of-00004.safetensors`` (index is 1-based, as in Hugging Face)."""
    return f"{GROUPS[group]}-{index:05d}-of-{count:05d}.safetensors"


def rank_state_filename(rank: int) -> str:
    """Per-rank non-tensor state (RNG states): ``rank-00003.json``."""
    return f"rank-{rank:05d}.json"
