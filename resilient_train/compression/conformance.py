"""The conformance suite every Codec runs (tests call these; each raises AssertionError).

* :func:`check_roundtrip`: ``|x - decode(encode(x))| <= codec.error_bound(x)`` elementwise,
  output shape and dtype, ``payload.nbytes == payload_nbytes(numel)``.
* :func:`check_bytes`: ``from_bytes(to_bytes(p))`` decodes to the same values; encoding is
  deterministic.
* :func:`check_accumulate`: ``decode(p, out, accumulate=True) == out + decode(p)``.
* :func:`check_error_feedback`: over rounds, what was decoded plus the final residual equals
  the sum of the inputs (nothing is lost, only delayed).
"""

from __future__ import annotations

import torch

from .codecs import Codec

__all__ = ["check_roundtrip", "check_bytes", "check_accumulate", "check_error_feedback", "check_all"]


def check_roundtrip(codec: Codec, x: torch.Tensor) -> None:
    p = codec.encode(x)
    d = codec.decode(p)
    assert d.dtype == torch.float32 and d.shape == x.shape, (d.dtype, d.shape, x.shape)
    assert p.nbytes == codec.payload_nbytes(x.numel()), (p.nbytes, codec.payload_nbytes(x.numel()))
    err = (x - d).abs()
    bound = codec.error_bound(x)
    bad = err > bound
    assert not bool(bad.any()), (f"{codec.name}: {int(bad.sum())} of {x.numel()} elements exceed the bound; "
                                 f"worst err {float(err.max())} vs bound {float(bound[bad].min())}")


def check_bytes(codec: Codec, x: torch.Tensor) -> None:
    p = codec.encode(x)
    buf = codec.to_bytes(p)
    assert buf.dtype == torch.uint8 and buf.numel() == codec.payload_nbytes(x.numel())
    q = codec.from_bytes(buf, x.numel())
    assert torch.equal(codec.decode(p), codec.decode(q))
    assert torch.equal(buf, codec.to_bytes(codec.encode(x))), "encoding is not deterministic"


def check_accumulate(codec: Codec, x: torch.Tensor) -> None:
    p = codec.encode(x)
    base = torch.linspace(-1, 1, x.numel()) if x.numel() else torch.zeros(0)
    out = base.clone()
    res = codec.decode(p, out=out, accumulate=True)
    assert res is out
    assert torch.equal(out, base + codec.decode(p))
    out2 = torch.full_like(base, 5.0)
    codec.decode(p, out=out2, accumulate=False)
    assert torch.equal(out2, codec.decode(p))


def check_error_feedback(codec: Codec, xs: list[torch.Tensor], rtol: float = 1e-5) -> None:
    residual = torch.zeros_like(xs[0])
    sent = torch.zeros(xs[0].numel(), dtype=torch.float64)
    total = torch.zeros(xs[0].numel(), dtype=torch.float64)
    for x in xs:
        before = residual.clone()
        p = codec.encode(x, residual)
        d = codec.decode(p)
        # per round, exactly: new residual = (x + old residual) - decoded, in fp32
        assert torch.equal(residual, (x + before) - d), f"{codec.name}: residual is not v - decode(payload)"
        sent += d.double()
        total += x.double()
    scale = max(1.0, float(total.abs().max())) if total.numel() else 1.0
    err = (sent + residual.double() - total).abs().max() if total.numel() else torch.tensor(0.0)
    assert float(err) <= rtol * scale * len(xs), f"{codec.name}: signal lost over rounds: {float(err)}"


def check_all(codec: Codec, x: torch.Tensor) -> None:
    check_roundtrip(codec, x)
    check_bytes(codec, x)
    check_accumulate(codec, x)
