"""resilient_train: keep PyTorch training alive across GPU clouds that fail independently.

The checkpoint API::

    state = resilient_train.TrainState(model=model, optimizer=opt, scheduler=sched)
    resilient_train.save("s3://bucket/run", state, step)        # collective
    resilient_train.load("s3://bucket/run", state)              # latest committed step
    mgr = resilient_train.CheckpointManager(uri, every_n_steps=100, keep_last=3)
"""

from __future__ import annotations

import logging

from . import errors
from .checkpoint import CheckpointManager, LoadResult, SaveResult, TrainState, load, save, verify_checkpoint

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CheckpointManager", "LoadResult", "SaveResult", "TrainState", "errors", "load", "save", "verify_checkpoint", "__version__"]

from .events import EventLog  # noqa: E402
from .trainer import SyncConfig, Trainer, TrainerConfig, wrap  # noqa: E402

__all__ += ["EventLog", "SyncConfig", "Trainer", "TrainerConfig", "wrap"]
