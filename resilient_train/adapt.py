"""How :func:`~resilient_train.wrap` meets a training script as people write it.

A typical torchrun script initialises the process group itself, wraps its model in DDP, feeds a
DataLoader from a :class:`torch.utils.data.DistributedSampler` and loops over epochs. ``wrap``
accepts all of that; each piece is adapted here, at wrap time, so that nothing fails hours
later at the first checkpoint:

* **process group**: when the script already called ``dist.init_process_group()``, ``wrap``
  uses that group. Under torchrun the job's rendezvous store (torch's c10d Store, not a
  checkpoint store) is shared by every restart attempt (torch's default;
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` turns it off), so the restarted workers'
  own ``init_process_group()`` would read the dead attempt's peer addresses and hang or fail in
  gloo's connectFullMesh. Once every group the wrapper needs is connected,
  :func:`forget_rendezvous_keys` deletes this attempt's keys from the rendezvous store, so a
  restarted attempt finds none and exchanges fresh addresses. Where it cannot list keys
  and restarts are enabled, ``wrap`` refuses and says which line to remove. When ``wrap``
  initialises the group itself it uses a prefix per attempt in the shared rendezvous store
  instead (see :func:`~resilient_train.trainer.setup.init_distributed`).
* **model**: a model already in ``DistributedDataParallel`` over every rank of the job is
  accepted (one torchrun job is one provider's replica group): the script's DDP stays in
  charge of the gradients and the wrapper checkpoints its ``.module``. A DDP over fewer ranks
  is refused with the fix (pass the bare model). A model the script passed through FSDP2's
  ``fully_shard`` (its parameters are DTensors: FSDP over a 1-D mesh, HSDP over a 2-D one) is
  taken as it is: FSDP2 stays in charge of the gradients, ``wrap`` adds no DDP, and checkpoints
  hold each rank's own pieces (never gathered; see :func:`model_layout`). FSDP1
  (``FullyShardedDataParallel``) is refused with the fix (move to ``fully_shard``): its flat
  parameters hide the tensors a checkpoint keys by name.
* **sampler**: a ``DistributedSampler`` is converted in place (the DataLoader that holds it
  keeps working) into a :class:`ResumableDistributedSampler`: same dataset length, shuffle,
  seed, ``drop_last`` and epoch, hence the same order of samples, plus a position that a
  checkpoint records. Any other sampler must have ``state_dict()``/``load_state_dict()`` or
  ``wrap`` refuses.
* **epochs**: :func:`epochs` yields the epochs still to run, starting with the one the
  checkpoint was taken in, so ``for epoch in trainer.epochs(E): sampler.set_epoch(epoch)``
  resumes mid-epoch without replaying samples.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from .data import ResumableSampler
from .errors import ConfigError

__all__ = ["ResumableDistributedSampler", "adapt_sampler", "unwrap_model", "find_script_ddp", "model_layout", "check_model_layout",
           "check_sharded_mesh", "forget_rendezvous_keys", "restart_safety_problem", "start_epoch", "epochs"]

log = logging.getLogger(__name__)

EPOCH_KEY = "resilient_train.epoch"

_REMOVE_INIT = (
    "remove the line `dist.init_process_group(...)` from the script and create the DistributedSampler/DDP after "
    "`resilient_train.wrap(...)` (wrap initialises the process group with a rendezvous-store prefix per restart attempt), "
    "or launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
)


# ---------------------------------------------------------------------- process group


def restart_safety_problem(rdzv_store: Any, env: Mapping[str, str]) -> str | None:
    """Why the script's own process group cannot survive a torchrun restart, or None if it can.
    ``rdzv_store``: the default group's rendezvous store (torch's c10d Store)."""
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if not shared or restarts == 0:
        return None
    try:
        rdzv_store.list_keys()
    except Exception as exc:  # FileStore/HashStore and older torch builds cannot list keys
        return f"the script's rendezvous store ({type(rdzv_store).__name__}) cannot list its keys ({type(exc).__name__}: {exc}), so a restarted attempt would read this attempt's peer addresses"
    return None


def forget_rendezvous_keys(groups: list[Any], timeout: timedelta, env: Mapping[str, str] | None = None) -> int:
    """Delete this attempt's keys from the default group's rendezvous store once every group is connected.

    Called on every rank, after the wrapper built its groups, only when the script initialised
    the default process group itself. A barrier on each group first makes sure every rank has
    connected (NCCL connects lazily, on a group's first collective); a second barrier keeps
    rank 0's deletion ahead of anything else that uses the rendezvous store. Returns the number of keys
    deleted (on rank 0; 0 elsewhere). Raises :class:`ConfigError` when the rendezvous store cannot
    be cleaned and restarts are enabled.
    """
    from torch.distributed.distributed_c10d import _get_default_store

    env = os.environ if env is None else env
    rdzv_store = _get_default_store()
    problem = restart_safety_problem(rdzv_store, env)
    if problem:
        raise ConfigError(f"{problem}: {_REMOVE_INIT}")
    for g in [None] + [g for g in groups if g is not None]:
        dist.barrier(group=g)
    deleted = 0
    if dist.get_rank() == 0:
        try:
            keys = rdzv_store.list_keys()
        except Exception as exc:  # no restarts configured (checked above): nothing depends on it
            log.debug("rendezvous store cannot list keys (%s); leaving rendezvous keys in place", exc)
            keys = []
        for key in keys:
            if rdzv_store.delete_key(key):
                deleted += 1
    dist.barrier()
    log.info("script-initialised process group adopted; %d rendezvous key(s) of this attempt removed so a restart can rendezvous afresh", deleted)
    return deleted


# ---------------------------------------------------------------------- model


def _is_fsdp1(model: torch.nn.Module) -> bool:
    return any(cls.__name__ == "FullyShardedDataParallel" for cls in type(model).__mro__)


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and callable(getattr(t, "to_local", None))


def unwrap_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``(module to checkpoint, the script's DDP or None)``. A DDP model gives its ``.module``;
    an FSDP2 model (``fully_shard``) is its own module; FSDP1 is refused with the fix."""
    if any(_is_fsdp1(m) for m in model.modules()):
        raise ConfigError(
            "wrap takes FSDP2 models (torch.distributed.fsdp.fully_shard), not FSDP1 (FullyShardedDataParallel): "
            "its flat parameters hide the per-tensor layout a checkpoint keys by name. Replace "
            "`FullyShardedDataParallel(model, ...)` by `fully_shard(block)` for each block and `fully_shard(model)`"
        )
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if any(_is_dtensor(p) for p in model.module.parameters()):
            raise ConfigError("the model is in DistributedDataParallel and its parameters are DTensors (fully_shard): remove `DDP(...)`, FSDP2 already averages the gradients")
        return model.module, model
    return model, None


def find_script_ddp(module: torch.nn.Module) -> torch.nn.Module | None:
    """The DistributedDataParallel the script built around ``module``, if any.

    A script that keeps its own ``model = DDP(model)`` but passes the bare module to ``wrap``
    would otherwise get a second DDP from ``wrap``: two reducers each all-reducing every
    gradient (twice the traffic, and a mismatch of hooks when one of them is skipped). ``wrap``
    adopts the script's DDP instead (one warning says so); pass the DDP itself to silence it.
    Scans the live objects once (a few milliseconds per 100k objects).
    """
    import gc

    from .checkpoint.state import checkpoint_module as canonical

    target = canonical(module)
    ddp = torch.nn.parallel.DistributedDataParallel
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance() dereferences a weak proxy, which raises
        # ReferenceError when its object is gone (seen with a DataLoader's proxies)
        if issubclass(type(obj), ddp) and obj.module is not None and canonical(obj.module) is target:
            log.warning("the model passed to wrap is already inside a DistributedDataParallel the script built: wrap uses that DDP "
                        "instead of adding a second one (pass the DDP itself to wrap to silence this)")
            return obj
    return None


def model_layout(module: torch.nn.Module) -> str:
    """``"sharded"`` when the parameters are DTensors (FSDP2 / HSDP / a DTensor mesh), else
    ``"replicated"`` (a plain model: each rank holds every tensor whole; DDP's case).

    The checkpoint path is one for both: a replicated tensor is the one-piece case of a sharded
    one (each distinct piece is written once, by one of the ranks that hold it, and a load
    reads the region its live tensor covers). The layout decides only who averages gradients:
    DDP (added by ``wrap`` when the script did not) or the script's FSDP2. A model with some
    DTensor and some plain parameters is refused: its plain ones would never be averaged
    (``fully_shard(model)`` on the root shards the rest).
    """
    params = list(module.parameters())
    sharded = [_is_dtensor(p) for p in params]
    if not any(sharded):
        return "replicated"
    if not all(sharded):
        plain = [n for n, p in module.named_parameters() if not _is_dtensor(p)][:3]
        raise ConfigError(f"some parameters are DTensors (fully_shard) and some are not ({', '.join(plain)}): call fully_shard(model) on the root module too, so every parameter is sharded and its gradient averaged")
    return "sharded"


def check_model_layout(user_ddp: torch.nn.Module | None, layout: str = "replicated", sync_mode: str = "ddp", group: str | None = None) -> None:
    """The script's DDP spans every rank of the job (one torchrun job is one replica group). A
    sharded model is one replica over all the job's ranks: sync mode 'ddp' inside one torchrun
    job, or 'diloco'/'localsgd' between providers with ``group=`` (each rank exchanges its own
    shard, recovery/lanes.py). DiLoCo between the ranks of one job would average different
    shards with each other, and is refused."""
    if layout == "sharded" and group is None and sync_mode != "ddp":
        raise ConfigError(
            f"an FSDP2 (fully_shard) model is one replica spread over every rank of the job: sync mode {sync_mode!r} "
            "without group= would average different shards with each other. Use sync mode 'ddp' (FSDP2 averages the "
            "gradients) inside one torchrun job, or DiLoCo/local SGD between providers with "
            "TrainerConfig(group='<provider>', membership=...)"
        )
    if user_ddp is None:
        return
    pg = getattr(user_ddp, "process_group", None)
    if pg is not None and dist.is_initialized() and dist.get_world_size(pg) != dist.get_world_size():
        raise ConfigError("the model's DistributedDataParallel uses a process group smaller than the world: pass the bare model and let wrap build the DDP over every rank")


def check_sharded_mesh(module: torch.nn.Module, world_size: int) -> None:
    """Every DTensor parameter's mesh spans the whole job: FSDP2 over all ranks, or HSDP's
    replicate x shard mesh. A mesh over fewer ranks would leave the other ranks' copies
    unaveraged and the checkpoint's pieces ambiguous."""
    for name, p in module.named_parameters():
        if _is_dtensor(p) and p.device_mesh.size() != world_size:
            raise ConfigError(f"parameter {name!r} is sharded over a mesh of {p.device_mesh.size()} ranks but the job has {world_size}: build the mesh over every rank (init_device_mesh(device, (world_size,)) or HSDP's (replicas, shards))")


# ---------------------------------------------------------------------- sampler


class ResumableDistributedSampler(ResumableSampler):
    """A ``DistributedSampler`` converted by ``wrap``: same order, plus a resumable position.

    Keeps the original object's ``dataset`` and ``num_replicas`` attributes for code that reads
    them.
    """

    @property
    def num_replicas(self) -> int:
        return self.world_size

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        self.world_size = value


def adapt_sampler(sampler: Any) -> Any:
    """Return a sampler a checkpoint can record; convert a DistributedSampler in place."""
    if sampler is None:
        return None
    if callable(getattr(sampler, "state_dict", None)) and callable(getattr(sampler, "load_state_dict", None)):
        return sampler
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        fresh = ResumableSampler(len(sampler.dataset), seed=int(sampler.seed), shuffle=bool(sampler.shuffle), rank=int(sampler.rank), world_size=int(sampler.num_replicas), drop_last=bool(sampler.drop_last))
        fresh.epoch = int(sampler.epoch)
        kept = {"dataset": sampler.dataset}
        sampler.__dict__.clear()
        sampler.__dict__.update(fresh.__dict__, **kept)
        # In place, so the DataLoader built on this object draws from the resumable order.
        sampler.__class__ = ResumableDistributedSampler
        log.info("DistributedSampler converted to a resumable sampler (%d samples, shuffle=%s, seed=%d, drop_last=%s)", sampler.dataset_len, sampler.shuffle, sampler.seed, sampler.drop_last)
        return sampler
    raise ConfigError(f"sampler {type(sampler).__name__} has no state_dict()/load_state_dict(), so a checkpoint cannot record its position: use resilient_train.data.ResumableSampler or torch.utils.data.DistributedSampler (converted by wrap)")


# ---------------------------------------------------------------------- epochs


def start_epoch(sampler: Any, extra: Mapping[str, Any]) -> int:
    """The first epoch a resumed loop still has to run.

    With a sampler that knows its epoch: that epoch, or the next one when it was used up when
    the checkpoint was taken. Without one: the epoch recorded by :func:`epochs` (an epoch
    interrupted half-way then starts again from its beginning, as the wrapper cannot skip its
    batches; pass a sampler to resume mid-epoch).
    """
    epoch = getattr(sampler, "epoch", None)
    if isinstance(epoch, int):
        done = sampler.exhausted() if callable(getattr(sampler, "exhausted", None)) else False
        return epoch + 1 if done else epoch
    return int(extra.get(EPOCH_KEY, 0))


def epochs(trainer: Any, count: int) -> Iterator[int]:
    """Yield ``start_epoch .. count-1``, recording the current epoch in the checkpointed extras."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"epochs() takes the total number of epochs, an int >= 0, got {count!r}")
    for epoch in range(start_epoch(trainer.sampler, trainer.extra), count):
        trainer.extra[EPOCH_KEY] = epoch
        yield epoch
        trainer.extra[EPOCH_KEY] = epoch + 1  # finished: a checkpoint from here on resumes after it
