"""Codecs for pseudo-gradients: the `Codec` protocol and the pure-torch reference codecs.

A codec turns a flat fp32 tensor into an :class:`Encoded` payload and back. Every codec
supports *error feedback*: ``encode(x, residual)`` encodes ``v = x + residual`` and, in the
same call, overwrites ``residual`` with ``v - decode(payload)`` (what compression dropped),
so that it is sent next round instead of being lost.

The reference codecs below are the oracle. The compiled paths (the C++ CPU twin and the CUDA
kernel in ``csrc/``, loaded by :mod:`resilient_train.compression._ext`) must produce the same
bytes, so the integer codecs' rounding is defined operation by operation, each one an IEEE
fp32 operation with round-to-nearest-even and no fused multiply-add::

    v      = x + r                      (no addition when no residual is given)
    absmax = max |v| over the block      (blocks of ``block_size`` consecutive elements;
                                          the last block may be shorter)
    scale  = absmax / QMAX               (QMAX = 127 for int8, 7 for int4)
    scale  = 0 if not (scale >= FLT_MIN) (tiny or all-zero blocks are sent as zeros)
    inv    = 1 / scale, or 0 where scale == 0
    q      = clamp(round_half_even(v * inv), -QMAX, QMAX)
    deq    = q * scale
    r'     = v - deq

Non-finite inputs give unspecified payloads; :mod:`resilient_train.sync` refuses to encode
them. int4 stores ``q + 8`` (1..15) in nibbles over the flat index: element ``2j`` in the
low nibble of byte ``j``, element ``2j+1`` in the high nibble; an odd tail pads the high
nibble with 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError, KernelUnavailableError, PayloadMismatchError

__all__ = [
    "Codec",
    "Encoded",
    "CODEC_NAMES",
    "get_codec",
    "NoneCodec",
    "BF16Codec",
    "BlockwiseCodec",
    "TopKCodec",
]

log = logging.getLogger(__name__)

FLT_MIN = torch.finfo(torch.float32).tiny  # smallest normal fp32, 2**-126


@dataclass(frozen=True)
class Encoded:
    """One encoded flat tensor. ``data`` holds values (packed for int4), ``scales`` one fp32
    per block for the integer codecs, ``indices`` int32 positions for top-k."""

    codec: str
    numel: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def parts(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scales, self.indices) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts())


@runtime_checkable
class Codec(Protocol):  # pragma: no mutate block (mutmut would add members to the protocol)
    """Encode/decode flat fp32 tensors, with error feedback.

    ``encode(x, residual=None)``: ``x`` is a 1-D fp32 tensor. With ``residual`` (same shape,
    fp32) it encodes ``x + residual`` and overwrites ``residual`` with what was dropped.
    ``decode(payload, out=None, accumulate=False)``: returns a 1-D fp32 tensor of
    ``payload.numel`` elements; with ``out`` it writes there (``out += ...`` if accumulate).
    ``payload_nbytes(numel)`` is exact and depends only on ``numel`` and the options, so peers
    can exchange fixed-size buffers. ``to_bytes``/``from_bytes`` flatten a payload to uint8.
    ``error_bound(x)`` is the per-element bound on ``|x - decode(encode(x))|``.
    """

    name: str

    def options(self) -> dict[str, Any]: ...

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded: ...

    def decode(
        self, payload: Encoded, out: torch.Tensor | None = None, accumulate: bool = False
    ) -> torch.Tensor: ...

    def payload_nbytes(self, numel: int) -> int: ...

    def to_bytes(self, payload: Encoded) -> torch.Tensor: ...

    def from_bytes(self, buf: torch.Tensor, numel: int) -> Encoded: ...

    def error_bound(self, x: torch.Tensor) -> torch.Tensor: ...


def _check_input(x: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ConfigError(f"codecs take a 1-D float32 tensor, got {x.dtype} with shape {tuple(x.shape)}; "
                          "flatten and .float() it first")
    if residual is not None and (residual.shape != x.shape or residual.dtype != torch.float32):
        raise ConfigError(f"residual must be float32 with shape {tuple(x.shape)}, "
                          f"got {residual.dtype} {tuple(residual.shape)}")


def _finish(out: torch.Tensor | None, deq: torch.Tensor, accumulate: bool) -> torch.Tensor:
    if out is None:
        return deq
    if out.shape != deq.shape or out.dtype != torch.float32:
        raise ConfigError(f"out must be float32 with shape {tuple(deq.shape)}, got {out.dtype} {tuple(out.shape)}")
    if accumulate:
        out.add_(deq)  # deq first, then one fp32 add: what the kernels do
    else:
        out.copy_(deq)
    return out


class _Layout:
    """Shared to_bytes/from_bytes given a per-numel list of (field, dtype, count)."""

    name: str

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        raise NotImplementedError

    def payload_nbytes(self, numel: int) -> int:
        return sum(c * torch.empty(0, dtype=dt).element_size() for _, dt, c in self.layout(numel))

    def to_bytes(self, payload: Encoded) -> torch.Tensor:
        parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in payload.parts()]
        if not parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat(parts)

    def from_bytes(self, buf: torch.Tensor, numel: int) -> Encoded:
        want = self.payload_nbytes(numel)
        if buf.dtype != torch.uint8 or buf.numel() != want:
            raise PayloadMismatchError(
                f"{self.name} payload for {numel} elements must be {want} uint8 bytes, "
                f"got {buf.numel()} {buf.dtype}")
        fields: dict[str, torch.Tensor] = {}
        off = 0
        for field, dt, count in self.layout(numel):
            size = count * torch.empty(0, dtype=dt).element_size()
            fields[field] = buf[off:off + size].clone().view(dt)
            off += size
        return Encoded(self.name, numel, **fields)


class NoneCodec(_Layout):
    """fp32 as is. Exact; the residual stays zero."""

    name = "none"

    def options(self) -> dict[str, Any]:
        return {}

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        return [("data", torch.float32, numel)]

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded:
        _check_input(x, residual)
        v = x + residual if residual is not None else x
        if residual is not None:
            residual.zero_()
        return Encoded(self.name, x.numel(), v.clone())

    def decode(self, payload: Encoded, out=None, accumulate=False) -> torch.Tensor:
        return _finish(out, payload.data.float(), accumulate)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class BF16Codec(_Layout):
    """bfloat16, round to nearest even (``tensor.to(torch.bfloat16)``). Relative error <= 2**-8."""

    name = "bf16"

    def options(self) -> dict[str, Any]:
        return {}

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        return [("data", torch.bfloat16, numel)]

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded:
        _check_input(x, residual)
        v = x + residual if residual is not None else x
        data = v.to(torch.bfloat16)
        if residual is not None:
            torch.sub(v, data.float(), out=residual)
        return Encoded(self.name, x.numel(), data)

    def decode(self, payload: Encoded, out=None, accumulate=False) -> torch.Tensor:
        return _finish(out, payload.data.float(), accumulate)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        # half an ulp of an 8-bit significand, plus bf16's smallest subnormal step
        return x.abs() * 2.0**-8 + 2.0**-133


class BlockwiseCodec(_Layout):
    """int8 or int4 blockwise absmax quantisation; rounding as in the module docstring.

    ``backend``: ``"reference"`` (pure torch), ``"cpu"`` (the C++ twin, error if it cannot
    build), ``"cuda"`` (the CUDA kernel, error if unavailable) or ``"auto"`` (compiled path
    for the tensor's device when it loads, else the reference, logged once).
    """

    def __init__(self, bits: int, block_size: int = 128, backend: str = "auto"):
        self.bits = bits
        self.name = f"int{bits}"
        self.qmax = 127 if bits == 8 else 7
        self.block_size = block_size
        self.backend = backend

    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "backend": self.backend}

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        nblocks = -(-numel // self.block_size)
        if self.bits == 8:
            return [("data", torch.int8, numel), ("scales", torch.float32, nblocks)]
        return [("data", torch.uint8, (numel + 1) // 2), ("scales", torch.float32, nblocks)]

    # -- dispatch

    def _ext(self, device: torch.device):
        if self.backend == "reference":
            return None
        from . import _ext  # lazy: compiling is I/O and takes seconds

        if self.backend == "cuda" or (self.backend == "auto" and device.type == "cuda"):
            if device.type != "cuda":
                raise KernelUnavailableError(f"backend='cuda' but the tensor is on {device}; move it to a GPU")
            return _ext.load_cuda(required=self.backend == "cuda")
        if device.type == "cpu":
            return _ext.load_cpu(required=self.backend == "cpu")
        return None

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded:
        _check_input(x, residual)
        ext = self._ext(x.device)
        if ext is not None:
            data, scales = ext.quantize_ef(x.contiguous(), residual, self.block_size, self.bits)
            return Encoded(self.name, x.numel(), data, scales)
        return self.encode_reference(x, residual)

    def decode(self, payload: Encoded, out=None, accumulate=False) -> torch.Tensor:
        self._check_payload(payload)
        ext = self._ext(payload.data.device)
        if ext is not None:
            if out is None:
                out = torch.empty(payload.numel, dtype=torch.float32, device=payload.data.device)
                accumulate = False
            elif out.shape != (payload.numel,) or out.dtype != torch.float32 or not out.is_contiguous():
                raise ConfigError(f"out must be a contiguous float32 tensor of {payload.numel} elements")
            ext.dequantize(payload.data, payload.scales, payload.numel, self.block_size, self.bits, out, accumulate)
            return out
        return self.decode_reference(payload, out, accumulate)

    def _check_payload(self, payload: Encoded) -> None:
        want = {f: c for f, _, c in self.layout(payload.numel)}
        if (payload.codec != self.name or payload.data.numel() != want["data"]
                or payload.scales is None or payload.scales.numel() != want["scales"]):
            raise PayloadMismatchError(f"payload of codec {payload.codec!r} with {payload.data.numel()} values "
                                       f"does not fit {self.name} block_size={self.block_size} numel={payload.numel}")

    # -- the oracle

    def _blocks(self, v: torch.Tensor) -> torch.Tensor:
        n = v.numel()
        nblocks = -(-n // self.block_size)
        pad = nblocks * self.block_size - n
        return torch.nn.functional.pad(v, (0, pad)).view(nblocks, self.block_size)

    def encode_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded:
        _check_input(x, residual)
        n = x.numel()
        v = x + residual if residual is not None else x
        vb = self._blocks(v)
        absmax = vb.abs().amax(dim=1) if n else torch.zeros(0, device=x.device)
        scale = absmax / self.qmax
        scale = torch.where(scale >= FLT_MIN, scale, torch.zeros_like(scale))
        inv = torch.where(scale > 0, torch.reciprocal(scale), torch.zeros_like(scale))
        q = torch.round(vb * inv[:, None]).clamp_(-self.qmax, self.qmax)
        if residual is not None:
            deq = (q * scale[:, None]).reshape(-1)[:n]
            torch.sub(v, deq, out=residual)
        q = q.reshape(-1)[:n]
        if self.bits == 8:
            data = q.to(torch.int8)
        else:
            nib = (q + 8).to(torch.uint8)
            if n % 2:
                nib = torch.cat([nib, torch.zeros(1, dtype=torch.uint8, device=x.device)])
            pairs = nib.view(-1, 2)
            data = pairs[:, 0] | (pairs[:, 1] << 4)
        return Encoded(self.name, n, data, scale)

    def decode_reference(self, payload: Encoded, out=None, accumulate=False) -> torch.Tensor:
        self._check_payload(payload)
        n = payload.numel
        if self.bits == 8:
            q = payload.data.float()
        else:
            lo = payload.data & 15
            hi = payload.data >> 4
            q = torch.stack([lo, hi], dim=1).reshape(-1)[:n].float() - 8
        deq = (self._blocks(q) * payload.scales[:, None]).reshape(-1)[:n]
        return _finish(out, deq, accumulate)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        absmax = self._blocks(x).abs().amax(dim=1) if n else torch.zeros(0)
        scale = absmax / self.qmax
        # half a step, plus the fp32 roundings of v*inv and q*scale; tiny blocks are sent as 0
        bound = torch.where(scale >= FLT_MIN, scale * (0.5 + 1e-5), absmax)
        return bound[:, None].expand(-1, self.block_size).reshape(-1)[:n]


class TopKCodec(_Layout):
    """The ``k = ceil(ratio * numel)`` largest magnitudes as fp32 values and int32 indices.

    Selection is ``torch.topk(|v|, k, sorted=False)`` (no full sort). Ties at the k-th
    magnitude are broken by ``torch.topk``; the kept values are exact, dropped ones stay in
    the residual.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01):
        self.ratio = ratio

    def options(self) -> dict[str, Any]:
        return {"ratio": self.ratio}

    def k(self, numel: int) -> int:
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self.ratio * numel)))

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        k = self.k(numel)
        return [("data", torch.float32, k), ("indices", torch.int32, k)]

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Encoded:
        _check_input(x, residual)
        v = x + residual if residual is not None else x
        idx = torch.topk(v.abs(), self.k(v.numel()), sorted=False).indices
        values = v[idx]
        if residual is not None:
            residual.copy_(v)
            residual[idx] = 0
        return Encoded(self.name, x.numel(), values, None, idx.to(torch.int32))

    def decode(self, payload: Encoded, out=None, accumulate=False) -> torch.Tensor:
        if payload.indices is None or payload.indices.numel() != self.k(payload.numel):
            raise PayloadMismatchError(f"topk payload does not hold k={self.k(payload.numel)} indices")
        idx = payload.indices.long()
        if out is not None and accumulate:
            if out.shape != (payload.numel,) or out.dtype != torch.float32:
                raise ConfigError(f"out must be float32 with {payload.numel} elements")
            out.index_add_(0, idx, payload.data)
            return out
        deq = torch.zeros(payload.numel, dtype=torch.float32, device=payload.data.device)
        deq[idx] = payload.data
        return _finish(out, deq, False)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k(x.numel())
        if k == x.numel():
            return torch.zeros_like(x)
        kth = torch.topk(x.abs(), k, sorted=False).values.min()
        return torch.full_like(x, float(kth))


CODEC_NAMES = ("none", "bf16", "int8", "int4", "topk")
_BACKENDS = ("auto", "reference", "cpu", "cuda")


def get_codec(name: str, **options: Any) -> Codec:
    """Build a codec by name. Options: int8/int4 ``block_size`` (int > 0, even for int4,
    default 128) and ``backend`` (auto/reference/cpu/cuda); topk ``ratio`` (0 < ratio <= 1,
    default 0.01). Anything else raises :class:`ConfigError`; ``backend='cuda'`` where CUDA
    is not available raises :class:`KernelUnavailableError`."""
    allowed = {"none": set(), "bf16": set(), "int8": {"block_size", "backend"},
               "int4": {"block_size", "backend"}, "topk": {"ratio"}}
    if name not in allowed:
        raise ConfigError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    unknown = set(options) - allowed[name]
    if unknown:
        raise ConfigError(f"codec {name!r} has no option(s) {sorted(unknown)}; "
                          f"it accepts {sorted(allowed[name]) or 'none'}")
    if name == "none":
        return NoneCodec()
    if name == "bf16":
        return BF16Codec()
    if name == "topk":
        ratio = options.get("ratio", 0.01)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"topk ratio must be a number in (0, 1], got {ratio!r}")
        return TopKCodec(float(ratio))
    block = options.get("block_size", 128)
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ConfigError(f"block_size must be a positive int, got {block!r}")
    if name == "int4" and block % 2:
        raise ConfigError(f"int4 block_size must be even (two values a byte), got {block}")
    backend = options.get("backend", "auto")
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise KernelUnavailableError("backend='cuda' asked for, but torch.cuda.is_available() is False "
                                     "(no GPU or a CPU-only torch build); use backend='auto' or 'reference'")
    return BlockwiseCodec(8 if name == "int8" else 4, block, backend)
