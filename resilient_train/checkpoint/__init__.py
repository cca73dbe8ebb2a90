"""Checkpoints: save and load a training state to a store or a Placement of providers.

The front holds what scripts and the other rooms use: :func:`save` / :func:`load` (a live
:class:`TrainState`), the one save route and the one load route underneath them
(:func:`save_checkpoint` of a :func:`capture`, :func:`load_checkpoint`) on a :class:`Location`,
:func:`newest_committed` (committed steps, newest first), :func:`read_manifest`,
:func:`verify_checkpoint`, retention (:func:`retention_plan`, :func:`apply_retention`) and
:class:`CheckpointManager`. The phases (planner, writer, chunks, targets, ...) and deprecated
spellings (``committed_steps``, ``latest_step``, ``write_snapshot``, ...) stay importable from
their modules; see docs/format.md for the layout.
"""

from .manager import CheckpointManager
from .retention import apply_retention, retention_plan
from .location import Location, as_location
from .loading import load, load_checkpoint
from .reader import LoadResult, verify_checkpoint
from .state import TrainState, capture
from .steps import newest_committed, read_manifest
from .saving import save, save_checkpoint
from .writer import SaveOptions, SaveResult

__all__ = [
    "CheckpointManager",
    "LoadResult",
    "Location",
    "SaveOptions",
    "SaveResult",
    "TrainState",
    "as_location",
    "apply_retention",
    "capture",
    "load",
    "load_checkpoint",
    "newest_committed",
    "read_manifest",
    "retention_plan",
    "save",
    "save_checkpoint",
    "verify_checkpoint",
]
