"""Distributed setup: the default process group from torchrun's environment.

:func:`init_distributed` joins the job's rendezvous store (torch's c10d Store, not a checkpoint
store) under :func:`store_prefix` (one prefix per torchrun attempt when it is the agent's) and initialises the default process group; a
group the script initialised itself is adopted as is.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["init_distributed", "store_prefix"]

log = logging.getLogger(__name__)


def init_distributed(timeout: timedelta, backend: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment, if not done yet.

    Returns ``(rank, world_size)``; ``(0, 1)`` without a distributed environment. The rendezvous
    store's prefix is :func:`store_prefix`'s.
    """
    env = os.environ if env is None else env
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in env:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun (or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    use_agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    host = rank == 0 and not use_agent_store
    try:
        base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=host, timeout=timeout, wait_for_workers=False)
    except Exception as exc:
        if host and "EADDRINUSE" in str(exc):
            # torchrun picked this port and released it before this process could bind it
            log.error("MASTER_PORT %s, which torchrun chose for this round's store, was taken by another process "
                      "in between (a race inside torch when TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). torchrun's next "
                      "attempt picks another port: launch with --max-restarts >= 1, or keep the agent's store "
                      "(unset the variable) where a provider runs on one node", env["MASTER_PORT"])
        raise
    prefix = store_prefix(env)
    store = dist.PrefixStore(prefix, base)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info("process group up: rank %d of %d, store prefix %s, backend %s", rank, world, prefix, backend)
    return rank, world


def store_prefix(env: Mapping[str, str]) -> str:
    """The prefix under which the workers of one torchrun attempt meet in its rendezvous store.

    The agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``, torch's default) outlives the
    attempts: gloo workers of a restarted attempt would read the previous attempt's peer
    addresses and fail in connectFullMesh or hang, so each attempt gets
    ``resilient_train/attempt-N`` (N = ``TORCHELASTIC_RESTART_COUNT``). That count is the
    agent's own, though: with several agents (``--nnodes``) a membership change restarts
    workers without counting and an agent that comes back starts again at 0, so agents of one
    round can disagree on N. Without the agent's store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``)
    rank 0 of each round hosts a new store on a port its agent just chose: nothing of an
    earlier attempt is in it, and the prefix names no attempt, so workers of agents with
    different counts meet. Either way the prefix names the job (``TORCHELASTIC_RUN_ID``: random
    per ``--standalone`` launch, ``--rdzv-id`` otherwise), so a worker that reaches another job's
    store (two agents on one machine can pick the same free port for it) waits for its own peers
    instead of taking a rank in that job.
    """
    run = env.get("TORCHELASTIC_RUN_ID", "")
    base = f"resilient_train/{run}" if run else "resilient_train"
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return f"{base}/attempt-{int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))}"
    return base
