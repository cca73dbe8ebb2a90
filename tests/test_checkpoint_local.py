"""Single-process save/load: round trips, bit-for-bit resume, retention, faults, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

import resilient_train as rt
from resilient_train import errors
from resilient_train.checkpoint.steps import committed_steps, latest_step
from resilient_train.storage import open_store

from .helpers import TinyNet, assert_same_state, full_state, make_run, train_steps
from .test_integrity_load import set_digests


def _params(state) -> dict:
    """Every part of the state a failed load must leave alone (model, optimizer, scheduler,
    sampler, extras, RNG)."""
    return full_state(state)


def test_resume_is_bit_for_bit(tmp_path):
    reference = make_run()
    ref_losses = train_steps(reference, 20)

    first = make_run()
    losses = train_steps(first, 11)
    rt.save(str(tmp_path), first, 11)

    resumed = make_run(seed=999)  # different init: everything must come from the checkpoint
    torch.manual_seed(4242)  # and the RNG too
    result = rt.load(str(tmp_path), resumed)
    assert result.step == 11
    losses += train_steps(resumed, 9)
    assert losses == ref_losses
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.sampler.state_dict() == reference.sampler.state_dict()
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.extra == reference.extra
    ref_opt, res_opt = reference.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert ref_opt["param_groups"] == res_opt["param_groups"]
    for i, st in ref_opt["state"].items():
        for name, v in st.items():
            assert torch.equal(v, res_opt["state"][i][name])


def test_model_files_are_plain_huggingface_safetensors(tmp_path):
    state = make_run()
    train_steps(state, 1)
    rt.save(str(tmp_path), state, 1, options=rt.checkpoint.SaveOptions(max_file_bytes=300))
    folder = tmp_path / "step-0000000001"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    loaded = {}
    for f in files:
        loaded.update(safetensors.torch.load_file(folder / f))
    assert set(loaded) == set(index["weight_map"]) == set(state.model.state_dict())
    for k, v in state.model.state_dict().items():
        assert torch.equal(loaded[k], v)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.model.state_dict().values())
    opt = {}
    for f in sorted(folder.glob("optimizer-*.safetensors")):
        opt.update(safetensors.torch.load_file(f))
    assert "state/fc1.weight/exp_avg" in opt


def test_latest_is_highest_valid_manifest_and_retention(tmp_path):
    state = make_run()
    mgr = rt.CheckpointManager(str(tmp_path), every_n_steps=2, keep_last=2)
    saved = [s for s in range(1, 9) if mgr.maybe_save(s, state)]
    assert saved == [2, 4, 6, 8]
    assert mgr.steps() == [6, 8]
    # An uncommitted leftover below the newest is removed; a broken manifest is not "latest".
    (tmp_path / "step-0000000007").mkdir()
    (tmp_path / "step-0000000007" / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    (tmp_path / "step-0000000009").mkdir()
    (tmp_path / "step-0000000009" / "manifest.json").write_text("{not json")
    assert latest_step(open_store(str(tmp_path))) == 8
    mgr.save(10, state)
    assert not (tmp_path / "step-0000000007").exists()
    assert mgr.steps() == [8, 10]


def test_a_failed_retention_does_not_fail_the_committed_save(tmp_path, caplog):
    """The provider stops answering the listing of the checkpoint root (what retention reads)
    after the checkpoint is committed: save returns (warning, nothing deleted), and the next
    save's retention catches up."""
    from resilient_train.storage import LocalStore, RetryingStore, RetryPolicy

    class RootListingDown(LocalStore):
        down = True

        def list(self, path=""):
            if self.down and path in ("", "."):
                raise ConnectionResetError(104, "injected connection reset during list ''")
            return super().list(path)

    state = make_run()
    inner = RootListingDown(str(tmp_path))
    store = RetryingStore(inner, RetryPolicy(max_attempts=2, max_total_s=0.5, base_wait_s=0.01, max_wait_s=0.02, breaker_cooldown_s=0))
    mgr = rt.CheckpointManager(store, every_n_steps=1, keep_last=1)
    with caplog.at_level("WARNING", logger="resilient_train"):
        for step in (1, 2):
            assert mgr.save(step, state).step == step
    assert "retention failed" in caplog.text
    assert sorted(p.parent.name for p in tmp_path.glob("step-*/manifest.json")) == ["step-0000000001", "step-0000000002"]
    inner.down = False
    mgr.save(3, state)
    assert sorted(p.parent.name for p in tmp_path.glob("step-*/manifest.json")) == ["step-0000000003"]


def test_retention_plan_never_drops_newest():
    from resilient_train.checkpoint import retention_plan

    assert retention_plan({1: True, 2: True, 3: False, 4: True, 5: False}, 1) == [1, 2, 3]
    assert retention_plan({1: False, 2: False}, 1) == []
    assert retention_plan({3: True}, 1) == []


def test_manager_validates_config(tmp_path):
    with pytest.raises(errors.ConfigError, match="every_n_steps"):
        rt.CheckpointManager(str(tmp_path), every_n_steps=0)
    with pytest.raises(ValueError, match="keep_last"):
        rt.CheckpointManager(str(tmp_path), every_n_steps=1, keep_last=0)


def test_refuses_to_overwrite_committed_step(tmp_path):
    first = make_run()
    rt.save(str(tmp_path), first, 5)
    second = make_run(seed=1)  # a different state: the refused save must not leave any of it
    train_steps(second, 2)
    with pytest.raises(errors.CheckpointWriteError, match="already committed"):
        rt.save(str(tmp_path), second, 5)
    loaded = make_run(seed=2)
    rt.load(str(tmp_path), loaded)
    for k, v in first.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.extra == first.extra and loaded.sampler.state_dict() == first.sampler.state_dict()


def test_memory_store_round_trip():
    state = make_run()
    train_steps(state, 3)
    rt.save("memory://rt-test/run", state, 3)
    other = make_run(seed=5)
    rt.load("memory://rt-test/run", other)
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k])


# ------------------------------------------------------------------ faults and bad input


def _saved(tmp_path, step=1):
    state = make_run()
    train_steps(state, 2)
    rt.save(str(tmp_path), state, step)
    return tmp_path / f"step-{step:010d}"


def _assert_untouched(fresh, before):
    assert_same_state(before, full_state(fresh))


@pytest.mark.parametrize("victim", ["model-00001-of-00001.safetensors", "optimizer-00001-of-00001.safetensors"])
def test_flipped_byte_is_detected_before_anything_changes(tmp_path, victim):
    folder = _saved(tmp_path)
    path = folder / victim
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = make_run(seed=3)
    before = _params(fresh)
    with pytest.raises(errors.HashMismatchError, match=victim):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)
    _, problems = rt.verify_checkpoint(str(tmp_path))
    assert len(problems) == 1 and victim in problems[0]


def test_truncated_and_missing_files(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "model-00001-of-00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    fresh = make_run(seed=3)
    before = _params(fresh)
    # a size mismatch is a HashMismatchError (TruncatedFileError is its former name, one class)
    assert errors.TruncatedFileError is errors.HashMismatchError
    with pytest.raises(errors.HashMismatchError, match="model-00001.* is shorter than"):
        rt.load(str(tmp_path), fresh)
    path.unlink()
    with pytest.raises(errors.CorruptCheckpointError, match="model-00001"):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)


def _rewrite_manifest(folder, mutate):
    m = json.loads((folder / "manifest.json").read_text())
    mutate(m)
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda m: m.update(format_version=4), errors.UnsupportedFormatVersionError, "version 4"),
        (lambda m: m["hash"].update(algorithm="md5"), errors.UnsupportedFormatVersionError, "algorithm 'md5'"),
        (lambda m: m["files"][0].update(path="../../etc/passwd"), errors.UnsafePathError, "leave"),
        (lambda m: m["files"][0].update(path="/abs/file.safetensors"), errors.UnsafePathError, "leave"),
        (lambda m: m["tensors"][0].update(file="../x.safetensors"), errors.UnsafePathError, "leave"),
        (lambda m: m.pop("tensors"), errors.ManifestError, "tensors"),
        (lambda m: m["files"][0].update(digest="zz"), errors.ManifestError, "digest"),
        (lambda m: m["files"][0]["chunks"].append("0" * 64), errors.ManifestError, "chunks"),
        (lambda m: m["tensors"][0].update(offsets=[5] * len(m["tensors"][0]["offsets"]) or [5]), errors.ManifestError, "offsets|exceeds"),
    ],
)
def test_malicious_or_malformed_manifest(tmp_path, mutate, error, match):
    folder = _saved(tmp_path)
    _rewrite_manifest(folder, mutate)
    fresh = make_run(seed=3)
    before = _params(fresh)
    with pytest.raises(error, match=match):
        rt.load(str(tmp_path), fresh, step=1)
    _assert_untouched(fresh, before)


def test_manifest_not_json_is_not_latest_and_named(tmp_path):
    folder = _saved(tmp_path)
    (folder / "manifest.json").write_bytes(b"\x00garbage")
    with pytest.raises(errors.ManifestError, match="not valid JSON"):
        rt.load(str(tmp_path), make_run(), step=1)
    with pytest.raises(errors.CheckpointNotFoundError):
        rt.load(str(tmp_path), make_run())


def _patch_header(folder, fname, header_bytes: bytes):
    """Replace a safetensors header and fix the manifest's hash, as an attacker would."""
    import hashlib
    import struct

    path = folder / fname
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    new = struct.pack("<Q", len(header_bytes)) + header_bytes + data[8 + n:]
    path.write_bytes(new)

    def fix(m):
        for f in m["files"]:
            if f["path"] == fname:
                f["size_bytes"] = len(new)
                set_digests(m, f, new)

    _rewrite_manifest(folder, fix)


def test_safetensors_header_lies_about_offsets(tmp_path):
    folder = _saved(tmp_path)
    fname = "model-00001-of-00001.safetensors"
    header = json.loads((folder / fname).read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4
    fresh = make_run(seed=3)
    before = _params(fresh)
    _patch_header(folder, fname, json.dumps(header).encode())
    with pytest.raises(errors.SafetensorsHeaderError, match="data_offsets|bytes do not hold"):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)


def test_oversized_header_refused_without_reading_it(tmp_path):
    import struct

    from resilient_train.format import parse_header

    with pytest.raises(errors.SafetensorsHeaderError, match="exceeds"):
        parse_header(struct.pack("<Q", 2**40) + b"{}", 2**41)
    with pytest.raises(errors.SafetensorsHeaderError, match="claims"):
        parse_header(struct.pack("<Q", 1000) + b"{}", 100)
    with pytest.raises(errors.SafetensorsHeaderError, match="dtype"):
        body = b'{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}'
        parse_header(struct.pack("<Q", len(body)) + body, 8 + len(body) + 4)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "dtype"])
def test_state_mismatch_detected_before_change(tmp_path, change):
    _saved(tmp_path)
    fresh = make_run(seed=3)
    if change == "missing":
        fresh.model.register_buffer("new_buf", torch.zeros(3))
    elif change == "extra":
        del fresh.model.calls
    elif change == "shape":
        fresh.model.fc2 = torch.nn.Linear(16, 5)
        fresh.optimizer = None
        fresh.scheduler = None
    elif change == "dtype":
        fresh.model.fc1.double()
    before = _params(fresh)
    with pytest.raises(errors.StateMismatchError, match={"missing": "new_buf: missing", "extra": "calls: in the checkpoint", "shape": "fc2", "dtype": "dtype"}[change]):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)


def test_unstorable_state_is_a_config_error(tmp_path):
    state = make_run()
    state.extra["fn"] = lambda: 1
    with pytest.raises(TypeError, match="extra.fn"):
        rt.save(str(tmp_path), state, 1)
    assert committed_steps(open_store(str(tmp_path))) == []


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    rt.load(str(tmp_path), make_run(seed=3))
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in folder.iterdir())


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    import resilient_train as rt
    from resilient_train.format import safetensors_io
    root = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    state = rt.TrainState(model=model, rng=False)
    rt.save(root, state, 1)
    with torch.no_grad():
        model.weight.add_(1.0)
    real = safetensors_io._write_all
    calls = [0]
    def dying(f, data):
        calls[0] += 1
        real(f, data)
        if calls[0] == 2:  # header and first tensor chunk are on disk, then the process dies
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    safetensors_io._write_all = dying
    rt.save(root, state, 2)
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], timeout=120, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "step-0000000002").exists()  # the partial save left files...
    assert not (tmp_path / "step-0000000002" / "manifest.json").exists()
    assert committed_steps(open_store(str(tmp_path))) == [1]  # ...but it is invisible
    model = torch.nn.Linear(256, 256)
    result = rt.load(str(tmp_path), rt.TrainState(model=model, rng=False))
    assert result.step == 1
    torch.manual_seed(0)
    assert torch.equal(model.weight, torch.nn.Linear(256, 256).weight)
    # A new save of the same step clears the leftovers and commits.
    rt.save(str(tmp_path), rt.TrainState(model=model, rng=False), 2)
    assert committed_steps(open_store(str(tmp_path))) == [1, 2]


def test_tied_weights_and_odd_dtypes(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("bf16", torch.randn(3, dtype=torch.bfloat16))
            self.register_buffer("empty", torch.zeros(0, 3))

    a, b = Tied(), Tied()
    rt.save(str(tmp_path), rt.TrainState(model=a), 1)
    rt.load(str(tmp_path), rt.TrainState(model=b))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert b.out.weight.data_ptr() == b.emb.weight.data_ptr()


def test_every_file_is_fsynced_before_the_manifest_commits(tmp_path, monkeypatch):
    """The commit rule (docs/format.md): every file the manifest names is durable (fsynced)
    before the manifest is created; a crash before it leaves an uncommitted folder, never a
    manifest naming bytes the disk may not have."""
    from resilient_train.checkpoint.writer import SaveOptions
    from resilient_train.storage.local import LocalStore

    order: list[str] = []
    real_fsync, real_commit = os.fsync, LocalStore.write_bytes_exclusive

    def fsync(fd):
        real_fsync(fd)
        order.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))

    def commit(self, path, data):
        order.append("commit " + path)
        return real_commit(self, path, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(LocalStore, "write_bytes_exclusive", commit)
    state = make_run()
    train_steps(state, 2)
    rt.save(str(tmp_path), state, 2, options=SaveOptions(max_file_bytes=4096))
    manifest = json.loads((tmp_path / "step-0000000002" / "manifest.json").read_bytes())
    named = {f["path"] for f in manifest["files"]}
    assert sum(n.endswith(".safetensors") for n in named) >= 2, named  # model and optimizer files
    at = next(i for i, e in enumerate(order) if e.startswith("commit") and e.endswith("manifest.json"))
    synced = {os.path.basename(e.split(" ", 1)[1]) for e in order[:at] if e.startswith("fsync ")}
    assert named <= synced, f"not fsynced before the manifest: {sorted(named - synced)}"
