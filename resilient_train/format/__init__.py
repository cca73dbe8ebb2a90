"""The on-disk checkpoint format, version 3 (``FORMAT_VERSION``; versions 1 and 2 stay readable): names,
manifest schema, digest algorithms (hashing.py: SHA-256, BLAKE3), safetensors layout, JSON state, signatures.

Everything persisted is defined here and pinned by exact-bytes tests. See ``docs/format.md``.
"""

from __future__ import annotations

from .jsontree import decode as decode_json_state, dumps_canonical, encode as encode_json_state
from .manifest import FileRecord, Manifest, TensorRecord, check_filename
from .names import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUPS,
    HF_INDEX_NAME,
    MANIFEST_NAME,
    STATE_NAME,
    parse_step_dirname,
    rank_state_filename,
    shard_filename,
    step_dirname,
)
from .safetensors_io import DTYPE_TO_ST, ST_TO_DTYPE, TensorSlot, build_header, parse_header, write_file

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUPS",
    "HF_INDEX_NAME",
    "MANIFEST_NAME",
    "STATE_NAME",
    "FileRecord",
    "Manifest",
    "TensorRecord",
    "check_filename",
    "parse_step_dirname",
    "rank_state_filename",
    "shard_filename",
    "step_dirname",
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "TensorSlot",
    "build_header",
    "parse_header",
    "write_file",
    "encode_json_state",
    "decode_json_state",
    "dumps_canonical",
]
