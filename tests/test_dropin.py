"""The wrapper meets a torchrun script as people write it (own init_process_group, DDP,
DistributedSampler, epoch loop): the conversion is small, and the converted script survives a
SIGKILL and a torchrun restart with the same final weights as an uninterrupted run."""

from __future__ import annotations

import ast
import difflib
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import resilient_train as rt
from resilient_train import errors
from resilient_train.data import ResumableSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = os.path.join(ROOT, "examples", "plain_ddp.py")
CONVERTED = os.path.join(ROOT, "examples", "plain_ddp_resilient.py")
HARNESS = os.path.join(ROOT, "tests", "torchrun_harness.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def code_lines(path: str) -> list[str]:
    """The script's lines after its module docstring, without blank lines."""
    text = open(path).read()
    body = ast.parse(text).body
    skip = body[0].end_lineno if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else 0
    return [line for line in text.splitlines()[skip:] if line.strip()]


def changed_lines(a: list[str], b: list[str]) -> int:
    n = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            n += max(i2 - i1, j2 - j1)
    return n


def test_conversion_changes_at_most_six_lines():
    a, b = code_lines(PLAIN), code_lines(CONVERTED)
    n = changed_lines(a, b)
    diff = "\n".join(difflib.unified_diff(a, b, lineterm="", n=0))
    assert 1 <= n <= 6, f"converting plain_ddp.py takes {n} changed lines:\n{diff}"
    assert any("dist.init_process_group" in line for line in b), "the converted script keeps its own init_process_group"


def torchrun(script_args: list[str], cwd: str, env_extra: dict, timeout: int = 150) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=1", HARNESS, CONVERTED, *script_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env_extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "model-0*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_converted_script_survives_sigkill_bit_for_bit(tmp_path):
    """256 samples, 2 ranks, batch 8: 16 steps an epoch, 3 epochs = 48 steps; checkpoints every
    10 steps; rank 1 is killed at step 25 (mid-epoch 1). The script keeps its own
    init_process_group, DDP and DistributedSampler."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    torchrun(["--epochs", "3"], str(ref), {"RT_REPORT_DIR": str(ref)})
    torchrun(["--epochs", "3"], str(run), {"RT_REPORT_DIR": str(run), "RT_KILL_AT": "25", "RT_KILL_RANK": "1"})
    steps = lambda d: sorted(os.path.basename(p) for p in glob.glob(str(d / "ckpts" / "step-*")))  # noqa: E731
    assert steps(ref)[-1] == steps(run)[-1] == "step-0000000048", "close() saves the final step; no epoch is replayed"
    report = json.loads((run / "report-rank0-attempt1.json").read_text())
    # Checkpoints are asynchronous: step 20's may still be in flight at the kill.
    assert report["resumed_from"] in (10, 20) and report == {"steps_run": 48 - report["resumed_from"], "resumed_from": report["resumed_from"], "step": 48, "world": 2}, report
    assert not (run / "report-rank0-attempt0.json").exists()
    a, b = weights(str(ref / "ckpts" / "step-0000000048")), weights(str(run / "ckpts" / "step-0000000048"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_sampler_converted_in_place_same_order(world_of_one, tmp_path):
    data = torch.utils.data.TensorDataset(torch.arange(21.0))
    original = torch.utils.data.DistributedSampler(data, shuffle=True, seed=5, drop_last=False)
    original.set_epoch(2)
    expected = list(original)
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=5, drop_last=False)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = rt.wrap(model, opt, checkpoint=str(tmp_path / "ck"), sampler=sampler)
    assert isinstance(sampler, ResumableSampler) and trainer.sampler is sampler
    sampler.set_epoch(2)
    assert [int(v) for (xb,) in loader for v in xb] == expected
    assert trainer.start_epoch == 3, "epoch 2 was used up: a resumed loop starts at 3"
    trainer.close(save=False)


def test_refused_at_wrap_time_not_at_the_first_checkpoint(world_of_one, tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(errors.ConfigError, match="state_dict"):
        rt.wrap(model, opt, checkpoint=str(tmp_path), sampler=torch.utils.data.RandomSampler(range(10)))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(errors.ConfigError, match="one torchrun per provider"):  # several providers: group=, not replica_groups
        rt.wrap(ddp, opt, checkpoint=str(tmp_path), replica_groups=2, every_n_steps=10, sync=rt.SyncConfig(mode="diloco", sync_every=5))


def test_ddp_model_is_not_wrapped_twice_and_close_saves_final_step(world_of_one, tmp_path):
    def run(steps, **close_kw):
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        trainer = rt.wrap(ddp, opt, checkpoint=str(tmp_path / "ck"), every_n_steps=5)
        assert trainer.model is ddp and trainer.module is ddp.module
        for epoch in trainer.epochs(steps):  # one step an epoch
            ddp(torch.ones(3, 4)).sum().backward()
            trainer.step()
            opt.zero_grad()
        trainer.close(**close_kw)
        return trainer

    assert run(7).step_count == 7
    assert sorted(os.listdir(tmp_path / "ck"))[-1] == "step-0000000007"
    second = run(9, save=False)
    assert second.resumed_from == 7 and second.step_count == 9
    assert sorted(os.listdir(tmp_path / "ck"))[-1] == "step-0000000007"


def test_restart_safety_decision():
    from resilient_train.adapt import restart_safety_problem

    class StoreWithoutListing:  # torch builds whose stores cannot list keys
        def list_keys(self):
            raise NotImplementedError("list_keys")

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    assert "cannot list its keys" in restart_safety_problem(StoreWithoutListing(), shared)
    assert restart_safety_problem(StoreWithoutListing(), {**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_safety_problem(StoreWithoutListing(), {**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_safety_problem(dist.HashStore(), shared) is None


def test_store_prefix_names_the_attempt_only_in_the_agents_shared_store():
    """Agents of one elastic job (--nnodes) count restarts separately: workers whose agents
    disagree on the count meet in a store of their own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    from resilient_train.trainer.setup import store_prefix

    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert store_prefix(shared) == "resilient_train/attempt-2"
    own = [{"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RESTART_COUNT": n} for n in ("0", "1")]
    assert store_prefix(own[0]) == store_prefix(own[1]) == store_prefix({}) == "resilient_train"
    # the job's id is in the prefix: a worker that reaches another job's store (two agents can
    # pick the same free port) does not take a rank in that job
    jobs = [dict(own[0], TORCHELASTIC_RUN_ID=r) for r in ("job-a", "job-b")]
    assert store_prefix(jobs[0]) == "resilient_train/job-a" != store_prefix(jobs[1])
    assert store_prefix(dict(shared, TORCHELASTIC_RUN_ID="job-a")) == "resilient_train/job-a/attempt-2"
