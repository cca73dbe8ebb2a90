"""Read a checkpoint another tool wrote, to start a run from it as step N (``init_from``).

Three kinds, told apart by what the path holds:

* **torch.save file** (``ckpt.pt``): loaded with ``torch.load(weights_only=True)``, which
  refuses any object that is not a tensor or a plain container/number/string (nothing is
  unpickled that could run code). Either a state dict of tensors, or a dict holding one under
  ``model`` (also ``model_state_dict``, ``state_dict``), an optimizer state dict under
  ``optimizer`` (``optimizer_state_dict``, ``optim``) and the step under ``step``
  (``iter_num``, ``global_step``, ``iteration``).
* **Hugging Face safetensors folder** (``model.safetensors`` or
  ``model.safetensors.index.json`` + shards): model weights only.
* **torch.distributed.checkpoint (DCP) folder** (``.metadata`` + ``*.distcp``): DCP pickles its
  metadata; every tensor is read from its byte range with
  ``torch.load(weights_only=True)``. Model weights (keys under ``model.`` or bare), plus the
  step when the checkpoint holds an int under ``step``/``iter_num``/``global_step``. The
  metadata goes through a restricted unpickler (Python's documented ``find_class``
  allow-list: DCP's metadata classes, torch dtypes and ``torch.Size``; any other global is
  refused before anything runs).

Key names are made canonical: ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes
are dropped. :func:`read_foreign` returns a :class:`Foreign` with the tensors and the sha256
of every file it read (recorded as the run's provenance). Failure behaviour: a path that is
none of the three, a file torch refuses to load safely, or a DCP metadata file holding other
classes raise :class:`~resilient_train.errors.ConfigError` naming the path and the fix.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import io
import json
import os
import pathlib
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import ConfigError

__all__ = ["Foreign", "read_foreign", "canonical_key"]

_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
_OPTIM_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_STEP_KEYS = ("step", "iter_num", "global_step", "iteration")


@dataclass
class Foreign:
    """What a foreign checkpoint holds: canonical model tensors, the optimizer's torch state
    dict (or None), the step it records (or None), its kind and the sha256 of each file read."""

    kind: str
    path: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    step: int | None = None
    sha256: dict[str, str] = field(default_factory=dict)

    def provenance(self, step: int) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "step": step, "sha256": dict(sorted(self.sha256.items())),
                "optimizer": self.optimizer is not None, "tensors": len(self.model)}


def canonical_key(key: str) -> str:
    """``module._orig_mod.h.0.w`` -> ``h.0.w`` (DDP and torch.compile prefixes, anywhere in a chain)."""
    parts = key.split(".")
    return ".".join(p for p in parts if p not in ("module", "_orig_mod")) if ("module" in parts or "_orig_mod" in parts) else key


def _canonical(sd: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"{where}: model entry {k!r} is a {type(v).__name__}, not a tensor")
        ck = canonical_key(str(k))
        if ck in out:
            raise ConfigError(f"{where}: two entries become {ck!r} once the module./_orig_mod. prefixes are dropped")
        out[ck] = v
    return out


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _int_step(obj: Mapping[str, Any]) -> int | None:
    for k in _STEP_KEYS:
        v = obj.get(k)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = int(v.item())
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


def read_foreign(path: str) -> Foreign:
    """Read the checkpoint at ``path`` (a local file or folder); see the module doc."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"init_from must be a path to a torch.save file, an HF safetensors folder or a DCP folder, got {path!r}")
    if os.path.isfile(path):
        return _read_torch_save(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return _read_dcp(path)
        if os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
            return _read_hf(path)
        raise ConfigError(f"init_from={path!r} is a folder with neither model.safetensors(.index.json) (Hugging Face) nor .metadata (torch.distributed.checkpoint)")
    raise ConfigError(f"init_from={path!r} does not exist (a local file or folder is expected)")


def _read_torch_save(path: str) -> Foreign:
    digest = _sha256_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError...: all mean "not loadable safely"
        raise ConfigError(f"init_from={path!r}: torch.load(weights_only=True) refused it ({type(exc).__name__}: {str(exc)[:300]}); "
                          "re-save it as a dict of tensors, numbers and strings") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"init_from={path!r} holds a {type(obj).__name__}, not a dict (a state dict or {{'model': ..., 'optimizer': ..., 'step': ...}})")
    model_sd = next((obj[k] for k in _MODEL_KEYS if isinstance(obj.get(k), dict)), None)
    optim = next((obj[k] for k in _OPTIM_KEYS if isinstance(obj.get(k), dict)), None)
    if model_sd is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            model_sd = obj
        else:
            raise ConfigError(f"init_from={path!r}: no model state dict under {', '.join(_MODEL_KEYS)} and the file is not a flat dict of tensors (keys: {sorted(map(str, obj))[:8]})")
    if optim is not None and not ({"state", "param_groups"} <= set(optim)):
        raise ConfigError(f"init_from={path!r}: the optimizer entry is not a torch optimizer state dict (it needs 'state' and 'param_groups')")
    return Foreign("torch.save", path, _canonical(model_sd, path), optim, _int_step(obj), {os.path.basename(path): digest})


def _read_hf(path: str) -> Foreign:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
        names = ["model.safetensors.index.json", *files]
    else:
        files = names = ["model.safetensors"]
    model: dict[str, torch.Tensor] = {}
    sha = {n: _sha256_file(os.path.join(path, n)) for n in names}
    for name in files:
        if "/" in name or name.startswith("."):
            raise ConfigError(f"init_from={path!r}: the index names {name!r}, outside the folder")
        model.update(load_file(os.path.join(path, name)))
    return Foreign("huggingface", path, _canonical(model, path), None, None, sha)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Python's documented way to restrict unpickling: ``find_class`` resolves only DCP's
    metadata classes and torch's dtype/Size/memory-format values; any other global (a
    function, ``os.system``...) raises before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_dcp_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not one of DCP's metadata classes")


def _allowed_dcp_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    out: dict[tuple[str, str], Any] = {}
    for cls in (m.Metadata, m.TensorStorageMetadata, m.BytesStorageMetadata, m.ChunkStorageMetadata, m.TensorProperties,
                m.MetadataIndex, m.StorageMeta, _StorageInfo, torch.Size):
        out[(cls.__module__, cls.__qualname__)] = cls
    for name in dir(m):
        obj = getattr(m, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            out[(obj.__module__, obj.__qualname__)] = obj
    for name in dir(torch):
        obj = getattr(torch, name)
        if isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
            out[("torch", name)] = obj
    out[("collections", "OrderedDict")] = collections.OrderedDict
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        out[("pathlib", cls.__name__)] = cls  # StorageMeta.checkpoint_id
    # how torch pickles a layout: torch.serialization._get_layout("torch.strided") looks the name up
    out[("torch.serialization", "_get_layout")] = lambda name: _named_layout(name)
    return out


def _named_layout(name: Any) -> Any:
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return layout


def _dcp_metadata(path: str) -> Any:
    """DCP's pickled ``.metadata``, read with :class:`_DCPMetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        data = f.read()
    try:
        meta = _DCPMetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - anything the restricted unpickler refuses
        raise ConfigError(f"init_from={path!r}: its .metadata holds more than DCP's metadata classes ({type(exc).__name__}: {str(exc)[:300]}); refusing to unpickle it") from None
    if not isinstance(meta, Metadata):
        raise ConfigError(f"init_from={path!r}: .metadata does not hold DCP Metadata")
    return meta


def _read_dcp(path: str) -> Foreign:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta = _dcp_metadata(path)
    storage = meta.storage_data
    sha: dict[str, str] = {".metadata": _sha256_file(os.path.join(path, ".metadata"))}
    blobs: dict[str, bytes] = {}

    def blob(rel: str) -> bytes:
        if "/" in rel or rel.startswith("."):
            raise ConfigError(f"init_from={path!r}: DCP metadata names {rel!r}, outside the folder")
        if rel not in blobs:
            with open(os.path.join(path, rel), "rb") as f:
                blobs[rel] = f.read()
            sha[rel] = hashlib.sha256(blobs[rel]).hexdigest()
        return blobs[rel]

    def item(index: Any) -> Any:
        info = storage[index]
        raw = blob(info.relative_path)[info.offset: info.offset + info.length]
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    model: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    from torch.distributed.checkpoint.metadata import MetadataIndex

    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            if fqn.startswith(("optim.", "optimizer.")):
                continue  # DCP's flattened optimizer layout is not imported (model and step only)
            full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            for chunk in md.chunks:
                t = item(MetadataIndex(fqn, chunk.offsets))
                full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = t
            model[fqn.removeprefix("model.")] = full
        elif isinstance(md, BytesStorageMetadata) and fqn in _STEP_KEYS:
            scalars[fqn] = item(MetadataIndex(fqn))
    if not model:
        raise ConfigError(f"init_from={path!r}: the DCP checkpoint holds no model tensors")
    return Foreign("dcp", path, _canonical(model, path), None, _int_step(scalars), sha)
