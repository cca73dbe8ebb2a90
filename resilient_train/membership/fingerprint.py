"""A model fingerprint: what must match for a replica group to join the others."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["model_fingerprint"]


def model_fingerprint(model: torch.nn.Module, code_version: str = "") -> str:
    """A short hex digest of every state tensor's name, shape and dtype, plus ``code_version``
    (e.g. a git commit). Values are not included: a joiner's weights are replaced anyway."""
    items = [[k, list(v.shape), str(v.dtype)] for k, v in sorted(model.state_dict().items())]
    blob = json.dumps({"state": items, "code_version": code_version}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()
