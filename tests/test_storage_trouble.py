"""Storage trouble never stops training, and checkpoint work stays off the training path.

Real servers and real faults: the S3 emulator (moto) behind a TCP proxy that is taken down
mid-run or throttled, gloo ranks with a short collective timeout, a provider that never
answers. See docs/storage.md.
"""

from __future__ import annotations

import time

import pytest
import torch

from resilient_train.storage import RetryPolicy
from resilient_train.testing.proxy import FaultProxy

from .conftest import start_server

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SHORT = RetryPolicy(max_attempts=2, max_total_s=2.0, base_wait_s=0.05, max_wait_s=0.2, call_timeout_s=5.0, breaker_cooldown_s=1.0)


def _s3(servers):
    if "s3" not in servers:
        servers["s3"] = start_server("s3")
    srv = servers["s3"]
    if not srv.filesystem().exists("rt-trouble"):
        srv.create_bucket("rt-trouble")
    return srv


# ---------------------------------------------------------------- staging share


def _stage_share(rank, world, root):
    import torch
    import torch.distributed as dist

    from resilient_train import TrainState
    from resilient_train.checkpoint.async_save import AsyncCheckpointer
    from resilient_train.checkpoint.writer import SaveOptions

    torch.manual_seed(0)  # the same replicated model on both ranks
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(8)])
    state = TrainState(model=model, rng=False)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ck = AsyncCheckpointer(root, process_group=dist.new_group(backend="gloo"), options=SaveOptions(max_file_bytes=16384, io_threads=2))
    ck.save(1, state)
    ck.wait()
    first = ck.staging_bytes
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ck.save(2, state)
    ck.wait()
    second = ck.staging_bytes
    ck.close()
    return first, second, total, model[0].weight.detach().clone()


def test_each_rank_stages_only_its_share(tmp_path):
    from resilient_train import TrainState, load
    from resilient_train.testing.ranks import run_ranks

    outs = run_ranks(_stage_share, 2, str(tmp_path / "ck"), timeout_s=120)
    total = outs[0][2]
    for first, second, _, _ in outs:
        assert first == second == total // 2, (first, second, total)  # 8 equal tensors: 4 per rank
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=False) for _ in range(8)])
    load(str(tmp_path / "ck"), TrainState(model=model, rng=False), 2)
    assert torch.equal(model[0].weight, outs[0][3])  # every piece was written by some rank


# ---------------------------------------------------------------- outage and catch-up


def test_provider_down_mid_run_training_goes_on_and_copies_are_caught_up(tmp_path, servers):
    from resilient_train import TrainState
    from resilient_train.checkpoint.async_save import AsyncCheckpointer
    from resilient_train.checkpoint.steps import committed_steps
    from resilient_train.storage.ledger import Ledger
    from resilient_train.storage.providers import HealthBook, Placement, Provider, ReplicationPolicy

    srv = _s3(servers)
    with FaultProxy(srv.port) as proxy:
        opts = dict(srv.storage_options, endpoint_url=proxy.endpoint)
        provs = [
            Provider("a", str(tmp_path / "a"), "eu-west-1", egress_cost_per_gb=0.09),
            Provider("b", srv.uri("rt-trouble", f"catchup-{time.time_ns()}"), "eu-west-1", egress_cost_per_gb=0.02, storage_options=opts, retry=SHORT),
        ]
        pl = Placement(provs, ReplicationPolicy(copies=2))
        events: list[tuple[str, dict]] = []
        ledger = Ledger(provs)
        ck = AsyncCheckpointer(
            pl, on_failure="continue", keep_last=3, ledger=ledger, on_event=lambda e, **f: events.append((e, f)),
            health_book=HealthBook(cooldown_s=1.0), probe_interval_s=0.3, max_uncommitted_steps=6,
        )
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        state = TrainState(model=model, optimizer=opt, rng=False)
        t_down = t_up = None
        step = 0
        while True:  # ~3 s up, ~10 s down, ~5 s up again
            step += 1
            model(torch.randn(8, 256)).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 16:
                proxy.down()
                t_down = time.monotonic()
            if t_down is not None and t_up is None and time.monotonic() - t_down > 10.0:
                proxy.up()
                t_up, up_step = time.monotonic(), step
            if step % 2 == 0:
                ck.save(step, state)  # never raises for the outage
                if t_up is not None and time.monotonic() - t_up > 5.0:
                    break
            time.sleep(0.15)
        ck.close()
        b_steps = committed_steps(pl.store("b"))
    kinds = [e for e, _ in events]
    assert "replication_degraded" in kinds, kinds
    assert "caught_up" in kinds, kinds
    assert ck.failures == [] and ck.saves_committed == step // 2  # every save committed on a
    a_steps = committed_steps(pl.store("a"))
    assert a_steps == [step - 4, step - 2, step]
    assert b_steps == a_steps
    assert ck.behind == {}
    caught = ledger.bytes("b", "write", "catch_up")
    assert caught > 0, ledger.summary()
    assert ledger.pair_bytes("a", "b", "catch_up") == caught
    summary = ledger.summary()
    assert summary["pairs"]["a->b"]["cost"] > 0 and summary["providers"]["a"]["write_bytes"] > 0
    assert up_step > 16


# ---------------------------------------------------------------- slow copies vs the collective timeout


def _slow_copy(rank, world, root, bucket_uri, opts):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from resilient_train import TrainState
    from resilient_train.checkpoint.async_save import AsyncCheckpointer
    from resilient_train.storage import RetryPolicy
    from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB: ~4 s through a 1 MB/s link
    state = TrainState(model=model, rng=False)
    slow_retry = RetryPolicy(max_attempts=2, max_total_s=60, call_timeout_s=60)
    pl = Placement([Provider("fast", f"{root}/fast", "eu-west-1"), Provider("slow", bucket_uri, "eu-west-1", storage_options=opts, retry=slow_retry)], ReplicationPolicy(copies=2))
    ck = AsyncCheckpointer(pl, process_group=group, copy_timeout_s=120)
    t0 = time.monotonic()
    stalls = []
    for step in (1, 2):
        ck.save(step, state)
        stalls.append(time.monotonic() - t0)
        time.sleep(1.0)  # "training" between saves, shorter than the copy
        t0 = time.monotonic()
    ck.close()  # raises on rank 0 if a copy failed
    copy_s = [r.copies["slow"].seconds for r in ck.worker.reports if "slow" in r.copies] if ck.worker else []
    return {"copy_s": copy_s, "committed": ck.saves_committed, "stalls": stalls}


def test_copy_longer_than_collective_timeout_fails_no_rank(tmp_path, servers):
    from resilient_train.checkpoint.steps import committed_steps
    from resilient_train.storage import open_store
    from resilient_train.testing.ranks import run_ranks

    srv = _s3(servers)
    with FaultProxy(srv.port, bytes_per_s=1_000_000) as proxy:
        uri = srv.uri("rt-trouble", f"slow-{time.time_ns()}")
        opts = dict(srv.storage_options, endpoint_url=proxy.endpoint)
        outs = run_ranks(_slow_copy, 2, str(tmp_path), uri, opts, timeout_s=180)
    assert [o["committed"] for o in outs] == [2, 2]
    assert outs[0]["copy_s"] and max(outs[0]["copy_s"]) > 3.0, outs[0]  # the copy did outlast the 3 s timeout
    assert outs[1]["copy_s"] == []  # rank 1 never copies
    assert committed_steps(open_store(str(tmp_path / "fast"))) == [1, 2]
    assert committed_steps(open_store(uri, srv.storage_options)) == [1, 2]


# ---------------------------------------------------------------- storage down for good


@pytest.mark.parametrize("limit", ["max_uncommitted_steps", "max_checkpoint_failures"])
def test_limit_stops_the_run_when_storage_is_down_for_good(tmp_path, limit, servers):
    import json

    import resilient_train as rt
    from resilient_train.errors import CheckpointPolicyError
    from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy

    srv = _s3(servers)
    proxy = FaultProxy(srv.port).start()
    # the store answers at start (an unreachable store at resume is an error, never "no
    # checkpoint"), then goes down for good before the first save
    dead = dict(srv.storage_options, endpoint_url=proxy.endpoint)
    pl = Placement([Provider("dead-s3", srv.uri("nowhere", f"run-{time.time_ns()}"), "eu-west-1", storage_options=dead, retry=SHORT)], ReplicationPolicy(copies=1))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = {"max_uncommitted_steps": 5} if limit == "max_uncommitted_steps" else {"max_checkpoint_failures": 3}
    if not srv.filesystem().exists("nowhere"):
        srv.create_bucket("nowhere")
    trainer = rt.wrap(model, opt, checkpoint=pl, every_n_steps=2, event_log=str(tmp_path / "ev.jsonl"), **kw)
    proxy.down()
    with pytest.raises(CheckpointPolicyError) as ei:
        while trainer.step_count < 40:
            model(torch.randn(3, 4)).sum().backward()
            trainer.step()
            opt.zero_grad()
    msg = str(ei.value)
    assert "dead-s3" in msg and limit in msg and ("StoreUnavailableError" in msg or "StoreTransientError" in msg), msg
    assert "dead-s3" in ei.value.failures
    # max_uncommitted_steps=5: saves at 2 and 4 failed, the save at 6 would leave 6 > 5 steps uncommitted.
    # max_checkpoint_failures=3: saves at 2, 4 and 6 failed; the save at 8 stops.
    assert trainer.step_count == (6 if limit == "max_uncommitted_steps" else 8), trainer.step_count
    kinds = [json.loads(line)["event"] for line in open(tmp_path / "ev.jsonl")]
    assert kinds.count("checkpoint_failed") >= 2
    trainer.close(save=False)
    proxy.stop()
