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
import math
from typing import Any, Callable

import torch

__all__ = ["encode", "decode", "dumps_canonical"]

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


def decode(tree: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`encode`. ``tensors`` supplies the values of ``{"__tensor__": key}``."""

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (tag, val), = x.items()
            if tag == "__tuple__":
                return tuple(walk(v) for v in val)
            if tag == "__dict__":
                return {_hashable(walk(k)): walk(v) for k, v in val}
            if tag == "__float__":
                return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[val]
            if tag == "__bytes__":
                return base64.b64decode(val)
            if tag == "__dtype__":
                dt = getattr(torch, val, None)
                if not isinstance(dt, torch.dtype):
                    raise ValueError(f"unknown dtype {val!r} in JSON state")
                return dt
            if tag == "__ndarray__":
                import numpy as np

                arr = np.frombuffer(base64.b64decode(val["b64"]), dtype=np.dtype(val["dtype"]))
                return arr.reshape(val["shape"]).copy()
            if tag == "__tensor__":
                if tensors is None or val not in tensors:
                    raise KeyError(f"tensor {val!r} referenced by the JSON state is missing")
                return tensors[val]
        return {k: walk(v) for k, v in x.items()}

    return walk(tree)


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def dumps_canonical(obj: Any) -> bytes:
    """The one JSON serialisation used for every persisted JSON file: sorted keys, 1-space
    indent, ASCII only, trailing newline. Exact-bytes tests pin it."""
    import json

    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
