"""Lossless JSON for non-tensor training state, with tensors split out. Never pickle.

``encode(obj)`` turns a nested Python value into a JSON-able tree plus a dict of tensors that
were found inside it (replaced in the tree by ``{"__tensor__": key}``). ``decode`` reverses it.
Values JSON cannot hold are tagged so they come back as the same type:

* tuples -> ``{"__tuple__": [...]}``; dicts with non-``str`` keys -> ``{"__dict__": [[k, v], ...]}``
* non-finite floats -> ``{"__float__": "nan" | "inf" | "-inf"}``
* ``bytes`` -> ``{"__bytes__": base64}``; numpy arrays -> ``{"__ndarray__": {dtype, shape, b64}}``
* ``torch.dtype`` -> ``{"__dtype__": "float32"}``; numpy scalars -> plain int/float/bool
* dicts whose keys look like tags are escaped with ``{"__dict__": ...}`` so decode is unambiguous.

Anything else (functions, arbitrary objects) is refused with a TypeError naming the path: a
checkpoint never carries code.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Callable

import torch

from ..errors import StateFileError

__all__ = ["encode", "decode", "dumps_canonical", "loads_strict", "strict_decoder", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

MAX_JSON_BYTES = 256 * 1024 * 1024
"""No persisted JSON file (manifest, state, rank state, index) may be larger: refused before reading."""

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays/objects accepted (checked before parsing: no RecursionError)."""

_TAGS = ("__tuple__", "__dict__", "__float__", "__bytes__", "__ndarray__", "__dtype__", "__tensor__")


def _float(x: float) -> Any:
    if math.isnan(x):
        return {"__float__": "nan"}
    if math.isinf(x):
        return {"__float__": "inf" if x > 0 else "-inf"}
    return x


def encode(obj: Any, tensor_key: Callable[[str], str] | None = None, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(tree, tensors)``. ``tensor_key(path)`` names each tensor found (default: path)."""
    tensors: dict[str, torch.Tensor] = {}
    name = tensor_key or (lambda p: p)

    def walk(x: Any, p: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return _float(x)
        if isinstance(x, torch.Tensor):
            key = name(p)
            if key in tensors:
                raise ValueError(f"two tensors would be stored under the key {key!r}")
            tensors[key] = x
            return {"__tensor__": key}
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{p}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{p}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k in _TAGS for k in x):
                return {k: walk(v, f"{p}.{k}" if p else k) for k, v in x.items()}
            return {"__dict__": [[walk(k, f"{p}.<key>"), walk(v, f"{p}.{k}")] for k, v in x.items()]}
        mod = type(x).__module__
        if mod == "numpy":
            import numpy as np

            if isinstance(x, np.ndarray):
                return {"__ndarray__": {"dtype": x.dtype.str, "shape": list(x.shape), "b64": base64.b64encode(np.ascontiguousarray(x).tobytes()).decode("ascii")}}
            if isinstance(x, np.bool_):
                return bool(x)
            if isinstance(x, np.integer):
                return int(x)
            if isinstance(x, np.floating):
                return _float(float(x))
        raise TypeError(
            f"cannot store {type(x).__module__}.{type(x).__qualname__} at {p or '<root>'!r} as JSON: "
            "checkpoint state must be tensors, numbers, strings, bools, None, lists, tuples, dicts, bytes or numpy arrays"
        )

    return walk(obj, path), tensors


_NDARRAY_DTYPE = re.compile(r"^[<>|=][biufc][1-9][0-9]?$")


def decode(tree: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`encode`. ``tensors`` supplies the values of ``{"__tensor__": key}``.

    A malformed tag (wrong payload type, unknown dtype, bad base64, a tensor reference that
    ``tensors`` lacks, an unhashable dict key) raises :class:`StateFileError`; decoding has no
    side effects, so callers decode everything before changing any live object.
    """

    def bad(msg: str) -> StateFileError:
        return StateFileError(f"JSON state: {msg}")

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (tag, val), = x.items()
            if tag == "__tuple__":
                if not isinstance(val, list):
                    raise bad("__tuple__ must hold a list")
                return tuple(walk(v) for v in val)
            if tag == "__dict__":
                if not isinstance(val, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in val):
                    raise bad("__dict__ must hold a list of [key, value] pairs")
                out = {}
                for k, v in val:
                    key = _hashable(walk(k))
                    try:
                        hash(key)
                    except TypeError:
                        raise bad(f"__dict__ key {k!r} is not hashable") from None
                    if key in out:
                        raise bad(f"__dict__ key {k!r} appears twice")
                    out[key] = walk(v)
                return out
            if tag == "__float__":
                if val not in ("nan", "inf", "-inf"):
                    raise bad(f"__float__ must be 'nan', 'inf' or '-inf', got {val!r}")
                return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[val]
            if tag == "__bytes__":
                return _b64(val, bad)
            if tag == "__dtype__":
                dt = getattr(torch, val, None) if isinstance(val, str) else None
                if not isinstance(dt, torch.dtype):
                    raise bad(f"unknown dtype {val!r}")
                return dt
            if tag == "__ndarray__":
                import numpy as np

                if not isinstance(val, dict) or set(val) != {"b64", "dtype", "shape"}:
                    raise bad("__ndarray__ must hold exactly b64, dtype and shape")
                dtype, shape = val["dtype"], val["shape"]
                if not isinstance(dtype, str) or not _NDARRAY_DTYPE.match(dtype):
                    raise bad(f"__ndarray__ dtype {dtype!r} is not a plain numeric dtype")
                if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                    raise bad(f"__ndarray__ shape {shape!r} is not a list of non-negative ints")
                raw = _b64(val["b64"], bad)
                dt = np.dtype(dtype)
                numel = math.prod(shape)
                if numel * dt.itemsize != len(raw):
                    raise bad(f"__ndarray__ of shape {shape} and dtype {dtype} needs {numel * dt.itemsize} bytes, has {len(raw)}")
                return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
            if tag == "__tensor__":
                if not isinstance(val, str) or tensors is None or val not in tensors:
                    raise bad(f"tensor {val!r} referenced by the JSON state is missing")
                return tensors[val]
        return {k: walk(v) for k, v in x.items()}

    return walk(tree)


def _b64(val: Any, bad: Callable[[str], StateFileError]) -> bytes:
    if not isinstance(val, str):
        raise bad("base64 payload must be a string")
    try:
        return base64.b64decode(val, validate=True)
    except (binascii.Error, ValueError):
        raise bad("base64 payload is not valid base64") from None


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON (non-finite numbers are stored as {{\"__float__\": ...}})")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} overflows to a non-finite float")
    return x


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


_STRICT_HOOKS: dict[str, Any] = {"object_pairs_hook": _no_duplicates, "parse_constant": _refuse_constant, "parse_float": _finite_float}


def strict_decoder() -> json.JSONDecoder:
    """The JSON decoder of every persisted JSON file: a duplicate key, a bare ``NaN`` or
    ``Infinity`` and a number that overflows to infinity raise ValueError (the caller turns it
    into its typed error). :func:`loads_strict` parses with the same rules; the manifest's
    key-by-key parser (:mod:`.manifest`) uses this decoder directly."""
    return json.JSONDecoder(**_STRICT_HOOKS)


def loads_strict(data: bytes, *, where: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH, error: type = StateFileError) -> Any:
    """Parse persisted JSON strictly: UTF-8, at most ``max_bytes`` (checked before parsing) and
    ``max_depth`` deep, no duplicate keys, no bare ``NaN``/``Infinity``, no number that overflows
    to infinity. Any failure raises
    ``error`` (a CheckpointError subclass) naming ``where``; never ValueError or RecursionError."""
    if len(data) > max_bytes:
        raise error(f"{where}: {len(data)} bytes exceeds the {max_bytes}-byte limit for this JSON file")
    try:
        text = bytes(data).decode("utf-8")
        # The C parser guards its own recursion (RecursionError, caught here); the depth limit
        # is then checked without recursion, so later walks over the tree stay shallow.
        obj = json.loads(text, **_STRICT_HOOKS)
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{where} is not valid JSON (strict: UTF-8, no duplicate keys, no NaN or Infinity): {exc}") from None
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > max_depth:
                raise error(f"{where}: JSON nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return obj


def dumps_canonical(obj: Any) -> bytes:
    """The one JSON serialisation used for every persisted JSON file: sorted keys, 1-space
    indent, ASCII only, trailing newline. Exact-bytes tests pin it."""
    import json

    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
