"""Export a checkpoint's model weights alone, as a plain Hugging Face safetensors folder."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ..errors import CheckpointNotFoundError
from ..format.jsontree import dumps_canonical
from ..format.names import HF_INDEX_NAME
from ..format.safetensors_io import write_file
from ..progress import Progress
from ..storage import Store
from .location import as_location, as_store
from .reader import read_whole_tensors
from .steps import newest_committed, read_manifest

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


def export_hf(src: Any, dst: "str | Store", step: int | None = None, *, max_shard_bytes: int = 5 * 1024**3, storage_options: Mapping[str, Any] | None = None, dst_storage_options: Mapping[str, Any] | None = None, progress: bool = False) -> list[str]:
    """Write ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` to ``dst``.

    Sharded (DTensor) model tensors are reassembled. Returns the file names written.
    ``progress``: a tqdm bar over the bytes written (periodic log lines without tqdm).
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    _, tensors = read_model_tensors(src, step, storage_options=storage_options)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    out = as_store(dst, dst_storage_options)
    names = []
    weight_map = {}
    bar = Progress(sum(t.numel() * t.element_size() for t in tensors.values()), f"export to {out.name}", bar=progress, enabled=progress)
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with out.open_write(fname) as f:
            write_file(f, items, {"format": "pt"})
        bar(sum(t.numel() * t.element_size() for _, t in items))
        names.append(fname)
        weight_map.update({n: fname for n, _ in items})
    bar.close()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    out.write_bytes(HF_INDEX_NAME, dumps_canonical({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}))
    log.info("exported %d tensors (%.1f MB) to %s", len(tensors), total / 1e6, out.uri)
    return names + [HF_INDEX_NAME]
