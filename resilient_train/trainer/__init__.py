"""The drop-in wrapper: a training script keeps its model, optimizer and loop.

::

    trainer = resilient_train.wrap(model, optimizer, TrainerConfig(checkpoint="s3://b/run"))
    for xb, yb in loader:
        loss = loss_fn(trainer.model(xb), yb)
        loss.backward()
        trainer.step()          # where the loop called optimizer.step()
    trainer.close()

What :func:`wrap` does, in order (the phases of :meth:`Trainer.start`):

1. **distributed** (:mod:`.setup`): under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
   ``MASTER_PORT`` set) it joins the job's rendezvous store (under a prefix per restart attempt
   when it is the agent's, shared by every attempt: see :func:`.setup.init_distributed`), so a restarted
   gloo job never reads the previous attempt's peer addresses, and initialises the default
   process group. A group the script initialised itself is adopted instead, and a script's DDP
   or FSDP2 (``fully_shard``) model and DistributedSampler are accepted (see
   :mod:`resilient_train.adapt`).
2. **layout**: one torchrun job is one provider's replica group: inside it gradients are
   averaged every step by DDP over fast local links (or by the script's FSDP2). With
   ``group=``/``membership=`` the job is one member of a larger job of several providers,
   synchronised by the configured latency-tolerant mode (``localsgd``/``diloco``) through a
   :class:`~resilient_train.recovery.ProviderGroup`. Mode ``ddp`` without ``group=`` is plain DDP.
3. **resume** (:mod:`.resume`): the newest verifiable checkpoint on any provider is loaded
   (resharded to this world size): model, optimizer, scheduler, sampler, sync state, RNG, step.
4. **loop** (:mod:`.trainer`): :meth:`Trainer.step` runs the optimizer step, the scheduler, the
   cross-provider sync, and the checkpoint schedule (asynchronous: training stalls only for
   the copy to CPU staging memory; writing and replication run in the background).

Every phase appends to the event log (JSON lines) when one is configured. The package's parts:
:mod:`.config` (``TrainerConfig``, ``SyncConfig``: validated at construction, no I/O),
:mod:`.setup` (the default process group), :mod:`.resume` (resume and the job-wide restart
agreement), :mod:`.trainer` (``Trainer``, ``wrap``: the step loop).
"""

from __future__ import annotations

from .config import SyncConfig, TrainerConfig
from .trainer import Trainer, wrap

__all__ = ["SyncConfig", "TrainerConfig", "Trainer", "wrap"]
