"""The event log: fsspec URLs (buffered, flushed at checkpoints and close), callables, the
on_event metrics hook, and sinks that fail without stopping training."""

from __future__ import annotations

import json
import logging
import os
import sys

import fsspec
import pytest
import torch

import resilient_train as rt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_url_log_is_written_through_fsspec_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"memory://rt-events/{os.getpid()}/events-{{rank}}.jsonl"
    path = url.replace("{rank}", "0")
    fs = fsspec.filesystem("memory")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = rt.wrap(model, opt, checkpoint=str(tmp_path / "ck"), every_n_steps=5, async_save=False, event_log=url)
    for _ in range(6):
        model(torch.ones(3, 4)).sum().backward()
        trainer.step()
        opt.zero_grad()
    if trainer.events._flusher is not None:
        trainer.events._flusher.join(10)
    mid = [json.loads(line)["event"] for line in fs.cat(path).decode().splitlines()]
    assert "checkpoint_committed" in mid, "flushed at the checkpoint, before close"
    trainer.close()
    final = [json.loads(line) for line in fs.cat(path).decode().splitlines()]
    assert final[-1]["event"] == "close" and final[-1]["rank"] == 0
    assert not any(p.startswith("memory") for p in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_callable_log_and_on_event_metrics_hook(tmp_path):
    log_calls, metrics = [], []
    model = torch.nn.Linear(2, 1)
    trainer = rt.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint=str(tmp_path / "ck"), every_n_steps=5, event_log=log_calls.append, on_event=metrics.append)
    trainer.close()
    assert [e["event"] for e in log_calls] == [e["event"] for e in metrics] and metrics[0]["event"] == "no_checkpoint"
    assert metrics[-1]["event"] == "close" and all("t" in e for e in metrics)


def test_failing_sinks_warn_once_and_training_goes_on(tmp_path, caplog):
    calls = []

    def broken(event):
        calls.append(event["event"])
        raise RuntimeError("metrics backend down")

    caplog.set_level(logging.WARNING, logger="resilient_train")
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = rt.wrap(model, opt, checkpoint=str(tmp_path / "ck"), every_n_steps=5, async_save=False, on_event=broken, event_log="nosuchscheme://bucket/events.jsonl")
    for _ in range(11):
        model(torch.ones(3, 4)).sum().backward()
        trainer.step()
        opt.zero_grad()
    trainer.close()
    assert trainer.step_count == 11 and "checkpoint_committed" in calls and calls[-1] == "close"
    warnings = [r.getMessage() for r in caplog.records if "event sink" in r.getMessage()]
    assert len([w for w in warnings if "on_event" in w]) == 1, warnings
    assert len([w for w in warnings if "nosuchscheme" in w]) == 1, warnings


def test_tensorboard_example(tmp_path):
    pytest.importorskip("tensorboard")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import tensorboard_events
    finally:
        sys.path.pop(0)
    assert tensorboard_events.main(["--ckpt", str(tmp_path / "ck"), "--logdir", str(tmp_path / "tb"), "--steps", "20"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "checkpoint_started/stall_s" in tags, tags
