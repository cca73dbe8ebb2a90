"""Which checkpoint is `latest`: create-only commits (two writers of one step), torn manifests,
stale listing caches, unreachable stores, and falling back past a corrupt newest checkpoint."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest
import torch

import resilient_train as rt
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint.steps import committed_steps, latest_step
from resilient_train.checkpoint.steps import newest_committed
from resilient_train.checkpoint import SaveOptions, save
from resilient_train.errors import CommitConflictError, StorageError, StoreConflictError, StoreUnavailableError
from resilient_train.format import MANIFEST_NAME, step_dirname
from resilient_train.storage import LocalStore, RetryPolicy, open_store
from resilient_train.storage.retry import RetryingStore

from .conftest import assert_same_tensors, make_train_state, state_tensors

pytestmark = pytest.mark.timeout(120)
OPTS = SaveOptions(max_file_bytes=8192, io_threads=2)
FAST = RetryPolicy(max_attempts=2, max_total_s=3.0, base_wait_s=0.05, max_wait_s=0.1, call_timeout_s=5.0, breaker_cooldown_s=0.0)


class _CommitGate:
    """A Store whose create-only writes wait until ``n`` writers arrived, so they really race."""

    def __init__(self, inner, barrier: threading.Barrier):
        self._inner = inner
        self._barrier = barrier

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def write_bytes_exclusive(self, path, data):
        self._barrier.wait(timeout=60)
        return self._inner.write_bytes_exclusive(path, data)


@pytest.mark.parametrize("kind", ["local", "s3", "gcs", "azure"])
def test_two_writers_of_one_step_exactly_one_commits(make_store, kind):
    store = make_store(kind)
    barrier = threading.Barrier(2)
    states = [make_train_state(seed=1), make_train_state(seed=2)]
    outcomes: list = [None, None]

    def writer(i: int) -> None:
        try:
            outcomes[i] = save(_CommitGate(store, barrier), states[i], 3, options=OPTS).manifest.to_bytes()
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            outcomes[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    won = [o for o in outcomes if isinstance(o, bytes)]
    lost = [o for o in outcomes if not isinstance(o, bytes)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert isinstance(lost[0], CommitConflictError), repr(lost[0])
    assert store.read_bytes(f"{step_dirname(3)}/{MANIFEST_NAME}") == won[0]  # the winner's manifest, untouched
    with pytest.raises(StoreConflictError):
        store.write_bytes_exclusive(f"{step_dirname(3)}/{MANIFEST_NAME}", b"{}")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_torn_or_empty_manifest_is_uncommitted_and_replaced(make_store, kind):
    store = make_store(kind)
    state = make_train_state()
    save(store, state, 1, options=OPTS)
    save(store, state, 2, options=OPTS)
    for torn in (b"", b'{"format": "resilient-train-che'):
        store.delete(f"{step_dirname(2)}/{MANIFEST_NAME}")
        store.write_bytes(f"{step_dirname(2)}/{MANIFEST_NAME}", torn)
        assert latest_step(store) == 1 and committed_steps(store) == [1]
        assert committed_steps(store, validate=False) == ([1] if not torn else [1, 2])
        res = CheckpointManager(store, every_n_steps=1).restore(make_train_state(seed=4))
        assert res is not None and res.step == 1
    save(store, state, 2, options=OPTS)  # the torn commit is replaced by a new save
    assert latest_step(store) == 2
    fresh = make_train_state(seed=4)
    rt.load(store, fresh)
    assert_same_tensors(state_tensors(fresh), state_tensors(state))


def test_stale_listing_cache_of_another_client_does_not_hide_a_commit(make_store, servers):
    first = make_store("s3")
    opts = dict(servers["s3"].storage_options)
    second = open_store(first.uri, {**opts, "skip_instance_cache": True})  # another client, its own caches
    state = make_train_state()
    save(first, state, 1, options=OPTS)
    save(second, state, 2, options=OPTS)
    mpath = f"{step_dirname(2)}/{MANIFEST_NAME}"
    manifest = second.read_bytes(mpath)
    second.delete(mpath)  # step 2 uncommitted for a moment ...
    assert latest_step(first) == 1
    first.list(step_dirname(2))  # ... while the first client lists its folder (cached, no manifest)
    second.write_bytes_exclusive(mpath, manifest)  # the second client commits
    assert first.exists(mpath) is False  # the first client's cache is stale indeed
    assert latest_step(first) == 2 and committed_steps(first) == [1, 2]
    res = CheckpointManager(first, every_n_steps=1).restore(make_train_state(seed=3))
    assert res is not None and res.step == 2


def _dead_s3(name: str):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    opts = {"key": "x", "secret": "y", "endpoint_url": f"http://127.0.0.1:{port}", "client_kwargs": {"region_name": "us-east-1"}, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    return open_store("s3://rt-tests/dead", opts, name=name, retry=FAST)


def test_unreachable_store_is_an_error_never_no_checkpoint(tmp_path, caplog):
    dead = _dead_s3("dead")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StorageError):
        rt.wrap(model, opt, checkpoint=dead, every_n_steps=5)
    with pytest.raises(StoreUnavailableError):
        CheckpointManager(dead, every_n_steps=1).restore(make_train_state())

    alive = open_store(str(tmp_path / "alive"), name="alive")
    save(alive, make_train_state(), 4, options=OPTS)
    with caplog.at_level(logging.WARNING, logger="resilient_train"):
        assert newest_committed([_dead_s3("dead2"), alive]) == [4]  # one provider answers: use it
    assert any("dead2" in r.getMessage() and "unavailable" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreUnavailableError, match="no checkpoint provider could be reached"):
        newest_committed([_dead_s3("d3"), _dead_s3("d4")])


def test_wrap_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    ck = tmp_path / "ck"

    def run(steps: int):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = rt.wrap(model, opt, checkpoint=str(ck), every_n_steps=5, async_save=False, event_log=str(tmp_path / "ev.jsonl"))
        g = torch.Generator().manual_seed(trainer.step_count)
        while trainer.step_count < steps:
            model(torch.randn(3, 4, generator=g)).sum().backward()
            trainer.step()
            opt.zero_grad()
        trainer.close(save=False)  # the checkpoints are the periodic ones (every 5 steps)
        return trainer

    run(10)
    shard = sorted((ck / step_dirname(10)).glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    second = run(12)
    assert second.resumed_from == 5
    ev = [json.loads(line) for line in open(tmp_path / "ev.jsonl")]
    fb = [e for e in ev if e["event"] == "resume_fallback"]
    assert len(fb) == 1 and fb[0]["step"] == 10 and "HashMismatchError" in fb[0]["reason"]

    mgr = CheckpointManager(str(ck), every_n_steps=5)
    state = rt.TrainState(model=torch.nn.Linear(4, 2), optimizer=None, rng=False)
    assert mgr.restore(state).step == 10  # step 10 was saved again by the second run


def test_retried_create_only_write_that_had_succeeded_is_not_a_conflict(tmp_path):
    """The first attempt commits but its answer is lost (a reset after the write): the retry
    finds the object holding exactly its bytes and reports success, not a conflict."""
    from resilient_train.storage import LocalStore

    class LostAnswer(LocalStore):
        calls = 0

        def write_bytes_exclusive(self, path, data):
            LostAnswer.calls += 1
            super().write_bytes_exclusive(path, data)
            if LostAnswer.calls == 1:
                raise ConnectionResetError(104, "Connection reset by peer")

    store = RetryingStore(LostAnswer(str(tmp_path / "s"), name="s"), FAST)
    store.write_bytes_exclusive("a/manifest.json", b"mine")
    assert LostAnswer.calls == 2 and store.read_bytes("a/manifest.json") == b"mine"
    with pytest.raises(StoreConflictError):
        store.write_bytes_exclusive("a/manifest.json", b"someone else's")



def _corrupt_model_file(folder) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_no_verifiable_checkpoint_while_committed_ones_exist_is_an_error_not_a_fresh_start(tmp_path):
    """docs/format.md, "Newest verifiable": committed checkpoints exist but none verifies:
    restore raises, it does not return None (which the trainer takes for a fresh start)."""
    from resilient_train.errors import CorruptCheckpointError

    root = tmp_path / "ck"
    state = make_train_state()
    for step in (1, 2):
        save(str(root), state, step, options=OPTS)
        _corrupt_model_file(root / step_dirname(step))
    with pytest.raises(CorruptCheckpointError, match="none of the 2 committed checkpoints"):
        CheckpointManager(str(root), every_n_steps=1).restore(make_train_state(seed=4))


def test_a_newer_format_version_is_an_error_never_skipped(tmp_path):
    from resilient_train.errors import UnsupportedFormatVersionError

    root = tmp_path / "ck"
    state = make_train_state()
    save(str(root), state, 1, options=OPTS)
    save(str(root), state, 2, options=OPTS)
    mfile = root / step_dirname(2) / MANIFEST_NAME
    m = json.loads(mfile.read_bytes())
    mfile.write_text(json.dumps(dict(m, format_version=m["format_version"] + 1)))
    with pytest.raises(UnsupportedFormatVersionError):
        CheckpointManager(str(root), every_n_steps=1).restore(make_train_state(seed=4))
    assert mfile.exists()  # not uncommitted either


class _ClientRetriedCommit(LocalStore):
    """A create-only write whose first attempt reached the store but whose answer was lost,
    retried inside the client (as botocore does): the retry finds an object and the call
    raises StoreConflictError. ``rival``: another writer's manifest lands first instead.
    ``unreadable``: the object cannot be read back."""

    def __init__(self, root, *, rival: bytes | None = None, unreadable: bool = False):
        super().__init__(root, name="lost-answer")
        self.rival, self.unreadable, self.commits = rival, unreadable, 0

    def write_bytes_exclusive(self, path, data):
        if path.endswith(MANIFEST_NAME):
            self.commits += 1
            if self.rival is not None:
                super().write_bytes(path, self.rival)
            else:
                super().write_bytes_exclusive(path, data)  # the first attempt: it got there
            raise StoreConflictError(f"{path!r} already exists", provider=self.name, path=path)
        super().write_bytes_exclusive(path, data)

    def read_bytes(self, path, start=None, end=None):
        if self.unreadable and path.endswith(MANIFEST_NAME):
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read_bytes(path, start, end)


def test_commit_whose_answer_was_lost_inside_the_client_is_judged_by_the_objects_bytes(tmp_path, caplog):
    """The fast, local twin of the S3 test in test_verify_truth.py (issue 19, 5): a manifest
    create that the client retried itself and found is this save's commit when the object
    holds this save's bytes (no CommitConflictError, loads bit-identical); another writer's
    object is a conflict and stays theirs; an object that cannot be read back is never
    claimed as this save's commit (found by ``make mutate``: no fast test reached the
    read-back)."""
    state = make_train_state()
    want = state_tensors(state)
    own = _ClientRetriedCommit(str(tmp_path / "own"))
    with caplog.at_level(logging.INFO, logger="resilient_train.checkpoint.saving"):
        res = save(own, state, 5, options=OPTS)
    assert own.commits == 1 and committed_steps(own) == [5]
    assert any(m.startswith(f"saved step 5 to {own.uri}: {len(res.manifest.files)} files") for m in caplog.messages), caplog.messages
    assert own.read_bytes(f"{step_dirname(5)}/{MANIFEST_NAME}") == res.manifest.to_bytes()
    fresh = make_train_state(seed=5)
    rt.load(LocalStore(str(tmp_path / "own")), fresh, 5)
    assert_same_tensors(state_tensors(fresh), want)

    rival = save(str(tmp_path / "rival"), make_train_state(seed=9), 5, options=OPTS).manifest.to_bytes()
    theirs = _ClientRetriedCommit(str(tmp_path / "theirs"), rival=rival)
    with pytest.raises(CommitConflictError, match="committed by another writer first"):
        save(theirs, state, 5, options=OPTS)
    assert LocalStore(str(tmp_path / "theirs")).read_bytes(f"{step_dirname(5)}/{MANIFEST_NAME}") == rival

    unreadable = _ClientRetriedCommit(str(tmp_path / "unreadable"), unreadable=True)
    with pytest.raises(CommitConflictError):
        save(unreadable, state, 5, options=OPTS)


def test_a_signed_checkpoint_copied_to_another_store_commits_with_its_signature(tmp_path):
    """A copy (migrate, replication) writes the source's ``manifest.sig`` before its create-only
    manifest, so the copy verifies under the same keys; copying again is a no-op (found by
    ``make mutate``: only the slow emulator test checked that the signature travels)."""
    from resilient_train.checkpoint.replicate import migrate
    from resilient_train.format.signing import SIGNATURE_NAME, SigningKey

    key = SigningKey.generate_ed25519()
    state = make_train_state()
    want = state_tensors(state)
    save(str(tmp_path / "a"), state, 3, options=SaveOptions(max_file_bytes=8192, signing_key=key))
    a, b = LocalStore(str(tmp_path / "a")), LocalStore(str(tmp_path / "b"))
    migrate(a, b, 3, progress=False)
    sig = f"{step_dirname(3)}/{SIGNATURE_NAME}"
    assert b.read_bytes(sig) == a.read_bytes(sig)
    fresh = make_train_state(seed=5)
    assert rt.load(b, fresh, 3, verify_keys=key).step == 3
    assert_same_tensors(state_tensors(fresh), want)
    assert migrate(a, b, 3, progress=False)[0].already_committed


class _RacedCopy(LocalStore):
    """A copy destination where another writer commits ``theirs`` just before this copy's commit."""

    def __init__(self, root, theirs: bytes):
        super().__init__(root, name="raced")
        self.theirs = theirs

    def write_bytes_exclusive(self, path, data):
        if path.endswith(MANIFEST_NAME):
            super().write_bytes_exclusive(path, self.theirs)
        super().write_bytes_exclusive(path, data)


def test_a_copy_raced_by_another_writer_commits_only_over_identical_bytes(tmp_path):
    """A copy's commit that finds a manifest: the same bytes (another replicator copying the
    same checkpoint) is this copy's success; different bytes raise CheckpointError and the
    other writer's checkpoint stands (found by ``make mutate``)."""
    from resilient_train.checkpoint.replicate import copy_checkpoint
    from resilient_train.errors import CheckpointError

    src = LocalStore(str(tmp_path / "src"))
    mine = save(src, make_train_state(), 4, options=OPTS).manifest.to_bytes()
    same = _RacedCopy(str(tmp_path / "same"), mine)
    copy_checkpoint(src, same, 4)
    assert committed_steps(same) == [4] and same.read_bytes(f"{step_dirname(4)}/{MANIFEST_NAME}") == mine

    theirs = save(str(tmp_path / "other"), make_train_state(seed=9), 4, options=OPTS).manifest.to_bytes()
    raced = _RacedCopy(str(tmp_path / "raced"), theirs)
    with pytest.raises(CheckpointError, match="another writer committed a different checkpoint for step 4"):
        copy_checkpoint(src, raced, 4)
    assert raced.read_bytes(f"{step_dirname(4)}/{MANIFEST_NAME}") == theirs
