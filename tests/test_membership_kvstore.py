"""The KVStore contract, run on every implementation; the torch-Store adapter under real gloo."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
import torch

from resilient_train.errors import ConfigError, MembershipStoreError
from resilient_train.membership import EtcdKVStore, KVStore, MemoryKVStore, TCPKVStore, torch_store_for
from resilient_train.sync.communicator import ProcessGroupCommunicator
from resilient_train.sync.threads import make_gloo_group

pytestmark = pytest.mark.timeout(60)

TO = timedelta(seconds=5)


def _make_kv(request, kind: str) -> KVStore:
    if kind == "memory":
        return MemoryKVStore()
    if kind == "tcp":
        return TCPKVStore.host()
    cluster = request.getfixturevalue("etcd_cluster")  # a real 3-member etcd; fresh keys per test
    return EtcdKVStore(cluster.endpoints, prefix=f"t-{uuid.uuid4().hex[:8]}/")


@pytest.fixture(params=["memory", "tcp", "etcd"])
def kv(request) -> KVStore:
    return _make_kv(request, request.param)


def test_contract(kv):
    assert isinstance(kv, KVStore)
    assert kv.get("missing", timeout=TO) is None  # never blocks on a missing key
    kv.set("k", b"v1", timeout=TO)
    assert kv.get("k", timeout=TO) == b"v1"
    assert kv.add("n", 0, timeout=TO) == 0 and kv.add("n", 3, timeout=TO) == 3 and kv.add("n", -1, timeout=TO) == 2
    # compare_set: None means "only if missing"; the value held afterwards comes back
    assert kv.compare_set("view/1", None, b"A", timeout=TO) == b"A"
    assert kv.compare_set("view/1", None, b"B", timeout=TO) == b"A"
    assert kv.compare_set("view/1", b"X", b"C", timeout=TO) == b"A"
    assert kv.compare_set("view/1", b"A", b"D", timeout=TO) == b"D"
    other = kv.clone()
    assert other.get("view/1", timeout=TO) == b"D"  # clones see the same data
    other.set("k", bytes(range(256)), timeout=TO)
    assert kv.get("k", timeout=TO) == bytes(range(256))


def test_compare_set_has_one_winner_under_contention(kv):
    wins = []

    def race(i: int) -> None:
        mine = f"proposal-{i}".encode()
        if kv.clone().compare_set("epoch/7", None, mine, timeout=TO) == mine:
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1
    assert kv.get("epoch/7", timeout=TO) == f"proposal-{wins[0]}".encode()


def test_unreachable_tcp_store_raises_membership_store_error():
    srv = TCPKVStore.host()
    port = srv.port
    del srv  # the server goes away with its only handle
    client = TCPKVStore("127.0.0.1", port, connect_timeout=timedelta(seconds=1))
    with pytest.raises(MembershipStoreError, match=f"127.0.0.1:{port}"):
        client.get("k", timeout=TO)
    with pytest.raises(ConfigError, match="port"):
        TCPKVStore("127.0.0.1", 0)


@pytest.mark.parametrize("kind", ["memory", "etcd"])
def test_gloo_group_rendezvous_on_a_plain_kvstore(request, kind):
    """gloo over the Python adapter (no native torch Store): in memory, and over a real etcd."""
    kv = _make_kv(request, kind)
    out: dict = {}

    def rank(r: int) -> None:
        try:
            store = torch_store_for(kv.clone(), "rt/epoch-3", timedelta(seconds=20))
            comm = ProcessGroupCommunicator(make_gloo_group(store, r, 3, timedelta(seconds=20)))
            out[r] = comm.allreduce_sum(torch.full((5,), float(r + 1))).wait(timedelta(seconds=20))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            out[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    for r in range(3):
        assert isinstance(out.get(r), torch.Tensor), out.get(r)
        assert torch.equal(out[r], torch.full((5,), 6.0))
    if kind == "memory":
        assert kv._data and all(k.startswith("rt/epoch-3/") for k in kv._data)  # all under the prefix
