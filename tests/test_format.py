"""The on-disk format, pinned: exact bytes for a tiny known state, JSON state round trips,
safetensors compatibility, names, and the pure planner."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import resilient_train as rt
from resilient_train.checkpoint.planner import PieceMeta, plan_reads, plan_save
from resilient_train.format import Manifest, TensorRecord, decode_json_state, encode_json_state, parse_step_dirname, step_dirname

# Changing any of these bytes changes format version 1: bump FORMAT_VERSION and keep a reader.
PINNED_V1 = {
    'manifest.json' : b'{\n "files": [\n  {\n   "path": "model-00001-of-00001.safetensors",\n   "sha256": "10fdc69197f627a61f8cf82563a86867ebaf50f1dca290fbeb0fb75f6b6519ff",\n   "size_bytes": 172\n  },\n  {\n   "path": "model.safetensors.index.json",\n   "sha256": "b5b757ed16e4862ebdf4a380c21a9c505f763ad14552f69875714df85f9e445f",\n   "size_bytes": 155\n  },\n  {\n   "path": "rank-00000.json",\n   "sha256": "d389bfc79f7f089f4101f3b3326e102fcc5563750b41af61f01ff4885c4384b0",\n   "size_bytes": 33\n  },\n  {\n   "path": "state.json",\n   "sha256": "bb7d0864b5358203174338b18193ce12c178a05bf0f119770691dd29ee5d604a",\n   "size_bytes": 49\n  }\n ],\n "format": "resilient-train-checkpoint",\n "format_version": 1,\n "step": 7,\n "tensors": [\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1\n   ],\n   "key": "model/bias",\n   "name": "bias",\n   "offsets": [\n    0\n   ],\n   "shape": [\n    1\n   ]\n  },\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1,\n    2\n   ],\n   "key": "model/weight",\n   "name": "weight",\n   "offsets": [\n    0,\n    0\n   ],\n   "shape": [\n    1,\n    2\n   ]\n  }\n ],\n "world": {\n  "world_size": 1\n }\n}\n' ,
    'model-00001-of-00001.safetensors' : b'\x98\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"pt"},"bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"weight":{"dtype":"F32","shape":[1,2],"data_offsets":[4,12]}}   \x00\x00\x00?\x00\x00\x80?\x00\x00\x00\xc0' ,
    'model.safetensors.index.json' : b'{\n "metadata": {\n  "total_size": 12\n },\n "weight_map": {\n  "bias": "model-00001-of-00001.safetensors",\n  "weight": "model-00001-of-00001.safetensors"\n }\n}\n' ,
    'rank-00000.json' : b'{\n "rank": 0,\n "world_size": 1\n}\n' ,
    'state.json' : b'{\n "extra": {\n  "lr": 0.1,\n  "name": "tiny"\n }\n}\n' ,
}


# Format version 2: the same data files; the manifest adds per-chunk digests
# ("chunk_sha256", one per 8 MiB here) and the "hash" block with the chunk size.
PINNED_V2 = {**PINNED_V1, "manifest.json": b'{\n "files": [\n  {\n   "chunk_sha256": [\n    "10fdc69197f627a61f8cf82563a86867ebaf50f1dca290fbeb0fb75f6b6519ff"\n   ],\n   "path": "model-00001-of-00001.safetensors",\n   "sha256": "10fdc69197f627a61f8cf82563a86867ebaf50f1dca290fbeb0fb75f6b6519ff",\n   "size_bytes": 172\n  },\n  {\n   "chunk_sha256": [\n    "b5b757ed16e4862ebdf4a380c21a9c505f763ad14552f69875714df85f9e445f"\n   ],\n   "path": "model.safetensors.index.json",\n   "sha256": "b5b757ed16e4862ebdf4a380c21a9c505f763ad14552f69875714df85f9e445f",\n   "size_bytes": 155\n  },\n  {\n   "chunk_sha256": [\n    "d389bfc79f7f089f4101f3b3326e102fcc5563750b41af61f01ff4885c4384b0"\n   ],\n   "path": "rank-00000.json",\n   "sha256": "d389bfc79f7f089f4101f3b3326e102fcc5563750b41af61f01ff4885c4384b0",\n   "size_bytes": 33\n  },\n  {\n   "chunk_sha256": [\n    "bb7d0864b5358203174338b18193ce12c178a05bf0f119770691dd29ee5d604a"\n   ],\n   "path": "state.json",\n   "sha256": "bb7d0864b5358203174338b18193ce12c178a05bf0f119770691dd29ee5d604a",\n   "size_bytes": 49\n  }\n ],\n "format": "resilient-train-checkpoint",\n "format_version": 2,\n "hash": {\n  "algorithm": "sha256",\n  "chunk_bytes": 8388608\n },\n "step": 7,\n "tensors": [\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1\n   ],\n   "key": "model/bias",\n   "name": "bias",\n   "offsets": [\n    0\n   ],\n   "shape": [\n    1\n   ]\n  },\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1,\n    2\n   ],\n   "key": "model/weight",\n   "name": "weight",\n   "offsets": [\n    0,\n    0\n   ],\n   "shape": [\n    1,\n    2\n   ]\n  }\n ],\n "world": {\n  "world_size": 1\n }\n}\n'}


# Format version 3 (the default): the same data files; the manifest names its algorithm
# ("hash.algorithm": "blake3"), lists each file's chunk digests as "chunks" and its "digest" as
# the BLAKE3 of the concatenated 32-byte chunk digests. Checked against the blake3 package
# directly in test_v3_digests_are_blake3_of_the_bytes.
PINNED_V3 = {**PINNED_V1, "manifest.json": b'{\n "files": [\n  {\n   "chunks": [\n    "44a83de7c24575a3c06515683143ce5faf0e0acbef00254e69d00486e4a73827"\n   ],\n   "digest": "db676c6e3a6137ada8f0edf537511334cc132e1de41db42a60d22e3c4959c23f",\n   "path": "model-00001-of-00001.safetensors",\n   "size_bytes": 172\n  },\n  {\n   "chunks": [\n    "0df5d36c3550cf2cf3d9605983df34a501ae85c416b2286c75de4a9cdedf5f9c"\n   ],\n   "digest": "53415dc4847435d6812bca25aeaa8563839f5c7a588c34281e461035cffae97f",\n   "path": "model.safetensors.index.json",\n   "size_bytes": 155\n  },\n  {\n   "chunks": [\n    "f8fe44601fc4ec17d0f46cac690543aaff413f1634a25be9fd77d643dfda4fbc"\n   ],\n   "digest": "053c98d9f00060c54511177f0dd4c85b1c3dd69a60179dbd240cbb753c94fb8d",\n   "path": "rank-00000.json",\n   "size_bytes": 33\n  },\n  {\n   "chunks": [\n    "00a64377ad339497289a989cc89e6c675481807cb52af397503131c3ead711dd"\n   ],\n   "digest": "f470ad25a986ee8a5681a6c9d939a807a23e3ae1282fdf5c868f147f54e4dfcf",\n   "path": "state.json",\n   "size_bytes": 49\n  }\n ],\n "format": "resilient-train-checkpoint",\n "format_version": 3,\n "hash": {\n  "algorithm": "blake3",\n  "chunk_bytes": 8388608\n },\n "step": 7,\n "tensors": [\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1\n   ],\n   "key": "model/bias",\n   "name": "bias",\n   "offsets": [\n    0\n   ],\n   "shape": [\n    1\n   ]\n  },\n  {\n   "dtype": "F32",\n   "file": "model-00001-of-00001.safetensors",\n   "global_shape": [\n    1,\n    2\n   ],\n   "key": "model/weight",\n   "name": "weight",\n   "offsets": [\n    0,\n    0\n   ],\n   "shape": [\n    1,\n    2\n   ]\n  }\n ],\n "world": {\n  "world_size": 1\n }\n}\n'}


def _tiny_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    return model


@pytest.mark.parametrize("version", [1, 2, 3])
def test_exact_bytes_of_a_tiny_checkpoint(tmp_path, version):
    pinned = {1: PINNED_V1, 2: PINNED_V2, 3: PINNED_V3}[version]
    state = rt.TrainState(model=_tiny_model(), rng=False, extra={"lr": 0.1, "name": "tiny"})
    rt.save(str(tmp_path), state, 7, options=rt.checkpoint.SaveOptions(format_version=version))
    folder = tmp_path / "step-0000000007"
    assert sorted(p.name for p in folder.iterdir()) == sorted(pinned)
    for name, data in pinned.items():
        assert (folder / name).read_bytes() == data, name
    manifest = Manifest.from_bytes(pinned["manifest.json"])
    assert manifest.format_version == version
    assert manifest.to_bytes() == pinned["manifest.json"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_pinned_checkpoint_of_each_version_loads(tmp_path, version):
    pinned = {1: PINNED_V1, 2: PINNED_V2, 3: PINNED_V3}[version]
    folder = tmp_path / "step-0000000007"
    folder.mkdir()
    for name, data in pinned.items():
        (folder / name).write_bytes(data)
    model = torch.nn.Linear(2, 1)
    state = rt.TrainState(model=model, rng=False, extra={})
    rt.load(str(tmp_path), state)
    assert model.weight.tolist() == [[1.0, -2.0]] and model.bias.tolist() == [0.5]
    assert state.extra == {"lr": 0.1, "name": "tiny"}


def test_v3_digests_are_blake3_of_the_bytes():
    """The pinned v3 digests, recomputed with the blake3 package alone (not our hashing code)."""
    import json

    import blake3

    m = json.loads(PINNED_V3["manifest.json"])
    assert m["hash"] == {"algorithm": "blake3", "chunk_bytes": 8 * 1024 * 1024}
    for f in m["files"]:
        assert f["chunks"] == [blake3.blake3(PINNED_V3[f["path"]]).hexdigest()], f["path"]
        assert f["digest"] == blake3.blake3(b"".join(bytes.fromhex(d) for d in f["chunks"])).hexdigest(), f["path"]


def test_step_folder_names():
    assert step_dirname(42) == "step-0000000042"
    assert parse_step_dirname("step-0000000042") == 42
    assert parse_step_dirname("step-42") is None
    assert parse_step_dirname("step-0000000042.tmp") is None
    with pytest.raises(ValueError):
        step_dirname(-1)
    # the edges of the persisted name (mutation testing): 0 and 10**10 - 1 fit ten digits
    assert step_dirname(0) == "step-0000000000"
    assert step_dirname(10**10 - 1) == "step-9999999999"
    for bad in (10**10, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"step must be an int in \[0, 1e10\)"):
            step_dirname(bad)
    assert parse_step_dirname("step-0000000042/") == 42  # fsspec listings may end folders with "/"
    assert parse_step_dirname("/step-0000000042") is None


def test_json_state_round_trip_of_rng_and_awkward_values():
    value = {
        "py": random.getstate(),
        "np": np.random.get_state(),
        "floats": [math.inf, -math.inf, 1.5, np.float32(2.0)],
        "int_keys": {1: "a", (2, 3): "b"},
        "tagged": {"__tuple__": 1},
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "t": torch.arange(4),
    }
    tree, tensors = encode_json_state(value)
    assert list(tensors) == ["t"]
    back = decode_json_state(tree, tensors)
    assert back["py"] == value["py"]
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], value["np"][1]) and back["np"][2:] == value["np"][2:]
    assert back["floats"][:3] == [math.inf, -math.inf, 1.5] and back["floats"][3] == 2.0
    assert back["int_keys"] == {1: "a", (2, 3): "b"}
    assert back["tagged"] == {"__tuple__": 1}
    assert back["bytes"] == b"\x00\xff" and back["dtype"] is torch.bfloat16
    nan_tree, _ = encode_json_state(float("nan"))
    assert math.isnan(decode_json_state(nan_tree))


def test_json_state_refuses_code():
    with pytest.raises(TypeError, match="x.f"):
        encode_json_state({"x": {"f": print}})


def _meta(key, shape, offsets=None, gshape=None, group="model"):
    gshape = gshape or shape
    n = 4
    for s in shape:
        n *= s
    return PieceMeta(key, group, key.split("/", 1)[1], "F32", tuple(shape), tuple(gshape), tuple(offsets or [0] * len(shape)), n)


def test_planner_spreads_replicated_and_keeps_shards_with_owners():
    replicated = [_meta(f"model/p{i}", [100 * (i + 1)]) for i in range(6)]
    shard = lambda r: _meta("model/w", [5, 4], [5 * r, 0], [20, 4])  # noqa: E731
    per_rank = [replicated + [shard(r)] for r in range(4)]
    plan = plan_save(per_rank)
    owners = {p.key: f.rank for f in plan.files for p in f.pieces if p.key != "model/w"}
    assert len(owners) == 6 and len(set(owners.values())) == 4  # spread over every rank
    shards = sorted((f.rank, p.offsets) for f in plan.files for p in f.pieces if p.key == "model/w")
    assert shards == [(0, (0, 0)), (1, (5, 0)), (2, (10, 0)), (3, (15, 0))]
    assert all(f.group == "model_shards" for f in plan.files if any(p.key == "model/w" for p in f.pieces))
    assert plan == plan_save(per_rank)  # deterministic


def test_planner_splits_files_by_size():
    per_rank = [[_meta(f"model/p{i}", [256]) for i in range(10)]]
    plan = plan_save(per_rank, max_file_bytes=2048)
    assert [f.filename for f in plan.files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert all(f.nbytes <= 2048 for f in plan.files)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 6),
    saved_world=st.integers(1, 5),
    load_world=st.integers(1, 5),
)
def test_plan_reads_covers_any_resharding_exactly(n, m, saved_world, load_world):
    full = torch.arange(n * m, dtype=torch.float32).reshape(n, m)
    step = -(-n // saved_world)
    records = []
    pieces = {}
    for r in range(saved_world):
        lo, hi = min(n, r * step), min(n, (r + 1) * step)
        if hi > lo:
            rec = TensorRecord("model/w", f"f{r}", "w", "F32", (hi - lo, m), (n, m), (lo, 0))
            records.append(rec)
            pieces[rec.file] = full[lo:hi]
    lstep = -(-n // load_world)
    for r in range(load_world):
        lo, hi = min(n, r * lstep), min(n, (r + 1) * lstep)
        dest = torch.full((hi - lo, m), -1.0)
        ops, covered = plan_reads(records, (lo, 0), (hi - lo, m))
        assert covered == dest.numel()
        for op in ops:
            src = pieces[op.record.file][tuple(slice(s, s + k) for s, k in zip(op.src_start, op.size))]
            dest[tuple(slice(s, s + k) for s, k in zip(op.dst_start, op.size))] = src
        assert torch.equal(dest, full[lo:hi])


def test_v3_with_sha256_chunk_digests_round_trips(tmp_path):
    """Format 3 names its algorithm: SHA-256 chunks (for readers that need it) are written,
    loaded and verified with SHA-256, never with the default; an unknown algorithm is refused
    at SaveOptions."""
    import hashlib
    import json

    from resilient_train import errors
    from resilient_train.checkpoint import SaveOptions, verify_checkpoint

    state = rt.TrainState(model=_tiny_model(), rng=False, extra={"t": torch.arange(3000, dtype=torch.float32)})
    rt.save(str(tmp_path), state, 7, options=SaveOptions(hash_algorithm="sha256", hash_chunk_bytes=4096))
    folder = tmp_path / "step-0000000007"
    m = json.loads((folder / "manifest.json").read_bytes())
    assert m["format_version"] == 3 and m["hash"] == {"algorithm": "sha256", "chunk_bytes": 4096}
    for f in m["files"]:
        data = (folder / f["path"]).read_bytes()
        chunks = [hashlib.sha256(data[i:i + 4096]).hexdigest() for i in range(0, max(len(data), 1), 4096)]
        assert f["chunks"] == chunks and f["digest"] == hashlib.sha256(b"".join(bytes.fromhex(c) for c in chunks)).hexdigest()
    fresh = rt.TrainState(model=torch.nn.Linear(2, 1), rng=False, extra={})
    rt.load(str(tmp_path), fresh)
    assert torch.equal(fresh.extra["t"], state.extra["t"])
    assert verify_checkpoint(str(tmp_path), 7)[1] == []
    p = folder / "extra-00001-of-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x04
    p.write_bytes(bytes(data))
    with pytest.raises(errors.HashMismatchError, match="SHA-256 digest"):
        rt.load(str(tmp_path), rt.TrainState(model=torch.nn.Linear(2, 1), rng=False, extra={}))
    problems = verify_checkpoint(str(tmp_path), 7)[1]
    assert len(problems) == 1 and "extra-00001-of-00001.safetensors" in problems[0] and "SHA-256" in problems[0]
    with pytest.raises(ValueError, match="hash_algorithm"):
        SaveOptions(hash_algorithm="md5")
