"""Export a checkpoint's model weights alone, as a plain Hugging Face safetensors folder."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping

import torch

from ..errors import CheckpointNotFoundError, StateMismatchError
from ..format.jsontree import dumps_canonical
from ..format.names import HF_INDEX_NAME
from ..format.safetensors_io import ST_TO_DTYPE, build_header, tensor_bytes
from ..progress import Progress
from ..storage import Store
from .chunks import Chunks
from .location import as_location, as_store
from .planner import plan_reads, region_volume, tiling_problem
from .reader import read_whole_tensors
from .steps import newest_committed, read_manifest
from .targets import CopyOp, Target, place_op, records_by_key

__all__ = ["read_model_tensors", "export_hf"]

log = logging.getLogger(__name__)


def read_model_tensors(uri: Any, step: int | None = None, *, storage_options: Mapping[str, Any] | None = None, io_threads: int = 4) -> tuple[int, dict[str, torch.Tensor]]:
    """Every model tensor of a checkpoint, reassembled whole on the CPU, every byte verified."""
    sources = list(as_location(uri, storage_options).stores)
    if step is None:
        latest = newest_committed(sources[0], limit=1)
        if not latest:
            raise CheckpointNotFoundError(f"no committed checkpoint under {sources[0].uri}")
        step = latest[0]
    manifest = read_manifest(sources[0], step)
    # Every byte is hashed from the buffer it is copied from (one pass, chunk by chunk).
    tensors = read_whole_tensors(sources, manifest, "model/", io_threads=io_threads)
    return step, {key.removeprefix("model/"): t for key, t in tensors.items()}


DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024
"""Largest slice of one tensor an export holds at a time (whole rows; one row when a row is larger)."""


def export_hf(src: Any, dst: "str | Store", step: int | None = None, *, max_shard_bytes: int = 5 * 1024**3, storage_options: Mapping[str, Any] | None = None, dst_storage_options: Mapping[str, Any] | None = None, progress: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES, io_threads: int = 4) -> list[str]:
    """Write ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` to ``dst``.

    Streams with bounded memory: the output files are laid out from the manifest alone (names,
    dtypes, global shapes), then each tensor is assembled ``block_bytes`` of whole rows at a
    time from the stored pieces that overlap those rows (sharded DTensor / FSDP2 pieces of any
    layout and whole tensors alike), every byte hashed from the buffer it is copied from, and
    written out before the next block is read. A process holds one block, the verified chunks
    that block needs (``io_threads`` ranged reads of at most ``chunk_bytes`` each) and, for
    pieces split along a later dimension than the first (tensor parallel), one stored piece;
    never the model. Returns the file names written. ``progress``: a tqdm bar over the bytes
    written (periodic log lines without tqdm).
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    if block_bytes <= 0:
        raise ValueError("block_bytes must be positive")
    sources = list(as_location(src, storage_options).stores)
    if step is None:
        latest = newest_committed(sources[0], limit=1)
        if not latest:
            raise CheckpointNotFoundError(f"no committed checkpoint under {sources[0].uri}")
        step = latest[0]
    manifest = read_manifest(sources[0], step)
    by_key = records_by_key(manifest)
    entries = []  # (name, dtype, global shape, key), in name order as before
    for key, recs in sorted(by_key.items()):
        if key.startswith("model/"):
            why = tiling_problem(recs)
            if why is not None:
                raise StateMismatchError(f"{key}: stored pieces do not tile the tensor exactly: {why}")
            entries.append((key.removeprefix("model/"), ST_TO_DTYPE[recs[0].dtype], tuple(recs[0].global_shape), key))
    nbytes = lambda e: region_volume(e[2]) * torch.empty((), dtype=e[1]).element_size()  # noqa: E731
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + nbytes(e) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e)
    out = as_store(dst, dst_storage_options)
    names: list[str] = []
    weight_map: dict[str, str] = {}
    total = sum(nbytes(e) for e in entries)
    bar = Progress(total, f"export to {out.name}", bar=progress, enabled=progress)
    with ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="rt-export") as pool:
        chunks = Chunks(sources, manifest, pool)
        headers: dict[str, Any] = {}
        for i, items in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            head, _ = build_header([(n, dt, shape) for n, dt, shape, _ in items], {"format": "pt"})
            with out.open_write(fname) as f:
                _write_all(f, head)
                for _, dt, shape, key in items:
                    for block in _blocks(key, dt, shape, block_bytes):
                        _fill(chunks, headers, manifest, by_key, block)
                        _write_all(f, tensor_bytes(block.dest))
                        bar(block.dest.numel() * block.dest.element_size())
            names.append(fname)
            weight_map.update({n: fname for n, _, _, _ in items})
    bar.close()
    out.write_bytes(HF_INDEX_NAME, dumps_canonical({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}))
    log.info("exported %d tensors (%.1f MB) to %s, %d MiB at a time, %.1f MB fetched", len(entries), total / 1e6, out.uri, block_bytes >> 20, chunks.bytes_fetched / 1e6)
    return names + [HF_INDEX_NAME]


def _blocks(key: str, dtype: torch.dtype, shape: tuple[int, ...], block_bytes: int) -> Iterator[Target]:
    """Consecutive slices of whole rows (first dimension) of at most ``block_bytes`` (one row
    at least); a 0-d tensor is one block. Allocated one at a time, as the caller asks."""
    if len(shape) == 0:
        yield Target(key, torch.empty((), dtype=dtype), (), ())
        return
    row = region_volume(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    rows = max(1, block_bytes // max(1, row))
    for a in range(0, max(shape[0], 1), rows):
        n = min(rows, shape[0] - a)
        yield Target(key, torch.empty((n, *shape[1:]), dtype=dtype), (a,) + (0,) * (len(shape) - 1), shape)
        if shape[0] == 0:
            return


def _fill(chunks: Chunks, headers: dict[str, Any], manifest: Any, by_key: Mapping[str, Any], t: Target) -> None:
    """Fill one block from the pieces overlapping it; drop every chunk afterwards (bounded)."""
    read_ops, covered = plan_reads(by_key[t.key], t.offsets, tuple(t.dest.shape))
    if covered != t.dest.numel():
        raise StateMismatchError(f"{t.key}: stored pieces cover {covered} of the {t.dest.numel()} elements of rows from {t.offsets[:1]}")
    for f in {op.record.file for op in read_ops} - set(headers):
        headers[f] = chunks.header(f)
    try:
        jobs = []
        for op in read_ops:
            data_start, slots = headers[op.record.file]
            slot = slots[op.record.name]
            rec_shape = op.record.shape
            inner = region_volume(rec_shape[1:]) * t.dest.element_size()  # bytes per row of the piece
            if len(rec_shape) and tuple(op.size[1:]) == tuple(rec_shape[1:]) and tuple(op.size[1:]) == tuple(t.dest.shape[1:]):
                # whole rows of the piece into whole rows of the block: one contiguous byte range
                begin = data_start + slot.begin + op.src_start[0] * inner
                jobs.append(("rows", op, op.record.file, begin, begin + op.size[0] * inner))
            else:
                jobs.append(("piece", op, op.record.file, data_start + slot.begin, data_start + slot.end))
        chunks.prefetch([(f, i) for _, _, f, b, e in jobs for i in chunks.covering(f, b, e)])
        for kind, op, f, b, e in jobs:
            if kind == "rows":
                dst = t.dest[op.dst_start[0]:op.dst_start[0] + op.size[0]]
                chunks.copy_into(f, b, e, dst.reshape(-1).view(torch.uint8).numpy())
            else:
                data_start, slots = headers[f]
                slot = slots[op.record.name]
                place_op(chunks, CopyOp(t, op, f, slot, b, e))
    finally:
        for k in list(chunks.cache):
            chunks.drop(k)


def _write_all(f: Any, data: Any) -> None:
    mv = memoryview(data).cast("B")
    while len(mv):
        n = f.write(mv)
        if n is None:  # buffered/remote writers take everything and return None
            return
        mv = mv[n:]
