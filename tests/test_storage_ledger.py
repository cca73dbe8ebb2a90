"""The ledger of bytes and money, per-pair prices, the read-order saving, log redaction, limits."""

from __future__ import annotations

import io
import logging

import pytest

from resilient_train.checkpoint.async_save import AsyncCheckpointer
from resilient_train.checkpoint.loading import load_replicated
from resilient_train.checkpoint.replicate import copy_checkpoint
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.errors import CheckpointPolicyError, ConfigError
from resilient_train.logs import configure_logging
from resilient_train.storage import LocalStore
from resilient_train.storage.ledger import Ledger
from resilient_train.storage.providers import HealthBook, Placement, Provider, ReplicationPolicy, place, placement_from_config
from resilient_train.storage.redact import redact_log, remember_secrets
from resilient_train.testing.faults import FaultyStore

from .conftest import make_train_state

pytestmark = pytest.mark.timeout(60)


def test_prices_per_provider_and_pair():
    provs = [Provider("aws", "/tmp/a", "eu", egress_cost_per_gb=0.09, egress_to={"gcp": 0.02}), Provider("gcp", "/tmp/g", "eu", egress_cost_per_gb=0.12)]
    seen = []
    led = Ledger(provs, on_record=seen.append)
    assert led.record_copy("aws", "gcp", 2_000_000_000) == pytest.approx(0.04)  # the pair price
    assert led.record_copy("gcp", "aws", 1_000_000_000, "catch_up") == pytest.approx(0.12)
    assert led.record_read("aws", 500_000_000) == pytest.approx(0.045)
    led.record_write("aws", 10, "checkpoint")
    assert led.record_sync("aws", "gcp", 1_000_000_000) == pytest.approx(0.02)
    s = led.summary()
    assert s["providers"]["aws"]["read_bytes"] == 2_500_000_000 and s["providers"]["gcp"]["write_bytes"] == 2_000_000_000
    assert s["pairs"]["aws->gcp"]["by_purpose"] == {"replication": {"bytes": 2_000_000_000, "cost": 0.04}, "sync": {"bytes": 1_000_000_000, "cost": 0.02}}
    assert s["total_cost"] == pytest.approx(0.04 + 0.12 + 0.045 + 0.02)
    assert led.bytes("gcp", "write", "catch_up") == 0 and led.bytes("aws", "write", "catch_up") == 1_000_000_000
    assert [r["kind"] for r in seen] == ["copy", "copy", "read", "write", "sync"]
    assert any("total cost" in line for line in led.lines())
    with pytest.raises(ConfigError, match="egress_to"):
        Provider("x", "/tmp/x", "eu", egress_to={"y": -1})
    pl = placement_from_config({"providers": [{"name": "a", "uri": "/tmp/a", "region": "eu", "egress_to": {"b": 0.01}}, {"name": "b", "uri": "/tmp/b", "region": "eu"}]})
    assert pl.provider("a").egress_to == {"b": 0.01}


def test_read_order_prefers_the_cheaper_replica_and_says_what_it_saves(tmp_path):
    provs = [Provider("dear", str(tmp_path / "d"), "eu", egress_cost_per_gb=0.09), Provider("cheap", str(tmp_path / "c"), "eu", egress_cost_per_gb=0.02)]
    d = place(provs, ReplicationPolicy(copies=2))
    assert d.read_order == ("cheap", "dear") and d.read_saving_per_gb == pytest.approx(0.07)
    assert "saves 0.07 per GB" in d.reason
    pl = Placement(provs, ReplicationPolicy(copies=2))
    state = make_train_state()
    from resilient_train import save

    save(pl.store("dear"), state, 1)
    led = Ledger(provs)
    copy_checkpoint(pl.store("dear"), pl.store("cheap"), 1, ledger=led)
    n = led.pair_bytes("dear", "cheap")
    assert n > 0
    res = load_replicated(pl, make_train_state(seed=2), 1, ledger=led)
    sizes = {f.path: f.size_bytes for f in res.manifest.files}
    read = sum(sizes[f] for f in res.sources)  # the files the load read (the HF index is not)
    assert set(res.sources.values()) == {"cheap"} and 0 < read <= n
    assert led.bytes("cheap", "read", "recovery") == read and led.bytes("dear", "read", "recovery") == 0
    assert 0 < led.summary()["saved_by_read_order"] == pytest.approx(read / 1e9 * 0.07, abs=1e-6)


def test_redaction_of_log_records():
    remember_secrets({"key": "AKIAUNITTESTKEY00001", "secret": "unit/test/secret/value", "connection_string": "AccountName=x;AccountKey=c2VjcmV0a2V5dmFsdWU=;"})
    line = "headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAUNITTESTKEY00001/x, Signature=abcdef'} key AKIAUNITTESTKEY00001 secret unit/test/secret/value acct c2VjcmV0a2V5dmFsdWU="
    out = redact_log(line)
    for s in ("AKIAUNITTESTKEY00001", "unit/test/secret/value", "c2VjcmV0a2V5dmFsdWU", "abcdef", "AWS4-HMAC"):
        assert s not in out, out
    buf = io.StringIO()
    root = logging.getLogger()
    old = root.level
    try:
        configure_logging(1, stream=buf)
        assert logging.getLogger("resilient_train").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
        logging.getLogger("botocore.endpoint").warning("Sending %s", "Authorization: AWS4 Credential=AKIAUNITTESTKEY00001")
        logging.getLogger("resilient_train.x").info("secret is %s", "unit/test/secret/value")
        text = buf.getvalue()
        assert "Sending" in text and "secret is ***" in text and "AKIAUNITTESTKEY00001" not in text
    finally:
        for h in list(root.handlers):
            if getattr(h, "_resilient_train", False):
                root.removeHandler(h)
        root.setLevel(old)
        logging.getLogger("resilient_train").setLevel(logging.NOTSET)


def test_health_book_notes_missed_copies():
    hb = HealthBook(cooldown_s=5)
    hb.failed("b", 0.0, "down")
    hb.missed("b", 4)
    hb.missed("b", 6)
    assert hb.behind == {"b": [4, 6]} and hb.cause("b") == "down"
    assert hb.snapshot(["b"], 1.0) == {"b": False} and hb.snapshot(["b"], 6.0) == {"b": True}
    hb.caught_up("b", [4])
    assert hb.behind == {"b": [6]}
    hb.caught_up("b")
    assert hb.behind == {}


def test_continue_mode_reports_failures_and_the_limit_names_the_provider(tmp_path):
    down = FaultyStore(LocalStore(str(tmp_path), name="flaky"), down=True)
    events = []
    ck = AsyncCheckpointer(down, on_failure="continue", max_checkpoint_failures=2, options=SaveOptions(max_file_bytes=8192), on_event=lambda e, **f: events.append((e, f)))
    state = make_train_state()
    assert ck.save(1, state)
    assert ck.save(2, state)  # the failure of step 1 is not raised
    ck.wait()
    with pytest.raises(CheckpointPolicyError, match="flaky") as ei:
        ck.save(3, state)
    assert "max_checkpoint_failures=2" in str(ei.value) and "flaky" in ei.value.failures
    assert [e for e, _ in events] == ["checkpoint_failed", "checkpoint_failed"]
    ck.close()  # nothing raised in continue mode


def test_trainer_summary_and_event_log_carry_the_ledger(tmp_path):
    import json

    import torch

    import resilient_train as rt

    provs = [Provider("a", str(tmp_path / "a"), "eu", egress_cost_per_gb=0.05), Provider("b", str(tmp_path / "b"), "eu", egress_cost_per_gb=0.01)]
    pl = Placement(provs, ReplicationPolicy(copies=2))
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = rt.wrap(model, opt, checkpoint=pl, every_n_steps=2, keep_last=2, event_log=str(tmp_path / "ev.jsonl"))
    while trainer.step_count < 6:
        model(torch.randn(3, 16)).sum().backward()
        trainer.step()
        opt.zero_grad()
    trainer.ledger.record_sync("a", "b", 1_000_000)  # what the sync path reports
    trainer.close()
    s = trainer.summary()
    assert s["checkpoints_committed"] == 3 and s["providers_behind"] == {}
    led = s["ledger"]
    assert led["providers"]["a"]["by_purpose"]["checkpoint"]["write_bytes"] > 0
    assert led["pairs"]["a->b"]["by_purpose"]["replication"]["bytes"] > 0
    assert led["pairs"]["a->b"]["by_purpose"]["sync"]["bytes"] == 1_000_000
    kinds = [json.loads(line)["event"] for line in open(tmp_path / "ev.jsonl")]
    assert "ledger" in kinds and kinds.count("bytes") >= 6 and kinds.count("checkpoint_committed") == 3
    from resilient_train.checkpoint.steps import committed_steps

    assert committed_steps(pl.store("b")) == [4, 6]  # copies and retention ran in the background


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_provider_group_sync_path_records_each_rounds_bytes_once(tmp_path):
    """The sync path itself (not a hand call of ``record_sync``): two providers, each a real
    process of examples/provider_train.py (one rank, DiLoCo int8 through a TCP membership
    store). Every round, each leader records what it sent in that round only: the ledger's
    sync bytes per round equal the growth of the provider group's ``bytes_sent``, and the
    pair's total equals the final ``bytes_sent`` (a ledger that re-counted everything sent so
    far every round would grow quadratically)."""
    import json
    import os
    import subprocess
    import sys

    from resilient_train.membership.kvstore import TCPKVStore

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kv = TCPKVStore.host(0)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, os.path.join(root, "examples", "provider_train.py"), "--group", g, "--membership", f"tcp://127.0.0.1:{kv.port}",
                               "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path), "--steps", "40", "--sync-every", "10", "--every", "20", "--start-groups", "2"],
                              env=env, stdout=open(tmp_path / f"log-{g}.txt", "w"), stderr=subprocess.STDOUT) for g in "ab"]
    try:
        assert [p.wait(timeout=360) for p in procs] == [0, 0], [(tmp_path / f"log-{g}.txt").read_text()[-2000:] for g in "ab"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for me, peer in (("a", "b"), ("b", "a")):
        events = [json.loads(line) for line in open(tmp_path / f"events-{me}-rank0.jsonl")]
        sent = [e["bytes_sent"] for e in events if e["event"] == "sync"]
        recorded = [e["bytes"] for e in events if e["event"] == "bytes" and e.get("purpose") == "sync"]
        assert len(sent) == 4 and len(recorded) == 4, (sent, recorded)
        assert recorded == [b - a for a, b in zip([0] + sent, sent)], (recorded, sent)  # one peer: all of it, once
        ledger = [e for e in events if e["event"] == "done"][0]["summary"]["ledger"]
        assert ledger["pairs"][f"{me}->{peer}"]["by_purpose"]["sync"]["bytes"] == sent[-1]
