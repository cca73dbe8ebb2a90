"""Reference codecs: the shared conformance suite, exact bytes, rounding, bad options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_train.compression import CODEC_NAMES, Codec, get_codec
from resilient_train.compression.conformance import check_all, check_error_feedback
from resilient_train.errors import ConfigError, KernelUnavailableError, PayloadMismatchError

# every codec, with the integer codecs on the pure-torch path and on a small odd-ish block
CODECS = [
    ("none", {}), ("bf16", {}), ("topk", {"ratio": 0.1}), ("topk", {"ratio": 1.0}),
    ("int8", {"backend": "reference"}), ("int8", {"backend": "reference", "block_size": 5}),
    ("int4", {"backend": "reference"}), ("int4", {"backend": "reference", "block_size": 6}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CODECS]


def _x(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


@pytest.mark.parametrize("name,opts", CODECS, ids=IDS)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 127, 128, 129, 1001])
def test_conformance_sizes(name, opts, n):
    codec = get_codec(name, **opts)
    assert isinstance(codec, Codec)
    check_all(codec, _x(n, seed=n, scale=3.0))


@pytest.mark.parametrize("name,opts", CODECS, ids=IDS)
def test_conformance_special_values(name, opts):
    codec = get_codec(name, **opts)
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-40, 3.0e38, -2.5, 2.5, 0.5, 1.5, 1e-5] * 13)
    check_all(codec, x)
    check_all(codec, torch.zeros(300))


@pytest.mark.parametrize("name,opts", CODECS, ids=IDS)
def test_error_feedback_conserves_signal(name, opts):
    codec = get_codec(name, **opts)
    xs = [_x(777, seed=s, scale=1.0 + s) for s in range(6)]
    check_error_feedback(codec, xs)


@pytest.mark.parametrize("name,opts", CODECS, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 700), seed=st.integers(0, 2**31 - 1),
       log_scale=st.floats(-20, 20))
def test_conformance_hypothesis(name, opts, n, seed, log_scale):
    codec = get_codec(name, **opts)
    check_all(codec, _x(n, seed, 2.0 ** log_scale))


def test_error_feedback_makes_int4_unbiased_over_rounds():
    # the same small signal every round: without EF int4 rounds it away forever, with EF the
    # running average of what is sent converges to it
    codec = get_codec("int4", backend="reference", block_size=8)
    x = torch.tensor([1.0, 0.05, 0.05, 0.05, -0.03, 0.0, 0.0, 0.0])
    assert torch.equal(codec.decode(codec.encode(x))[1:5], torch.zeros(4))
    r = torch.zeros_like(x)
    sent = sum(codec.decode(codec.encode(x, r)) for _ in range(200))
    torch.testing.assert_close(sent / 200, x, atol=2e-3, rtol=0)


def test_int8_exact_bytes_and_half_even_rounding():
    codec = get_codec("int8", block_size=4, backend="reference")
    x = torch.tensor([127.0, -63.5, 0.5, 1.5])  # scale 1: -63.5 -> -64, 0.5 -> 0, 1.5 -> 2
    buf = codec.to_bytes(codec.encode(x))
    assert bytes(buf.tolist()) == bytes([0x7F, 0xC0, 0x00, 0x02, 0x00, 0x00, 0x80, 0x3F])


def test_int4_exact_bytes_nibble_order_and_odd_tail():
    codec = get_codec("int4", block_size=4, backend="reference")
    x = torch.tensor([7.0, 2.5, -2.5, 0.5, 7.0])  # block 0 scale 1: q = 7, 2, -2, 0; block 1: q = 7
    buf = codec.to_bytes(codec.encode(x))
    # q + 8 = 15, 10, 6, 8, 15 -> low nibble first; odd tail pads the high nibble with 0
    assert bytes(buf.tolist()) == bytes([0xAF, 0x86, 0x0F]) + bytes([0, 0, 0x80, 0x3F, 0, 0, 0x80, 0x3F])
    assert codec.decode(codec.encode(x)).tolist() == [7.0, 2.0, -2.0, 0.0, 7.0]


def test_rounding_definition_scale_and_reciprocal():
    codec = get_codec("int8", block_size=3, backend="reference")
    x = torch.tensor([1.0, 0.3, -0.7])
    p = codec.encode(x)
    scale = torch.tensor(1.0) / 127
    assert p.scales.item() == scale.item()
    q = torch.round(x * (1 / scale)).clamp(-127, 127)
    assert p.data.tolist() == q.to(torch.int8).tolist()


def test_tiny_blocks_are_sent_as_zero_and_kept_in_residual():
    codec = get_codec("int8", block_size=2, backend="reference")
    x = torch.tensor([1e-39, -1e-39, 1.0, 0.0])
    r = torch.zeros(4)
    p = codec.encode(x, r)
    assert p.scales[0].item() == 0.0 and p.data[:2].tolist() == [0, 0]
    assert r[:2].tolist() == x[:2].tolist()


def test_topk_keeps_the_largest_magnitudes():
    codec = get_codec("topk", ratio=0.25)
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05])
    p = codec.encode(x)
    assert sorted(p.indices.tolist()) == [1, 6]
    assert codec.k(8) == 2 and codec.k(9) == 3 and codec.k(0) == 0 and codec.k(1) == 1
    assert codec.decode(p).tolist() == [0, -5.0, 0, 0, 0, 0, 4.0, 0]


def test_payload_sizes():
    n = 1000
    assert get_codec("none").payload_nbytes(n) == 4000
    assert get_codec("bf16").payload_nbytes(n) == 2000
    assert get_codec("int8", block_size=128).payload_nbytes(n) == 1000 + 4 * 8
    assert get_codec("int4", block_size=128).payload_nbytes(n) == 500 + 4 * 8
    assert get_codec("int4", block_size=128).payload_nbytes(n + 1) == 501 + 4 * 8
    assert get_codec("topk", ratio=0.01).payload_nbytes(n) == 10 * 8


@pytest.mark.parametrize("name,opts,match", [
    ("int3", {}, "unknown codec"),
    ("int8", {"block_size": 0}, "positive"),
    ("int8", {"block_size": -4}, "positive"),
    ("int8", {"block_size": 2.0}, "positive"),
    ("int4", {"block_size": 7}, "even"),
    ("int8", {"blocksize": 64}, "no option"),
    ("none", {"ratio": 0.1}, "no option"),
    ("topk", {"ratio": 0}, "ratio"),
    ("topk", {"ratio": 1.5}, "ratio"),
    ("int8", {"backend": "gpu"}, "backend"),
])
def test_bad_options_raise_config_error(name, opts, match):
    with pytest.raises(ConfigError, match=match):
        get_codec(name, **opts)


def test_cuda_backend_without_cuda_is_a_typed_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(KernelUnavailableError, match="cuda"):
        get_codec("int8", backend="cuda")


def test_mismatched_payloads_are_typed_errors():
    int8 = get_codec("int8", backend="reference")
    int4 = get_codec("int4", backend="reference")
    p = int8.encode(torch.ones(300))
    with pytest.raises(PayloadMismatchError):
        int4.decode(p)
    with pytest.raises(PayloadMismatchError):
        int8.from_bytes(int8.to_bytes(p)[:-1], 300)
    with pytest.raises(PayloadMismatchError):
        get_codec("topk").decode(p)


def test_inputs_must_be_flat_float32():
    codec = get_codec("bf16")
    with pytest.raises(ConfigError, match="1-D float32"):
        codec.encode(torch.ones(2, 2))
    with pytest.raises(ConfigError, match="1-D float32"):
        codec.encode(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="residual"):
        codec.encode(torch.ones(4), torch.ones(3))


def test_all_names_are_buildable():
    assert set(CODEC_NAMES) == {"none", "bf16", "int8", "int4", "topk"}
    for name in CODEC_NAMES:
        assert get_codec(name).name == name


def test_bound_is_tight_for_int8():
    # the bound is not vacuous: some element of a random block gets close to half a step
    codec = get_codec("int8", block_size=128, backend="reference")
    x = _x(128 * 64, seed=3)
    err = (x - codec.decode(codec.encode(x))).abs()
    assert float((err / codec.error_bound(x)).max()) > 0.9
    assert math.isclose(float(codec.error_bound(x)[0]), float(x[:128].abs().max()) / 127 * (0.5 + 1e-5),
                        rel_tol=1e-6)
