"""Lanes at scale, the fast guard (docs/scale.md "Store load of lanes"): benchmarks/sim_lanes_scale.py
with 2 lanes x 3 groups of real :class:`~resilient_train.recovery.lanes.Lane` objects over a real
TCPStore, real gloo. Asserted, per lane and epoch, on the path every store without a native torch
Store takes (etcd's; every call counted):

* gloo's rendezvous of a lane of ``G`` members writes exactly ``G`` keys (one per member), and the
  TCPStore's own key count agrees;
* it reads each key a bounded number of times (3 reads per key per member when every key is
  there, plus the 10 ms polls of a key not written yet): at most ``4 G^2`` reads per lane here;
* while every lane's operation is in flight, the abort watchers read ``abort/<epoch>`` at most
  once per ``abort_poll_s`` per lane rank;
* one lane failing (``Lane.fail``) makes every in-flight rank of every lane leave its wait (the
  other lanes through the store key alone), well before the round deadline.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.timeout(180)  # ~10 s on a quiet machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_lane_rendezvous_keys_reads_and_abort_watch():
    from resilient_train.membership import TCPKVStore

    _load("sim_membership_scale")  # the counting store the lanes simulation builds on
    sim = _load("sim_lanes_scale")
    Counting = sim.counting_class()

    L, G = 2, 3
    host = TCPKVStore.host(port=0)
    kv = Counting(sim._NoNative(host.clone()), "sim-lanes/t")
    res = sim.run_config(kv, "tcp-kv", L, G, 2, 0.5, "t", num_keys=lambda: int(host._store.num_keys()))

    for ep in res["epochs"]:
        assert ep["distinct_keys_written"] == L * G, ep
        assert ep["counted_writes"] == L * G, ep
        assert ep["keys_added"] == L * G, ep
        # reads: 3-4 per rendezvous key on a quiet machine; each extra 10 ms of waiting under load is one more poll, so only the floor is exact
        assert 3 * G * G * L <= ep["counted_reads"] <= 40 * G * G * L, ep
        assert 100 <= ep["value_bytes"]["min"] <= ep["value_bytes"]["max"] <= 1000, ep  # one gloo address per key
        assert ep["connect_s"] < sim.TIMEOUT_S / 3, ep

    aw = res["abort_watch"]
    assert aw["lane_ranks_in_flight"] == L * (G - 1)
    assert 0 < aw["abort_reads_per_lane_rank_per_s"] <= 1.05 / sim.ABORT_POLL_S, aw
    assert aw["left_count"] == L * (G - 1) and aw["left_by"]["completed"] == 0, aw
    assert aw["left_by"]["aborted"] >= G - 1, aw  # lane 2's ranks had only the store key to go by
    assert aw["fail_to_all_left_s"] < sim.TIMEOUT_S / 3, aw
