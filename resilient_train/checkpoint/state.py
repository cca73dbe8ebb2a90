"""What a checkpoint holds, and how live training objects turn into pieces + JSON and back.

:class:`TrainState` names the objects of a training run. :func:`capture` turns them into a
:class:`Snapshot`: tensor pieces (views of the live tensors, not copies) plus JSON trees for
everything else. Loading goes the other way in :mod:`.targets` (``build_targets``: where every
stored tensor must land, the checkpoint validated against the live objects before any tensor
is changed).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ConfigError, StateMismatchError
from ..format.jsontree import decode, encode
from ..format.safetensors_io import DTYPE_TO_ST, ST_TO_DTYPE
from .planner import PieceMeta

__all__ = ["TrainState", "Piece", "Snapshot", "capture", "rng_state", "set_rng_state", "checkpoint_module", "local_piece", "optimizer_fqns",
           "encode_rank_tree", "decode_rank_tree"]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The objects a checkpoint saves and restores. Every field is optional.

    * ``model``: an ``nn.Module`` (DDP-wrapped modules are unwrapped; DTensor/FSDP2
      parameters are saved shard by shard).
    * ``optimizer``: any ``torch.optim.Optimizer``; its state is keyed by parameter name, so
      it survives a change of world size and of parameter order.
    * ``scheduler``, ``sampler``: objects with ``state_dict()``/``load_state_dict()`` whose
      state is JSON-able (tensors allowed).
    * ``stateful``: more such objects by name (e.g. a DiLoCo wrapper's outer optimizer).
    * ``extra``: a user dict (JSON-able values and tensors); restored in place.
    * ``rng``: save and restore the RNG states of python, numpy, torch and CUDA, per rank.
    * ``extra_per_rank``: a dict like ``extra`` but kept per rank (a prefetched batch, a
      running metric of this rank); restored in place.
    * ``stateful_per_rank``: objects with ``state_dict()``/``load_state_dict()`` by name whose
      state differs per rank (a data loader's position: torchdata's ``StatefulDataLoader``).

    **Which rank's value is saved.** ``extra``, ``scheduler`` and ``sampler`` are rank 0's,
    every key, JSON values and tensors alike (other ranks' values are not looked at).
    ``stateful`` objects must be identical on every rank (the library's sync state is): their
    JSON is rank 0's, their tensors are written by whichever rank balances the write.
    ``rng``, ``extra_per_rank`` and ``stateful_per_rank`` are saved by every rank into its own
    ``rank-NNNNN.json`` (tensors inline, copied to CPU at capture: keep this state small) and
    restored per rank. **On a world-size change** rank ``r`` takes the state saved by rank
    ``r % saved_world_size`` (growing: new ranks repeat the first ranks' state; shrinking: the
    state of ranks ``>= new world size`` is dropped). Per-rank tensors come back on the device
    of the value the live dict holds under that key at load time (CPU otherwise). A
    ``stateful_per_rank`` object the checkpoint holds no state for keeps its own (a warning
    says so): a script may start saving its data loader on a run that has checkpoints.
    """

    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    sampler: Any = None
    stateful: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    rng: bool = True
    extra_per_rank: dict[str, Any] = field(default_factory=dict)
    stateful_per_rank: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise ConfigError(f"TrainState.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ConfigError(f"TrainState.optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        if self.optimizer is not None and self.model is None:
            raise ConfigError("TrainState.optimizer needs TrainState.model: optimizer state is keyed by parameter name")
        for label, obj in (("scheduler", self.scheduler), ("sampler", self.sampler), *((f"stateful[{k!r}]", v) for k, v in self.stateful.items()),
                           *((f"stateful_per_rank[{k!r}]", v) for k, v in self.stateful_per_rank.items())):
            if obj is not None and not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(f"TrainState.{label} must have state_dict() and load_state_dict()")
        if not isinstance(self.extra, dict):
            raise ConfigError("TrainState.extra must be a dict")
        if not isinstance(self.extra_per_rank, dict) or not isinstance(self.stateful_per_rank, dict):
            raise ConfigError("TrainState.extra_per_rank and TrainState.stateful_per_rank must be dicts")

    @property
    def has_rank_state(self) -> bool:
        """Whether a load must read this rank's ``rank-NNNNN.json``."""
        return bool(self.rng or self.extra_per_rank or self.stateful_per_rank)


@dataclass
class Piece:
    """A tensor piece to write: ``tensor`` is a view of live memory (CPU or GPU)."""

    meta: PieceMeta
    tensor: torch.Tensor


@dataclass
class Snapshot:
    """Everything one rank contributes to a checkpoint.

    ``shared`` becomes ``state.json`` (rank 0's is written); ``rank_state`` becomes this rank's
    ``rank-NNNNN.json``. Tensors referenced from either tree are among ``pieces``.
    """

    pieces: list[Piece]
    shared: dict[str, Any]
    rank_state: dict[str, Any]

    def metas(self) -> list[PieceMeta]:
        return [p.meta for p in self.pieces]

    @property
    def nbytes(self) -> int:
        return sum(p.meta.nbytes for p in self.pieces)


def checkpoint_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names are the checkpoint's keys: DDP's ``module.`` and
    ``torch.compile``'s ``_orig_mod.`` dropped, in any nesting (DDP of a compiled model, a
    compiled DDP), so a checkpoint loads with compile on or off and exports plain names.
    Not :func:`resilient_train.adapt.unwrap_model`, which returns ``(module, ddp or None)`` for
    the trainer and refuses FSDP."""
    for _ in range(8):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model
    return model


def _is_compiled(model: Any) -> bool:
    """A ``torch.compile``'d module (``torch._dynamo``'s OptimizedModule), without importing dynamo."""
    return isinstance(getattr(model, "_orig_mod", None), torch.nn.Module) and type(model).__name__ == "OptimizedModule"


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_piece(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, global_shape, offsets)`` for a plain tensor or a DTensor."""
    if _is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        gshape = tuple(t.shape)
        lshape, offs = compute_local_shape_and_global_offset(gshape, t.device_mesh, t.placements)
        if tuple(local.shape) != tuple(lshape):
            raise StateMismatchError(f"DTensor local shape {tuple(local.shape)} differs from its placement's {tuple(lshape)}")
        return local, gshape, tuple(int(o) for o in offs)
    return t, tuple(t.shape), (0,) * t.dim()


def _piece(key: str, group: str, name: str, t: torch.Tensor) -> Piece:
    local, gshape, offs = local_piece(t)
    st = DTYPE_TO_ST.get(local.dtype)
    if st is None:
        raise ConfigError(f"tensor {key!r} has dtype {local.dtype}, which safetensors cannot store")
    local = local.detach()
    return Piece(PieceMeta(key, group, name, st, tuple(local.shape), gshape, offs, local.numel() * local.element_size()), local)


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in checkpoint_module(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def optimizer_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    ids = _param_names(model)
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        fqns = []
        for p in group["params"]:
            if id(p) not in ids:
                raise ConfigError(f"optimizer param group {gi} holds a parameter that is not in the model: pass the model the optimizer was built for")
            fqns.append(ids[id(p)])
        groups.append(fqns)
    return groups


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: CUDA RNG not restored", len(states), torch.cuda.device_count())


def capture(state: TrainState, rank: int = 0, world_size: int = 1) -> Snapshot:
    """Describe ``state`` as pieces + JSON without copying tensor data."""
    pieces: list[Piece] = []
    shared: dict[str, Any] = {}

    if state.model is not None:
        for name, t in checkpoint_module(state.model).state_dict().items():
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"model state entry {name!r} is not a tensor")
            pieces.append(_piece(f"model/{name}", "model", name, t))

    if state.optimizer is not None:
        assert state.model is not None  # checked in TrainState
        fqn_groups = optimizer_fqns(state.model, state.optimizer)
        sd = state.optimizer.state_dict()
        index_to_fqn = {}
        for group_sd, fqns in zip(sd["param_groups"], fqn_groups):
            for idx, fqn in zip(group_sd["params"], fqns):
                index_to_fqn[idx] = fqn
        opt_state: dict[str, Any] = {}
        for idx, per_param in sd["state"].items():
            fqn = index_to_fqn[idx]
            entry: dict[str, Any] = {}
            for sname, v in per_param.items():
                if isinstance(v, torch.Tensor):
                    key = f"optimizer/state/{fqn}/{sname}"
                    pieces.append(_piece(key, "optimizer", key.removeprefix("optimizer/"), v))
                    entry[sname] = {"__tensor__": key}
                else:
                    tree, ts = encode(v, path=f"optimizer/state/{fqn}/{sname}")
                    if ts:
                        raise ConfigError(f"optimizer state {fqn}/{sname} nests tensors; only top-level tensors are supported")
                    entry[sname] = tree
            opt_state[fqn] = entry
        groups = []
        for group_sd, fqns in zip(sd["param_groups"], fqn_groups):
            g = {k: v for k, v in group_sd.items() if k != "params"}
            tree, ts = encode(g, path="optimizer/param_groups")
            if ts:
                raise ConfigError("optimizer param_groups hold tensors (e.g. a tensor lr); use a float")
            tree["params"] = fqns
            groups.append(tree)
        shared["optimizer"] = {"param_groups": groups, "state": opt_state}

    def add_tree(label: str, obj: Any, every_rank: bool = False) -> None:
        tree, ts = encode(obj, path=label, tensor_key=lambda p: f"{label}/{p[len(label) + 1:]}" if p.startswith(label + ".") else label)
        # Only rank 0's shared.json is written, so only rank 0's tensors may be (the planner
        # would otherwise pick whichever rank balances the write: rank 1's tensors beside
        # rank 0's JSON). ``stateful`` objects are identical on every rank by contract.
        if every_rank or rank == 0:
            for key, t in ts.items():
                pieces.append(_piece(key, "extra", key, t))
        shared[label] = tree

    if state.scheduler is not None:
        add_tree("scheduler", state.scheduler.state_dict())
    if state.sampler is not None:
        add_tree("sampler", state.sampler.state_dict())
    for name, obj in sorted(state.stateful.items()):
        add_tree(f"stateful.{name}", obj.state_dict(), every_rank=True)
    if state.extra:
        add_tree("extra", state.extra)

    rank_state: dict[str, Any] = {"rank": rank, "world_size": world_size}
    if state.rng:
        tree, _ = encode(rng_state())
        rank_state["rng"] = tree
    if state.extra_per_rank:
        rank_state["extra_per_rank"] = encode_rank_tree(state.extra_per_rank, "extra_per_rank")
    if state.stateful_per_rank:
        rank_state["stateful_per_rank"] = {name: encode_rank_tree(obj.state_dict(), f"stateful_per_rank.{name}") for name, obj in sorted(state.stateful_per_rank.items())}
    return Snapshot(pieces, shared, rank_state)


# ------------------------------------------------------------------ per-rank state

_RANK_TENSOR = "__rank_tensor__"


def encode_rank_tree(obj: Any, label: str) -> Any:
    """A JSON tree of one rank's own state, tensors inline (copied to CPU now, so the tree is a
    snapshot of this moment even while the save runs in the background)."""

    def inline(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if _is_dtensor(x):
                raise ConfigError(f"{label}: a DTensor cannot be per-rank state; keep per-rank tensors local")
            t = x.detach().to("cpu").contiguous()
            if t.dtype not in DTYPE_TO_ST:
                raise ConfigError(f"{label}: tensor dtype {t.dtype} cannot be stored")
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {_RANK_TENSOR: {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data": raw}}
        if isinstance(x, dict):
            if _RANK_TENSOR in x:
                raise ConfigError(f"{label}: the key {_RANK_TENSOR!r} is reserved")
            return {k: inline(v) for k, v in x.items()}
        if isinstance(x, list):
            return [inline(v) for v in x]
        if isinstance(x, tuple):
            return tuple(inline(v) for v in x)
        return x

    tree, ts = encode(inline(obj), path=label)
    assert not ts  # every tensor was inlined above
    return tree


def decode_rank_tree(tree: Any, label: str, like: Any = None) -> Any:
    """Inverse of :func:`encode_rank_tree`. ``like``: the live value; a tensor found under the
    same key there gives the device the restored tensor goes to. Raises StateFileError."""
    from ..errors import StateFileError

    def restore(x: Any, live: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_RANK_TENSOR}:
                spec = x[_RANK_TENSOR]
                try:
                    dtype = ST_TO_DTYPE[spec["dtype"]]
                    shape = [int(d) for d in spec["shape"]]
                    raw = spec["data"]
                    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
                except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                    raise StateFileError(f"rank state {label}: malformed tensor ({type(exc).__name__}: {exc})") from None
                return t.to(live.device) if isinstance(live, torch.Tensor) else t
            return {k: restore(v, live.get(k) if isinstance(live, dict) else None) for k, v in x.items()}
        if isinstance(x, list):
            return [restore(v, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return tuple(restore(v, live[i] if isinstance(live, (list, tuple)) and i < len(live) else None) for i, v in enumerate(x))
        return x

    return restore(decode(tree), like)


def decode_rng(tree: Any) -> dict[str, Any]:
    return decode(tree)


def st_dtype(st: str) -> torch.dtype:
    return ST_TO_DTYPE[st]
