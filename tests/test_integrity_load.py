"""Integrity of loading against broken and hostile checkpoints (issue 9, read side).

Every case runs a real save, then damages real bytes on disk (or serves them through a real
S3 emulator) and asserts: a typed error from ``resilient_train.errors`` (or a correct load),
the live state untouched (model, optimizer, scheduler, sampler, extras, RNG), nothing read
outside the checkpoint folder, and bounded time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import struct
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import resilient_train as rt
from resilient_train import errors
from resilient_train.checkpoint import SaveOptions
from resilient_train.checkpoint import verify_checkpoint
from resilient_train.storage import LocalStore
from resilient_train.testing.proxy import FaultProxy

from .helpers import make_run, train_steps

CHUNK = 4096
STEP = "step-0000000001"


def _state(seed: int = 0):
    state = make_run(seed=seed)
    state.extra["table"] = torch.arange(3000, dtype=torch.float32) * (seed + 1)  # 12 KB: several chunks
    return state


def _save(root, *, chunk=CHUNK, version=3):
    state = _state()
    train_steps(state, 2)
    rt.save(str(root), state, 1, options=SaveOptions(hash_chunk_bytes=chunk, format_version=version))
    return state


class _Pristine(tuple):
    def __repr__(self) -> str:
        return f"<pristine checkpoint at {self[0]}>"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    saved = _save(root)
    return _Pristine((root, {k: v.clone() for k, v in saved.model.state_dict().items()}))


def _fresh_copy(pristine, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(pristine[0], root)
    return root, root / STEP


def _snapshot(state) -> dict:
    """Everything a load may change, deep-copied."""
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scheduler": copy.deepcopy(state.scheduler.state_dict()),
        "sampler": copy.deepcopy(state.sampler.state_dict()),
        "extra": copy.deepcopy(state.extra),
        "rng": (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_untouched(state, before):
    after = _snapshot(state)
    for part in before:
        assert _same(before[part], after[part]), f"{part} changed although the load failed"


def _rehash(folder, names=None):
    """Make the manifest consistent with the files on disk again (a consistent attacker)."""
    try:
        m = json.loads((folder / "manifest.json").read_bytes())
        files = m["files"]
        cb = m.get("hash", {}).get("chunk_bytes")
        assert isinstance(files, list) and all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files)
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RecursionError):
        return  # the manifest itself is the damage
    for f in files:
        if names is not None and f["path"] not in names:
            continue
        p = folder / f["path"]
        if not p.is_file():
            continue
        set_digests(m, f, p.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(m))


def set_digests(m, f, data):
    """Record ``data`` as file record ``f`` of manifest ``m`` in the manifest's format, with
    hashlib and the blake3 package directly (not the library's hashing code)."""
    import blake3

    cb = m.get("hash", {}).get("chunk_bytes")
    f["size_bytes"] = len(data)
    pieces = [data[i:i + cb] for i in range(0, max(len(data), 1), cb)] if cb else []
    if m.get("format_version") == 3:
        h = blake3.blake3 if m["hash"]["algorithm"] == "blake3" else hashlib.sha256
        f["chunks"] = [h(c).hexdigest() for c in pieces]
        f["digest"] = h(b"".join(bytes.fromhex(d) for d in f["chunks"])).hexdigest()
        return
    f["sha256"] = hashlib.sha256(data).hexdigest()
    if cb:
        f["chunk_sha256"] = [hashlib.sha256(c).hexdigest() for c in pieces]


class _OpenAudit:
    """Records every absolute path under the temp folder opened while active (audit hook)."""

    active: "list | None" = None
    installed = False

    @classmethod
    def install(cls):
        if not cls.installed:
            def hook(event, args):
                if event == "open" and cls.active is not None and isinstance(args[0], (str, bytes)):
                    path = os.fsdecode(args[0])
                    if os.path.isabs(path):
                        cls.active.append(path)
            sys.addaudithook(hook)
            cls.installed = True


def _load_checked(root, before_state):
    """Load into ``before_state``; return the exception (typed) or None. Asserts the state is
    untouched on failure and that nothing outside ``root`` was opened."""
    _OpenAudit.install()
    before = _snapshot(before_state)
    opened: list = []
    _OpenAudit.active = opened
    try:
        rt.load(str(root), before_state)
        exc = None
    except Exception as e:  # noqa: BLE001 - classified below
        exc = e
    finally:
        _OpenAudit.active = None
    base = os.path.dirname(str(root))
    outside = [p for p in opened if p.startswith(base) and not p.startswith(str(root))]
    assert not outside, f"opened outside the checkpoint: {outside}"
    if exc is not None:
        assert isinstance(exc, errors.ResilientTrainError), f"untyped {type(exc).__name__}: {exc}"
        assert not isinstance(exc, errors.PartialLoadError)
        _assert_untouched(before_state, before)
    return exc


# ---------------------------------------------------------------- format v2 chunks


def test_v3_chunk_digests_cover_every_range(tmp_path):
    """The default format: BLAKE3 of every chunk, and the digest of the digests per file
    (recomputed with the blake3 package directly)."""
    import blake3

    _save(tmp_path)
    folder = tmp_path / STEP
    m = json.loads((folder / "manifest.json").read_bytes())
    assert m["format_version"] == 3 and m["hash"] == {"algorithm": "blake3", "chunk_bytes": CHUNK}
    multi = 0
    for f in m["files"]:
        data = (folder / f["path"]).read_bytes()
        want = [blake3.blake3(data[i:i + CHUNK]).hexdigest() for i in range(0, max(len(data), 1), CHUNK)]
        assert f["chunks"] == want, f["path"]
        assert f["digest"] == blake3.blake3(b"".join(bytes.fromhex(d) for d in want)).hexdigest()
        assert "sha256" not in f and f["size_bytes"] == len(data)
        multi += len(want) > 1
    assert multi >= 1


def test_v2_chunk_digests_cover_every_range(tmp_path):
    _save(tmp_path, version=2)
    folder = tmp_path / STEP
    m = json.loads((folder / "manifest.json").read_bytes())
    assert m["format_version"] == 2 and m["hash"] == {"algorithm": "sha256", "chunk_bytes": CHUNK}
    multi = 0
    for f in m["files"]:
        data = (folder / f["path"]).read_bytes()
        want = [hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, max(len(data), 1), CHUNK)]
        assert f["chunk_sha256"] == want, f["path"]
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        multi += len(want) > 1
    assert multi >= 1


def test_v1_checkpoint_still_loads_and_verifies(tmp_path):
    saved = _save(tmp_path, version=1)
    m = json.loads((tmp_path / STEP / "manifest.json").read_bytes())
    assert m["format_version"] == 1 and "hash" not in m and "chunk_sha256" not in m["files"][0]
    fresh = _state(seed=5)
    rt.load(str(tmp_path), fresh)
    for k, v in saved.model.state_dict().items():
        assert torch.equal(v, fresh.model.state_dict()[k])
    assert verify_checkpoint(str(tmp_path))[1] == []


# ---------------------------------------------------------------- property-based damage

FILES = st.sampled_from([
    "manifest.json", "state.json", "rank-00000.json", "model.safetensors.index.json",
    "model-00001-of-00001.safetensors", "optimizer-00001-of-00001.safetensors", "extra-00001-of-00001.safetensors",
])

MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), FILES, st.floats(0, 1, exclude_max=True), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("truncate"), FILES, st.floats(0, 1, exclude_max=True), st.booleans()),
    st.tuples(st.just("append"), FILES, st.binary(min_size=1, max_size=64), st.booleans()),
    st.tuples(st.just("swap"), FILES, FILES, st.booleans()),
    st.tuples(st.just("json"), FILES, st.sampled_from([
        b'{"a": 1, "a": 2}', b'{"lr": NaN}', b"[" * 5000 + b"]" * 5000, b'{"x": 1e999}', b"\xff\xfe",
        b'{"optimizer": {"param_groups": [{"params": 7}], "state": []}}', b'{"rng": {"__float__": "zz"}}', b"[]", b"{}",
    ]), st.booleans()),
    st.tuples(st.just("header"), st.sampled_from(["model-00001-of-00001.safetensors", "extra-00001-of-00001.safetensors"]), st.sampled_from([
        {"shape": [10**12, 10**12]}, {"dtype": "F64"}, {"data_offsets": [0, 4]}, {"shape": [-1]}, {"dup": True}, {"rename": True},
    ]), st.booleans()),
    st.tuples(st.just("manifest"), st.sampled_from([
        ("world", {"world_size": 2}), ("step", 2), ("tensor_shape", [10**9, 10**9]), ("tensor_key", "model/zzz"),
        ("tensor_name", "nope"), ("file_size", 10**15), ("chunk_bytes", 4097), ("drop_file", "rank-00000.json"),
        ("drop_file", "state.json"), ("dup_key", None),
    ]), st.booleans()),
)


def _apply(folder, mutation):
    kind = mutation[0]
    rehash = mutation[-1]
    touched = []
    if kind == "flip":
        _, name, where, bit, _ = mutation
        p = folder / name
        data = bytearray(p.read_bytes())
        data[int(where * len(data))] ^= 1 << bit
        p.write_bytes(bytes(data))
        touched = [name]
    elif kind == "truncate":
        _, name, where, _ = mutation
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(data[: int(where * len(data))])
        touched = [name]
    elif kind == "append":
        _, name, extra, _ = mutation
        p = folder / name
        p.write_bytes(p.read_bytes() + extra)
        touched = [name]
    elif kind == "swap":
        _, a, b, _ = mutation
        da, db = (folder / a).read_bytes(), (folder / b).read_bytes()
        (folder / a).write_bytes(db)
        (folder / b).write_bytes(da)
        touched = [a, b]
    elif kind == "json":
        _, name, body, _ = mutation
        if name.endswith(".safetensors"):
            name = "state.json"
        (folder / name).write_bytes(body)
        touched = [name]
    elif kind == "header":
        _, name, edit, _ = mutation
        p = folder / name
        data = p.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        raw = data[8:8 + n].decode()
        header = json.loads(raw)
        first = next(k for k in header if k != "__metadata__")
        if edit.get("dup"):
            body = raw.rstrip()[:-1] + "," + json.dumps(first) + ":" + json.dumps(header[first]) + "}"
        elif edit.get("rename"):
            header["renamed"] = header.pop(first)
            body = json.dumps(header)
        else:
            header[first].update(edit)
            body = json.dumps(header)
        p.write_bytes(struct.pack("<Q", len(body)) + body.encode() + data[8 + n:])
        touched = [name]
    elif kind == "manifest":
        _, (what, value), _ = mutation
        m = json.loads((folder / "manifest.json").read_bytes())
        if what == "world":
            m["world"] = value
        elif what == "step":
            m["step"] = value
        elif what == "tensor_shape":
            m["tensors"][0]["shape"] = m["tensors"][0]["global_shape"] = value
        elif what == "tensor_key":
            m["tensors"][-1]["key"] = value
        elif what == "tensor_name":
            m["tensors"][0]["name"] = value
        elif what == "file_size":
            m["files"][0]["size_bytes"] = value
        elif what == "chunk_bytes":
            m["hash"]["chunk_bytes"] = value
        elif what == "drop_file":
            m["files"] = [f for f in m["files"] if f["path"] != value]
        elif what == "dup_key":
            m["tensors"].append(dict(m["tensors"][0], name="other"))
        (folder / "manifest.json").write_text(json.dumps(m))
        return
    if rehash:
        _rehash(folder, [t for t in touched if t != "manifest.json"])


@pytest.mark.timeout(240)
@settings(max_examples=int(os.environ.get("RT_FUZZ_EXAMPLES", "200")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=MUTATIONS)
def test_damaged_checkpoint_raises_typed_error_and_leaves_state_untouched(pristine, tmp_path_factory, mutation):
    root, folder = _fresh_copy(pristine, tmp_path_factory.mktemp("case"))
    _apply(folder, mutation)
    fresh = _state(seed=3)
    exc = _load_checked(root, fresh)
    if exc is None and not mutation[-1]:  # a damage that changes nothing the load uses (e.g. JSON whitespace)
        for k, v in pristine[1].items():
            assert torch.equal(v, fresh.model.state_dict()[k]), f"{k} loaded wrong without an error"
    # ckpt verify agrees: damage to the bytes never verifies clean (re-hashed edits can be
    # well-formed files whose values only the live objects refuse: verify cannot know those)
    if mutation[-1]:
        return
    try:
        _, problems = verify_checkpoint(str(root), 1)
    except errors.ResilientTrainError:
        problems = ["manifest refused"]
    if exc is not None and not isinstance(exc, errors.StateMismatchError):
        assert problems, f"load failed with {type(exc).__name__}: {exc} but verify found nothing"


# ---------------------------------------------------------------- targeted cases


class _SwappingStore(LocalStore):
    """A real local store whose file ``victim`` is replaced on disk right after its first read."""

    def __init__(self, root, victim, replacement):
        super().__init__(root, name="swapping")
        self.victim, self.replacement, self.done = victim, replacement, False

    def read_bytes(self, path, start=None, end=None):
        data = super().read_bytes(path, start, end)
        if path.endswith(self.victim) and not self.done:
            self.done = True
            with open(os.path.join(self.root, path), "r+b") as f:
                f.write(self.replacement)
        return data


@pytest.mark.parametrize("chunk, budget", [(CHUNK, CHUNK), (8 * 1024 * 1024, None)])
def test_file_swapped_between_reads_is_caught(tmp_path, chunk, budget):
    """The bug of issue 9: a file replaced after it was checked loaded silently wrong. Now each
    byte is hashed from the buffer it is used from: a file read in several ranged reads (a small
    staging budget) and swapped between them fails; a file read in one go loads exactly the
    bytes that were hashed, never the swapped ones."""
    _save(tmp_path, chunk=chunk)
    name = "extra-00001-of-00001.safetensors"
    data = (tmp_path / STEP / name).read_bytes()
    bogus = bytearray(data)
    bogus[-8:] = b"\x00\x00\xc0\x7f" * 2  # NaN in the last two elements, same length
    store = _SwappingStore(str(tmp_path), name, bytes(bogus))
    fresh = _state(seed=3)
    before = _snapshot(fresh)
    if budget is not None:
        with pytest.raises(errors.HashMismatchError):
            rt.load(store, fresh, staging_budget_bytes=budget)
        _assert_untouched(fresh, before)  # the extra file is read before any live tensor
    else:
        rt.load(store, fresh)
        assert store.done and (tmp_path / STEP / name).read_bytes() == bytes(bogus)
        assert torch.equal(fresh.extra["table"][-2:], torch.tensor([2998.0, 2999.0]))


def test_fifo_state_file_is_refused_without_hanging(tmp_path):
    _save(tmp_path)
    folder = tmp_path / STEP
    os.unlink(folder / "state.json")
    os.mkfifo(folder / "state.json")
    fresh = _state(seed=3)
    before = _snapshot(fresh)
    with pytest.raises(errors.CorruptCheckpointError, match="not a regular file"):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)
    _, problems = verify_checkpoint(str(tmp_path), 1)
    assert any(p.startswith("state.json") for p in problems)


def test_symlinks_out_of_the_checkpoint_are_refused(tmp_path):
    root = tmp_path / "ckpt"
    _save(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = "model-00001-of-00001.safetensors"
    # an identical copy outside: following the link would even pass the hash check
    shutil.move(root / STEP / name, outside / name)
    os.symlink(outside / name, root / STEP / name)
    fresh = _state(seed=3)
    before = _snapshot(fresh)
    with pytest.raises(errors.CorruptCheckpointError, match="symlink"):
        rt.load(str(root), fresh)
    _assert_untouched(fresh, before)
    # a whole step folder linked from elsewhere
    shutil.move(root / STEP / name, tmp_path / "unused")
    shutil.move(outside / name, root / STEP / name)
    shutil.move(root / STEP, outside / STEP)
    os.symlink(outside / STEP, root / STEP)
    with pytest.raises(errors.CheckpointError):
        rt.load(str(root), fresh, 1)
    _assert_untouched(fresh, before)


def test_manifest_that_is_dev_zero_or_huge_is_refused_quickly(tmp_path):
    _save(tmp_path)
    manifest = tmp_path / STEP / "manifest.json"
    os.unlink(manifest)
    os.symlink("/dev/zero", manifest)
    fresh = _state(seed=3)
    with pytest.raises(errors.ManifestError):
        rt.load(str(tmp_path), fresh, 1)
    os.unlink(manifest)
    with open(manifest, "wb") as f:  # sparse: 300 MiB of zeros without the disk space
        f.truncate(300 * 1024 * 1024)
    with pytest.raises(errors.ManifestError, match="limit"):
        rt.load(str(tmp_path), fresh, 1)


def test_missing_rank_file_is_a_typed_error(tmp_path):
    _save(tmp_path)
    folder = tmp_path / STEP
    m = json.loads((folder / "manifest.json").read_bytes())
    m["files"] = [f for f in m["files"] if f["path"] != "rank-00000.json"]
    (folder / "manifest.json").write_text(json.dumps(m))
    fresh = _state(seed=3)
    before = _snapshot(fresh)
    with pytest.raises(errors.ManifestError, match="rank-00000.json"):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)
    _, problems = verify_checkpoint(str(tmp_path), 1)
    assert any("rank-00000.json" in p and p.startswith("manifest.json") for p in problems)


@pytest.mark.parametrize("body, match", [
    (b'{"extra": {"note": "a", "note": "b"}}', "duplicate key"),
    (b'{"extra": {"lr": NaN}}', "NaN"),
    (b'{"extra": ' + b"[" * 10000 + b"]" * 10000 + b"}", "nested"),
])
def test_strict_json_in_state_files(tmp_path, body, match):
    _save(tmp_path)
    (tmp_path / STEP / "state.json").write_bytes(body)
    _rehash(tmp_path / STEP, ["state.json"])
    fresh = _state(seed=3)
    before = _snapshot(fresh)
    with pytest.raises(errors.StateFileError, match=match):
        rt.load(str(tmp_path), fresh)
    _assert_untouched(fresh, before)


def test_verify_names_manifest_only_damage(tmp_path):
    _save(tmp_path)
    folder = tmp_path / STEP
    m = json.loads((folder / "manifest.json").read_bytes())
    rec = next(t for t in m["tensors"] if t["file"].startswith("model-"))
    rec["name"] = "renamed"  # consistent JSON, but the file holds no such tensor
    m["world"]["world_size"] = 2
    (folder / "manifest.json").write_text(json.dumps(m))
    _, problems = verify_checkpoint(str(tmp_path), 1)
    assert any(p.startswith("model-00001-of-00001.safetensors") and "renamed" in p for p in problems), problems
    assert any(p.startswith("manifest.json") and "rank-00001.json" in p for p in problems), problems


def test_beyond_the_staging_budget_a_late_failure_says_partial(tmp_path):
    from .conftest import make_train_state

    rt.save(str(tmp_path), make_train_state(width=64), 1, options=SaveOptions(hash_chunk_bytes=CHUNK))
    p = tmp_path / STEP / "optimizer-00001-of-00001.safetensors"  # read after the model file
    good = p.read_bytes()
    data = bytearray(good)
    assert len(data) > 2 * CHUNK
    data[-1] ^= 0xFF  # the header chunk is intact: the failure comes late
    p.write_bytes(bytes(data))
    fresh = make_train_state(seed=3, width=64)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(errors.HashMismatchError):  # within the default budget: untouched
        rt.load(str(tmp_path), fresh)
    assert _same(before, {k: v.clone() for k, v in fresh.model.state_dict().items()})
    # Beyond the budget, fresh tensors (the optimizer state) are read before live ones: a bad
    # optimizer file still leaves the model untouched.
    with pytest.raises(errors.HashMismatchError):
        rt.load(str(tmp_path), fresh, staging_budget_bytes=0)
    assert _same(before, {k: v.clone() for k, v in fresh.model.state_dict().items()})
    p.write_bytes(bytes(good))
    m = tmp_path / STEP / "model-00001-of-00001.safetensors"
    mdata = bytearray(m.read_bytes())
    assert len(mdata) > 2 * CHUNK
    mdata[-1] ^= 0xFF  # a live tensor's last chunk: read straight into the model, then refused
    m.write_bytes(bytes(mdata))
    with pytest.raises(errors.PartialLoadError, match="partially overwritten") as info:
        rt.load(str(tmp_path), fresh, staging_budget_bytes=0)
    assert isinstance(info.value.cause, errors.HashMismatchError)
    assert not _same(before, {k: v.clone() for k, v in fresh.model.state_dict().items()})


def test_streaming_load_within_a_small_budget_is_exact(tmp_path):
    saved = _save(tmp_path)
    fresh = _state(seed=3)
    rt.load(str(tmp_path), fresh, staging_budget_bytes=CHUNK)
    assert _same(_snapshot(saved)["model"], _snapshot(fresh)["model"])
    assert _same(saved.optimizer.state_dict(), fresh.optimizer.state_dict())
    assert torch.equal(saved.extra["table"], fresh.extra["table"])


def test_bad_chunk_comes_from_the_next_replica(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    saved = _save(a)
    shutil.copytree(a, b)
    p = a / STEP / "extra-00001-of-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # only the last chunk of the file is bad on replica a
    p.write_bytes(bytes(data))
    fresh = _state(seed=3)
    res = rt.load([LocalStore(str(a), name="a"), LocalStore(str(b), name="b")], fresh)
    assert torch.equal(saved.extra["table"], fresh.extra["table"])
    assert res.sources["extra-00001-of-00001.safetensors"] == "a"  # most chunks still from a


# ---------------------------------------------------------------- remote: one download per byte


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_s3_load_downloads_each_byte_once(servers, make_store):
    store = make_store("s3")
    srv = servers["s3"]
    state = _state()
    state.extra["big"] = torch.randn(1024 * 1024)  # 4 MiB
    rt.save(store, state, 1, options=SaveOptions(hash_chunk_bytes=1024 * 1024))
    proxy = FaultProxy(srv.port).start()
    try:
        from resilient_train.storage import open_store

        opts = dict(srv.storage_options, endpoint_url=f"http://127.0.0.1:{proxy.port}")
        via_proxy = open_store(store.uri, opts)
        fresh = _state(seed=3)
        res = rt.load(via_proxy, fresh, 1)
    finally:
        proxy.stop()
    data_bytes = res.manifest.total_bytes
    assert torch.equal(fresh.extra["big"], state.extra["big"])
    assert res.bytes_fetched <= data_bytes + len(res.manifest.files)  # +1 byte asked past each file end
    # everything the server sent: bodies (each byte once) + manifest + listings + HTTP headers
    overhead = len(res.manifest.to_bytes()) + 200 * 1024
    assert data_bytes <= proxy.bytes_to_client <= data_bytes + overhead, (proxy.bytes_to_client, data_bytes)


# ---------------------------------------------------------------- beyond the budget: read straight into the tensors


class _CountingStore(LocalStore):
    """A real local store that counts the bytes served by scatter reads and by ranged reads."""

    def __init__(self, root, name="counting"):
        super().__init__(root, name=name)
        self.scattered = 0
        self.scatter_reads = 0
        self.ranged = 0

    def read_into(self, path, start, buffers):
        n = super().read_into(path, start, buffers)
        self.scattered += n
        self.scatter_reads += 1
        return n

    def read_bytes(self, path, start=None, end=None):
        data = super().read_bytes(path, start, end)
        self.ranged += len(data)
        return data


def _save_wide(root, width=128):
    """A model whose file spans many 4 KiB chunks (live tensors read straight into place)."""
    from .conftest import make_train_state

    state = make_train_state(width=width)
    rt.save(str(root), state, 1, options=SaveOptions(hash_chunk_bytes=CHUNK))
    return state


def _model_of(state):
    return {k: v.clone() for k, v in state.model.state_dict().items()}


def test_streamed_load_reads_tensors_straight_into_place(tmp_path):
    """Beyond the budget, whole pieces are scatter-read into the tensors they fill and hashed
    there: the tensor bytes never pass through a staging buffer (only headers and JSON do)."""
    from .conftest import make_train_state

    saved = _save_wide(tmp_path)
    store = _CountingStore(str(tmp_path))
    fresh = make_train_state(seed=3, width=128)
    rt.load(store, fresh, staging_budget_bytes=0)
    assert _same(_model_of(saved), _model_of(fresh))
    assert _same(saved.optimizer.state_dict(), fresh.optimizer.state_dict())
    tensor_bytes = sum(f.stat().st_size for f in (tmp_path / STEP).glob("*.safetensors"))
    assert store.scattered > 0.9 * tensor_bytes, (store.scattered, store.ranged, tensor_bytes)
    # ranged reads: each file's first chunk (read with its header, before anything is written) and the JSON files
    assert store.ranged < 0.2 * tensor_bytes, (store.scattered, store.ranged, tensor_bytes)
    # consecutive chunks are read as runs: one scatter read per file here, not one per 4 KiB chunk
    chunks_read = store.scattered // CHUNK
    assert chunks_read > 20 and store.scatter_reads <= 4, (store.scatter_reads, chunks_read)


@pytest.mark.parametrize("where", ["first", "boundary-1", "boundary", "middle", "last"])
@pytest.mark.parametrize("name", ["model-00001-of-00001.safetensors", "optimizer-00001-of-00001.safetensors"])
def test_streamed_direct_read_refuses_a_flipped_byte(tmp_path, where, name):
    """A byte flipped anywhere in a chunk read straight into a tensor is refused: in a live
    tensor (the model) as PartialLoadError naming the hash mismatch (the bytes landed before
    they were hashed), in a fresh one (the optimizer state, read first) as the mismatch itself,
    the model untouched."""
    from .conftest import make_train_state

    _save_wide(tmp_path)
    p = tmp_path / STEP / name
    data = bytearray(p.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    pos = {"first": data_start, "boundary-1": 2 * CHUNK - 1, "boundary": 2 * CHUNK, "middle": (data_start + len(data)) // 2, "last": len(data) - 1}[where]
    assert data_start <= pos < len(data) and len(data) > 2 * CHUNK + 1
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))
    fresh = make_train_state(seed=3, width=128)
    before = _model_of(fresh)
    with pytest.raises((errors.PartialLoadError, errors.HashMismatchError)) as info:
        rt.load(str(tmp_path), fresh, staging_budget_bytes=0)
    if name.startswith("model") and pos >= CHUNK:
        assert isinstance(info.value, errors.PartialLoadError) and isinstance(info.value.cause, errors.HashMismatchError), repr(info.value)
    else:  # the optimizer state, or the header chunk (verified before anything is written)
        assert isinstance(info.value, errors.HashMismatchError), repr(info.value)
        assert _same(before, _model_of(fresh))


@pytest.mark.parametrize("change", ["shorter", "longer"])
def test_streamed_direct_read_refuses_a_file_of_another_length(tmp_path, change):
    from .conftest import make_train_state

    _save_wide(tmp_path)
    p = tmp_path / STEP / "model-00001-of-00001.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-1] if change == "shorter" else data + b"\0")
    with pytest.raises(errors.PartialLoadError) as info:
        rt.load(str(tmp_path), make_train_state(seed=3, width=128), staging_budget_bytes=0)
    assert isinstance(info.value.cause, errors.TruncatedFileError) and change in str(info.value.cause), repr(info.value.cause)


def test_streamed_direct_read_takes_a_bad_chunk_from_the_next_replica(tmp_path):
    """The next replica's copy is read into the same tensor memory and hashed there again."""
    from .conftest import make_train_state

    a, b = tmp_path / "a", tmp_path / "b"
    saved = _save_wide(a)
    shutil.copytree(a, b)
    p = a / STEP / "model-00001-of-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    fresh = make_train_state(seed=3, width=128)
    stores = [_CountingStore(str(a), name="a"), _CountingStore(str(b), name="b")]
    res = rt.load(stores, fresh, staging_budget_bytes=0)
    assert _same(_model_of(saved), _model_of(fresh))
    assert res.sources["model-00001-of-00001.safetensors"] == "a"  # most chunks from a, the bad one from b
    assert 0 < stores[1].scattered <= 2 * CHUNK


def test_streamed_direct_read_from_a_store_without_scatter_reads(tmp_path):
    """An fsspec store (no ``read_into``): ranged reads copied into the tensors, hashed there."""
    from resilient_train.storage import open_store

    from .conftest import make_train_state

    store = open_store(f"memory://direct-{tmp_path.name}")
    assert not callable(getattr(type(store), "read_into", None))
    saved = make_train_state(width=128)
    rt.save(store, saved, 1, options=SaveOptions(hash_chunk_bytes=CHUNK))
    fresh = make_train_state(seed=3, width=128)
    rt.load(store, fresh, staging_budget_bytes=0)
    assert _same(_model_of(saved), _model_of(fresh))
    path = f"{STEP}/model-00001-of-00001.safetensors"
    data = bytearray(store.read_bytes(path))
    data[len(data) // 2] ^= 0x10
    store.write_bytes(path, bytes(data))
    with pytest.raises(errors.PartialLoadError) as info:
        rt.load(store, make_train_state(seed=3, width=128), staging_budget_bytes=0)
    assert isinstance(info.value.cause, errors.HashMismatchError)


def test_staged_load_reads_fresh_tensors_straight_into_place(tmp_path):
    """Within the budget, the optimizer state (fresh tensors, applied only after every byte
    verified) is read straight into its tensors; only the live model's bytes are staged. A
    damaged optimizer file still leaves the whole state untouched."""
    from .conftest import make_train_state

    saved = _save_wide(tmp_path)
    store = _CountingStore(str(tmp_path))
    fresh = make_train_state(seed=3, width=128)
    rt.load(store, fresh)
    assert _same(_model_of(saved), _model_of(fresh))
    assert _same(saved.optimizer.state_dict(), fresh.optimizer.state_dict())
    opt_bytes = (tmp_path / STEP / "optimizer-00001-of-00001.safetensors").stat().st_size
    model_bytes = (tmp_path / STEP / "model-00001-of-00001.safetensors").stat().st_size
    assert opt_bytes - CHUNK <= store.scattered < opt_bytes, (store.scattered, opt_bytes)
    assert store.ranged >= model_bytes, (store.ranged, model_bytes)
    p = tmp_path / STEP / "optimizer-00001-of-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    fresh = make_train_state(seed=3, width=128)
    before = _model_of(fresh)
    opt_before = {k: v for k, v in fresh.optimizer.state_dict()["state"].items()}
    with pytest.raises(errors.HashMismatchError):
        rt.load(str(tmp_path), fresh)
    assert _same(before, _model_of(fresh))
    assert _same(opt_before, fresh.optimizer.state_dict()["state"])
