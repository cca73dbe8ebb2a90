"""Resume in every cross-provider mode the wrapper accepts: two providers (one rank each, run as
threads of this process, membership over an in-process store), AdamW inside, stopped after a
checkpoint and resumed; the result equals the uninterrupted run bit for bit. (The same with
real processes, two ranks per provider, int8 and SIGKILL: tests/test_provider_loss.py.)"""

from __future__ import annotations

import threading
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


def _provider(name, store, ckpt, mode, codec, stop_at, out):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=ckpt, every_n_steps=EVERY, async_save=False, group=name, membership=store, start_groups=2,
        sync=rt.SyncConfig(mode=mode, sync_every=H, codec=codec), heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0))
    while trainer.step_count < stop_at:
        g = torch.Generator().manual_seed(1000 * trainer.step_count + ord(name))
        x = torch.randn(8, 6, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        trainer.step()
    out[name] = ({k: v.clone() for k, v in model.state_dict().items()}, trainer.resumed_from)
    trainer.close()


def _run(tmp_path, tag, mode, codec, stop_at):
    store = f"memory://{uuid.uuid4().hex}"
    out, errors = {}, {}

    def body(name):
        try:
            _provider(name, store, str(tmp_path / tag), mode, codec, stop_at, out)
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
