"""`resilient-train ckpt migrate` and `ckpt replicate` against the S3 server."""

from __future__ import annotations

import json

import pytest

from resilient_train import save
from resilient_train.checkpoint import verify_checkpoint
from resilient_train.checkpoint.steps import committed_steps
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.cli import main
from resilient_train.storage import open_store

from .conftest import make_train_state

pytestmark = pytest.mark.timeout(120)


def test_cli_migrate_local_to_s3_resumable_with_progress(make_store, servers, tmp_path, capsys):
    s3 = make_store("s3")  # starts the server
    srv = servers["s3"]
    src = str(tmp_path / "src")
    state = make_train_state()
    for step in (1, 2):
        save(src, state, step, options=SaveOptions(max_file_bytes=8192))
    dst = srv.uri("rt-tests", "cli-dst")
    opts = json.dumps(srv.storage_options)
    assert main(["ckpt", "migrate", src, dst, "--all", "--dst-storage-options", opts]) == 0
    out, err = capsys.readouterr()
    assert "step 1:" in out and "step 2:" in out and "files copied" in out
    assert "B/s" in err or "iB/s" in err  # tqdm: bytes and rate
    assert "testing" not in out  # the secret of the storage options is not echoed
    d = open_store(dst, srv.storage_options)
    assert committed_steps(d) == [1, 2] and verify_checkpoint(d, 2)[1] == []
    assert main(["ckpt", "migrate", src, dst, "--step", "2", "--dst-storage-options", opts, "--no-progress"]) == 0
    assert "already committed" in capsys.readouterr().out
    assert main(["ckpt", "migrate", src, dst, "--step", "9", "--dst-storage-options", opts]) == 3  # not found
    assert "committed steps: [1, 2]" in capsys.readouterr().err
    del s3


def test_cli_replicate_from_config(tmp_path, capsys):
    a, b, us = tmp_path / "a", tmp_path / "b", tmp_path / "us"
    save(str(a), make_train_state(), 3, options=SaveOptions(max_file_bytes=8192))
    cfg = {
        "providers": [
            {"name": "a", "uri": str(a), "region": "eu-west-1"},
            {"name": "us", "uri": str(us), "region": "us-east-1"},
            {"name": "b", "uri": str(b), "region": "eu-central-1", "egress_cost_per_gb": 0.1},
        ],
        "policy": {"copies": 2, "allowed_regions": ["eu-*"]},
    }
    path = tmp_path / "providers.json"
    path.write_text(json.dumps(cfg))
    assert main(["ckpt", "replicate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step 3: committed on a, b" in out and "never written: us" in out
    assert committed_steps(open_store(str(b))) == [3] and not us.exists()
    cfg["policy"]["copies"] = 3
    path.write_text(json.dumps(cfg))
    assert main(["ckpt", "replicate", "--config", str(path)]) == 2
    assert "lower copies" in capsys.readouterr().err


def test_cli_migrate_and_replicate_print_the_ledger(tmp_path, capsys):
    """docs/storage.md, the ledger: `ckpt migrate` / `ckpt replicate` print it."""
    a = tmp_path / "a"
    save(str(a), make_train_state(), 3, options=SaveOptions(max_file_bytes=8192))
    assert main(["ckpt", "migrate", str(a), str(tmp_path / "m"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(migration)" in out and "ledger: total cost" in out, out
    cfg = {"providers": [{"name": "a", "uri": str(a), "region": "eu-west-1", "egress_cost_per_gb": 0.5},
                         {"name": "b", "uri": str(tmp_path / "b"), "region": "eu-west-1"}], "policy": {"copies": 2}}
    (tmp_path / "providers.json").write_text(json.dumps(cfg))
    assert main(["ckpt", "replicate", "--config", str(tmp_path / "providers.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ledger: a->b: " in out and "(replication)" in out and "ledger: total cost" in out, out
