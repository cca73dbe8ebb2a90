"""The drop-in wrapper: in-process use, bad configuration, and real torchrun launches with a
worker SIGKILLed (torchrun restarts, the wrapper resumes by itself) and a world-size change."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import resilient_train as rt
from resilient_train import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_elastic.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(nproc: int, *args: str, restarts: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", SCRIPT, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "model-0*.safetensors"))):
        out.update(load_file(f))
    return out


def events(log_dir: str, rank: int = 0) -> list[dict]:
    with open(os.path.join(log_dir, f"events-rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_in_process_wrap_resumes(tmp_path):
    def run(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = rt.wrap(model, opt, checkpoint=str(tmp_path / "ck"), every_n_steps=5, event_log=str(tmp_path / "ev.jsonl"))
        g = torch.Generator().manual_seed(trainer.step_count)
        while trainer.step_count < steps:
            model(torch.randn(3, 4, generator=g)).sum().backward()
            trainer.step()
            opt.zero_grad()
        trainer.close()
        return trainer, model

    first, _ = run(12)
    assert first.resumed_from is None and first.step_count == 12
    second, model = run(17)
    assert second.resumed_from == 12 and second.step_count == 17  # close() saved step 12
    kinds = [json.loads(line)["event"] for line in open(tmp_path / "ev.jsonl")]
    assert kinds.count("checkpoint_committed") == 5 and "resume" in kinds  # 5, 10, 12 (close); 15, 17 (close)


def test_bad_configuration_fails_at_start(tmp_path, monkeypatch):
    model, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(errors.ConfigError, match="checkpoint is required"):
        rt.TrainerConfig()
    # a keyword that is not a field: ConfigError naming it (the closest field, or what replaced a retired one)
    with pytest.raises(errors.ConfigError, match="unknown TrainerConfig field 'replica_groups': .*one torchrun per provider"):
        rt.TrainerConfig(checkpoint="x", replica_groups=1)
    with pytest.raises(errors.ConfigError, match="unknown TrainerConfig field 'every_n_step'; did you mean 'every_n_steps'"):
        rt.TrainerConfig(checkpoint="x", every_n_step=10)
    with pytest.raises(errors.ConfigError, match="unknown SyncConfig field 'sync_evry'; did you mean 'sync_every'"):
        rt.SyncConfig(mode="diloco", sync_evry=5)
    assert "replica_groups" not in repr(rt.TrainerConfig(checkpoint="x"))
    with pytest.raises(errors.ConfigError, match="unknown"):
        rt.SyncConfig(mode="gossip")
    with pytest.raises(errors.ConfigError, match="'localsgd' averages the parameters uncompressed, so codec must be 'none'"):
        rt.SyncConfig(mode="localsgd", codec="int4")  # was accepted and the codec silently ignored
    with pytest.raises(errors.ConfigError, match="'ddp' all-reduces the gradients every step"):
        rt.SyncConfig(mode="ddp", fragments=2)
    with pytest.raises(errors.ConfigError, match="multiple of sync.sync_every"):
        rt.TrainerConfig(checkpoint="x", every_n_steps=7, sync=rt.SyncConfig(mode="diloco", sync_every=5))
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(errors.ConfigError, match="group and membership go together"):
        rt.TrainerConfig(checkpoint="x", group="a", sync=rt.SyncConfig(mode="diloco", sync_every=5), every_n_steps=10)
    with pytest.raises(errors.ConfigError, match="choose sync mode 'diloco' or 'localsgd'"):
        rt.TrainerConfig(checkpoint="x", group="a", membership="tcp://127.0.0.1:1")
    with pytest.raises(errors.ConfigError, match="overlap_steps"):
        rt.TrainerConfig(checkpoint="x", group="a", membership="tcp://127.0.0.1:1", every_n_steps=8, sync=rt.SyncConfig(mode="diloco", sync_every=4, fragments=2, overlap_steps=2))  # rounds would overlap: 2 >= 4 // 2
    with pytest.raises(errors.ConfigError, match="provider name without '/'"):
        rt.TrainerConfig(checkpoint="x", group="a/b", membership="tcp://127.0.0.1:1", every_n_steps=10, sync=rt.SyncConfig(mode="diloco", sync_every=5))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(errors.ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT"):
        rt.wrap(model, opt, checkpoint=str(tmp_path))


@pytest.mark.slow
def test_torchrun_restart_after_sigkill_resumes_bit_for_bit(tmp_path):
    common = ["--steps", "30", "--every", "10", "--sync-save"]
    torchrun(2, "--ckpt", str(tmp_path / "ref"), *common)
    logs = tmp_path / "logs"
    logs.mkdir()
    out = torchrun(2, "--ckpt", str(tmp_path / "run"), "--log-dir", str(logs), "--kill-at", "25", "--kill-rank", "1", *common)
    done = json.loads(out.stdout.strip().splitlines()[-1])
    assert done == {**done, "event": "done", "step": 30, "resumed_from": 20, "world": 2}
    ev = events(str(logs))
    assert [e["step"] for e in ev if e["event"] == "resume"] == [20]
    ref, run = weights(str(tmp_path / "ref" / "step-0000000030")), weights(str(tmp_path / "run" / "step-0000000030"))
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)


@pytest.mark.slow
def test_resume_on_more_ranks_sees_every_sample_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ck = str(tmp_path / "ck")
    torchrun(2, "--ckpt", ck, "--steps", "30", "--every", "10", "--sync-save", "--log-dir", str(a))
    out = torchrun(3, "--ckpt", ck, "--steps", "50", "--every", "10", "--sync-save", "--log-dir", str(b))
    done = json.loads(out.stdout.strip().splitlines()[-1])
    assert done["resumed_from"] == 30 and done["world"] == 3
    seen = []
    for folder in (a, b):
        for path in glob.glob(str(folder / "steps-rank*-attempt0.jsonl")):
            for line in open(path):
                rec = json.loads(line)
                if rec["epoch"] == 0:
                    seen += rec["ids"]
    assert len(seen) == 960 and sorted(seen) == list(range(960)), "samples lost or repeated across the world-size change"
