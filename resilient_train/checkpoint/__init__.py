"""Checkpoints: pure planning, the writer (shards first, manifest last), the reader, the manager."""

from .manager import CheckpointManager, retention_plan
from .planner import PieceMeta, SavePlan, plan_save
from .reader import LoadResult, committed_steps, latest_step, load, read_manifest, verify_checkpoint
from .state import Snapshot, TrainState, capture
from .writer import SaveOptions, SaveResult, save, write_snapshot

__all__ = [
    "CheckpointManager",
    "LoadResult",
    "PieceMeta",
    "SaveOptions",
    "SavePlan",
    "SaveResult",
    "Snapshot",
    "TrainState",
    "capture",
    "committed_steps",
    "latest_step",
    "load",
    "plan_save",
    "read_manifest",
    "retention_plan",
    "save",
    "verify_checkpoint",
    "write_snapshot",
]
