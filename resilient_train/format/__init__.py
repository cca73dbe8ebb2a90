"""The on-disk checkpoint format, version 3 (``FORMAT_VERSION``; versions 1 and 2 stay readable): names,
manifest schema, digest algorithms (hashing.py: SHA-256, BLAKE3), safetensors layout, JSON state, signatures.

Everything persisted is defined here and pinned by exact-bytes tests. See ``docs/format.md``.
The front holds what a reader of a checkpoint needs (the manifest, the step folder names, the
safetensors header, the JSON state codec); the writer's pieces (file names per rank, header
building, canonical JSON, dtype tables) stay in their modules (:mod:`.names`, :mod:`.manifest`,
:mod:`.safetensors_io`, :mod:`.jsontree`, :mod:`.signing`).
"""

from __future__ import annotations

from .jsontree import decode as decode_json_state, encode as encode_json_state
from .manifest import FileRecord, Manifest, TensorRecord
from .names import FORMAT_VERSION, MANIFEST_NAME, STATE_NAME, parse_step_dirname, step_dirname
from .safetensors_io import parse_header

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STATE_NAME",
    "FileRecord",
    "Manifest",
    "TensorRecord",
    "parse_step_dirname",
    "step_dirname",
    "parse_header",
    "encode_json_state",
    "decode_json_state",
]
