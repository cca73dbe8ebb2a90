"""DiLoCo, streaming DiLoCo with overlap, and local SGD, for a plain PyTorch loop.

Usage (every replica runs the same code)::

    sync = DiLoCo(model, inner_opt, sync_every=100, codec="int8", comm=ProcessGroupCommunicator())
    for batch in data:
        loss(model, batch).backward(); inner_opt.step(); inner_opt.zero_grad()
        # nothing else: sync hooks inner_opt.step(). Without an inner optimizer, call sync.step().

Maths (per fragment, see docs/sync.md). Each replica ``i`` keeps the *global* weights
``G`` (fp32, identical on every replica) and trains its local weights ``L_i``. At a sync of a
fragment, ``D_i = G - L_i`` (the pseudo-gradient) is encoded with error feedback, the mean
``D = (1/n) sum_i decode(encode(D_i + e_i))`` is computed identically on every replica, and the
outer optimizer steps ``G`` with ``G.grad = D`` (default: SGD, lr 0.7, Nesterov momentum 0.9).
Then ``L_i <- G`` when ``overlap_steps == 0``. With ``overlap_steps = d > 0`` the exchange
runs in the background while d more inner steps happen, and then
``L_i <- lerp(L_i, G, mix) = L_i + mix * (G - L_i)`` (``mix`` = 1 discards the d local steps,
0.5 is the Streaming DiLoCo choice).

Schedule: parameters are split into ``fragments = K`` contiguous groups of about equal size;
fragment ``k`` launches at inner steps ``t`` with ``t >= o_k`` and ``t = o_k (mod H)``, where
``o_k = (k + 1) * H // K``; with K = 1 that is every H steps. Its result is applied at
``t + d``.

Failure behaviour: the first sync runs a handshake (one all-gather) comparing a digest of the
*starting* parameters, taken in the constructor, and the sync configuration: different
parameters raise :class:`ReplicaMismatchError`, different configurations
:class:`PayloadMismatchError`, on every rank. A non-finite pseudo-gradient is never sent (its
replica sends zeros and a veto flag in the same exchange); the round is skipped on every
replica: ``G``, the outer optimizer and the residuals stay as they were, ``L_i <- G``, and the
skip is logged and counted in ``skipped_rounds``. The replica whose pseudo-gradient was
non-finite also calls ``on_local_veto()`` (the trainer clears its inner optimizer state there,
so a poisoned Adam moment cannot veto every later round); without one, a DiLoCo given its
``inner_optimizer`` clears that optimizer's state itself (logged). ``max_vetoes_in_a_row``
(default :data:`DEFAULT_MAX_VETOES_IN_A_ROW`; 0 turns the limit off) consecutive vetoed rounds
raise :class:`SyncVetoError`: with the defaults a replica that keeps producing non-finite
pseudo-gradients stops training loudly instead of skipping every later round. A failed or timed-out exchange raises
:class:`DistributedError`.

``state_dict()`` returns ``{"meta": <JSON-able dict>, "tensors": {name: Tensor}}`` with the
global weights, residuals, outer optimizer state and any in-flight result (waited for), so a
checkpoint never needs pickle. ``LocalSGD`` is DiLoCo with the outer optimizer fixed to plain
SGD with lr 1 (so ``G <- mean_i L_i``) and no compression.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

from ..compression import Codec, get_codec
from ..errors import ConfigError, PayloadMismatchError, ReplicaMismatchError, StateMismatchError, SyncVetoError
from .communicator import (DEFAULT_TIMEOUT, Communicator, Handle, ProcessGroupCommunicator, CODEC_IDS,
                           allreduce_encoded)

__all__ = ["DiLoCo", "LocalSGD", "default_outer_optimizer", "STATE_FORMAT", "GLOBAL_STATE_FORMAT"]

log = logging.getLogger(__name__)

STATE_FORMAT = "resilient_train.sync/1"
GLOBAL_STATE_FORMAT = "resilient_train.sync.global/1"
"""The replicated part (:meth:`DiLoCo.global_state_dict`): exchanged between live members, never persisted."""
_DIGEST_SAMPLES = 4096


def default_outer_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The DiLoCo paper's outer optimizer: SGD, lr 0.7, Nesterov momentum 0.9."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def param_digest(params: list[torch.Tensor]) -> int:
    """63-bit digest of shapes, dtypes and a strided sample of up to 4096 values per tensor.

    Cheap (independent of model size beyond the sample) and deterministic across machines; it
    detects replicas initialised differently, not a single changed element."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        flat = _local(p).detach().reshape(-1)
        stride = max(1, flat.numel() // _DIGEST_SAMPLES)
        sample = flat[::stride][:_DIGEST_SAMPLES].contiguous().cpu()
        h.update(f"{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: the local shard of a DTensor (FSDP2, tensor parallel;
    it shares the parameter's storage), the tensor itself otherwise. Sync state (global
    weights, outer momentum, residuals) is kept per local piece, so a sharded model's sync state
    is sharded like its parameters and nothing is ever gathered."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def _flatten(params: list[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.zeros(0)
    return torch.cat([_local(p).detach().reshape(-1).to(torch.float32) for p in params])


@torch.no_grad()
def _write(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        t = _local(p)
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


@dataclass
class _Pending:
    launched_at: int
    apply_at: int
    handle: Handle
    saved_residual: torch.Tensor | None


class _Fragment:
    def __init__(self, index: int, params: list[torch.Tensor], offset: int, outer_factory, with_residual: bool):
        self.index = index
        self.params = params
        self.offset = offset
        self.global_ = _flatten(params).clone().requires_grad_(True)
        self.outer = outer_factory([self.global_])
        self.residual = torch.zeros_like(self.global_.detach()) if with_residual else None
        self.pending: _Pending | None = None

    @property
    def numel(self) -> int:
        return self.global_.numel()


def _split(params: list[torch.Tensor], k: int) -> list[list[torch.Tensor]]:
    """K contiguous groups with about total/K elements each (every group non-empty).

    Sized by each parameter's *logical* element count (a DTensor's whole tensor, not this rank's
    piece), so every rank of a sharded model puts every parameter in the same fragment: a
    fragment's pieces on the ranks of a group are one fragment of the model, synced at the same
    steps, and its checkpointed pieces (``fragment.<k>.<what>.p<j>``) name the same parameter on
    every rank and under any other sharding."""
    total = sum(p.numel() for p in params)
    groups: list[list[torch.Tensor]] = [[] for _ in range(k)]
    seen = 0
    for i, p in enumerate(params):
        remaining_params = len(params) - i
        g = min(k - 1, seen * k // max(total, 1))
        # keep enough parameters for the groups still empty
        empty_after = sum(1 for grp in groups[g + 1:] if not grp)
        if remaining_params <= empty_after:
            g = next(j for j, grp in enumerate(groups) if not grp)
        groups[g].append(p)
        seen += p.numel()
    return groups


DEFAULT_MAX_VETOES_IN_A_ROW = 3
"""Consecutive vetoed rounds after which :class:`DiLoCo` raises SyncVetoError (0: never)."""


class DiLoCo:
    """DiLoCo with optional streaming fragments, overlap and compressed pseudo-gradients.

    ``inner_optimizer``: if given, ``step()`` runs automatically after each of its steps (a
    post-step hook, removed by ``close()``); if ``None``, call ``step()`` after every inner
    optimizer step yourself. ``outer_optimizer``: a factory ``params -> Optimizer`` applied to
    each fragment's global weights (default :func:`default_outer_optimizer`). ``comm``: a
    :class:`Communicator` (default: the default process group, looked up at the first sync).
    The constructor validates arguments and copies the starting weights; it does no I/O.
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None = None,
                 outer_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None, *,
                 sync_every: int, comm: Communicator | None = None, codec: str | Codec = "none",
                 fragments: int = 1, overlap_steps: int = 0, mix: float = 0.5,
                 timeout: timedelta = DEFAULT_TIMEOUT, max_vetoes_in_a_row: int = DEFAULT_MAX_VETOES_IN_A_ROW,
                 on_local_veto: Callable[[], None] | None = None):
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ConfigError(f"sync_every must be an int >= 1 (inner steps between syncs), got {sync_every!r}")
        params = [p for p in model.parameters()]
        if not params:
            raise ConfigError("the model has no parameters to synchronise")
        if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= min(
                sync_every, len(params)):
            raise ConfigError(f"fragments must be an int in [1, min(sync_every, number of parameter tensors)] "
                              f"= [1, {min(sync_every, len(params))}], got {fragments!r}")
        if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or not 0 <= overlap_steps < sync_every:
            raise ConfigError(f"overlap_steps must be an int in [0, sync_every) = [0, {sync_every}), "
                              f"got {overlap_steps!r}")
        if not isinstance(mix, (int, float)) or not 0 < mix <= 1:
            raise ConfigError(f"mix must be in (0, 1], got {mix!r}")
        self.codec: Codec = get_codec(codec) if isinstance(codec, str) else codec
        if not isinstance(self.codec, Codec):
            raise ConfigError(f"codec must be a codec name or a Codec, got {type(codec).__name__}")
        self.sync_every = sync_every
        self.overlap_steps = overlap_steps
        self.mix = float(mix)
        self.timeout = timeout
        self.comm: Communicator = comm if comm is not None else ProcessGroupCommunicator()
        factory = outer_optimizer or default_outer_optimizer
        self._fragments = [
            _Fragment(k, grp, (k + 1) * sync_every // fragments, factory, self.codec.name != "none")
            for k, grp in enumerate(_split(params, fragments))]
        self._digest = param_digest(params)
        self.step_count = 0
        self.rounds = 0
        self.skipped_rounds = 0
        self._handshake_done = False
        self.local_veto = False
        self.vetoes_in_a_row = 0
        if isinstance(max_vetoes_in_a_row, bool) or not isinstance(max_vetoes_in_a_row, int) or max_vetoes_in_a_row < 0:
            raise ConfigError(f"max_vetoes_in_a_row must be an int >= 0 (0: never raise), got {max_vetoes_in_a_row!r}")
        self.max_vetoes_in_a_row = max_vetoes_in_a_row
        self.on_local_veto = on_local_veto
        self._inner = inner_optimizer
        self._hook = None
        if inner_optimizer is not None:
            self._hook = inner_optimizer.register_step_post_hook(lambda *_: self._step())

    # ------------------------------------------------------------------ the loop

    def step(self) -> None:
        """Count one inner step; launch and apply the syncs that are due (see the schedule)."""
        if self._hook is not None:
            raise ConfigError("this sync is hooked to its inner optimizer and steps by itself; "
                              "do not also call step() (or construct it with inner_optimizer=None)")
        self._step()

    def _step(self) -> None:
        self.step_count += 1
        t = self.step_count
        for frag in self._fragments:
            if frag.pending is not None and frag.pending.apply_at == t:
                self._apply(frag)
            if t >= frag.offset and (t - frag.offset) % self.sync_every == 0:
                self._launch(frag, t)
                if self.overlap_steps == 0:
                    self._apply(frag)

    def sync_steps(self, fragment: int, horizon: int) -> list[int]:
        """The inner steps <= horizon at which ``fragment`` launches a sync (pure)."""
        o = self._fragments[fragment].offset
        return list(range(o, horizon + 1, self.sync_every))

    @property
    def completed_rounds(self) -> int:
        """Rounds launched and applied (or skipped by a veto): :attr:`rounds` less those in
        flight. With ``overlap_steps = 0`` it equals :attr:`rounds` after every step; with
        overlap it moves at the apply step ``t + d`` (where a caller's round boundary falls)."""
        return self.rounds - sum(1 for f in self._fragments if f.pending is not None)

    @property
    def num_fragments(self) -> int:
        return len(self._fragments)

    def fragment_params(self, k: int) -> list[torch.Tensor]:
        return list(self._fragments[k].params)

    def global_weights(self, k: int) -> torch.Tensor:
        return self._fragments[k].global_.detach()

    # ------------------------------------------------------------------ phases

    def _config_vector(self) -> list[int]:
        numels = ",".join(str(f.numel) for f in self._fragments)
        opts = f"{sorted(self.codec.options().items())}|{numels}"
        opt_hash = int.from_bytes(hashlib.blake2b(opts.encode(), digest_size=8).digest(), "little") >> 1
        return [self.sync_every, len(self._fragments), self.overlap_steps, CODEC_IDS.get(self.codec.name, 0),
                opt_hash]

    def _handshake(self) -> None:
        """One all-gather of [digest, config...]; raises on every rank if replicas differ."""
        mine = torch.tensor([self._digest] + self._config_vector(), dtype=torch.int64)
        rows = [r.tolist() for r in self.comm.allgather(mine).wait(self.timeout)]
        ref = rows[0]
        differ = {r: f"parameter digest {row[0]:#x} != rank 0's {ref[0]:#x}"
                  for r, row in enumerate(rows) if row[0] != ref[0]}
        if differ:
            raise ReplicaMismatchError("replicas started from different parameters (broadcast or seed the "
                                       "model identically before constructing the sync)", differ)
        differ = {r: f"[sync_every, fragments, overlap_steps, codec, options] = {row[1:]} != rank 0's {ref[1:]}"
                  for r, row in enumerate(rows) if row[1:] != ref[1:]}
        if differ:
            raise PayloadMismatchError("replicas disagree on the sync configuration", differ)
        self._handshake_done = True

    def _launch(self, frag: _Fragment, t: int) -> None:
        if not self._handshake_done:
            self._handshake()
        delta = frag.global_.detach() - _flatten(frag.params).to(frag.global_.device)
        finite = bool(torch.isfinite(delta).all())
        agree = getattr(self.comm, "all_finite", None)
        if callable(agree):  # a sharded replica: one non-finite shard vetoes the whole replica's contribution
            finite = bool(agree(finite))
        if not finite:
            delta.zero_()  # never send a non-finite value; the flag vetoes the round everywhere
        saved = frag.residual.clone() if frag.residual is not None else None
        self.local_veto = not finite
        if self.codec.name == "none":
            # [delta..., veto flag, 1]: the last element sums to the number of replicas that took
            # part, so a round redone among survivors (an elastic communicator) divides by them.
            buf = torch.cat([delta, torch.tensor([0.0 if finite else 1.0, 1.0], device=delta.device)])

            def finish(b: torch.Tensor) -> tuple[torch.Tensor | None, int]:
                nbad, n = int(b[-2].item()), int(b[-1].item())
                return (None, nbad) if nbad else (b[:-2].div_(n), 0)

            handle = self.comm.allreduce_sum(buf).then(finish)
        else:
            payload = self.codec.encode(delta, frag.residual if finite else None)
            handle = allreduce_encoded(self.comm, self.codec, payload, 0 if finite else 1).then(
                lambda res: (res[0], sum(1 for f in res[1] if f)))
        frag.pending = _Pending(t, t + self.overlap_steps, handle, saved)
        self.rounds += 1

    @torch.no_grad()
    def _apply(self, frag: _Fragment) -> None:
        pending = frag.pending
        assert pending is not None  # internal invariant: only called with a round in flight
        mean, nbad = pending.handle.wait(self.timeout)
        frag.pending = None
        g = frag.global_
        if mean is None:
            self.skipped_rounds += 1
            self.vetoes_in_a_row += 1
            log.warning("sync round of fragment %d launched at step %d skipped: non-finite pseudo-gradient "
                        "on %d replica(s); local weights reset to the global weights", frag.index,
                        pending.launched_at, nbad)
            if frag.residual is not None and pending.saved_residual is not None:
                frag.residual.copy_(pending.saved_residual)
            _write(frag.params, g.detach())
            if self.local_veto and self.on_local_veto is not None:
                self.on_local_veto()  # heal: the poisoned replica also drops its inner optimizer state
            elif self.local_veto and self._inner is not None:
                self._inner.state.clear()  # the default heal: a poisoned moment would veto every later round
                log.warning("inner optimizer state cleared on this replica after its non-finite pseudo-gradient")
            if self.max_vetoes_in_a_row and self.vetoes_in_a_row >= self.max_vetoes_in_a_row:
                raise SyncVetoError(f"{self.vetoes_in_a_row} synchronisation rounds in a row were vetoed by a "
                                    f"non-finite pseudo-gradient (last at step {pending.launched_at}, this replica "
                                    f"{'was' if self.local_veto else 'was not'} the cause): training diverges; "
                                    "lower the learning rate or check the data")
            return
        self.vetoes_in_a_row = 0
        g.grad = mean.to(g.device)
        with torch.enable_grad():
            frag.outer.step()
        g.grad = None
        if self.overlap_steps == 0:
            _write(frag.params, g.detach())
        else:
            local = _flatten(frag.params).to(g.device)
            _write(frag.params, torch.lerp(local, g.detach(), self.mix))

    def wait_in_flight(self) -> None:
        """Wait until every round in flight has its result (kept, and applied at its apply step
        as usual); raises what its exchange raised (the round stays in flight, for
        :meth:`abort_round`). :meth:`state_dict` waits the same way; calling this first lets a
        caller handle an exchange's failure where it handles the other sync failures."""
        for f in self._fragments:
            if f.pending is not None:
                f.pending.handle.wait(self.timeout)

    def skip_handshake(self) -> None:
        """The caller has already compared the replicas' starting parameters and configuration
        (e.g. the membership fingerprint of provider groups): the first sync does not run the
        handshake all-gather."""
        self._handshake_done = True

    def abort_round(self) -> None:
        """Forget every round in flight as if it had never been launched: error-feedback
        residuals go back to their values before the launch. Used when this replica was dropped
        from the job mid-round and will take the live state from a peer."""
        for frag in self._fragments:
            if frag.pending is not None:
                if frag.residual is not None and frag.pending.saved_residual is not None:
                    frag.residual.copy_(frag.pending.saved_residual)
                frag.pending = None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for rounds in flight (their results are dropped) and remove the hook."""
        for frag in self._fragments:
            if frag.pending is not None:
                frag.pending.handle.wait(self.timeout)
                frag.pending = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "DiLoCo":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    # The checkpoint (state_dict) and the healing of a joiner (global_state_dict and its flat
    # form) share one encoding: _encode_fragment / _load_fragment.

    def _encode_fragment(self, f: _Fragment, tensors: dict[str, torch.Tensor], *, local: bool, copy: bool = True) -> dict[str, Any]:
        """One fragment's global weights and outer optimizer state (``local``: also this replica's
        residual and round in flight, waiting for it) into ``tensors`` + a JSON-able entry."""
        pre = f"fragment.{f.index}"
        own = (lambda t: t.clone()) if copy else (lambda t: t)
        tensors[f"{pre}.global"] = own(f.global_.detach())
        osd = f.outer.state_dict()
        ostate: dict[str, dict[str, Any]] = {}
        for pid, st in osd["state"].items():
            ostate[str(pid)] = {}
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"{pre}.outer.{pid}.{key}"] = own(val)
                    ostate[str(pid)][key] = {"tensor": f"{pre}.outer.{pid}.{key}"}
                else:
                    ostate[str(pid)][key] = {"value": val}
        entry: dict[str, Any] = {"numel": f.numel, "offset": f.offset, "outer_state": ostate, "outer_param_groups": osd["param_groups"]}
        if not local:
            return entry
        if f.residual is not None:
            tensors[f"{pre}.residual"] = f.residual.clone()
        pending = None
        if f.pending is not None:
            mean, nbad = f.pending.handle.wait(self.timeout)
            pending = {"launched_at": f.pending.launched_at, "apply_at": f.pending.apply_at, "nbad": nbad}
            if mean is not None:
                tensors[f"{pre}.pending.mean"] = mean.clone()
            if f.pending.saved_residual is not None:
                tensors[f"{pre}.pending.saved_residual"] = f.pending.saved_residual.clone()
        entry["pending"] = pending
        return entry

    @staticmethod
    def _tensor(tensors: dict[str, Any], name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in tensors:
            raise StateMismatchError(f"sync state lacks tensor {name!r}")
        t = tensors[name]
        if t.shape != like.shape:
            raise StateMismatchError(f"{name}: shape {tuple(t.shape)} != expected {tuple(like.shape)}")
        return t.to(device=like.device, dtype=like.dtype)

    def _load_fragment(self, f: _Fragment, fm: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Inverse of :meth:`_encode_fragment` for the replicated part (global weights, outer state)."""
        pre = f"fragment.{f.index}"
        if fm.get("numel") != f.numel:
            raise StateMismatchError(f"{pre}: {fm.get('numel')} elements saved, model has {f.numel}")
        f.global_.data.copy_(self._tensor(tensors, f"{pre}.global", f.global_))
        ostate = {}
        for pid, entries in fm["outer_state"].items():
            ostate[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entries.items()}
        f.outer.load_state_dict({"state": ostate, "param_groups": fm["outer_param_groups"]})

    # A sharded model (DTensor parameters: FSDP2, tensor parallel) keeps its sync state per local
    # piece. In a checkpoint each fragment-sized tensor is split back into one DTensor per
    # parameter, placed like that parameter: every rank writes only its own pieces, and a load
    # reads only what this rank's placement needs (sharded_layout), like the optimizer state.

    @property
    def sharded(self) -> bool:
        return any(callable(getattr(p, "to_local", None)) for f in self._fragments for p in f.params)

    def _split_sharded(self, f: _Fragment, name: str, flat: torch.Tensor, tensors: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor

        off = 0
        for j, p in enumerate(f.params):
            local = _local(p)
            n = local.numel()
            piece = flat[off:off + n].reshape(local.shape)
            tensors[f"{name}.p{j}"] = (DTensor.from_local(piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
                                       if callable(getattr(p, "to_local", None)) else piece)
            off += n

    def _join_sharded(self, f: _Fragment, name: str, tensors: dict[str, Any]) -> torch.Tensor | None:
        """The fragment-sized tensor ``name`` from its per-parameter pieces (local pieces, or whole
        tensors of which this rank's piece is taken); None when absent."""
        if f"{name}.p0" not in tensors:
            return None
        parts = []
        for j, p in enumerate(f.params):
            t = tensors.get(f"{name}.p{j}")
            if t is None:
                raise StateMismatchError(f"sync state lacks {name}.p{j}")
            local = _local(p)
            if tuple(t.shape) == tuple(p.shape) and tuple(local.shape) != tuple(p.shape):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                shape, offs = compute_local_shape_and_global_offset(tuple(p.shape), p.device_mesh, p.placements)
                t = t[tuple(slice(o, o + n) for o, n in zip(offs, shape))]
            if tuple(t.shape) != tuple(local.shape):
                raise StateMismatchError(f"{name}.p{j}: shape {tuple(t.shape)} is neither this rank's piece "
                                         f"{tuple(local.shape)} nor the parameter's {tuple(p.shape)}")
            parts.append(t.reshape(-1).to(torch.float32))
        return torch.cat(parts) if parts else torch.zeros(0)

    def sharded_layout(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """For a checkpoint load: every per-parameter tensor name :meth:`state_dict` may hold for a
        sharded model -> (this rank's piece shape, its offsets, the parameter's shape)."""
        if not self.sharded:
            return {}
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        out = {}
        for f in self._fragments:
            for j, p in enumerate(f.params):
                if not callable(getattr(p, "to_local", None)):
                    continue
                shape, offs = compute_local_shape_and_global_offset(tuple(p.shape), p.device_mesh, p.placements)
                for what in ("global", "outer.0.momentum_buffer", "residual", "pending.mean", "pending.saved_residual"):
                    out[f"tensors.fragment.{f.index}.{what}.p{j}"] = (tuple(shape), tuple(int(o) for o in offs), tuple(p.shape))
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able, "tensors": {name: Tensor}}``. Waits for rounds in flight. A
        sharded model's fragment-sized tensors are one DTensor per parameter (``<name>.p<j>``)."""
        tensors: dict[str, torch.Tensor] = {}
        frags = [self._encode_fragment(f, tensors, local=True) for f in self._fragments]
        if self.sharded:
            for f in self._fragments:
                for name in [k for k in tensors if k.startswith(f"fragment.{f.index}.") and tuple(tensors[k].shape) == (f.numel,)]:
                    self._split_sharded(f, name, tensors.pop(name), tensors)
        meta = {"format": STATE_FORMAT, "kind": type(self).__name__, "step": self.step_count,
                "sync_every": self.sync_every, "overlap_steps": self.overlap_steps, "mix": self.mix,
                "codec": {"name": self.codec.name, "options": self.codec.options()},
                "rounds": self.rounds, "skipped_rounds": self.skipped_rounds,
                "handshake_done": self._handshake_done, "fragments": frags}
        return {"meta": meta, "tensors": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s output. Local model weights are not touched
        (they belong to the model's own checkpoint). Mismatches raise StateMismatchError."""
        meta, tensors = state.get("meta"), state.get("tensors")
        if not isinstance(meta, dict) or not isinstance(tensors, dict) or meta.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"not a {STATE_FORMAT} state (need keys 'meta' and 'tensors')")
        if self.sharded:
            # the pieces are checked against this rank's placement as they are joined; the meta's
            # element counts are the saving rank's (another placement), so they are not compared
            tensors = dict(tensors)
            saved = meta.get("fragments")
            if not isinstance(saved, list) or not all(isinstance(fm, dict) for fm in saved):
                raise StateMismatchError("sync state: 'fragments' must be a list of objects")
            meta = {**meta, "fragments": [{**fm, "numel": f.numel} for f, fm in zip(self._fragments, saved)] + saved[len(self._fragments):]}
            for f in self._fragments:
                for what in ("global", "outer.0.momentum_buffer", "residual", "pending.mean", "pending.saved_residual"):
                    joined = self._join_sharded(f, f"fragment.{f.index}.{what}", tensors)
                    if joined is not None:
                        tensors[f"fragment.{f.index}.{what}"] = joined
        mine = (type(self).__name__, self.sync_every, self.overlap_steps, self.codec.name, len(self._fragments))
        theirs = (meta.get("kind"), meta.get("sync_every"), meta.get("overlap_steps"),
                  meta.get("codec", {}).get("name"), len(meta.get("fragments", [])))
        if mine != theirs:
            raise StateMismatchError(f"sync state was saved as (kind, sync_every, overlap_steps, codec, fragments) "
                                     f"= {theirs}, this object is {mine}")
        for f, fm in zip(self._fragments, meta["fragments"]):
            pre = f"fragment.{f.index}"
            self._load_fragment(f, fm, tensors)
            if f.residual is not None:
                f.residual.copy_(self._tensor(tensors, f"{pre}.residual", f.residual))
            f.pending = None
            p = fm.get("pending")
            if p is not None:
                mean = self._tensor(tensors, f"{pre}.pending.mean", f.global_) if not p["nbad"] else None
                saved = tensors.get(f"{pre}.pending.saved_residual")
                f.pending = _Pending(p["launched_at"], p["apply_at"], Handle.completed((mean, p["nbad"])),
                                     saved.clone() if saved is not None else None)
        self.step_count = int(meta["step"])
        self.rounds = int(meta["rounds"])
        self.skipped_rounds = int(meta["skipped_rounds"])
        self._handshake_done = bool(meta["handshake_done"])

    # ------------------------------------------------------------------ the replicated (global) state

    def global_state_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """The part of :meth:`state_dict` every replica holds alike after a round, in the same
        encoding: each fragment's global weights and outer optimizer state, and the round
        counters. No residuals and no rounds in flight (this replica's own); does not wait.
        ``copy=False``: the tensors are the live ones (read them before the next round)."""
        tensors: dict[str, torch.Tensor] = {}
        frags = [self._encode_fragment(f, tensors, local=False, copy=copy) for f in self._fragments]
        meta = {"format": GLOBAL_STATE_FORMAT, "step": self.step_count, "rounds": self.rounds,
                "skipped_rounds": self.skipped_rounds, "fragments": frags}
        return {"meta": meta, "tensors": tensors}

    @torch.no_grad()
    def load_global_state_dict(self, state: dict[str, Any]) -> None:
        """Take a peer's :meth:`global_state_dict`: rounds in flight are dropped
        (:meth:`abort_round`), global weights and outer state installed, the local weights set
        to the global ones, counters taken, the handshake considered done. StateMismatchError
        for a state of another shape (nothing is changed then)."""
        meta, tensors = state.get("meta"), state.get("tensors")
        if not isinstance(meta, dict) or not isinstance(tensors, dict) or meta.get("format") != GLOBAL_STATE_FORMAT:
            raise StateMismatchError(f"not a {GLOBAL_STATE_FORMAT} state (need keys 'meta' and 'tensors')")
        if [fm.get("numel") for fm in meta.get("fragments", [])] != [f.numel for f in self._fragments]:
            raise StateMismatchError(f"global state has fragments of {[fm.get('numel') for fm in meta.get('fragments', [])]} elements, this object {[f.numel for f in self._fragments]}")
        self.abort_round()
        for f, fm in zip(self._fragments, meta["fragments"]):
            self._load_fragment(f, fm, tensors)
            _write(f.params, f.global_.detach())
        self.step_count = int(meta["step"])
        self.rounds = int(meta["rounds"])
        self.skipped_rounds = int(meta["skipped_rounds"])
        self._handshake_done = True

    # The flat form of the global state, for a state transfer between members (one contiguous
    # fp32 tensor of a size fixed by the model, so peers with and without outer momentum agree):
    # per fragment its global weights, then its outer momentum (zeros when there is none yet),
    # and with overlap_steps > 0 the averaged result of its round in flight (zeros when none).

    def _known_pending(self, f: _Fragment) -> tuple[torch.Tensor | None, int] | None:
        """A round in flight whose result is already known here (restored from a checkpoint, or
        waited for by :meth:`state_dict`); None when there is none or it is still running."""
        if f.pending is None or not f.pending.handle.done:
            return None
        return f.pending.handle.wait(self.timeout)

    def global_flat(self) -> torch.Tensor:
        """:meth:`global_state_dict` as one fp32 tensor (its meta: :meth:`global_flat_meta`).
        Outer state other than SGD's ``momentum_buffer`` is not carried (the receiver's
        optimizer resets it). With ``overlap_steps > 0`` each fragment also carries the result
        of its round in flight when that result is known here (a group resumed from a
        checkpoint taken inside a round: a receiver applies it at the same step as the sender);
        a round still running is not waited for (nor carried: between providers a state is
        sent only at round boundaries, where none runs)."""
        tensors = self.global_state_dict(copy=False)["tensors"]
        parts = []
        for f in self._fragments:
            mom = tensors.get(f"fragment.{f.index}.outer.0.momentum_buffer")
            parts.append(tensors[f"fragment.{f.index}.global"].reshape(-1))
            parts.append(mom.reshape(-1) if mom is not None else torch.zeros(f.numel))
            if self.overlap_steps:
                known = self._known_pending(f)
                mean = known[0] if known is not None else None
                parts.append(mean.reshape(-1) if mean is not None else torch.zeros(f.numel))
        return torch.cat([p.to(torch.float32) for p in parts]).contiguous()

    def global_flat_meta(self) -> dict[str, Any]:
        """The JSON-able meta of :meth:`global_flat`: round counters, which fragments have
        momentum, and (``overlap_steps > 0``) each fragment's carried round in flight
        (``{"launched_at", "apply_at", "nbad"}`` or None)."""
        gsd = self.global_state_dict(copy=False)
        meta = gsd["meta"]
        flags = [f"fragment.{f.index}.outer.0.momentum_buffer" in gsd["tensors"] for f in self._fragments]
        out = {"sync_step": meta["step"], "rounds": meta["rounds"], "skipped": meta["skipped_rounds"], "momentum": flags}
        if self.overlap_steps:
            pend = []
            for f in self._fragments:
                known = self._known_pending(f)
                pend.append(None if known is None else {"launched_at": f.pending.launched_at, "apply_at": f.pending.apply_at,
                                                        "nbad": int(known[1])})
            out["pending"] = pend
        return out

    def load_global_flat(self, flat: torch.Tensor, meta: dict[str, Any]) -> None:
        """Take :meth:`global_flat` + :meth:`global_flat_meta` of a peer, through
        :meth:`load_global_state_dict`; a round in flight that the peer carried is installed
        as this engine's own (its result known), to be applied at the same step as the peer's."""
        tensors: dict[str, torch.Tensor] = {}
        frags = []
        pending: list[tuple[dict[str, Any], torch.Tensor] | None] = []
        carried = meta.get("pending") if self.overlap_steps else None
        off = 0
        for f, has_mom in zip(self._fragments, meta["momentum"]):
            n = f.numel
            tensors[f"fragment.{f.index}.global"] = flat[off:off + n].view_as(f.global_)
            off += n
            ostate: dict[str, Any] = {}
            if has_mom:
                name = f"fragment.{f.index}.outer.0.momentum_buffer"
                tensors[name] = flat[off:off + n].clone().view_as(f.global_)
                ostate = {"0": {"momentum_buffer": {"tensor": name}}}
            off += n
            if self.overlap_steps:
                p = carried[f.index] if carried is not None else None
                pending.append((p, flat[off:off + n].clone().view_as(f.global_)) if p is not None else None)
                off += n
            frags.append({"numel": n, "outer_state": ostate, "outer_param_groups": f.outer.state_dict()["param_groups"]})
        self.load_global_state_dict({"meta": {"format": GLOBAL_STATE_FORMAT, "step": int(meta["sync_step"]), "rounds": int(meta["rounds"]),
                                              "skipped_rounds": int(meta["skipped"]), "fragments": frags}, "tensors": tensors})
        for f, carried_round in zip(self._fragments, pending):
            if carried_round is not None:  # the sender's round in flight: applied here at the same step
                p, mean = carried_round
                f.pending = _Pending(int(p["launched_at"]), int(p["apply_at"]),
                                     Handle.completed((None if p["nbad"] else mean, int(p["nbad"]))), None)


class LocalSGD(DiLoCo):
    """Average the replicas' parameters every ``sync_every`` steps.

    Implemented as DiLoCo with an outer SGD of lr 1 and no momentum and no compression:
    ``G <- G - mean_i (G - L_i) = mean_i L_i`` (up to fp32 rounding), then ``L_i <- G``. It keeps
    one fp32 copy of the weights (the last average), which is what a non-finite round falls
    back to."""

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer | None = None, *,
                 sync_every: int, comm: Communicator | None = None, fragments: int = 1, overlap_steps: int = 0,
                 mix: float = 0.5, timeout: timedelta = DEFAULT_TIMEOUT):
        super().__init__(model, inner_optimizer, lambda ps: torch.optim.SGD(ps, lr=1.0), sync_every=sync_every,
                         comm=comm, codec="none", fragments=fragments, overlap_steps=overlap_steps, mix=mix,
                         timeout=timeout)
