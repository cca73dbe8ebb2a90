"""Progress: tqdm bars for the commands when tqdm is installed, periodic log lines otherwise,
and log lines for saves and loads above the size threshold."""

from __future__ import annotations

import logging
import sys

import pytest

import resilient_train as rt
from resilient_train import progress as progress_mod
from resilient_train.cli import main

from .helpers import make_run, train_steps


def test_log_lines_without_tqdm(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    caplog.set_level(logging.INFO, logger="resilient_train")
    with progress_mod.Progress(4096, "copy x", bar=True, every_s=0.0) as p:
        p(1024)
        p(3072)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pip install 'resilient-train[progress]'" in text
    assert "copy x: 25% (1.0 KiB of 4.0 KiB" in text and "copy x: done, 4.0 KiB" in text


def test_verify_shows_a_bar_and_big_saves_and_loads_log(tmp_path, monkeypatch, caplog, capsys):
    pytest.importorskip("tqdm")
    state = make_run()
    train_steps(state, 1)
    caplog.set_level(logging.INFO, logger="resilient_train")
    monkeypatch.setattr("resilient_train.checkpoint.writer.LOG_MIN_BYTES", 0)
    monkeypatch.setattr("resilient_train.checkpoint.reader.LOG_MIN_BYTES", 0)
    rt.save(str(tmp_path), state, 1)
    rt.load(str(tmp_path), state)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "save step-0000000001 (rank 0): done" in text and "load step-0000000001: done" in text
    capsys.readouterr()
    assert main(["ckpt", "verify", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "verify step-0000000001" in err and "B/s" in err  # tqdm: bytes and rate
