"""resilient_train: keep PyTorch training alive across GPU clouds that fail independently.

The checkpoint API::

    state = resilient_train.TrainState(model=model, optimizer=opt, scheduler=sched)
    resilient_train.save("s3://bucket/run", state, step)        # collective
    resilient_train.load("s3://bucket/run", state)              # latest committed step
    mgr = resilient_train.CheckpointManager(uri, every_n_steps=100, keep_last=3)

The names below are imported on first use (PEP 562), so ``import resilient_train`` and the
command line start without importing torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import errors

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# name -> the submodule that defines it
_LAZY = {
    "CheckpointManager": ".checkpoint",
    "LoadResult": ".checkpoint",
    "SaveResult": ".checkpoint",
    "TrainState": ".checkpoint",
    "load": ".checkpoint",
    "save": ".checkpoint",
    "verify_checkpoint": ".checkpoint",
    "SyncConfig": ".trainer",
    "Trainer": ".trainer",
    "TrainerConfig": ".trainer",
    "wrap": ".trainer",
}

__all__ = sorted(_LAZY) + ["errors", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilient_train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
