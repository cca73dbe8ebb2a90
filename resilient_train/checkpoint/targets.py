"""Where every stored tensor lands, and how the rest of the state is applied: the targets of a read.

The validate, place and apply phases of a read (:mod:`.reader`): :func:`build_targets` checks the
manifest against the live objects (keys, dtypes, global shapes, coverage, optimizer groups) and
says where each stored tensor goes, before anything changes (StateMismatchError naming every
mismatch); :func:`plan_ops` / :func:`plan_batches` / :func:`place_op` copy verified bytes into
the targets; :func:`prepare_apply` decodes every JSON tree first, then :func:`apply_objects`
(all or none, rolled back if one object refuses its state) and :func:`apply_rest`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import StateFileError, StateMismatchError
from ..format.jsontree import decode
from ..format.manifest import Manifest, TensorRecord
from ..format.names import STATE_NAME
from ..format.safetensors_io import ST_TO_DTYPE, TensorSlot
from ..storage import redact
from .chunks import Chunks
from .planner import ReadOp, plan_reads, region_volume, tiling_problem
from .state import TrainState, checkpoint_module, decode_rank_tree, local_piece, optimizer_fqns, rng_state, set_rng_state

__all__ = [
    "Target", "LoadPlan", "CopyOp", "Prepared", "records_by_key", "whole_target", "optimizer_tree_ok", "build_targets",
    "plan_ops", "place_op", "plan_batches", "needed_files", "wholly_needed", "prepare_apply", "apply_objects", "apply_rest",
]

log = logging.getLogger(__name__)


@dataclass
class Target:
    key: str
    dest: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    live: bool = False
    """True when ``dest`` is a live tensor of the training state (written only once verified)."""


def records_by_key(manifest: Manifest) -> dict[str, list[TensorRecord]]:
    out: dict[str, list[TensorRecord]] = {}
    for t in manifest.tensors:
        out.setdefault(t.key, []).append(t)
    return out


def whole_target(key: str, recs: list[TensorRecord], device: torch.device | str = "cpu") -> Target:
    r = recs[0]
    return Target(key, torch.empty(r.global_shape, dtype=ST_TO_DTYPE[r.dtype], device=device), (0,) * len(r.global_shape), r.global_shape)


@dataclass
class LoadPlan:
    targets: list[Target]
    opt_tensors: dict[str, Any]
    tree_tensor_keys: list[str]


def optimizer_tree_ok(saved: Any) -> bool:
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state", {}), dict):
        return False
    for g in saved["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or not all(isinstance(n, str) for n in g["params"]):
            return False
    return all(isinstance(k, str) and isinstance(v, dict) for k, v in saved.get("state", {}).items())


def build_targets(state: TrainState, manifest: Manifest, shared: dict[str, Any], strict: bool) -> LoadPlan:
    """Where every stored tensor this rank needs lands, checked against the live objects (see
    module doc). Raises StateMismatchError naming every mismatch (at most 10) before anything
    changes; StateFileError for a malformed optimizer tree."""
    by_key = records_by_key(manifest)
    problems: list[str] = []
    targets = _model_targets(state, by_key, strict, problems)
    opt_tensors: dict[str, Any] = {}
    if state.optimizer is not None:
        targets += _optimizer_targets(state, by_key, shared, problems, opt_tensors)
    tree_keys: list[str] = []
    targets += _tree_targets(state, by_key, shared, problems, tree_keys)
    for key in sorted({t.key for t in targets}):
        why = tiling_problem(by_key.get(key, []))  # before coverage: overlaps can fake it
        if why is not None:
            problems.append(f"{key}: stored pieces do not tile the tensor exactly: {why}")
    for t in targets:
        recs = by_key.get(t.key, [])
        _, covered = plan_reads(recs, t.offsets, tuple(t.dest.shape))
        if covered != region_volume(t.dest.shape):
            problems.append(f"{t.key}: stored pieces cover {covered} of the {region_volume(t.dest.shape)} elements this rank needs")
    if problems:
        head = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise StateMismatchError(f"checkpoint step {manifest.step} does not fit the training state: {head}")
    return LoadPlan(targets, opt_tensors, tree_keys)


def _fits(by_key: Mapping[str, list[TensorRecord]], problems: list[str], key: str, dtype: torch.dtype, gshape: tuple[int, ...]) -> bool:
    """Whether stored ``key`` has the live tensor's dtype and global shape (else a problem noted)."""
    recs = by_key.get(key)
    if not recs:
        problems.append(f"{key}: missing from the checkpoint")
        return False
    r = recs[0]
    if ST_TO_DTYPE[r.dtype] != dtype:
        problems.append(f"{key}: checkpoint has dtype {ST_TO_DTYPE[r.dtype]}, the live tensor is {dtype}")
        return False
    if tuple(r.global_shape) != tuple(gshape):
        problems.append(f"{key}: checkpoint has shape {list(r.global_shape)}, the live tensor is {list(gshape)}")
        return False
    return True


def _model_targets(state: TrainState, by_key: Mapping[str, list[TensorRecord]], strict: bool, problems: list[str]) -> list[Target]:
    """The live model tensors (this rank's pieces of them), written in place once verified."""
    targets: list[Target] = []
    if state.model is None:
        return targets
    live = checkpoint_module(state.model).state_dict()
    for name, t in live.items():
        local, gshape, offs = local_piece(t)
        key = f"model/{name}"
        if _fits(by_key, problems, key, local.dtype, gshape):
            targets.append(Target(key, local, offs, gshape, live=True))
    if strict:
        live_keys = {f"model/{n}" for n in live}
        for key in sorted(k for k in by_key if k.startswith("model/") and k not in live_keys):
            problems.append(f"{key}: in the checkpoint but not in the model (pass strict=False to ignore)")
    return targets


def _check_param_groups(saved: Any, live_groups: list[list[str]], problems: list[str]) -> None:
    saved_groups = [g.get("params", []) for g in saved["param_groups"]]
    if len(saved_groups) != len(live_groups):
        problems.append(f"optimizer: checkpoint has {len(saved_groups)} param groups, the optimizer has {len(live_groups)}")
        return
    for i, (a, b) in enumerate(zip(saved_groups, live_groups)):
        if set(a) != set(b) or len(a) != len(b):
            missing = sorted(set(b) - set(a))[:3]
            extra = sorted(set(a) - set(b))[:3]
            problems.append(f"optimizer: param group {i} differs (missing {missing}, extra {extra})")


def _optimizer_targets(state: TrainState, by_key: Mapping[str, list[TensorRecord]], shared: dict[str, Any], problems: list[str],
                       opt_tensors: dict[str, Any]) -> list[Target]:
    """Fresh tensors for the optimizer state (sharded like their parameter when it is), noted in
    ``opt_tensors`` (key -> (tensor, parameter or None))."""
    targets: list[Target] = []
    saved = shared.get("optimizer")
    if saved is None:
        problems.append("optimizer: the checkpoint holds no optimizer state")
        return targets
    if not optimizer_tree_ok(saved):
        raise StateFileError(f"{STATE_NAME}: 'optimizer' must hold 'param_groups' (objects with a 'params' list of names) and 'state' (an object of objects)")
    _check_param_groups(saved, optimizer_fqns(state.model, state.optimizer), problems)  # type: ignore[arg-type]
    params = {n: p for n, p in checkpoint_module(state.model).named_parameters(remove_duplicate=False)}  # type: ignore[arg-type]
    for fqn, entry in saved.get("state", {}).items():
        p = params.get(fqn)
        if p is None:
            problems.append(f"optimizer: state for parameter {fqn!r}, which the model does not have")
            continue
        for sname, v in entry.items():
            if not (isinstance(v, dict) and set(v) == {"__tensor__"}):
                continue
            key = v["__tensor__"]
            recs = by_key.get(key)
            if not recs:
                problems.append(f"{key}: missing from the checkpoint")
                continue
            r = recs[0]
            local_p, p_gshape, p_offs = local_piece(p.data if not hasattr(p, "device_mesh") else p)
            if tuple(r.global_shape) == tuple(p_gshape) and len(p_gshape) > 0:
                dest = torch.empty(local_p.shape, dtype=ST_TO_DTYPE[r.dtype], device=local_p.device)
                targets.append(Target(key, dest, p_offs, p_gshape))
                opt_tensors[key] = (dest, p)
            else:
                t = whole_target(key, recs)
                targets.append(t)
                opt_tensors[key] = (t.dest, None)
    return targets


def _tree_targets(state: TrainState, by_key: Mapping[str, list[TensorRecord]], shared: dict[str, Any], problems: list[str], tree_keys: list[str]) -> list[Target]:
    """Whole tensors referenced from the scheduler, sampler, stateful and extra trees."""
    targets: list[Target] = []
    for label, wanted in (("scheduler", state.scheduler), ("sampler", state.sampler), ("extra", state.extra or None), *((f"stateful.{k}", v) for k, v in state.stateful.items())):
        if wanted is None:
            continue
        if label not in shared:
            if label == "extra":
                continue
            problems.append(f"{label}: the checkpoint holds no {label} state")
            continue
        # a stateful object with sharded state (DiLoCo over an FSDP2 model) names the pieces
        # this rank needs: read those only, like the optimizer state of a sharded parameter
        layout = getattr(wanted, "sharded_layout", None) if label.startswith("stateful.") else None
        pieces = layout() if callable(layout) else {}
        for key, recs in by_key.items():
            if key == label or key.startswith(label + "/"):
                like = pieces.get(key[len(label) + 1:])
                if like is not None and tuple(recs[0].global_shape) == like[2]:
                    targets.append(Target(key, torch.empty(like[0], dtype=ST_TO_DTYPE[recs[0].dtype]), like[1], like[2]))
                else:
                    targets.append(whole_target(key, recs))
                tree_keys.append(key)
    if state.extra == {} and "extra" in shared:
        for key, recs in by_key.items():
            if key == "extra" or key.startswith("extra/"):
                targets.append(whole_target(key, recs))
                tree_keys.append(key)
    return targets


@dataclass
class CopyOp:
    """One copy: bytes ``[begin, end)`` of ``file`` are the stored piece ``op.record`` (laid out
    as ``slot``), of which ``op`` places a region into ``target``."""

    target: "Target"
    op: ReadOp
    file: str
    slot: TensorSlot
    begin: int
    end: int


def plan_ops(manifest: Manifest, targets: list["Target"], headers: Mapping[str, tuple[int, dict[str, TensorSlot]]]) -> list[CopyOp]:
    by_key = records_by_key(manifest)
    ops = []
    for t in targets:
        read_ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        for op in read_ops:
            data_start, slots = headers[op.record.file]
            slot = slots[op.record.name]
            ops.append(CopyOp(t, op, op.record.file, slot, data_start + slot.begin, data_start + slot.end))
    ops.sort(key=lambda o: (o.file, o.begin))
    return ops


def _lands_whole(o: CopyOp) -> bool:
    """The op's stored bytes are exactly its target's memory (a whole contiguous CPU piece of
    the same dtype): they can be read straight into it."""
    dest = o.target.dest
    return (
        o.op.is_whole_piece
        and tuple(dest.shape) == o.op.size
        and dest.device.type == "cpu"
        and dest.is_contiguous()
        and dest.dtype == ST_TO_DTYPE[o.slot.dtype]
    )


def _dest_bytes(o: CopyOp) -> Any:
    return o.target.dest.reshape(-1).view(torch.uint8).numpy()


@dataclass
class DirectPlan:
    """Reads that land in their targets' memory with no staging copy (see :func:`plan_direct`)."""

    reads: list[tuple[str, int, list[Any], bool]]
    """``(file, chunk index, segments, live)``: the buffers that tile the chunk, in order, and
    whether any of them is a live tensor's memory."""
    from_cache: list[tuple[CopyOp, int, int]]
    """Byte ranges of direct ops whose chunk is already verified in the cache (headers)."""
    ops: list[CopyOp]
    """The ops the plan places."""
    rest: list[CopyOp]
    """The ops it does not (they go through verified cached chunks)."""


def plan_direct(chunks: Chunks, ops: list[CopyOp], eligible: Callable[[CopyOp], bool] = lambda o: True) -> DirectPlan:
    """Split ``ops`` into those whose chunks can be read straight into their targets and the
    rest. An op is direct when it lands whole (:func:`_lands_whole`), ``eligible`` accepts it,
    and every chunk it needs that is not cached is needed by direct ops only (a chunk is read
    exactly once either way). A direct chunk's bytes that no op needs (another rank's pieces)
    go to scratch buffers, so the whole chunk is still hashed."""
    live = [o for o in ops if o.end > o.begin]
    direct = {id(o) for o in live if eligible(o) and _lands_whole(o)}
    by_chunk: dict[tuple[str, int], list[CopyOp]] = {}
    for o in live:
        for i in chunks.covering(o.file, o.begin, o.end):
            by_chunk.setdefault((o.file, i), []).append(o)
    changed = True
    while changed:
        changed = False
        for key, users in by_chunk.items():
            if key in chunks.cache or all(id(o) in direct for o in users):
                continue
            for o in users:
                if id(o) in direct:
                    direct.discard(id(o))
                    changed = True
    reads: list[tuple[str, int, list[Any], bool]] = []
    from_cache: list[tuple[CopyOp, int, int]] = []
    for (f, i), users in sorted(by_chunk.items()):
        c0, c1, _ = chunks.ranges(f)[i]
        if (f, i) in chunks.cache:  # verified already (a header's chunk): copied, whoever else uses it
            from_cache.extend((o, max(c0, o.begin), min(c1, o.end)) for o in users if id(o) in direct)
            continue
        if not all(id(o) in direct for o in users):
            continue
        segments: list[Any] = []
        pos = c0
        for o in sorted(users, key=lambda o: o.begin):
            a, b = max(c0, o.begin), min(c1, o.end)
            if a > pos:
                segments.append(bytearray(a - pos))  # bytes this rank does not use: hashed, dropped
            segments.append(_dest_bytes(o)[a - o.begin:b - o.begin])
            pos = b
        if pos < c1:
            segments.append(bytearray(c1 - pos))
        reads.append((f, i, segments, any(o.target.live for o in users)))
    placed = [o for o in ops if id(o) in direct or o.end == o.begin]
    return DirectPlan(reads, from_cache, placed, [o for o in ops if not (id(o) in direct or o.end == o.begin)])


def place_direct(chunks: Chunks, plan: DirectPlan, pool: Any, live: bool) -> None:
    """Run the reads of a :class:`DirectPlan` that touch live tensors (``live``) or only fresh
    ones (not ``live``): every chunk read into its targets and hashed there, all chunks
    concurrently on ``pool`` (reads and hashes release the GIL). Raises the first failure
    after every read ended; the targets are then partially written."""
    for o, a, b in plan.from_cache:
        if o.target.live == live:
            chunks.copy_into(o.file, a, b, _dest_bytes(o)[a - o.begin:b - o.begin])
    # Consecutive chunks of a file are read as one run (fewer, larger reads), each chunk still
    # hashed from its own buffers.
    segments = {(f, i): segs for f, i, segs, lv in plan.reads if lv == live}
    futs = [pool.submit(chunks.read_direct_run, f, [(i, segments[(f, i)]) for i in idxs]) for f, idxs in chunks.runs(list(segments))]
    first: BaseException | None = None
    for fut in futs:
        try:
            fut.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after every read ended
            first = first or exc
    if first is not None:
        raise first


def place_op(chunks: Chunks, o: CopyOp) -> None:
    """Copy one op's verified bytes into its target (straight into the tensor when it is a
    whole contiguous CPU piece, else through a temporary of the stored piece)."""
    if o.end == o.begin:
        return
    dtype = ST_TO_DTYPE[o.slot.dtype]
    dest = o.target.dest
    direct = _lands_whole(o)
    if direct:
        chunks.copy_into(o.file, o.begin, o.end, dest.reshape(-1).view(torch.uint8).numpy())
        return
    tmp = torch.empty(o.slot.shape, dtype=dtype)
    chunks.copy_into(o.file, o.begin, o.end, tmp.reshape(-1).view(torch.uint8).numpy())
    src = tmp[tuple(slice(s, s + n) for s, n in zip(o.op.src_start, o.op.size))]
    dst = dest[tuple(slice(s, s + n) for s, n in zip(o.op.dst_start, o.op.size))]
    with torch.no_grad():
        dst.copy_(src)


def plan_batches(chunks: Chunks, ops: list[CopyOp], budget: int) -> list[tuple[list[CopyOp], list[tuple[str, int]]]]:
    """Split ``ops`` (sorted by file and offset) into batches whose new chunks fit ``budget``
    (at least one op each). Each chunk is fetched by exactly one batch."""
    out: list[tuple[list[CopyOp], list[tuple[str, int]]]] = []
    seen: set[tuple[str, int]] = set()
    cur_ops: list[CopyOp] = []
    cur_keys: list[tuple[str, int]] = []
    cur_bytes = 0
    for o in ops:
        new = [(o.file, i) for i in chunks.covering(o.file, o.begin, o.end) if (o.file, i) not in seen]
        nbytes = sum(chunks.ranges(f)[i][1] - chunks.ranges(f)[i][0] for f, i in new)
        if cur_ops and cur_bytes + nbytes > budget:
            out.append((cur_ops, cur_keys))
            cur_ops, cur_keys, cur_bytes = [], [], 0
        cur_ops.append(o)
        cur_keys.extend(new)
        seen.update(new)
        cur_bytes += nbytes
    if cur_ops:
        out.append((cur_ops, cur_keys))
    return out


def needed_files(manifest: Manifest, targets: list["Target"]) -> set[str]:
    by_key = records_by_key(manifest)
    files = set()
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        files.update(op.record.file for op in ops)
    return files


def wholly_needed(manifest: Manifest, targets: list["Target"]) -> set[str]:
    """Files every stored piece of which some target reads whole."""
    by_key = records_by_key(manifest)
    read_whole: set[tuple[str, str]] = set()
    partial: set[str] = set()
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        for op in ops:
            if op.is_whole_piece:
                read_whole.add((op.record.file, op.record.name))
            else:
                partial.add(op.record.file)
    in_file: dict[str, set[str]] = {}
    for rec in manifest.tensors:
        in_file.setdefault(rec.file, set()).add(rec.name)
    return {f for f, names in in_file.items() if f not in partial and all((f, n) in read_whole for n in names)}


@dataclass
class Prepared:
    """Everything :func:`apply_objects` and :func:`apply_rest` set, decoded and checked."""

    optimizer: dict[str, Any] | None = None
    objects: list[tuple[Any, Any]] = field(default_factory=list)
    extra: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra_per_rank: dict[str, Any] | None = None


def prepare_apply(state: TrainState, shared: dict[str, Any], plan: "LoadPlan", rank_tree: Any) -> Prepared:
    """Decode every JSON tree against the (not yet filled) target tensors. No side effects."""
    out = Prepared()
    tensors = {t.key: t.dest for t in plan.targets}
    if state.optimizer is not None:
        saved = shared["optimizer"]
        opt_values: dict[str, Any] = {}
        for key, (dest, param) in plan.opt_tensors.items():
            if param is not None and hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor

                opt_values[key] = DTensor.from_local(dest, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())
            else:
                opt_values[key] = dest
        live_groups = optimizer_fqns(state.model, state.optimizer)  # type: ignore[arg-type]
        fqn_to_index = {}
        groups = []
        idx = 0
        for live_fqns, saved_group in zip(live_groups, saved["param_groups"]):
            g = decode({k: v for k, v in saved_group.items() if k != "params"})
            g["params"] = list(range(idx, idx + len(live_fqns)))
            for fqn in live_fqns:
                fqn_to_index[fqn] = idx
                idx += 1
            groups.append(g)
        opt_state = {fqn_to_index[fqn]: decode(entry, opt_values) for fqn, entry in saved["state"].items()}
        out.optimizer = {"state": opt_state, "param_groups": groups}
    if state.scheduler is not None:
        out.objects.append((state.scheduler, decode(shared["scheduler"], tensors)))
    if state.sampler is not None:
        out.objects.append((state.sampler, decode(shared["sampler"], tensors)))
    for name, obj in state.stateful.items():
        out.objects.append((obj, decode(shared[f"stateful.{name}"], tensors)))
    if "extra" in shared:
        extra = decode(shared["extra"], tensors)
        if not isinstance(extra, dict):
            raise StateFileError(f"{STATE_NAME}: 'extra' must be an object")
        out.extra = extra
    if rank_tree is not None and "rng" in rank_tree and state.rng:
        rng = decode(rank_tree["rng"])
        if not isinstance(rng, dict):
            raise StateFileError("rank state: 'rng' must be an object")
        out.rng = rng
    if rank_tree is not None:
        _prepare_per_rank(state, rank_tree, out)
    return out


def _prepare_per_rank(state: TrainState, rank_tree: dict[str, Any], out: Prepared) -> None:
    """``extra_per_rank`` and ``stateful_per_rank`` from this rank's rank-state file (see
    TrainState for which saved rank that is)."""
    if "extra_per_rank" in rank_tree:  # an empty live dict is filled too (like ``extra`` is)
        epr = decode_rank_tree(rank_tree["extra_per_rank"], "extra_per_rank", state.extra_per_rank)
        if not isinstance(epr, dict):
            raise StateFileError("rank state: 'extra_per_rank' must be an object")
        out.extra_per_rank = epr
    saved = rank_tree.get("stateful_per_rank", {})
    if not isinstance(saved, dict):
        raise StateFileError("rank state: 'stateful_per_rank' must be an object")
    for name, obj in state.stateful_per_rank.items():
        if name not in saved:
            log.warning("the checkpoint holds no per-rank state for %r: it keeps its current state", name)
            continue
        out.objects.append((obj, decode_rank_tree(saved[name], f"stateful_per_rank.{name}")))


def _copy_state(sd: Any) -> Any:
    """A copy of a state dict deep enough that a later load_state_dict cannot change it
    (containers copied, tensors kept: loads replace tensors, they do not write into them)."""
    if isinstance(sd, dict):
        return {k: _copy_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_copy_state(v) for v in sd]
    return sd


def apply_objects(state: TrainState, p: Prepared) -> Callable[[], None]:
    """Optimizer, scheduler, sampler, stateful objects and RNG: all or none. If one refuses its
    state, the ones already set get their previous state back and StateFileError is raised.
    Returns a function that restores the previous states (for a failure on another rank)."""
    done: list[tuple[Any, Any]] = []
    old_rng = rng_state() if p.rng is not None else None

    def undo() -> None:
        for obj, before in reversed(done):
            try:
                obj.load_state_dict(before)
            except Exception as exc:  # noqa: BLE001 - logged; the caller raises the cause
                log.error("could not restore the previous state of %s: %s", type(obj).__name__, exc)
        if old_rng is not None:
            set_rng_state(old_rng)

    try:
        # Each object's previous state is kept before it is set, so that one that fails
        # half-way through its own load_state_dict is restored too.
        if p.optimizer is not None and state.optimizer is not None:
            done.append((state.optimizer, _copy_state(state.optimizer.state_dict())))
            state.optimizer.load_state_dict(p.optimizer)
        for obj, value in p.objects:
            done.append((obj, _copy_state(obj.state_dict())))
            obj.load_state_dict(value)
        if p.rng is not None:
            set_rng_state(p.rng)
    except Exception as exc:  # noqa: BLE001 - rolled back, then raised typed
        undo()
        raise StateFileError(redact(f"the checkpoint's state was refused ({type(exc).__name__}: {exc}); the previous state was restored")) from exc
    return undo


def apply_rest(state: TrainState, p: Prepared) -> None:
    if p.extra is not None:
        state.extra.clear()
        state.extra.update(p.extra)
    if p.extra_per_rank is not None:
        state.extra_per_rank.clear()
        state.extra_per_rank.update(p.extra_per_rank)
