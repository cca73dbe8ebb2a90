"""Communicator over real gloo ranks (threads, TCPStore on a free port) and the WAN emulator."""

from __future__ import annotations

import pytest
import torch

from resilient_train.compression import get_codec
from resilient_train.errors import ConfigError, PayloadMismatchError
from resilient_train.sync import (PROFILES, Communicator, LinkProfile, VirtualClock, WanEmulator, allreduce_encoded, replay,
                                  allreduce_mean, get_profile)
from resilient_train.sync.threads import run_thread_ranks


def test_allreduce_and_allgather_exact_with_byte_counts():
    def fn(rank, comm):
        assert isinstance(comm, Communicator)
        assert (comm.rank, comm.world_size) == (rank, 4)
        a = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
        h = allreduce_mean(comm, a)  # async: a handle
        got_mean = h.wait().tolist()
        parts = comm.allgather(torch.tensor([rank, 10 * rank], dtype=torch.int64)).wait()
        return got_mean, [p.tolist() for p in parts], comm.bytes_sent

    res = run_thread_ranks(fn, 4)
    for mean, parts, sent in res:
        assert mean == [2.5, 5.0, 7.5]
        assert parts == [[0, 0], [1, 10], [2, 20], [3, 30]]
        # ring all-reduce: 2 (n-1)/n * 12 bytes = 18; all-gather: (n-1) * 16 bytes = 48
        assert sent == 18 + 48


@pytest.mark.parametrize("name,opts", [("int8", {"backend": "reference", "block_size": 16}),
                                       ("int4", {"backend": "reference", "block_size": 16}),
                                       ("topk", {"ratio": 0.2}), ("bf16", {}), ("none", {})])
def test_encoded_allreduce_is_the_rank_ordered_mean_of_decoded_payloads(name, opts):
    n = 3

    def data(rank):
        return torch.randn(101, generator=torch.Generator().manual_seed(rank)) * (rank + 1)

    def fn(rank, comm):
        codec = get_codec(name, **opts)
        mean, flags = allreduce_encoded(comm, codec, codec.encode(data(rank))).wait()
        return mean, flags, comm.bytes_sent

    res = run_thread_ranks(fn, n)
    codec = get_codec(name, **opts)
    want = torch.zeros(101)
    for r in range(n):
        codec.decode(codec.encode(data(r)), out=want, accumulate=True)
    want /= n
    for mean, flags, sent in res:
        assert torch.equal(mean, want)  # bit-identical on every rank, and to the local oracle
        assert flags == [0, 0, 0]
        assert sent == (n - 1) * (40 + codec.payload_nbytes(101))


def test_encoded_allreduce_veto_flag_skips_decoding():
    def fn(rank, comm):
        codec = get_codec("int8", backend="reference")
        return allreduce_encoded(comm, codec, codec.encode(torch.ones(10)), flag=int(rank == 1)).wait()

    for mean, flags in run_thread_ranks(fn, 3):
        assert mean is None and flags == [0, 1, 0]


def test_peer_with_another_codec_is_a_payload_mismatch_on_every_rank():
    # same wire size (4 fp32 vs 2 values + 2 indices), different codec: the header catches it
    def fn(rank, comm):
        codec = get_codec("none") if rank == 0 else get_codec("topk", ratio=0.5)
        allreduce_encoded(comm, codec, codec.encode(torch.arange(4.0))).wait()

    with pytest.raises(Exception) as info:
        run_thread_ranks(fn, 2)
    errors = info.value.errors
    assert set(errors) == {0, 1}
    assert all(isinstance(e, PayloadMismatchError) for e in errors.values())


class _FakeComm:
    rank, world_size = 0, 2

    def __init__(self):
        self.bytes_sent = 0

    def _h(self, result):
        from resilient_train.sync import Handle
        return Handle.completed(result)

    def allreduce_sum(self, buf):
        self.bytes_sent += buf.numel() * buf.element_size()  # 2 (n-1)/n = 1 for n = 2
        return self._h(buf)

    def allgather(self, buf):
        self.bytes_sent += buf.numel() * buf.element_size()
        return self._h([buf, buf])


def test_wan_emulator_virtual_clock_charges_latency_plus_bytes_over_bandwidth():
    clock = VirtualClock()
    wan = WanEmulator(_FakeComm(), LinkProfile("test", latency_s=0.1, bandwidth_bytes_per_s=1000.0), clock=clock)
    wan.allreduce_sum(torch.zeros(100)).wait()  # 400 bytes: 0.1 + 0.4
    assert clock.now_s == pytest.approx(0.5)
    h = wan.allreduce_sum(torch.zeros(25))  # 100 bytes: ready at 0.5 + 0.2 = 0.7
    clock.advance(0.15)  # compute overlaps the exchange
    h.wait()
    assert clock.now_s == pytest.approx(0.7)
    assert wan.blocked_s == pytest.approx(0.5 + 0.05)
    h = wan.allgather(torch.zeros(25))
    clock.advance(1.0)  # compute longer than the exchange: waiting costs nothing
    h.wait()
    assert clock.now_s == pytest.approx(1.7)
    # two exchanges started together queue on the one link
    h1, h2 = wan.allreduce_sum(torch.zeros(25)), wan.allreduce_sum(torch.zeros(25))
    h2.wait()
    assert clock.now_s == pytest.approx(1.7 + 0.4)
    h1.wait()
    assert wan.bytes_sent == 400 + 100 + 100 + 200


def test_wan_trace_replays_to_the_same_time_and_to_slower_links():
    """A traced run replayed on its own link gives the emulator's own clock (evaluation marks
    included); on one slower link per rank the slowest link sets every exchange's time."""
    clock, trace = VirtualClock(), []
    link = LinkProfile("test", latency_s=0.1, bandwidth_bytes_per_s=1000.0)
    wan = WanEmulator(_FakeComm(), link, clock=clock, trace=trace)
    marks, seen = [], []
    for step in range(6):
        clock.advance(0.25)
        if step % 2 == 0:
            h = wan.allreduce_sum(torch.zeros(25))  # 100 bytes: 0.2 s on the link
        if step % 2 == 1:
            h.wait()  # overlapped by one step's compute (0.25 s): never late on this link
        if step == 3:
            wan.allgather(torch.zeros(100)).wait()  # 400 bytes: 0.5 s, blocking
        marks.append(wan.compute_s)
        seen.append(clock.now_s)
    assert [e["ev"] for e in trace].count("start") == 4
    same = replay(trace, link, at_compute_s=marks)
    assert same["total_s"] == pytest.approx(clock.now_s) and same["blocked_s"] == pytest.approx(wan.blocked_s)
    assert same["at"] == pytest.approx(seen)
    # one rank behind a 10x slower link: 100 bytes now take 0.1 + 1.0 s, past the overlap
    slow = replay(trace, [link, LinkProfile("slow", 0.1, 100.0)])
    assert slow["total_s"] == pytest.approx(6 * 0.25 + 3 * (1.1 - 0.25) + 4.1)
    with pytest.raises(ConfigError, match="virtual clock"):
        WanEmulator(_FakeComm(), link, trace=[])


def test_wan_emulator_real_clock_sleeps_the_remaining_delay():
    slept = []
    now = [10.0]
    wan = WanEmulator(_FakeComm(), LinkProfile("t", 0.05, 1e6), sleep=slept.append, monotonic=lambda: now[0])
    h = wan.allreduce_sum(torch.zeros(250))  # 1000 bytes: 0.05 + 0.001
    now[0] += 0.02
    h.wait()
    assert slept == [pytest.approx(0.031)]


def test_link_profiles():
    assert set(PROFILES) == {"intra", "inter", "wan"}
    assert get_profile("wan").latency_s == 0.150 and get_profile("wan").bandwidth_bytes_per_s == 100e6 / 8
    assert get_profile("intra").delay_s(10e9 / 8) == pytest.approx(1.001)
    assert get_profile("inter").latency_s == 0.050
    with pytest.raises(ConfigError, match="unknown link profile"):
        get_profile("moon")
    with pytest.raises(ConfigError):
        LinkProfile("bad", 0.1, 0.0)


def test_emulator_over_real_ranks_delivers_real_results():
    def fn(rank, comm):
        clock = VirtualClock()
        wan = WanEmulator(comm, "wan", clock=clock)
        out = allreduce_mean(wan, torch.full((1000,), float(rank))).wait()
        return out[0].item(), clock.now_s, wan.bytes_sent

    for value, t, sent in run_thread_ranks(fn, 2):
        assert value == 0.5
        assert sent == 4000
        assert t == pytest.approx(0.150 + 4000 / (100e6 / 8))


def test_gloo_groups_use_the_device_the_environment_names(monkeypatch):
    """Cross-provider groups listen on GLOO_SOCKET_IFNAME, else RT_GLOO_HOST, else the loopback:
    providers on several machines set one (docs/membership.md)."""
    import torch.distributed as dist

    from resilient_train.sync.threads import gloo_device, run_thread_ranks

    def total(rank, comm):
        return comm.allreduce_sum(torch.tensor([float(rank + 1)])).wait().item()

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("RT_GLOO_HOST", "localhost")
    assert run_thread_ranks(total, 2) == [3.0, 3.0]
    monkeypatch.setenv("RT_GLOO_HOST", "no-such-host.invalid")
    with pytest.raises(RuntimeError):
        gloo_device()  # the name is used, not silently replaced by the loopback
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the interface wins over the host name
    assert isinstance(gloo_device(), type(dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")))
    assert run_thread_ranks(total, 2) == [3.0, 3.0]
