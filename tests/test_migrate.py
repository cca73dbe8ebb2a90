"""Migration between clouds: streamed, verified, manifest last, resumable."""

from __future__ import annotations

import pytest

from resilient_train import load, save
from resilient_train.checkpoint.replicate import copy_checkpoint, migrate
from resilient_train.checkpoint import verify_checkpoint
from resilient_train.checkpoint.steps import committed_steps
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.errors import CheckpointError, ReplicationError
from resilient_train.format import MANIFEST_NAME, step_dirname
from resilient_train.storage import LocalStore
from resilient_train.testing.faults import FaultyStore

from .conftest import assert_same_tensors, make_train_state, state_tensors

pytestmark = pytest.mark.timeout(180)
OPTS = SaveOptions(max_file_bytes=8192, io_threads=4)


def test_s3_to_azure_to_gcs_to_local_loads_bit_identical(make_store, tmp_path):
    s3, az, gcs = make_store("s3"), make_store("azure"), make_store("gcs")
    local = LocalStore(str(tmp_path / "final"), name="local")
    state = make_train_state()
    want = state_tensors(state)
    save(s3, state, 10, options=OPTS)
    save(s3, state, 20, options=OPTS)
    reports = migrate(s3, az, all_steps=True, progress=False)
    assert [r.step for r in reports] == [10, 20]
    migrate(az, gcs, 20, progress=False)
    (rep,) = migrate(gcs, local, progress=False)  # default: the latest
    assert rep.step == 20 and rep.files_copied > 3 and rep.bytes_copied > 0
    assert committed_steps(az) == [10, 20] and committed_steps(gcs) == [20] and committed_steps(local) == [20]
    assert verify_checkpoint(local, 20)[1] == []
    a = s3.read_bytes(f"{step_dirname(20)}/{MANIFEST_NAME}")
    assert local.read_bytes(f"{step_dirname(20)}/{MANIFEST_NAME}") == a
    fresh = make_train_state(seed=8)
    load(local, fresh, 20)
    assert_same_tensors(state_tensors(fresh), want)


def test_interrupted_migration_resumes_copying_only_what_is_missing_or_wrong(make_store):
    src, dst_inner = make_store("s3", "src"), make_store("memory", "dst")
    state = make_train_state()
    save(src, state, 3, options=OPTS)
    folder = step_dirname(3)
    names = sorted(n for n in src.list(folder) if n != MANIFEST_NAME)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3

    class FailOn(FaultyStore):
        """The destination refuses one file for good: the first run cannot finish."""

        def open_write(self, path):
            if path.endswith(shards[1]):
                raise PermissionError("injected: quota exceeded")
            return super().open_write(path)

        def write_bytes(self, path, data):
            if path.endswith(shards[1]):
                raise PermissionError("injected: quota exceeded")
            return super().write_bytes(path, data)

    with pytest.raises(ReplicationError) as ei:
        copy_checkpoint(src, FailOn(dst_inner), 3)
    assert "dst" in str(ei.value) and shards[1] in str(ei.value)
    assert not dst_inner.exists(f"{folder}/{MANIFEST_NAME}")  # not committed
    assert committed_steps(dst_inner) == []
    # one copied file is damaged meanwhile: the rerun must replace it
    bad = bytearray(dst_inner.read_bytes(f"{folder}/{shards[0]}"))
    bad[-1] ^= 1
    dst_inner.write_bytes(f"{folder}/{shards[0]}", bytes(bad))

    rep = copy_checkpoint(src, dst_inner, 3)
    assert rep.files_copied == 2 and rep.files_skipped == len(names) - 2
    assert verify_checkpoint(dst_inner, 3)[1] == []
    again = copy_checkpoint(src, dst_inner, 3)
    assert again.already_committed and again.bytes_copied == 0


def test_a_different_checkpoint_at_the_same_step_is_never_overwritten(make_store):
    a, b = make_store("memory", "a"), make_store("memory", "b")
    save(a, make_train_state(seed=1), 1, options=OPTS)
    save(b, make_train_state(seed=2), 1, options=OPTS)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        copy_checkpoint(a, b, 1)


def test_migrate_argument_errors(make_store):
    a, b = make_store("memory", "a"), make_store("memory", "b")
    with pytest.raises(CheckpointError, match="no committed"):
        migrate(a, b, progress=False)
    save(a, make_train_state(), 2, options=OPTS)
    with pytest.raises(CheckpointError, match="committed steps: \\[2\\]"):
        migrate(a, b, 5, progress=False)
    with pytest.raises(ValueError):
        migrate(a, b, 2, all_steps=True)


def test_migration_streams_through_transient_faults(make_store):
    src = make_store("memory", "src")
    save(src, make_train_state(), 4, options=OPTS)
    from resilient_train.storage import RetryingStore, RetryPolicy

    flaky = FaultyStore(make_store("memory", "dst"), rate=0.3, seed=4)
    dst = RetryingStore(flaky, RetryPolicy(max_attempts=10, max_total_s=20, base_wait_s=0.001, max_wait_s=0.01))
    copy_checkpoint(src, dst, 4)
    assert flaky.injected > 0
    assert verify_checkpoint(dst, 4)[1] == []
