"""DiLoCo / LocalSGD on real gloo ranks (threads): the maths by hand, the schedule, failures."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from resilient_train.compression import get_codec
from resilient_train.errors import ConfigError, PayloadMismatchError, ReplicaMismatchError, StateMismatchError
from resilient_train.sync import DiLoCo, LocalSGD
from resilient_train.sync.threads import run_thread_ranks

THETA0 = [1.0, 2.0, -1.0, 0.5]


class Vec(torch.nn.Module):
    def __init__(self, values, extra: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))
        if extra:
            self.v = torch.nn.Parameter(torch.arange(float(extra)))


def mlp(seed: int = 0) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _set(model, values):
    with torch.no_grad():
        model.w.copy_(torch.tensor(values))


def sgd_nesterov_by_hand(theta, grads, lr=0.7, mu=0.9):
    """torch.optim.SGD(nesterov=True) written out: buf = g (first), buf = mu buf + g; p -= lr (g + mu buf)."""
    buf = None
    for g in grads:
        buf = g.clone() if buf is None else buf * mu + g
        theta = theta - lr * (g + mu * buf)
    return theta


def test_one_and_two_outer_steps_by_hand():
    # local weights at the syncs (steps 2 and 4), chosen so every pseudo-gradient is dyadic
    locals_ = {0: {2: [0.5, 1.75, -2.0, 2.5]}, 1: {2: [-0.5, 2.25, -1.0, -1.5]}}
    d1 = torch.tensor([1.0, 0.0, 0.5, 0.0])  # mean of theta0 - L_i

    def fn(rank, comm):
        model = Vec(THETA0)
        sync = DiLoCo(model, sync_every=2, comm=comm)
        sync.step()
        _set(model, locals_[rank][2])
        sync.step()  # step 2: sync
        after1 = model.w.detach().clone()
        g1 = sync.global_weights(0).clone()
        # round 2: move each replica by a known amount from the new global weights
        _set(model, (after1 - torch.tensor([0.25, 0.5, 0.0, -1.0]) * (1 + rank)).tolist())
        sync.step()
        sync.step()  # step 4: sync
        return after1, g1, model.w.detach().clone(), sync.rounds, comm.bytes_sent

    res = run_thread_ranks(fn, 2)
    theta0 = torch.tensor(THETA0)
    want1 = sgd_nesterov_by_hand(theta0, [d1])
    # by hand: 1.9 * 0.7 = 1.33 times the mean pseudo-gradient
    torch.testing.assert_close(want1, torch.tensor([1.0 - 1.33, 2.0, -1.0 - 0.665, 0.5]))
    d2 = torch.tensor([0.25, 0.5, 0.0, -1.0]) * 1.5
    want2 = sgd_nesterov_by_hand(theta0, [d1, d2])
    for after1, g1, after2, rounds, sent in res:
        torch.testing.assert_close(after1, want1, rtol=0, atol=1e-6)
        assert torch.equal(after1, g1)  # L <- G without overlap
        torch.testing.assert_close(after2, want2, rtol=0, atol=1e-6)
        assert rounds == 2
    assert torch.equal(res[0][2], res[1][2])  # replicas identical after a sync


def test_int8_pseudo_gradient_with_error_feedback_matches_the_oracle():
    codec_opts = {"backend": "reference", "block_size": 2}

    def local_at(rank, t):
        return (torch.tensor(THETA0) + torch.tensor([0.3, -0.7, 0.11, 0.05]) * (rank + 1) * t).tolist()

    def fn(rank, comm):
        model = Vec(THETA0)
        sync = DiLoCo(model, sync_every=1, comm=comm, codec=get_codec("int8", **codec_opts),
                      outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        out = []
        for t in range(1, 4):
            _set(model, local_at(rank, t) if t == 1 else (model.w.detach() + 0.1 * (rank + 1)).tolist())
            sync.step()
            out.append(model.w.detach().clone())
        return out, sync.state_dict()["tensors"]["fragment.0.residual"]

    res = run_thread_ranks(fn, 2)
    # the oracle: replay both replicas locally with the reference codec
    codec = get_codec("int8", **codec_opts)
    g = torch.tensor(THETA0)
    resid = [torch.zeros(4), torch.zeros(4)]
    for t in range(1, 4):
        acc = torch.zeros(4)
        for r in range(2):
            local = torch.tensor(local_at(r, 1)) if t == 1 else g + 0.1 * (r + 1)
            codec.decode(codec.encode(g - local, resid[r]), out=acc, accumulate=True)
        g = g - acc / 2
        for r in range(2):
            assert torch.equal(res[r][0][t - 1], g)
    for r in range(2):
        assert torch.equal(res[r][1], resid[r])
        assert float(res[r][1].abs().max()) > 0  # int8 on 2-element blocks really dropped something


def test_local_sgd_averages_parameters():
    def fn(rank, comm):
        model = mlp(0)
        sync = LocalSGD(model, sync_every=3, comm=comm)
        g = torch.Generator().manual_seed(100 + rank)
        seen = []
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            seen.append([p.detach().clone() for p in model.parameters()])
            sync.step()
        return seen[-1], [p.detach().clone() for p in model.parameters()]

    res = run_thread_ranks(fn, 3)
    for i in range(len(res[0][1])):
        mean = sum(r[0][i] for r in res) / 3
        for r in res:
            torch.testing.assert_close(r[1][i], mean, rtol=0, atol=1e-6)


def test_streaming_fragments_sync_at_staggered_steps():
    H, K = 4, 2

    def fn(rank, comm):
        model = Vec([0.0] * 8, extra=8)  # two tensors of 8 elements: one per fragment
        sync = DiLoCo(model, sync_every=H, comm=comm, fragments=K,
                      outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        changed = {0: [], 1: []}
        sizes = [(comm.bytes_sent, sync.num_fragments)]
        for t in range(1, 11):
            before = [sync.global_weights(k).clone() for k in range(K)]
            with torch.no_grad():
                model.w.add_(1.0 + rank)
                model.v.add_(1.0 + rank)
            b0 = comm.bytes_sent
            sync.step()
            for k in range(K):
                if not torch.equal(before[k], sync.global_weights(k)):
                    changed[k].append(t)
            if comm.bytes_sent > b0:
                sizes.append(comm.bytes_sent - b0)
        return changed, sync.sync_steps(0, 10), sync.sync_steps(1, 10), sizes, sync.fragment_params(0)

    for changed, s0, s1, sizes, frag0 in run_thread_ranks(fn, 2):
        assert s0 == [2, 6, 10] and s1 == [4, 8]
        assert changed == {0: [2, 6, 10], 1: [4, 8]}
        assert len(frag0) == 1
        # each sync moves one fragment (8 floats + the veto and replica-count slots), not the
        # whole model; the first sync adds the handshake all-gather (6 int64)
        assert sizes[2:] == [2 * 1 * 10 * 4 // 2] * 4
        assert sizes[1] == 10 * 4 + 6 * 8


def test_overlap_applies_the_delayed_update_with_the_documented_mixing_rule():
    H, d, mix = 4, 2, 0.25
    theta0 = torch.tensor(THETA0)

    def local_step(rank, t):
        return torch.tensor([0.5, -0.25, 0.125, 1.0]) * (rank + 1) * (1 if t % 2 else -0.5)

    def fn(rank, comm):
        model = Vec(THETA0)
        sync = DiLoCo(model, sync_every=H, comm=comm, overlap_steps=d, mix=mix)
        trace = {}
        for t in range(1, 11):
            with torch.no_grad():
                model.w.add_(local_step(rank, t))
            sync.step()
            trace[t] = model.w.detach().clone()
        return trace

    res = run_thread_ranks(fn, 2)
    # replay the documented rule: launch at t = 4, 8 with D = mean(G - L(t)); at t + d:
    # G <- outer(G, D); L <- lerp(L, G, mix)
    L = [theta0.clone(), theta0.clone()]
    G = theta0.clone()
    opt_g = G.clone().requires_grad_(True)
    opt = torch.optim.SGD([opt_g], lr=0.7, momentum=0.9, nesterov=True)
    pending = None
    for t in range(1, 11):
        L = [L[r] + local_step(r, t) for r in range(2)]
        if pending is not None and pending[0] == t:
            opt_g.grad = pending[1]
            opt.step()
            L = [torch.lerp(L[r], opt_g.detach(), mix) for r in range(2)]
            pending = None
        if t % H == 0:
            pending = (t + d, sum(opt_g.detach() - L[r] for r in range(2)) / 2)
        for r in range(2):
            torch.testing.assert_close(res[r][t], L[r], rtol=0, atol=1e-6, msg=f"step {t} rank {r}")
    # and by hand for the first application (step 6): the d local steps survive half-way
    assert not torch.equal(res[0][6], res[1][6])
    assert torch.equal(res[0][5], theta0 + sum(local_step(0, t) for t in range(1, 6)))


def test_non_finite_pseudo_gradient_skips_the_round_on_every_replica(caplog):
    def fn(rank, comm):
        model = mlp(1)
        start = [p.detach().clone() for p in model.parameters()]
        # the reference codec: these thread ranks must not wait on a first JIT build of the twin
        sync = DiLoCo(model, sync_every=2, comm=comm, codec=get_codec("int8", backend="reference"))
        sync.step()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
            if rank == 1:
                next(model.parameters())[0, 0] = float("nan")
        sync.step()
        return start, [p.detach().clone() for p in model.parameters()], sync.skipped_rounds, sync.rounds, \
            sync.state_dict()["tensors"]

    with caplog.at_level(logging.WARNING, logger="resilient_train.sync.diloco"):
        res = run_thread_ranks(fn, 2)
    for start, after, skipped, rounds, tensors in res:
        assert (skipped, rounds) == (1, 1)
        for a, b in zip(start, after):
            assert torch.equal(a, b)  # reset to the unchanged global weights, NaN gone
        assert torch.equal(tensors["fragment.0.residual"], torch.zeros_like(tensors["fragment.0.residual"]))
        assert "momentum_buffer" not in "".join(tensors)  # the outer optimizer never stepped
    assert "skipped: non-finite pseudo-gradient on 1 replica(s)" in caplog.text


def test_replicas_with_different_parameters_fail_at_the_first_sync():
    def fn(rank, comm):
        model = mlp(seed=rank)
        sync = DiLoCo(model, sync_every=1, comm=comm)
        sync.step()

    with pytest.raises(Exception) as info:
        run_thread_ranks(fn, 2)
    assert set(info.value.errors) == {0, 1}
    assert all(isinstance(e, ReplicaMismatchError) for e in info.value.errors.values())
    assert "rank 1: parameter digest" in str(info.value.errors[0])


def test_replicas_with_different_codecs_fail_at_the_first_sync():
    def fn(rank, comm):
        sync = DiLoCo(mlp(0), sync_every=1, comm=comm, codec="int8" if rank == 0 else "int4")
        sync.step()

    with pytest.raises(Exception) as info:
        run_thread_ranks(fn, 2)
    assert all(isinstance(e, PayloadMismatchError) for e in info.value.errors.values())


@pytest.mark.parametrize("kwargs,match", [
    ({"sync_every": 0}, "sync_every"), ({"sync_every": -3}, "sync_every"), ({"sync_every": 2.5}, "sync_every"),
    ({"sync_every": 4, "fragments": 0}, "fragments"), ({"sync_every": 4, "fragments": 5}, "fragments"),
    ({"sync_every": 4, "overlap_steps": 4}, "overlap_steps"), ({"sync_every": 4, "mix": 0.0}, "mix"),
    ({"sync_every": 4, "codec": "int5"}, "unknown codec"),
])
def test_bad_configuration_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiLoCo(mlp(0), **kwargs)
    if "codec" not in kwargs and "sync_every" in kwargs and kwargs["sync_every"] < 1:
        with pytest.raises(ConfigError, match="sync_every"):
            LocalSGD(mlp(0), sync_every=kwargs["sync_every"])


def test_hooked_to_the_inner_optimizer_and_manual_step_refused():
    def fn(rank, comm):
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        with DiLoCo(model, opt, sync_every=3, comm=comm) as sync:
            for _ in range(6):
                model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            with pytest.raises(ConfigError, match="do not also call step"):
                sync.step()
            assert (sync.step_count, sync.rounds) == (6, 2)
        model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
        opt.step()  # hook removed by close(): no more counting
        assert sync.step_count == 6
        return [p.detach().clone() for p in model.parameters()]

    a, b = run_thread_ranks(fn, 2)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))  # the last local step differs


def test_state_dict_is_json_plus_tensors_and_resumes_identically():
    """Snapshot mid-flight (an overlapped int8 round pending), restore into a fresh object,
    and continue both: the restored run follows the original bit for bit."""

    def train(model, sync, g, steps):
        for _ in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
            sync.step()

    def fn(rank, comm):
        codec = get_codec("int8", block_size=8, backend="reference")
        make = lambda m: DiLoCo(m, sync_every=3, comm=comm, codec=codec, fragments=2, overlap_steps=1)  # noqa: E731
        model = mlp(0)
        sync = make(model)
        # H = 3, K = 2: fragment 0 launches at 1, 4, 7, ...; fragment 1 at 3, 6, 9, ...
        train(model, sync, torch.Generator().manual_seed(rank), 9)  # step 9: fragment 1 in flight
        state = sync.state_dict()
        text = json.dumps(state["meta"])
        assert all(isinstance(t, torch.Tensor) for t in state["tensors"].values())
        assert "fragment.1.pending.mean" in state["tensors"]
        assert "fragment.0.pending.mean" not in state["tensors"]
        weights = [p.detach().clone() for p in model.parameters()]

        model2 = mlp(0)
        with torch.no_grad():
            for p, w in zip(model2.parameters(), weights):
                p.copy_(w)
        sync2 = make(model2)
        sync2.load_state_dict({"meta": json.loads(text), "tensors": state["tensors"]})
        g1, g2 = torch.Generator().manual_seed(50 + rank), torch.Generator().manual_seed(50 + rank)
        train(model, sync, g1, 6)
        train(model2, sync2, g2, 6)
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
        return same, sync.rounds, sync2.rounds

    for same, r1, r2 in run_thread_ranks(fn, 2):
        assert same
        assert r1 == r2 == 10  # launches at 1,4,7,10,13 and 3,6,9,12,15


def test_load_state_dict_rejects_a_mismatched_state():
    sync = DiLoCo(mlp(0), sync_every=2, codec="int8")
    state = sync.state_dict()
    other = DiLoCo(mlp(0), sync_every=3, codec="int8")
    with pytest.raises(StateMismatchError, match="sync_every"):
        other.load_state_dict(state)
    state["tensors"]["fragment.0.global"] = torch.zeros(3)
    with pytest.raises(StateMismatchError, match="shape"):
        sync.load_state_dict(state)
    with pytest.raises(StateMismatchError):
        sync.load_state_dict({"meta": {}, "tensors": {}})


def test_global_state_heals_a_peer_with_the_checkpoint_encoding():
    """One state for checkpoints and healing (sync/diloco.py): the replicated part
    (global_state_dict, and its flat form for a state transfer) uses state_dict's names and
    encoding; a fresh engine that takes a peer's flat state holds the same global weights, outer
    momentum, counters and local weights as the peer, and gives back the same flat tensor."""

    def fn(rank, comm):
        model = mlp(0)
        sync = DiLoCo(model, sync_every=2, comm=comm, fragments=2)
        g = torch.Generator().manual_seed(rank)
        for _ in range(6):  # three rounds per fragment: outer momentum exists
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
            sync.step()
        return sync.global_flat(), sync.global_flat_meta(), sync.global_state_dict(), sync.state_dict(), sync.rounds

    flat, meta, gsd, sd, rounds = run_thread_ranks(fn, 2)[0]
    json.dumps(meta), json.dumps(gsd["meta"])
    assert meta["momentum"] == [True, True]
    # the same names and values as the checkpoint's state_dict
    for name, t in gsd["tensors"].items():
        assert torch.equal(t, sd["tensors"][name]), name
    assert [fm["outer_state"] for fm in gsd["meta"]["fragments"]] == [fm["outer_state"] for fm in sd["meta"]["fragments"]]

    model2 = mlp(7)
    healed = DiLoCo(model2, sync_every=2, fragments=2)
    healed.load_global_flat(flat.clone(), json.loads(json.dumps(meta)))
    got = healed.global_state_dict()
    assert sorted(got["tensors"]) == sorted(gsd["tensors"])
    for name, t in gsd["tensors"].items():
        assert torch.equal(got["tensors"][name], t), name
    assert healed.rounds == rounds and healed.step_count == sd["meta"]["step"]
    local = torch.cat([p.detach().reshape(-1) for p in model2.parameters()])
    assert torch.equal(local, torch.cat([gsd["tensors"]["fragment.0.global"], gsd["tensors"]["fragment.1.global"]]))
    assert torch.equal(healed.global_flat(), flat)

    other = DiLoCo(mlp(9), sync_every=2, fragments=2)
    other.load_global_state_dict(gsd)
    assert torch.equal(other.global_flat(), flat)
    with pytest.raises(StateMismatchError):
        DiLoCo(mlp(0), sync_every=3, fragments=3).load_global_state_dict(gsd)
