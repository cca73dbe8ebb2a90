"""Pure planning: which rank writes which piece into which file, and which reads fill a target.

No I/O and no torch.distributed here: every rank runs the same functions on the same gathered
inputs and gets the same plan. Tested without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..format.manifest import TensorRecord
from ..format.names import shard_filename

__all__ = ["PieceMeta", "FilePlan", "SavePlan", "plan_save", "ReadOp", "plan_reads", "region_volume", "tiling_problem"]

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PieceMeta:
    """What a rank holds of one logical tensor (a whole tensor is a piece at offsets 0)."""

    key: str
    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @property
    def ident(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        return (self.key, self.offsets, self.shape)


@dataclass(frozen=True)
class FilePlan:
    filename: str
    group: str
    rank: int
    pieces: tuple[PieceMeta, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class SavePlan:
    files: tuple[FilePlan, ...]

    def for_rank(self, rank: int) -> list[FilePlan]:
        return [f for f in self.files if f.rank == rank]


def plan_save(per_rank: Sequence[Sequence[PieceMeta]], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> SavePlan:
    """Assign every distinct piece to exactly one rank that holds it, balancing bytes, then
    pack each rank's pieces into files of at most ``max_file_bytes`` (a larger piece gets a
    file of its own). Pieces held by several ranks (replicated tensors) are written once.
    Model pieces that are not whole tensors go to the ``model_shards`` group so the ``model``
    files stay a valid Hugging Face layout.
    """
    if max_file_bytes <= 0:
        raise ValueError("max_file_bytes must be positive")
    holders: dict[tuple, list[int]] = {}
    meta: dict[tuple, PieceMeta] = {}
    for rank, pieces in enumerate(per_rank):
        for p in pieces:
            other = meta.get(p.ident)
            if other is not None and (other.dtype != p.dtype or other.global_shape != p.global_shape or other.group != p.group):
                raise ValueError(f"ranks disagree about tensor {p.key!r} ({other.dtype}{list(other.global_shape)} vs {p.dtype}{list(p.global_shape)})")
            meta[p.ident] = p
            holders.setdefault(p.ident, []).append(rank)
    load = [0] * len(per_rank)
    assigned: dict[int, list[PieceMeta]] = {r: [] for r in range(len(per_rank))}
    # Pieces only one rank holds are fixed; spread the rest, largest first.
    for ident in sorted(holders, key=lambda i: (len(holders[i]) > 1, -meta[i].nbytes, i)):
        ranks = holders[ident]
        r = ranks[0] if len(ranks) == 1 else min(ranks, key=lambda x: (load[x], x))
        load[r] += meta[ident].nbytes
        assigned[r].append(meta[ident])

    def file_group(p: PieceMeta) -> str:
        if p.group == "model" and p.shape != p.global_shape:
            return "model_shards"
        return p.group

    drafts: dict[str, list[tuple[int, list[PieceMeta]]]] = {}
    for r in range(len(per_rank)):
        by_group: dict[str, list[PieceMeta]] = {}
        for p in sorted(assigned[r], key=lambda p: (p.key, p.offsets)):
            by_group.setdefault(file_group(p), []).append(p)
        for g, pieces in sorted(by_group.items()):
            current: list[PieceMeta] = []
            size = 0
            for p in pieces:
                if current and size + p.nbytes > max_file_bytes:
                    drafts.setdefault(g, []).append((r, current))
                    current, size = [], 0
                current.append(p)
                size += p.nbytes
            if current:
                drafts.setdefault(g, []).append((r, current))
    files = []
    for g, chunks in sorted(drafts.items()):
        for i, (r, pieces) in enumerate(chunks):
            files.append(FilePlan(shard_filename(g, i + 1, len(chunks)), g, r, tuple(pieces)))
    return SavePlan(tuple(files))


@dataclass(frozen=True)
class ReadOp:
    """Copy the overlap of a stored piece into a target region.

    ``src_start``/``dst_start`` are per-dimension starts inside the stored piece and inside
    the target tensor; ``size`` is the overlap's shape.
    """

    record: TensorRecord
    src_start: tuple[int, ...]
    dst_start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def is_whole_piece(self) -> bool:
        return self.size == self.record.shape


def region_volume(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_reads(records: Sequence[TensorRecord], target_offsets: Sequence[int], target_shape: Sequence[int]) -> tuple[list[ReadOp], int]:
    """Reads that fill the target region from the stored pieces of one logical tensor.

    Returns ``(ops, covered)`` where ``covered`` is the number of target elements the ops
    write. Stored pieces of one tensor never overlap each other (the writer stores each piece
    once), so ``covered == volume(target_shape)`` means the target is fully covered.
    """
    ops = []
    covered = 0
    for rec in records:
        lo = [max(o, t) for o, t in zip(rec.offsets, target_offsets)]
        hi = [min(o + s, t + ts) for o, s, t, ts in zip(rec.offsets, rec.shape, target_offsets, target_shape)]
        if any(h <= l for h, l in zip(hi, lo)) and len(lo) > 0:
            continue
        size = tuple(h - l for h, l in zip(hi, lo))
        ops.append(ReadOp(rec, tuple(l - o for l, o in zip(lo, rec.offsets)), tuple(l - t for l, t in zip(lo, target_offsets)), size))
        covered += region_volume(size)
    return ops, covered


def tiling_problem(records: Sequence[TensorRecord]) -> str | None:
    """Why the stored pieces of one logical tensor do not tile it exactly, or None.

    Exact tiling: every piece lies inside the global shape, no two pieces share an element, and
    their volumes add up to the tensor's (so together they cover every element once). A reader
    that only counted covered elements could take two overlapping pieces for a gap they hide.
    Pieces are swept in order of their first-dimension start, so pieces sharded along the first
    dimension (FSDP2's ``Shard(0)``) are checked in ``n log n``.
    """
    if not records:
        return "no stored pieces"
    gshape = tuple(records[0].global_shape)
    for r in records:
        if tuple(r.global_shape) != gshape:
            return f"pieces disagree on the global shape ({list(gshape)} vs {list(r.global_shape)})"
        if len(r.offsets) != len(gshape) or any(o < 0 or o + s > g for o, s, g in zip(r.offsets, r.shape, gshape)):
            return f"piece at offsets {list(r.offsets)} of shape {list(r.shape)} lies outside the global shape {list(gshape)}"
    total = sum(region_volume(r.shape) for r in records)
    if total != region_volume(gshape):
        return f"pieces hold {total} elements, the tensor has {region_volume(gshape)}"
    if len(gshape) == 0 or len(records) == 1:
        return None
    ordered = sorted((r for r in records if region_volume(r.shape) > 0), key=lambda r: r.offsets)
    active: list[TensorRecord] = []
    for r in ordered:
        active = [a for a in active if a.offsets[0] + a.shape[0] > r.offsets[0]]
        for a in active:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.shape, r.offsets, r.shape)):
                return f"pieces at offsets {list(a.offsets)} and {list(r.offsets)} overlap"
        active.append(r)
    return None
