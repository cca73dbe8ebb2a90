"""Reading one checkpoint: find -> validate -> parse -> fetch, hash and place each chunk once -> apply.

The **read** phase of the one load route (:func:`~resilient_train.checkpoint.loading.load_checkpoint`,
which ``rt.load`` calls). Collective: every rank calls :func:`read_checkpoint`. This module
runs the phases; their parts are :mod:`.chunks` (fetch and verify) and :mod:`.targets`
(validate, place, apply). Every byte that reaches a live tensor or a JSON parser is hashed from
the very buffer it is then used from; nothing is read twice. Phases:

1. **find**: rank 0 picks the step (the highest with a valid manifest when none is given) on
   the first replica that has it, reads ``state.json`` and the Hugging Face index (verified,
   parsed strictly) and shares the manifest and the state with all ranks.
2. **validate**: the manifest is checked against the live objects (keys, dtypes, global
   shapes, coverage of every target by stored pieces, optimizer parameter groups, the shape of
   every JSON tree). Any mismatch raises StateMismatchError before anything is changed.
3. **parse**: each rank fetches and verifies the chunks holding the safetensors headers of the
   files it needs and its ``rank-NNNNN.json``, validates every header against the manifest and
   decodes every JSON tree. Still nothing is changed.
4. **fetch and place**: each rank fetches exactly the chunks holding the byte ranges it needs
   (ranged reads, concurrently on a thread pool; resharding happens here), hashes each chunk
   (format v2: per chunk; v1: the whole file is one chunk) and tries the next replica for a
   chunk that fails. When everything needed fits ``staging_budget_bytes``, all chunks are
   verified on every rank before the first live tensor is written, so a failed load leaves the
   state untouched. Beyond the budget, verified chunks are placed as they arrive and a later
   failure raises :class:`PartialLoadError` (the state was partially overwritten).
5. **apply**: optimizer, scheduler, sampler and stateful objects (rolled back if one of them
   refuses its state), then model tensors, extras and RNG states.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedError,
    ManifestError,
    PartialLoadError,
    ResilientTrainError,
    SignatureError,
    StateFileError,
    StorageError,
)
from ..format.jsontree import decode
from ..format.manifest import FileRecord, Manifest
from ..format.names import HF_INDEX_NAME, MANIFEST_NAME, STATE_NAME, rank_state_filename, step_dirname
from ..format.safetensors_io import TensorSlot
from ..progress import LOG_MIN_BYTES, Progress
from ..storage import Store, redact
from .collectives import Coordinator, describe
from .location import Location, as_location
from .chunks import Chunks, read_json_file
from .planner import region_volume
from .steps import newest_committed, read_manifest
from .targets import (
    CopyOp, DirectPlan, LoadPlan, Prepared, Target, apply_objects, apply_rest, build_targets, needed_files, optimizer_tree_ok, place_direct, place_op,
    plan_batches, plan_direct, plan_ops, prepare_apply, records_by_key, whole_target, wholly_needed,
)
from .state import TrainState

__all__ = [
    "read_checkpoint",
    "LoadResult",
    "verify_checkpoint",
    "read_tensors",
    "read_whole_tensors",
    "read_json_file",
    "completeness_problems",
    "DEFAULT_STAGING_BUDGET_BYTES",
]

log = logging.getLogger(__name__)

DEFAULT_STAGING_BUDGET_BYTES = 4 * 1024**3
"""Bytes a load may hold in CPU buffers so that a failure leaves the live state untouched."""

DEFAULT_IO_THREADS = 8
"""Concurrent ranged reads per rank (I/O and hashing both release the GIL)."""


@dataclass(frozen=True, repr=False)
class LoadResult:
    step: int
    manifest: Manifest
    sources: dict[str, str] = field(default_factory=dict)
    """File name -> name of the store (replica) that served it (most of its chunks)."""
    seconds: float = 0.0
    bytes_fetched: int = 0
    """Bytes of checkpoint files this rank fetched and hashed (headers and JSON included; the
    manifest, which has no digest of its own, not)."""

    def __repr__(self) -> str:
        # short: the manifest lists every tensor (kilobytes even for a tiny model)
        return (f"LoadResult(step={self.step}, world_size={self.manifest.world_size}, files={len(self.manifest.files)}, "
                f"tensors={len(self.manifest.tensors)}, providers={sorted(set(self.sources.values()))}, "
                f"seconds={self.seconds:.3f}, bytes_fetched={self.bytes_fetched})")


def _check_index(index: Any, manifest: Manifest, where: str) -> None:
    """The Hugging Face index must name only model files of this checkpoint, for tensors they hold."""
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not isinstance(index.get("metadata", {}), dict):
        raise StateFileError(f"{where}: must be an object with a 'weight_map' object")
    in_file = {(t.file, t.name) for t in manifest.tensors}
    for name, fname in index["weight_map"].items():
        if not isinstance(fname, str) or (fname, name) not in in_file:
            raise StateFileError(f"{where}: maps {name!r} to {fname!r}, which does not hold it per the manifest")


def _check_listed(sources: Sequence[Store], manifest: Manifest) -> None:
    """Every file the manifest lists exists in the step folder of some replica (one listing
    per replica, stopping once all are found). A load reads only the files it needs: without
    this, a file renamed in the manifest (or lost) would go unnoticed. When no replica can be
    listed, the reads that follow decide."""
    folder = step_dirname(manifest.step)
    missing = {f.path for f in manifest.files}
    listed_any = False
    for store in sources:
        try:
            names = set(store.list(folder))
        except (StorageError, OSError) as exc:
            log.warning("could not list %s on %s: %s", folder, store.name, redact(str(exc)))
            continue
        listed_any = True
        missing -= names
        if not missing:
            return
    if listed_any and missing:
        raise CorruptCheckpointError(
            f"{folder}/{MANIFEST_NAME} lists {sorted(missing)[:5]}, which no replica holds (a file lost, or a name "
            f"changed in the manifest: `ckpt verify` tells which)"
        )


# numbers in every torch optimizer that has them (not "eps": Adafactor keeps a tuple there)
_NUMERIC_GROUP_KEYS = ("lr", "initial_lr", "weight_decay", "momentum", "dampening")


def _is_number_or_scalar(v: Any, scalars: set[str]) -> bool:
    """A JSON number (not a bool), a tagged non-finite float, or a reference to a one-element tensor."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return True
    if isinstance(v, dict) and len(v) == 1:
        if "__float__" in v:
            return v["__float__"] in ("nan", "inf", "-inf")
        if "__tensor__" in v:
            return v["__tensor__"] in scalars
    return False


def _check_rng(rng: Any, where: str) -> None:
    """An RNG state as :func:`~resilient_train.checkpoint.state.set_rng_state` applies it, tried
    on fresh generators (no global state changes): what set_rng_state would refuse, this refuses."""
    if not isinstance(rng, dict):
        raise StateFileError(f"{where}: 'rng' must be an object")
    try:
        if "python" in rng:
            v = rng["python"]
            random.Random().setstate((v[0], tuple(v[1]), v[2]))
        if "numpy" in rng:
            np.random.RandomState().set_state(tuple(rng["numpy"]))
        if "torch" in rng:
            torch.Generator().set_state(torch.frombuffer(bytearray(rng["torch"]), dtype=torch.uint8))
        if "cuda" in rng and not (isinstance(rng["cuda"], list) and all(isinstance(b, bytes) for b in rng["cuda"])):
            raise TypeError("'cuda' must be a list of byte strings")
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError, OverflowError) as exc:
        raise StateFileError(redact(f"{where}: 'rng' is not a valid RNG state ({type(exc).__name__}: {exc})")) from None


def _check_optimizer_tree(opt: Any, manifest: Manifest, where: str) -> None:
    """An optimizer tree well-shaped, with numeric ``step`` values and hyper-parameters."""
    if not optimizer_tree_ok(opt):
        raise StateFileError(f"{where}: 'optimizer' must hold 'param_groups' (objects with a 'params' list of names) and 'state' (an object of objects)")
    scalars = {t.key for t in manifest.tensors if region_volume(t.global_shape) == 1}
    for fqn, entry in opt.get("state", {}).items():
        if "step" in entry and not _is_number_or_scalar(entry["step"], scalars):
            raise StateFileError(f"{where}: optimizer state of {fqn!r}: 'step' must be a number or a one-element tensor, got {str(entry['step'])[:40]!r}")
    for i, g in enumerate(opt["param_groups"]):
        for k in _NUMERIC_GROUP_KEYS:
            if k in g and not _is_number_or_scalar(g[k], scalars):
                raise StateFileError(f"{where}: optimizer param group {i}: {k!r} must be a number, got {str(g[k])[:40]!r}")


def _check_state_tree(obj: Any, manifest: Manifest, where: str) -> None:
    """The one parse-and-validate of a state / rank-state file that ``load`` and ``verify``
    both run (everything but the live objects): an object whose trees decode (tags
    well-formed, every ``__tensor__`` reference stored in the checkpoint), an optimizer tree
    well-shaped with numeric ``step`` values and hyper-parameters, RNG states that fresh
    generators accept. Raises StateFileError naming ``where``."""
    if not isinstance(obj, dict):
        raise StateFileError(f"{where}: top level must be a JSON object")
    if "optimizer" in obj:
        _check_optimizer_tree(obj["optimizer"], manifest, where)
    keys = {t.key: None for t in manifest.tensors}
    try:
        decoded = decode(obj, keys)  # type: ignore[arg-type]
    except StateFileError as exc:
        raise StateFileError(f"{where}: {exc}") from None
    if "rng" in decoded:
        _check_rng(decoded["rng"], where)


def completeness_problems(manifest: Manifest) -> list[str]:
    """What a committed manifest must list that this one does not (files named at fault)."""
    names = {f.path for f in manifest.files}
    out = []
    if STATE_NAME not in names:
        out.append(f"{MANIFEST_NAME}: does not list {STATE_NAME}")
    missing = [rank_state_filename(r) for r in range(manifest.world_size) if rank_state_filename(r) not in names]
    if missing:
        out.append(f"{MANIFEST_NAME}: world size {manifest.world_size} but no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return out


def verify_checkpoint(uri: Any, step: int | None = None, *, storage_options: Mapping[str, Any] | None = None, io_threads: int | None = None, verify_keys: Any = None, progress: bool = False) -> tuple[Manifest, list[str]]:
    """Re-hash every byte of a checkpoint and check it against the manifest: every chunk's
    SHA-256, every safetensors header against the tensors the manifest places there, every JSON
    file parsed strictly, and the manifest's own completeness. Returns ``(manifest, problems)``;
    no problems = valid. Each problem names the file at fault. With ``verify_keys`` the
    manifest's signature is checked first (SignatureError)."""
    store = as_location(uri, storage_options).primary
    if step is None:
        latest = newest_committed(store, keys=verify_keys, limit=1)
        if not latest:
            raise CheckpointNotFoundError(f"no committed checkpoint under {store.uri}")
        step = latest[0]
    manifest = read_manifest(store, step, keys=verify_keys)
    problems: list[str] = completeness_problems(manifest)
    threads = io_threads or DEFAULT_IO_THREADS

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rt-verify") as pool, \
            Progress(manifest.total_bytes, f"verify {step_dirname(step)}", bar=progress, min_bytes=0 if progress else LOG_MIN_BYTES) as bar:
        chunks = Chunks([store], manifest, pool)
        chunks.on_bytes = bar

        def one(rec: FileRecord) -> str | None:
            try:
                if rec.path.endswith(".safetensors"):
                    chunks.header(rec.path)
                elif rec.path.endswith(".json"):
                    obj = chunks.json(rec.path)
                    if rec.path == HF_INDEX_NAME:
                        _check_index(obj, manifest, rec.path)
                    else:
                        _check_state_tree(obj, manifest, rec.path)
                n = len(chunks.ranges(rec.path))
                # formats 1 and 2: the whole-file SHA-256 too, over the verified chunks in order
                whole = hashlib.sha256() if chunks.needs_whole_pass and n > 1 else None
                for first in range(0, n, threads):  # a window of chunks at a time, hashed in parallel
                    window = [(rec.path, i) for i in range(first, min(n, first + threads))]
                    chunks.prefetch(window)
                    for key in window:
                        if whole is not None:
                            whole.update(chunks.get(*key))
                        chunks.drop(key)
                try:
                    chunks.check_whole(rec.path, whole)
                except ManifestError as exc:  # the bytes match their chunk digests: the manifest is at fault
                    return redact(f"{MANIFEST_NAME}: {exc}")
                return None
            except (ResilientTrainError, OSError) as exc:
                return redact(f"{rec.path}: {type(exc).__name__}: {exc}")
            finally:
                for idx in range(len(chunks.ranges(rec.path))):
                    chunks.drop((rec.path, idx))

        # Files one after another, but each file's chunks on every core.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rt-verify-file") as files_pool:
            problems += [p for p in files_pool.map(one, manifest.files) if p]
    return manifest, problems


# ------------------------------------------------------------------ targets


# ------------------------------------------------------------------ reading


def read_tensors(sources: Sequence[Store], manifest: Manifest, targets: list["Target"], source_of: Mapping[str, int] | None = None, io_threads: int = DEFAULT_IO_THREADS) -> int:
    """Fill ``targets`` (fresh tensors, not live state) from ``sources``, every byte hashed
    from the buffer it is copied from. Returns bytes fetched. ``source_of`` is ignored (kept
    for callers of the older two-pass reader: replicas are now chosen per chunk)."""
    with ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="rt-load") as pool:
        chunks = Chunks(sources, manifest, pool)
        files = sorted(needed_files(manifest, targets))
        headers = dict(zip(files, pool.map(chunks.header, files)))
        ops = plan_ops(manifest, targets, headers)
        chunks.prefetch([(o.file, i) for o in ops for i in chunks.covering(o.file, o.begin, o.end)])
        for o in ops:
            place_op(chunks, o)
        return chunks.bytes_fetched


def read_whole_tensors(sources: Sequence[Store], manifest: Manifest, prefix: str = "", io_threads: int = DEFAULT_IO_THREADS) -> dict[str, torch.Tensor]:
    """Every stored tensor whose key starts with ``prefix``, reassembled whole on the CPU (sharded
    pieces joined), every byte verified: key -> tensor."""
    targets = [whole_target(key, recs) for key, recs in sorted(records_by_key(manifest).items()) if key.startswith(prefix)]
    read_tensors(sources, manifest, targets, io_threads=io_threads)
    return {t.key: t.dest for t in targets}


def _verify_with_fallback(sources: Sequence[Store], folder: str, rec: FileRecord, manifest: Manifest) -> tuple[int | None, str | None, str | None]:
    """Compatibility shim for callers of the older two-pass reader: checks the header only
    (the bytes themselves are hashed when :func:`read_tensors` reads them)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            if rec.path.endswith(".safetensors"):
                Chunks(sources, manifest, pool).header(rec.path)
            return 0, None, None
        except (ResilientTrainError, OSError) as exc:
            return None, describe(exc), type(exc).__name__


def _find(sources: Sequence[Store], step: int | None, keys: Any = None) -> tuple[int, Manifest]:
    """``step`` (default: the newest committed on any replica) and its manifest, read from the
    first replica that has it committed."""
    if step is None:
        latest = newest_committed(Location(sources), keys=keys, limit=1)
        if not latest:
            raise CheckpointNotFoundError("no committed checkpoint on any of: " + ", ".join(s.uri for s in sources))
        step = latest[0]
    errors: list[BaseException] = []
    for store in sources:
        try:
            return step, read_manifest(store, step, keys=keys)
        except (StorageError, CheckpointError, OSError) as exc:
            errors.append(exc)
    invalid = [e for e in errors if isinstance(e, (ManifestError, SignatureError))]
    if invalid:
        raise invalid[0]
    raise CheckpointNotFoundError(f"step {step} is not committed on any replica: " + "; ".join(redact(str(e)) for e in errors))


def _agree_or_raise(coord: Coordinator, error: BaseException | None) -> None:
    """Every rank raises if any rank failed; a rank's own typed error is re-raised as is."""
    msgs = coord.all_gather(None if error is None else describe(error))
    if error is not None:
        raise error
    failures = {r: m for r, m in enumerate(msgs) if m}
    if failures:
        raise DistributedError("checkpoint load failed on other ranks", failures)


_TYPED = (ResilientTrainError, OSError)


def _typed(exc: BaseException, what: str) -> BaseException:
    """Library errors pass through; anything else a malformed checkpoint can provoke becomes a
    typed error (never a raw KeyError/ValueError/TypeError/RuntimeError/RecursionError)."""
    if isinstance(exc, ResilientTrainError):
        return exc
    if isinstance(exc, MemoryError):
        return CorruptCheckpointError(f"{what}: ran out of memory (the checkpoint asks for more than this process can hold)")
    return CorruptCheckpointError(redact(f"{what}: {type(exc).__name__}: {exc}"))


def read_checkpoint(
    sources: Sequence[Store],
    state: TrainState,
    step: int | None = None,
    *,
    process_group: Any = None,
    strict: bool = True,
    io_threads: int | None = None,
    staging_budget_bytes: int | None = None,
    verify_keys: Any = None,
) -> LoadResult:
    """Read checkpoint ``step`` (default: the latest committed) from the replicas ``sources`` (in
    preference order: each chunk from the first whose copy verifies) into ``state``. Collective.
    The **read** phase of :func:`~resilient_train.checkpoint.loading.load_checkpoint`; see that
    module and this one for the promises and failure behaviour.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    budget = DEFAULT_STAGING_BUDGET_BYTES if staging_budget_bytes is None else staging_budget_bytes
    if budget < 0:
        raise ValueError(f"staging_budget_bytes must be >= 0, got {budget}")
    t0 = time.perf_counter()
    coord = Coordinator(process_group)
    threads = io_threads or DEFAULT_IO_THREADS
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rt-load") as pool:
        return _load(coord, list(sources), state, step, strict, pool, budget, t0, verify_keys)


def _load(coord: Coordinator, sources: list[Store], state: TrainState, step: int | None, strict: bool, pool: ThreadPoolExecutor, budget: int, t0: float, verify_keys: Any = None) -> LoadResult:
    """The phases of the module doc, in order, on every rank."""
    manifest, shared, fetched_by_find = _find_phase(coord, sources, step, verify_keys, pool)
    chunks = Chunks(sources, manifest, pool)
    progress = Progress(manifest.total_bytes, f"load {step_dirname(manifest.step)}", min_bytes=LOG_MIN_BYTES)
    chunks.on_bytes = progress
    plan, prepared, headers = _validate_and_parse(coord, chunks, manifest, shared, state, strict, budget, pool)
    ops = plan_ops(manifest, plan.targets, headers)
    place = _placer(chunks, ops, pool)
    # Fresh tensors (optimizer state, extras) are read straight into place from local files:
    # they are applied only once every rank verified everything, so only the live tensors'
    # bytes are staged.
    fresh = plan_direct(chunks, ops, eligible=lambda o: not o.target.live and _scatters(sources))
    batches = plan_batches(chunks, fresh.rest, budget)
    staged = len(batches) <= 1
    if staged:
        _place_staged(coord, state, prepared, fresh.rest, batches, chunks, place, fresh, pool)
    else:
        # Beyond the budget: whole pieces are read straight into their tensors and hashed there.
        direct = plan_direct(chunks, ops)
        _place_streamed(coord, state, prepared, plan_batches(chunks, direct.rest, budget), chunks, place, manifest.step, budget, direct, pool)
    coord.barrier()
    seconds = time.perf_counter() - t0
    log.info("loaded step %d (%d files, %.1f MB fetched, %s) in %.2f s", manifest.step, len(headers), chunks.bytes_fetched / 1e6, "staged" if staged else "streamed", seconds)
    progress.close()
    return LoadResult(manifest.step, manifest, chunks.source_names(), seconds, chunks.bytes_fetched + fetched_by_find)


def _find_phase(coord: Coordinator, sources: list[Store], step: int | None, verify_keys: Any, pool: ThreadPoolExecutor) -> tuple[Manifest, dict[str, Any], int]:
    """1. find (rank 0, shared with every rank): the manifest, ``state.json``, bytes fetched."""
    found: Any = None
    err: BaseException | None = None
    fetched_by_find = 0
    if coord.rank == 0:
        try:
            s, manifest = _find(sources, step, verify_keys)
            chunks0 = Chunks(sources, manifest, pool)
            small = [STATE_NAME] + [HF_INDEX_NAME for f in manifest.files if f.path == HF_INDEX_NAME]
            chunks0.prefetch([(f, i) for f in small for i in range(len(chunks0.ranges(f)))])  # one round trip
            _check_listed(sources, manifest)
            for f in small:
                chunks0.check_whole(f)
            shared = chunks0.json(manifest.file(STATE_NAME).path)
            _check_state_tree(shared, manifest, f"{step_dirname(s)}/{STATE_NAME}")
            if any(f.path == HF_INDEX_NAME for f in manifest.files):
                _check_index(chunks0.json(HF_INDEX_NAME), manifest, f"{step_dirname(s)}/{HF_INDEX_NAME}")
            found = (manifest.to_bytes(), shared)
            fetched_by_find = chunks0.bytes_fetched
        except (ResilientTrainError, OSError) as exc:
            err = exc
    found = coord.broadcast(found if err is None else describe(err))
    if err is not None:
        raise err
    if isinstance(found, str):
        raise CheckpointError(f"rank 0 could not find the checkpoint: {found}")
    return Manifest.from_bytes(found[0]), found[1], fetched_by_find


def _validate_and_parse(coord: Coordinator, chunks: Chunks, manifest: Manifest, shared: dict[str, Any], state: TrainState, strict: bool,
                        budget: int, pool: ThreadPoolExecutor) -> tuple[LoadPlan, Prepared, dict[str, tuple[int, dict[str, TensorSlot]]]]:
    """2. validate and 3. parse: nothing live changes before both passed on every rank."""
    err = None
    plan: LoadPlan | None = None
    prepared: Prepared | None = None
    headers: dict[str, tuple[int, dict[str, TensorSlot]]] = {}
    try:
        try:
            plan = build_targets(state, manifest, shared, strict)
            files = sorted(needed_files(manifest, plan.targets))
            # Files this rank needs whole (the usual case) are fetched in one concurrent round
            # with their headers, within the budget; the others header first, then the ranges.
            whole = wholly_needed(manifest, plan.targets)
            # Files that fill fresh tensors only (optimizer state, extras) are read straight into
            # them later (place_direct); they are not staged here. Formats 1 and 2 stage them to
            # check their whole-file SHA-256 too.
            if not chunks.needs_whole_pass and _scatters(chunks.sources):
                live_keys = {t.key for t in plan.targets if t.live}
                whole -= {f for f in whole if f.endswith(".safetensors") and not any(r.key in live_keys for r in manifest.tensors if r.file == f)}
            whole_bytes = sum(manifest.file(f).size_bytes for f in whole)
            rank_file = _rank_state_name(manifest, coord) if state.has_rank_state else None
            if rank_file is not None and any(f.path == rank_file for f in manifest.files):
                whole.add(rank_file)
            if whole and whole_bytes <= budget:
                chunks.prefetch([(f, i) for f in sorted(whole) for i in range(len(chunks.ranges(f)))])
                # Files read whole: their whole-file SHA-256 too (concurrently, from the cache).
                list(pool.map(chunks.check_whole, sorted(f for f in whole if len(chunks.ranges(f)) > 1)))
            headers = dict(zip(files, pool.map(chunks.header, files)))
            rank_tree = _read_rank_state(chunks, manifest, coord) if state.has_rank_state else None
            prepared = prepare_apply(state, shared, plan, rank_tree)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, MemoryError, RuntimeError) as exc:
            raise _typed(exc, f"checkpoint step {manifest.step}") from exc
    except _TYPED as exc:
        err = exc
    _agree_or_raise(coord, err)
    assert plan is not None and prepared is not None
    return plan, prepared, headers


def _scatters(sources: Sequence[Store]) -> bool:
    """Whether the preferred replica reads straight into memory (``read_into``: local files).
    Within the budget, fresh tensors are read in place only then: on an object store the
    staged path's few large ranged reads (up to MAX_RUN_BYTES) beat one request per chunk."""
    return bool(sources) and callable(getattr(type(sources[0]), "read_into", None))


def _placer(chunks: Chunks, ops: list[CopyOp], pool: ThreadPoolExecutor) -> Callable[[list[CopyOp]], None]:
    """4. place: a function that copies a batch of ops into their targets and drops each chunk
    once its last op used it (chunks no op needs are dropped now)."""
    refs: dict[tuple[str, int], int] = {}
    for o in ops:
        for i in chunks.covering(o.file, o.begin, o.end):
            refs[(o.file, i)] = refs.get((o.file, i), 0) + 1
    for key in list(chunks.cache):
        if key not in refs:
            chunks.drop(key)

    def place(batch: list[CopyOp]) -> None:
        # Ops write disjoint regions, and the copies release the GIL: run them concurrently.
        list(pool.map(lambda o: place_op(chunks, o), batch))
        for o in batch:
            for i in chunks.covering(o.file, o.begin, o.end):
                refs[(o.file, i)] -= 1
                if refs[(o.file, i)] == 0:
                    chunks.drop((o.file, i))

    return place


def _place_staged(coord: Coordinator, state: TrainState, prepared: Prepared, ops: list[CopyOp], batches: list[tuple[list[CopyOp], list[tuple[str, int]]]],
                  chunks: Chunks, place: Callable[[list[CopyOp]], None], direct: DirectPlan | None = None, pool: ThreadPoolExecutor | None = None) -> None:
    """4. fetch, hash and place within the budget: every rank verifies everything first. The
    ``direct`` reads fill fresh tensors only (read into place and hashed there, before anything
    live changes); ``ops`` are the rest."""
    err = None
    try:
        if direct is not None and direct.ops:
            place_direct(chunks, direct, pool, live=False)
        if batches:
            chunks.prefetch(batches[0][1])
    except _TYPED as exc:
        err = exc
    _agree_or_raise(coord, err)  # every rank verified everything it needs
    live = [o for o in ops if o.target.live]
    # Non-live targets (optimizer, scheduler, ... tensors) first, then the objects that may
    # still refuse their state (rolled back if one does), then the live tensors.
    place([o for o in ops if not o.target.live])
    undo: Callable[[], None] | None = None
    try:
        undo = apply_objects(state, prepared)
    except _TYPED as exc:
        err = exc
    try:
        _agree_or_raise(coord, err)  # no rank changes its live tensors unless all objects took their state
    except ResilientTrainError:
        if undo is not None:
            undo()
        raise
    place(live)
    apply_rest(state, prepared)


def _place_streamed(coord: Coordinator, state: TrainState, prepared: Prepared, batches: list[tuple[list[CopyOp], list[tuple[str, int]]]],
                    chunks: Chunks, place: Callable[[list[CopyOp]], None], step: int, budget: int, direct: DirectPlan | None = None,
                    pool: ThreadPoolExecutor | None = None) -> None:
    """4. fetch, hash and place beyond the budget: first the ``direct`` reads (every chunk read
    straight into the tensors it fills and hashed there, all at once on ``pool``), then the
    other ops batch by batch through verified cached chunks; a failure after a live tensor was
    written (or read into) is PartialLoadError on every rank."""
    touched = False
    err = None
    try:
        if direct is not None and direct.ops:
            place_direct(chunks, direct, pool, live=False)  # fresh tensors first: a failure here leaves the state untouched
            touched = any(o.target.live for o in direct.ops)  # the bytes land before they are verified
            place_direct(chunks, direct, pool, live=True)
        for batch, keys in batches:
            chunks.prefetch(keys)
            place(batch)
            touched = touched or any(o.target.live for o in batch)
    except _TYPED as exc:
        err = exc
    flags = coord.all_gather((err is not None, touched))
    if any(f for f, _ in flags):
        if any(t for _, t in flags):
            raise PartialLoadError(
                f"loading checkpoint step {step} failed after live tensors were overwritten "
                f"(the load needed more than the {budget}-byte staging budget); the training state is "
                f"partially overwritten: load another checkpoint: {redact(str(err)) if err else 'failed on another rank'}",
                cause=err,
            )
        _agree_or_raise(coord, err)
    try:
        apply_objects(state, prepared)
        apply_rest(state, prepared)
    except CheckpointError as exc:
        raise PartialLoadError(f"checkpoint step {step}: live tensors were overwritten, then: {exc}", cause=exc) from exc


def _rank_state_name(manifest: Manifest, coord: Coordinator) -> str:
    """The rank-state file this rank restores: its own, or ``rank % saved world size``."""
    return rank_state_filename(coord.rank if coord.rank < manifest.world_size else coord.rank % manifest.world_size)


def _read_rank_state(chunks: Chunks, manifest: Manifest, coord: Coordinator) -> Any:
    name = _rank_state_name(manifest, coord)
    if not any(f.path == name for f in manifest.files):
        raise ManifestError(f"{step_dirname(manifest.step)}/{MANIFEST_NAME} lists no {name} (world size {manifest.world_size}): rank {coord.rank}'s RNG state cannot be restored")
    if manifest.world_size != coord.world_size:
        log.info("world size changed %d -> %d: rank %d takes RNG state from %s", manifest.world_size, coord.world_size, coord.rank, name)
    tree = chunks.json(name)
    _check_state_tree(tree, manifest, f"{step_dirname(manifest.step)}/{name}")
    return tree


