"""Replication across real S3 / Azure / GCS servers: every copy commits on its own, faults on one
provider never stop the others, reads fall back to a replica, residency holds."""

from __future__ import annotations

import logging

import pytest

from resilient_train.checkpoint.loading import load_replicated
from resilient_train.checkpoint.replicate import copy_checkpoint, replicate
from resilient_train.checkpoint.saving import save_replicated
from resilient_train.checkpoint import load, verify_checkpoint
from resilient_train.checkpoint.steps import committed_steps
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.errors import ReplicationError
from resilient_train.format import MANIFEST_NAME, step_dirname
from resilient_train.storage import RetryPolicy, open_store
from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy

from .conftest import assert_same_tensors, make_train_state, start_server, state_tensors

pytestmark = pytest.mark.timeout(180)

SHORT = RetryPolicy(max_attempts=2, max_total_s=5, base_wait_s=0.05, max_wait_s=0.1, call_timeout_s=10)
OPTS = SaveOptions(max_file_bytes=8192, io_threads=4)


def provider_for(store, region, cost=0.0, **kw):
    """A Provider whose Store is the given one (the Placement gets it through ``stores``)."""
    return Provider(store.name, "memory://unused/" + store.name, region, egress_cost_per_gb=cost, **kw)


def test_three_clouds_each_commit_their_own_copy(make_store):
    stores = {k: make_store(k) for k in ("s3", "azure", "gcs")}
    provs = [provider_for(stores["s3"], "eu-west-1"), provider_for(stores["azure"], "westeurope"), provider_for(stores["gcs"], "europe-west4")]
    pl = Placement(provs, ReplicationPolicy(copies=3), stores={p.name: stores[p.name] for p in provs})
    state = make_train_state()
    want = state_tensors(state)
    rep = save_replicated(pl, state, 7, options=OPTS)
    assert rep.committed == ["s3", "azure", "gcs"]
    for name, store in stores.items():
        assert committed_steps(store) == [7], name
        _, problems = verify_checkpoint(store, 7)
        assert problems == [], (name, problems)
        fresh = make_train_state(seed=5)
        load(store, fresh, 7)
        assert_same_tensors(state_tensors(fresh), want)
    # every copy holds the same manifest, byte for byte
    mans = {n: s.read_bytes(f"{step_dirname(7)}/{MANIFEST_NAME}") for n, s in stores.items()}
    assert len(set(mans.values())) == 1


def test_residency_nothing_written_outside_allowed_regions(make_store):
    eu1, eu2, us = make_store("memory", "eu1"), make_store("memory", "eu2"), make_store("memory", "us")
    provs = [provider_for(us, "us-east-1"), provider_for(eu1, "eu-west-1"), provider_for(eu2, "eu-central-1")]
    pl = Placement(provs, ReplicationPolicy(copies=2, allowed_regions=("eu-*",)), stores={"eu1": eu1, "eu2": eu2, "us": us})
    state = make_train_state()
    save_replicated(pl, state, 1, options=OPTS)
    # even with an EU provider down, the US one is never used as a substitute
    with pytest.raises(ReplicationError) as ei:
        save_replicated(pl, state, 2, options=OPTS, health={"eu2": False})
    assert ei.value.committed == ["eu1"]
    assert us.list("") == []
    assert committed_steps(eu1) == [1, 2] and committed_steps(eu2) == [1]
    # replicate() brings step 2 up to the policy once eu2 is back
    replicate(pl, 2)
    assert committed_steps(eu2) == [1, 2] and us.list("") == []


def test_server_stopped_mid_save_others_commit_and_error_names_it(make_store, tmp_path):
    srv = start_server("s3")
    try:
        srv.create_bucket("dying")
        s3 = open_store(srv.uri("dying", "run"), srv.storage_options, name="s3-dying", retry=SHORT)
        azure, local = make_store("azure", "azure"), open_store(str(tmp_path / "local"), name="local")

        class KillAfterFirstFile:
            """Delegates to the S3 store; stops its server when the second file starts."""

            def __init__(self, inner):
                self.inner, self.name, self.opened = inner, inner.name, 0

            def __getattr__(self, attr):
                return getattr(self.inner, attr)

            def open_write(self, path):
                self.opened += 1
                if self.opened == 2:
                    srv.kill()
                return self.inner.open_write(path)

        dying = KillAfterFirstFile(s3)
        provs = [provider_for(s3, "eu-west-1"), provider_for(azure, "eu-west-1"), provider_for(local, "eu-west-1")]
        pl = Placement(provs, ReplicationPolicy(copies=3), stores={"s3-dying": dying, "azure": azure, "local": local})
        state = make_train_state()
        want = state_tensors(state)
        with pytest.raises(ReplicationError) as ei:
            save_replicated(pl, state, 3, options=SaveOptions(max_file_bytes=8192, io_threads=1))
        assert "s3-dying" in ei.value.failures and "s3-dying" in str(ei.value)
        assert ei.value.committed == ["azure", "local"]
        for store in (azure, local):
            fresh = make_train_state(seed=1)
            load(store, fresh, 3)
            assert_same_tensors(state_tensors(fresh), want)
    finally:
        srv.stop()


def test_provider_down_during_load_replica_serves(make_store, tmp_path, caplog):
    srv = start_server("s3")
    try:
        srv.create_bucket("down-test")
        s3 = open_store(srv.uri("down-test", "run"), srv.storage_options, name="s3", retry=SHORT)
        local = open_store(str(tmp_path / "local"), name="local")
        provs = [provider_for(s3, "eu-west-1", cost=0.0), provider_for(local, "eu-west-1", cost=1.0)]
        pl = Placement(provs, ReplicationPolicy(copies=2), stores={"s3": s3, "local": local})
        state = make_train_state()
        want = state_tensors(state)
        save_replicated(pl, state, 4, options=OPTS)
        assert pl.decide().read_order == ("s3", "local")  # s3 is preferred (cheaper) ...
        srv.kill()  # ... and now down
        fresh = make_train_state(seed=2)
        served = {}
        with caplog.at_level(logging.INFO):
            res = load_replicated(pl, fresh, 4, on_served=served.update)
        assert res.step == 4
        assert set(served.values()) == {"local"}
        assert_same_tensors(state_tensors(fresh), want)
    finally:
        srv.stop()


def test_corrupted_bytes_on_one_provider_replica_used(make_store, caplog):
    a, b = make_store("gcs", "gcs"), make_store("azure", "azure")
    provs = [provider_for(a, "eu"), provider_for(b, "eu", cost=1.0)]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores={"gcs": a, "azure": b})
    state = make_train_state()
    want = state_tensors(state)
    rep = save_replicated(pl, state, 9, options=OPTS)
    folder = step_dirname(9)
    shard = next(n for n in a.list(folder) if n.endswith(".safetensors"))
    data = bytearray(a.read_bytes(f"{folder}/{shard}"))
    data[-3] ^= 0x55  # inside tensor data: the header still parses, the hash does not match
    a.write_bytes(f"{folder}/{shard}", bytes(data))
    fresh = make_train_state(seed=3)
    served = {}
    with caplog.at_level(logging.WARNING):
        load_replicated(pl, fresh, 9, on_served=served.update)
    assert served[shard] == "azure"
    assert all(v == "gcs" for k, v in served.items() if k != shard)
    assert_same_tensors(state_tensors(fresh), want)
    assert any("azure" in r.getMessage() and shard in r.getMessage() for r in caplog.records)
    # copying from a list of replicas skips the corrupt copy too
    dst = make_store("memory", "dst")
    copy_checkpoint([a, b], dst, 9)
    assert verify_checkpoint(dst, 9)[1] == []
    assert rep.committed == ["gcs", "azure"]


def test_health_book_learns_from_a_failed_replica(make_store, tmp_path):
    from resilient_train.checkpoint.saving import write_replicated
    from resilient_train.checkpoint.state import capture
    from resilient_train.storage.providers import HealthBook
    from resilient_train.testing.faults import FaultyStore

    a, b, c = make_store("memory", "a"), make_store("memory", "b"), make_store("memory", "c")
    down = FaultyStore(b, down=True)
    provs = [provider_for(a, "eu"), provider_for(b, "eu"), provider_for(c, "eu")]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores={"a": a, "b": down, "c": c})
    book = HealthBook(cooldown_s=60)
    snap = capture(make_train_state())
    rep = write_replicated(pl, snap, 1, options=OPTS, health_book=book, now=0.0)
    assert rep.committed == ["a", "c"]  # b failed, c stood in
    assert book.snapshot(["a", "b", "c"], now=1.0) == {"a": True, "b": False, "c": True}
    rep = write_replicated(pl, snap, 2, options=OPTS, health_book=book, now=2.0)
    assert rep.committed == ["a", "c"] and down.calls == down.injected  # b was not even tried again
    assert pl.decide(book.snapshot(["a", "b", "c"], now=2.0)).read_order[-1] == "b"


def test_unhealthy_provider_is_not_asked_unless_needed(make_store):
    from resilient_train.testing.faults import FaultyStore

    a, b = make_store("memory", "a"), make_store("memory", "b")
    spy = FaultyStore(b)  # counts calls, never fails
    provs = [provider_for(a, "eu"), provider_for(b, "eu")]
    pl = Placement(provs, ReplicationPolicy(copies=2), stores={"a": a, "b": spy})
    state = make_train_state()
    want = state_tensors(state)
    save_replicated(pl, state, 1, options=OPTS)
    before = spy.calls
    fresh = make_train_state(seed=3)
    load_replicated(pl, fresh, health={"b": False})
    assert spy.calls == before  # b is marked down: not asked
    assert_same_tensors(state_tensors(fresh), want)
    a.delete(step_dirname(1), recursive=True)  # the healthy one lost it: b serves after all
    fresh = make_train_state(seed=4)
    res = load_replicated(pl, fresh, 1, health={"b": False})
    assert set(res.sources.values()) == {"b"}
    assert_same_tensors(state_tensors(fresh), want)
