"""Real gloo ranks: parallel disjoint writes, resharding across world sizes, DTensor shards,
and one rank's failure surfacing on every rank."""

from __future__ import annotations

import json

import pytest
import torch

import resilient_train as rt
from resilient_train import errors
from resilient_train.testing.ranks import run_ranks

pytestmark = pytest.mark.slow


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16), torch.nn.LayerNorm(16))


def _trained():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 32, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save_replicated(rank, world, root):
    model, opt = _trained()  # identical on every rank, like DDP replicas
    res = rt.save(root, rt.TrainState(model=model, optimizer=opt), 5)
    return res.bytes_written_by_rank, ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())


def _load_replicated(rank, world, root):
    torch.manual_seed(100 + rank)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16), torch.nn.LayerNorm(16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt.load(root, rt.TrainState(model=model, optimizer=opt))
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def _check(loaded, saved):
    sd, osd = loaded
    ref_sd, ref = saved
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    for i, st in ref["state"].items():
        for name, v in st.items():
            assert torch.equal(osd["state"][i][name], v), (i, name)


def test_four_ranks_write_disjoint_parts_and_load_on_1_2_3(tmp_path):
    root = str(tmp_path)
    out = run_ranks(_save_replicated, 4, root)
    written = [b for b, _ in out]
    assert all(b > 0 for b in written), f"every rank should write a part: {written}"
    manifest = json.loads((tmp_path / "step-0000000005" / "manifest.json").read_text())
    assert manifest["world"]["world_size"] == 4
    assert len({t["key"] for t in manifest["tensors"]}) == len(manifest["tensors"]), "a replicated tensor was stored twice"
    for world in (1, 2, 3):
        for loaded in run_ranks(_load_replicated, world, root):
            _check(loaded, out[0][1])


def test_two_ranks_save_four_load(tmp_path):
    root = str(tmp_path)
    saved = run_ranks(_save_replicated, 2, root)[0][1]
    for loaded in run_ranks(_load_replicated, 4, root):
        _check(loaded, saved)


# ------------------------------------------------------------------ DTensor shards


def _full_params():
    torch.manual_seed(0)
    return {"w": torch.randn(10, 6), "b": torch.randn(10), "scale": torch.randn(3)}


class _Sharded(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        for k, v in params.items():
            setattr(self, k, torch.nn.Parameter(v))


def _sharded_module(world, values):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    params = {
        "w": distribute_tensor(values["w"], mesh, [Shard(0)]),
        "b": distribute_tensor(values["b"], mesh, [Shard(0)]),
        "scale": distribute_tensor(values["scale"], mesh, [Replicate()]),
    }
    return _Sharded(params), mesh


def _reference_after_step():
    values = _full_params()
    model = _Sharded(values)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) + torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 10
    opt.step()
    return model, opt


def _save_dtensor(rank, world, root):
    from torch.distributed.tensor import distribute_tensor

    model, _ = _sharded_module(world, _full_params())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        full = torch.full(p.shape, 0.5) + torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 10
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)
    opt.step()
    res = rt.save(root, rt.TrainState(model=model, optimizer=opt), 3)
    return res.bytes_written_by_rank


def _load_dtensor(rank, world, root):
    blank = {k: torch.zeros_like(v) for k, v in _full_params().items()}
    model, _ = _sharded_module(world, blank)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    rt.load(root, rt.TrainState(model=model, optimizer=opt))
    params = {k: v.full_tensor() for k, v in model.state_dict().items()}
    state = {
        name: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in opt.state[p].items()}
        for name, p in model.named_parameters()
    }
    return params, state


def _load_plain(rank, world, root):
    model = _Sharded({k: torch.zeros_like(v) for k, v in _full_params().items()})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    rt.load(root, rt.TrainState(model=model, optimizer=opt))
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: dict(opt.state[p]) for n, p in model.named_parameters()}


def test_dtensor_shards_written_by_owners_and_resharded(tmp_path):
    root = str(tmp_path)
    written = run_ranks(_save_dtensor, 4, root)
    assert all(b > 0 for b in written)
    folder = tmp_path / "step-0000000003"
    manifest = json.loads((folder / "manifest.json").read_text())
    w_pieces = [t for t in manifest["tensors"] if t["key"] == "model/w"]
    assert sorted(tuple(t["offsets"]) for t in w_pieces) == [(0, 0), (3, 0), (6, 0), (9, 0)]
    assert all(t["file"].startswith("model-shards-") for t in w_pieces)
    scale = [t for t in manifest["tensors"] if t["key"] == "model/scale"]
    assert len(scale) == 1 and scale[0]["file"].startswith("model-0")  # replicated: stored once, HF file
    ref_model, ref_opt = _reference_after_step()
    ref_state = {n: ref_opt.state[p] for n, p in ref_model.named_parameters()}
    for params, state in run_ranks(_load_dtensor, 2, root) + run_ranks(_load_plain, 1, root):
        for k, v in ref_model.state_dict().items():
            assert torch.equal(params[k], v), k
        for n, st in ref_state.items():
            for k, v in st.items():
                assert torch.equal(state[n][k], v), (n, k)


# ------------------------------------------------------------------ failures on one rank


def _save_with_broken_rank(rank, world, root):
    from resilient_train.storage import LocalStore

    class Broken(LocalStore):
        def open_write(self, path):
            if path.endswith(".safetensors"):
                raise errors.StorageError("disk quota exceeded", provider="broken-disk")
            return super().open_write(path)

    model, opt = _trained()
    store = Broken(root) if rank == 1 else root
    try:
        rt.save(store, rt.TrainState(model=model, optimizer=opt), 7)
    except errors.CheckpointWriteError as exc:
        return sorted(exc.failures), str(exc)
    return None


def test_failure_on_one_rank_raises_on_every_rank(tmp_path):
    out = run_ranks(_save_with_broken_rank, 2, str(tmp_path))
    for failed, message in out:
        assert failed == [1]
        assert "rank 1" in message and "disk quota exceeded" in message and "broken-disk" in message
    assert not (tmp_path / "step-0000000007" / "manifest.json").exists()
