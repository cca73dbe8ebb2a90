"""Checkpoints: pure planning, the writer (shards first, manifest last), the reader, the manager."""

from .manager import CheckpointManager
from .retention import apply_retention, retention_plan
from .planner import PieceMeta, SavePlan, plan_save
from .location import Location, as_location
from .loading import load, load_checkpoint
from .reader import LoadResult, verify_checkpoint
from .state import Snapshot, TrainState, capture
from .steps import committed_steps, latest_step, newest_committed, read_manifest
from .saving import save, save_checkpoint, write_snapshot
from .writer import SaveOptions, SaveResult

__all__ = [
    "CheckpointManager",
    "LoadResult",
    "Location",
    "PieceMeta",
    "SaveOptions",
    "SavePlan",
    "SaveResult",
    "Snapshot",
    "TrainState",
    "as_location",
    "apply_retention",
    "capture",
    "committed_steps",
    "latest_step",
    "load",
    "load_checkpoint",
    "newest_committed",
    "plan_save",
    "read_manifest",
    "retention_plan",
    "save",
    "save_checkpoint",
    "verify_checkpoint",
    "write_snapshot",
]
