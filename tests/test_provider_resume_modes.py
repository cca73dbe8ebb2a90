"""Resume in every cross-provider mode the wrapper accepts: two providers (one rank each, run as
threads of this process, membership over an in-process store), AdamW inside, stopped after a
checkpoint and resumed; the result equals the uninterrupted run bit for bit. (The same with
real processes, two ranks per provider, int8 and SIGKILL: tests/test_provider_loss.py.)"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

import resilient_train as rt

pytestmark = pytest.mark.timeout(300)

H, EVERY, STEPS = 4, 8, 20


def _model() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)  # not the global RNG: the providers are threads
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _provider(name, store, ckpt, mode, codec, stop_at, out, events=None):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=ckpt, every_n_steps=EVERY, async_save=False, group=name, membership=store, start_groups=2,
        sync=rt.SyncConfig(mode=mode, sync_every=H, codec=codec), heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0,
        on_event=(lambda e: events.append(dict(e, member=name))) if events is not None else None))
    while trainer.step_count < stop_at:
        g = torch.Generator().manual_seed(1000 * trainer.step_count + ord(name))
        x = torch.randn(8, 6, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        trainer.step()
    out[name] = ({k: v.clone() for k, v in model.state_dict().items()}, trainer.resumed_from)
    trainer.close()


def _run(tmp_path, tag, mode, codec, stop_at, events=None, b_late_s=0.0, store=None):
    store = store or f"memory://{uuid.uuid4().hex}"
    out, errors = {}, {}

    def body(name):
        try:
            if name == "b":
                time.sleep(b_late_s)
            _provider(name, store, str(tmp_path / tag), mode, codec, stop_at, out, events)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc

    threads = [threading.Thread(target=body, args=(n,), daemon=True) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert set(out) == {"a", "b"}, "a provider did not finish"
    return out


# every codec the config accepts (int8 also with real processes, 2 ranks per provider, in
# tests/test_provider_loss.py::test_whole_job_killed_and_relaunched_resumes_bit_for_bit); the
# quantising codecs carry error-feedback residuals that must come back from the checkpoint exactly
@pytest.mark.parametrize("mode,codec", [("diloco", "none"), ("diloco", "bf16"), ("diloco", "int8"), ("diloco", "int4"), ("diloco", "topk"), ("localsgd", "none")])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, mode, codec):
    if codec in ("int8", "int4"):  # build the CPU kernel here, not in two provider threads at once
        from resilient_train.compression import _ext

        _ext.load_cpu(required=False)
    ref = _run(tmp_path, "ref", mode, codec, STEPS)
    _run(tmp_path, "run", mode, codec, 13)              # stops between the checkpoints of steps 8 and 16
    resumed = _run(tmp_path, "run", mode, codec, STEPS)
    for name in "ab":
        assert resumed[name][1] is not None and resumed[name][1] >= 8
        a, b = ref[name][0], resumed[name][0]
        assert all(torch.equal(a[k], b[k]) for k in a), f"{mode}/{codec}: provider {name} differs after resuming"
    assert all(torch.equal(ref["a"][0][k], ref["b"][0][k]) for k in ref["a"][0])  # both hold the global weights


def _unpublish(root, group, step):
    """As a kill just before ``group``'s commit of ``step`` leaves it: the data, no manifest."""
    (root / f"group-{group}" / f"step-{step:010d}" / "manifest.json").unlink()


@pytest.mark.parametrize("b_late_s,same_store", [(0.0, False), (2.5, False), (7.0, True)], ids=["together", "b-later", "b-later-same-store"])
def test_restart_agreement_goes_back_to_the_newest_step_every_group_has(tmp_path, b_late_s, same_store):
    """b's commit of step 16 is missing (the job died between a's and b's commits): at the
    restart both groups agree on step 8, a goes back to it and retires its step 16, and the
    result equals the uninterrupted run bit for bit (without the agreement a would bring the
    global state of step 16 and b the inner state of step 8). Also when b comes up after the
    first view was formed without it (a waits for start_groups in a view of its own), and when
    the membership store still holds the killed run's keys (views, the "started" flag: as an
    etcd would), b coming up after the old members' heartbeat timeout (5 s)."""
    store = f"memory://{uuid.uuid4().hex}" if same_store else None
    ref = _run(tmp_path, "ref", "diloco", "none", STEPS)
    _run(tmp_path, "run", "diloco", "none", 17, store=store)  # checkpoints of steps 8, 16 and (close) 17
    for group, step in (("a", 17), ("b", 17), ("b", 16)):  # killed before close, and before b's commit of 16
        _unpublish(tmp_path / "run", group, step)
    events: list[dict] = []
    resumed = _run(tmp_path, "run", "diloco", "none", STEPS, events, b_late_s=b_late_s, store=store)
    if b_late_s:
        first = next(e for e in events if e["event"] == "joined" and e["member"] == "a")
        assert first["epoch"] > 1, "b was not late enough to miss the first view"
    points = [e for e in events if e["event"] == "restart_point"]
    assert points and all(e["agreed"] == 8 and e["loaded"] == {"a": 16, "b": 8} for e in points), points
    back = [e for e in events if e["event"] == "restart_agreed"]
    assert [(e["member"], e["step"], e["loaded_before"]) for e in back] == [("a", 8, 16)]
    assert (tmp_path / "run" / "group-a" / "step-0000000016" / "rejected-manifest.json").exists()  # retired, then saved again
    for name in "ab":
        a, b = ref[name][0], resumed[name][0]
        assert all(torch.equal(a[k], b[k]) for k in a), f"provider {name} differs after the agreed restart"


def test_restart_without_a_common_step_warns_and_the_newest_state_serves(tmp_path):
    """No step both groups committed (retention or loss took it): the restart goes on from the
    most advanced state with a restart_inconsistent event naming what each group loaded."""
    _run(tmp_path, "run", "diloco", "none", 17)
    for group, step in (("a", 17), ("b", 17), ("b", 16), ("a", 8)):
        _unpublish(tmp_path / "run", group, step)
    events: list[dict] = []
    resumed = _run(tmp_path, "run", "diloco", "none", STEPS, events)
    bad = [e for e in events if e["event"] == "restart_inconsistent"]
    assert bad and bad[0]["loaded"] == {"a": 16, "b": 8}
    assert not [e for e in events if e["event"] == "restart_agreed"]
    assert all(torch.equal(resumed["a"][0][k], resumed["b"][0][k]) for k in resumed["a"][0])  # one global state again


def test_restart_with_a_group_that_has_no_checkpoint_takes_the_peers_state(tmp_path):
    """b lost its whole checkpoint folder (a new provider, or its storage wiped): at the restart
    nothing is agreed (only a has checkpoints), a resumes from its own newest, b starts fresh and
    receives the global state from a; both then hold the same global weights."""
    import shutil

    _run(tmp_path, "run", "diloco", "none", 17)
    shutil.rmtree(tmp_path / "run" / "group-b")
    events: list[dict] = []
    resumed = _run(tmp_path, "run", "diloco", "none", STEPS, events)
    assert not [e for e in events if e["event"] in ("restart_point", "restart_agreed", "restart_inconsistent")]
    assert resumed["a"][1] == 17 and resumed["b"][1] is None
    got = [e for e in events if e["event"] == "joined" and e["member"] == "b"]
    assert got and got[0]["state_from"] == "a" and got[0]["received_bytes"] > 0 and got[0]["step"] == 17
    assert all(torch.equal(resumed["a"][0][k], resumed["b"][0][k]) for k in resumed["a"][0])
