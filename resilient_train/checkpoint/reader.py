"""Loading: find -> validate -> verify every byte -> copy into the live tensors -> apply.

Collective: every rank calls :func:`load`. Phases:

1. **find**: rank 0 picks the step (the highest with a valid manifest when none is given) on
   the first replica that has it, and shares the manifest and ``state.json`` with all ranks.
2. **validate**: the manifest is checked against the live objects (keys, dtypes, global
   shapes, coverage of every target by stored pieces, optimizer parameter groups). Any
   mismatch raises StateMismatchError before anything is changed.
3. **verify**: the files any rank needs are split across ranks; each is re-hashed (SHA-256)
   and its safetensors header validated, trying replicas in order when a store fails or a
   hash differs. Ranks agree on one verified source per file; any unrecoverable file raises
   the same error on every rank, still before anything is changed.
4. **read**: each rank reads exactly the byte ranges it needs straight into its tensors
   (resharding across world sizes happens here: a target takes the overlap of every stored
   piece of the same tensor).
5. **apply**: optimizer, scheduler, sampler, stateful objects, extras and RNG states.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .. import errors as errors_module
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedError,
    HashMismatchError,
    ManifestError,
    ResilientTrainError,
    StateMismatchError,
    StorageError,
    TruncatedFileError,
)
from ..format.jsontree import decode
from ..format.manifest import FileRecord, Manifest, TensorRecord
from ..format.names import MANIFEST_NAME, STATE_NAME, parse_step_dirname, rank_state_filename, step_dirname
from ..format.safetensors_io import CHUNK_BYTES, ST_TO_DTYPE, TensorSlot, parse_header
from ..progress import LOG_MIN_BYTES, Progress
from ..storage import Store, open_store, redact
from .collectives import Coordinator
from .planner import ReadOp, plan_reads, region_volume
from .state import TrainState, _local_piece, _optimizer_fqns, set_rng_state, unwrap_model

__all__ = [
    "load",
    "LoadResult",
    "committed_steps",
    "latest_step",
    "read_manifest",
    "verify_checkpoint",
    "open_sources",
    "read_tensors",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadResult:
    step: int
    manifest: Manifest
    sources: dict[str, str] = field(default_factory=dict)
    """File name -> name of the store (replica) whose verified copy was read."""
    seconds: float = 0.0


# ------------------------------------------------------------------ finding checkpoints


def open_sources(uri: Any, storage_options: Mapping[str, Any] | None = None) -> list[Store]:
    """One Store per replica, in preference order, from a URI, a Store, or a list of them."""
    items = uri if isinstance(uri, (list, tuple)) else [uri]
    if not items:
        raise CheckpointError("no checkpoint location given")
    return [open_store(u, storage_options) for u in items]


def read_manifest(store: Store, step: int) -> Manifest:
    """Parse and validate the manifest of ``step`` (CheckpointNotFoundError if uncommitted)."""
    folder = step_dirname(step)
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        data = store.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} under {store.uri} ({path} is missing)") from None
    manifest = Manifest.from_bytes(data, where=f"{store.uri}/{path}")
    if manifest.step != step:
        raise ManifestError(f"{store.uri}/{path} says step {manifest.step} but lives in folder {folder}")
    return manifest


def committed_steps(store: Store, *, validate: bool = True) -> list[int]:
    """Steps under ``store`` whose manifest exists (and parses, with ``validate``), ascending."""
    steps = []
    for name in store.list(""):
        step = parse_step_dirname(name)
        if step is None:
            continue
        if validate:
            try:
                read_manifest(store, step)
            except CheckpointNotFoundError:
                continue
            except ManifestError as exc:
                log.warning("ignoring %s/%s: %s", store.uri, name, exc)
                continue
        elif not store.exists(f"{name}/{MANIFEST_NAME}"):
            continue
        steps.append(step)
    return sorted(steps)


def latest_step(store: Store) -> int | None:
    """The highest step with a valid manifest, or None if there is no committed checkpoint."""
    for step in reversed(committed_steps(store, validate=False)):
        try:
            read_manifest(store, step)
            return step
        except (CheckpointNotFoundError, ManifestError) as exc:
            log.warning("skipping step %d under %s: %s", step, store.uri, exc)
    return None


# ------------------------------------------------------------------ verification


def _read_exact(f: Any, mv: memoryview, where: str) -> None:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise TruncatedFileError(f"{where}: file ended {len(mv) - got} bytes early")
        got += n


def _read_header(f: Any, size: int, where: str) -> tuple[int, dict[str, TensorSlot]]:
    prefix = f.read(min(size, 64 * 1024))
    try:
        data_start, slots, _ = parse_header(prefix, size, where=where)
    except ValueError as exc:
        if isinstance(exc, CorruptCheckpointError) or len(exc.args) < 2:
            raise
        rest = bytearray(exc.args[1] - len(prefix))
        _read_exact(f, memoryview(rest), where)
        data_start, slots, _ = parse_header(prefix + bytes(rest), size, where=where)
    return data_start, slots


def _check_file(store: Store, folder: str, rec: FileRecord, manifest: Manifest) -> None:
    """Re-hash one file and validate its header against the manifest. Raises on mismatch."""
    path = f"{folder}/{rec.path}"
    where = f"{store.name}:{path}"
    size = store.size(path)
    if size != rec.size_bytes:
        raise TruncatedFileError(f"{where} is {size} bytes, the manifest says {rec.size_bytes}")
    h = hashlib.sha256()
    buf = bytearray(min(CHUNK_BYTES, max(rec.size_bytes, 1)))
    mv = memoryview(buf)
    with store.open_read(path) as f:
        if rec.path.endswith(".safetensors"):
            head = f.read(min(size, 64 * 1024))
            try:
                parse_header(head, size, where=where)
            except ValueError as exc:
                if isinstance(exc, CorruptCheckpointError) or len(exc.args) < 2:
                    raise
            h.update(head)
            remaining = size - len(head)
        else:
            remaining = size
        while remaining > 0:
            n = f.readinto(mv[: min(len(mv), remaining)])
            if not n:
                raise TruncatedFileError(f"{where} ended {remaining} bytes early")
            h.update(mv[:n])
            remaining -= n
    if h.hexdigest() != rec.sha256:
        raise HashMismatchError(f"{where}: SHA-256 {h.hexdigest()[:16]}... differs from the manifest's {rec.sha256[:16]}...; the file is corrupt")
    if rec.path.endswith(".safetensors"):
        with store.open_read(path) as f:
            _, slots = _read_header(f, size, where)
        for t in manifest.tensors:
            if t.file != rec.path:
                continue
            slot = slots.get(t.name)
            if slot is None or slot.dtype != t.dtype or slot.shape != t.shape:
                raise CorruptCheckpointError(f"{where}: tensor {t.name!r} in the file does not match the manifest ({slot})")


def _verify_with_fallback(sources: Sequence[Store], folder: str, rec: FileRecord, manifest: Manifest) -> tuple[int | None, str | None, str | None]:
    """``(index of the first source whose copy verifies, None, None)`` or
    ``(None, reasons, name of the first error's type)``."""
    reasons = []
    first_type = None
    for i, store in enumerate(sources):
        try:
            _check_file(store, folder, rec, manifest)
            if i > 0:
                log.warning("file %s served by replica %s after: %s", rec.path, store.name, "; ".join(reasons))
            return i, None, None
        except (StorageError, CorruptCheckpointError, OSError) as exc:
            first_type = first_type or type(exc).__name__
            reasons.append(redact(f"{store.name}: {type(exc).__name__}: {exc}"))
    return None, "; ".join(reasons), first_type


def verify_checkpoint(uri: Any, step: int | None = None, *, storage_options: Mapping[str, Any] | None = None, io_threads: int | None = None, progress: bool = False) -> tuple[Manifest, list[str]]:
    """Re-hash every file of a checkpoint. Returns ``(manifest, problems)``; no problems = valid.
    ``progress``: a tqdm bar (or periodic log lines without tqdm)."""
    sources = open_sources(uri, storage_options)
    store = sources[0]
    if step is None:
        step = latest_step(store)
        if step is None:
            raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
    manifest = read_manifest(store, step)
    folder = step_dirname(step)
    problems: list[str] = []

    bar = Progress(sum(r.size_bytes for r in manifest.files), f"verify {folder}", bar=progress, enabled=progress)

    def one(rec: FileRecord) -> str | None:
        try:
            _check_file(store, folder, rec, manifest)
            return None
        except (ResilientTrainError, OSError) as exc:
            return redact(f"{rec.path}: {type(exc).__name__}: {exc}")
        finally:
            bar(rec.size_bytes)

    with ThreadPoolExecutor(max_workers=io_threads or min(8, os.cpu_count() or 1)) as pool, bar:
        problems = [p for p in pool.map(one, manifest.files) if p]
    return manifest, problems


# ------------------------------------------------------------------ targets


@dataclass
class _Target:
    key: str
    dest: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


def _records_by_key(manifest: Manifest) -> dict[str, list[TensorRecord]]:
    out: dict[str, list[TensorRecord]] = {}
    for t in manifest.tensors:
        out.setdefault(t.key, []).append(t)
    return out


def _whole_target(key: str, recs: list[TensorRecord], device: torch.device | str = "cpu") -> _Target:
    r = recs[0]
    return _Target(key, torch.empty(r.global_shape, dtype=ST_TO_DTYPE[r.dtype], device=device), (0,) * len(r.global_shape), r.global_shape)


@dataclass
class _LoadPlan:
    targets: list[_Target]
    opt_tensors: dict[str, Any]
    tree_tensor_keys: list[str]


def _build_targets(state: TrainState, manifest: Manifest, shared: dict[str, Any], strict: bool) -> _LoadPlan:
    by_key = _records_by_key(manifest)
    problems: list[str] = []
    targets: list[_Target] = []

    def check(key: str, dtype: torch.dtype, gshape: tuple[int, ...]) -> bool:
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

    if state.model is not None:
        live = unwrap_model(state.model).state_dict()
        for name, t in live.items():
            local, gshape, offs = _local_piece(t)
            key = f"model/{name}"
            if check(key, local.dtype, gshape):
                targets.append(_Target(key, local, offs, gshape))
        if strict:
            live_keys = {f"model/{n}" for n in live}
            for key in sorted(k for k in by_key if k.startswith("model/") and k not in live_keys):
                problems.append(f"{key}: in the checkpoint but not in the model (pass strict=False to ignore)")

    opt_tensors: dict[str, Any] = {}
    if state.optimizer is not None:
        saved = shared.get("optimizer")
        if saved is None:
            problems.append("optimizer: the checkpoint holds no optimizer state")
        else:
            live_groups = _optimizer_fqns(state.model, state.optimizer)  # type: ignore[arg-type]
            saved_groups = [g.get("params", []) for g in saved["param_groups"]]
            if len(saved_groups) != len(live_groups):
                problems.append(f"optimizer: checkpoint has {len(saved_groups)} param groups, the optimizer has {len(live_groups)}")
            else:
                for i, (a, b) in enumerate(zip(saved_groups, live_groups)):
                    if set(a) != set(b) or len(a) != len(b):
                        missing = sorted(set(b) - set(a))[:3]
                        extra = sorted(set(a) - set(b))[:3]
                        problems.append(f"optimizer: param group {i} differs (missing {missing}, extra {extra})")
            params = {n: p for n, p in unwrap_model(state.model).named_parameters(remove_duplicate=False)}  # type: ignore[union-attr]
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
                    local_p, p_gshape, p_offs = _local_piece(p.data if not hasattr(p, "device_mesh") else p)
                    if tuple(r.global_shape) == tuple(p_gshape) and len(p_gshape) > 0:
                        dest = torch.empty(local_p.shape, dtype=ST_TO_DTYPE[r.dtype], device=local_p.device)
                        targets.append(_Target(key, dest, p_offs, p_gshape))
                        opt_tensors[key] = (dest, p)
                    else:
                        t = _whole_target(key, recs)
                        targets.append(t)
                        opt_tensors[key] = (t.dest, None)

    tree_keys: list[str] = []
    for label, wanted in (("scheduler", state.scheduler), ("sampler", state.sampler), ("extra", state.extra or None), *((f"stateful.{k}", v) for k, v in state.stateful.items())):
        if wanted is None:
            continue
        if label not in shared:
            if label == "extra":
                continue
            problems.append(f"{label}: the checkpoint holds no {label} state")
            continue
        for key, recs in by_key.items():
            if key == label or key.startswith(label + "/"):
                targets.append(_whole_target(key, recs))
                tree_keys.append(key)
    if state.extra == {} and "extra" in shared:
        for key, recs in by_key.items():
            if key == "extra" or key.startswith("extra/"):
                targets.append(_whole_target(key, recs))
                tree_keys.append(key)

    for t in targets:
        recs = by_key.get(t.key, [])
        _, covered = plan_reads(recs, t.offsets, tuple(t.dest.shape))
        if covered != region_volume(t.dest.shape):
            problems.append(f"{t.key}: stored pieces cover {covered} of the {region_volume(t.dest.shape)} elements this rank needs")
    if problems:
        head = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise StateMismatchError(f"checkpoint step {manifest.step} does not fit the training state: {head}")
    return _LoadPlan(targets, opt_tensors, tree_keys)


# ------------------------------------------------------------------ reading


def _copy_ops(store: Store, folder: str, file: str, size: int, ops: list[tuple[_Target, ReadOp]]) -> int:
    """Read the byte ranges of ``ops`` (all in ``file``) into their targets. Returns bytes read."""
    path = f"{folder}/{file}"
    where = f"{store.name}:{path}"
    read = 0
    with store.open_read(path) as f:
        data_start, slots = _read_header(f, size, where)
        for target, op in sorted(ops, key=lambda x: slots[x[1].record.name].begin):
            slot = slots[op.record.name]
            dtype = ST_TO_DTYPE[slot.dtype]
            f.seek(data_start + slot.begin)
            nbytes = slot.end - slot.begin
            dest = target.dest
            direct = (
                op.is_whole_piece
                and tuple(dest.shape) == op.size
                and dest.device.type == "cpu"
                and dest.is_contiguous()
                and dest.dtype == dtype
            )
            if direct:
                if nbytes:
                    _read_exact(f, memoryview(dest.reshape(-1).view(torch.uint8).numpy()), where)
            else:
                tmp = torch.empty(slot.shape, dtype=dtype)
                if nbytes:
                    _read_exact(f, memoryview(tmp.reshape(-1).view(torch.uint8).numpy()), where)
                src = tmp[tuple(slice(s, s + n) for s, n in zip(op.src_start, op.size))]
                dst = dest[tuple(slice(s, s + n) for s, n in zip(op.dst_start, op.size))]
                with torch.no_grad():
                    dst.copy_(src)
            read += nbytes
    return read


def read_tensors(sources: Sequence[Store], manifest: Manifest, targets: list[_Target], source_of: Mapping[str, int], io_threads: int) -> int:
    """Phase 4: fill ``targets`` from verified sources. Returns bytes read."""
    folder = step_dirname(manifest.step)
    by_key = _records_by_key(manifest)
    per_file: dict[str, list[tuple[_Target, ReadOp]]] = {}
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        for op in ops:
            per_file.setdefault(op.record.file, []).append((t, op))
    if not per_file:
        return 0
    with ThreadPoolExecutor(max_workers=min(io_threads, len(per_file)), thread_name_prefix="rt-load") as pool:
        futs = [
            pool.submit(_copy_ops, sources[source_of.get(fname, 0)], folder, fname, manifest.file(fname).size_bytes, ops)
            for fname, ops in per_file.items()
        ]
        return sum(f.result() for f in futs)


def _needed_files(manifest: Manifest, targets: list[_Target]) -> set[str]:
    by_key = _records_by_key(manifest)
    files = set()
    for t in targets:
        ops, _ = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
        files.update(op.record.file for op in ops)
    return files


def _read_json(sources: Sequence[Store], folder: str, rec: FileRecord) -> Any:
    import json

    reasons = []
    for store in sources:
        try:
            data = store.read_bytes(f"{folder}/{rec.path}")
        except (StorageError, OSError) as exc:
            reasons.append(redact(f"{store.name}: {exc}"))
            continue
        if len(data) != rec.size_bytes or hashlib.sha256(data).hexdigest() != rec.sha256:
            reasons.append(f"{store.name}: {rec.path} does not match its SHA-256 in the manifest")
            continue
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            reasons.append(f"{store.name}: {rec.path} is not JSON ({exc})")
    raise CorruptCheckpointError(f"no readable copy of {folder}/{rec.path}: " + "; ".join(reasons))


def _find(sources: Sequence[Store], step: int | None) -> tuple[int, Manifest]:
    if step is not None:
        errors: list[BaseException] = []
        for store in sources:
            try:
                return step, read_manifest(store, step)
            except (StorageError, CheckpointError, OSError) as exc:
                errors.append(exc)
        invalid = [e for e in errors if isinstance(e, ManifestError)]
        if invalid:
            raise invalid[0]
        raise CheckpointNotFoundError(f"step {step} is not committed on any replica: " + "; ".join(redact(str(e)) for e in errors))
    best: tuple[int, Manifest] | None = None
    for store in sources:
        try:
            s = latest_step(store)
            if s is not None and (best is None or s > best[0]):
                best = (s, read_manifest(store, s))
        except (StorageError, OSError) as exc:
            log.warning("replica %s unavailable while looking for the latest step: %s", store.name, redact(str(exc)))
    if best is None:
        raise CheckpointNotFoundError("no committed checkpoint on any of: " + ", ".join(s.uri for s in sources))
    return best


def _agree_or_raise(coord: Coordinator, error: BaseException | None) -> None:
    """Every rank raises if any rank failed; a rank's own typed error is re-raised as is."""
    msgs = coord.all_gather(None if error is None else redact(f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failures = {r: m for r, m in enumerate(msgs) if m}
    if failures:
        raise DistributedError("checkpoint load failed on other ranks", failures)


def load(
    uri: Any,
    state: TrainState,
    step: int | None = None,
    *,
    process_group: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    strict: bool = True,
    io_threads: int | None = None,
) -> LoadResult:
    """Load checkpoint ``step`` (default: the latest committed) into ``state``. Collective.

    ``uri`` may be a list of replicas (URIs or Stores) in preference order: each file is read
    from the first replica whose copy verifies. Nothing in ``state`` changes unless every
    needed file verified and the checkpoint fits the state. ``strict=False`` tolerates
    checkpoint tensors that the model does not have.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    t0 = time.perf_counter()
    coord = Coordinator(process_group)
    threads = io_threads or max(1, min(8, os.cpu_count() or 1))
    sources = open_sources(uri, storage_options)

    # 1. find
    found: Any = None
    err: BaseException | None = None
    if coord.rank == 0:
        try:
            s, manifest = _find(sources, step)
            shared = _read_json(sources, step_dirname(s), manifest.file(STATE_NAME))
            found = (manifest.to_bytes(), shared)
        except (ResilientTrainError, OSError) as exc:
            err = exc
    found = coord.broadcast(found if err is None else redact(f"{type(err).__name__}: {err}"))
    if err is not None:
        raise err
    if isinstance(found, str):
        raise CheckpointError(f"rank 0 could not find the checkpoint: {found}")
    manifest = Manifest.from_bytes(found[0])
    shared = found[1]
    folder = step_dirname(manifest.step)

    # 2. validate
    err = None
    plan = None
    try:
        plan = _build_targets(state, manifest, shared, strict)
    except (ResilientTrainError, OSError) as exc:
        err = exc
    _agree_or_raise(coord, err)
    assert plan is not None

    # 3. verify (files split across ranks)
    needed = sorted(set().union(*coord.all_gather(sorted(_needed_files(manifest, plan.targets)))))
    mine = needed[coord.rank :: coord.world_size]
    verdicts: dict[str, tuple[int | None, str | None, str | None]] = {}
    if mine:
        with ThreadPoolExecutor(max_workers=min(threads, len(mine)), thread_name_prefix="rt-verify") as pool, \
                Progress(sum(manifest.file(n).size_bytes for n in mine), f"load {folder}: verifying", min_bytes=LOG_MIN_BYTES) as progress:
            for fname, verdict in zip(mine, pool.map(lambda n: _verify_with_fallback(sources, folder, manifest.file(n), manifest), mine)):
                verdicts[fname] = verdict
                progress(manifest.file(fname).size_bytes)
    merged: dict[str, tuple[int | None, str | None, str | None]] = {}
    for part in coord.all_gather(verdicts):
        merged.update(part)
    bad = {f: (why, kind) for f, (src, why, kind) in merged.items() if src is None}
    if bad:
        first = sorted(bad)[0]
        detail = "; ".join(f"{f}: {w}" for f, (w, _) in sorted(bad.items())[:5])
        exc_type = getattr(errors_module, bad[first][1] or "", None)
        if not (isinstance(exc_type, type) and issubclass(exc_type, CorruptCheckpointError)):
            exc_type = CorruptCheckpointError
        raise exc_type(f"checkpoint step {manifest.step} cannot be loaded, nothing was changed: {detail}")
    source_of = {f: src for f, (src, _, _) in merged.items() if src is not None}

    # rank state (small, verified on read)
    rank_tree = None
    if state.rng:
        name = rank_state_filename(coord.rank if coord.rank < manifest.world_size else coord.rank % manifest.world_size)
        if any(f.path == name for f in manifest.files):
            rank_tree = _read_json(sources, folder, manifest.file(name))
            if manifest.world_size != coord.world_size:
                log.info("world size changed %d -> %d: rank %d takes RNG state from %s", manifest.world_size, coord.world_size, coord.rank, name)

    # 4. read
    err = None
    try:
        read_tensors(sources, manifest, plan.targets, source_of, threads)
    except (ResilientTrainError, OSError) as exc:
        err = exc
    _agree_or_raise(coord, err)

    # 5. apply
    _apply(state, shared, plan, rank_tree)
    coord.barrier()
    sources_used = {f: sources[i].name for f, i in source_of.items()}
    seconds = time.perf_counter() - t0
    log.info("loaded step %d (%d files) in %.2f s", manifest.step, len(needed), seconds)
    return LoadResult(manifest.step, manifest, sources_used, seconds)


def _apply(state: TrainState, shared: dict[str, Any], plan: _LoadPlan, rank_tree: Any) -> None:
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
        live_groups = _optimizer_fqns(state.model, state.optimizer)  # type: ignore[arg-type]
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
        state.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if state.scheduler is not None:
        state.scheduler.load_state_dict(decode(shared["scheduler"], tensors))
    if state.sampler is not None:
        state.sampler.load_state_dict(decode(shared["sampler"], tensors))
    for name, obj in state.stateful.items():
        obj.load_state_dict(decode(shared[f"stateful.{name}"], tensors))
    if "extra" in shared:
        extra = decode(shared["extra"], tensors)
        state.extra.clear()
        state.extra.update(extra)
    if rank_tree is not None and "rng" in rank_tree:
        set_rng_state(decode(rank_tree["rng"]))


