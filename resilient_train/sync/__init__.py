"""Latency-tolerant synchronisation: local SGD, DiLoCo, streaming fragments and overlap.

Reaches other replicas only through a :class:`Communicator` it is given. Never imports
checkpoint or storage. See docs/sync.md for the maths.
"""

from __future__ import annotations

from .communicator import (DEFAULT_TIMEOUT, Communicator, Handle, ProcessGroupCommunicator, allreduce_encoded,
                           allreduce_mean)
from .diloco import DiLoCo, LocalSGD, default_outer_optimizer
from .wan import PROFILES, LinkProfile, VirtualClock, WanEmulator, get_profile, replay

__all__ = ["Communicator", "Handle", "ProcessGroupCommunicator", "allreduce_mean", "allreduce_encoded",
           "DEFAULT_TIMEOUT", "DiLoCo", "LocalSGD", "default_outer_optimizer", "WanEmulator", "LinkProfile",
           "PROFILES", "VirtualClock", "get_profile", "replay"]
