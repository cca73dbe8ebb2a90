"""Fixtures shared by the test files. Storage: local servers of S3, Azure Blob and GCS;
membership: a 3-member etcd cluster (``etcd_cluster``).

Each server starts once per session on 127.0.0.1 on a free port and stops at the end;
``make_store(kind)`` returns an empty Store under a fresh prefix. A server whose program is
missing fails the test under CI (``CI`` set) and skips it, with the reason, elsewhere.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Callable, Iterator

import pytest

from resilient_train.testing.servers import SERVERS, EmulatorUnavailable, EtcdCluster, prepare_client_env

prepare_client_env()  # before any cloud client is imported (gcsfs hangs on emulators otherwise)

STORE_KINDS = ["local", "memory", "s3", "azure", "gcs"]


def start_server(kind: str):
    """Start a fresh server of ``kind``; fail loudly under CI, skip elsewhere, if it is missing."""
    try:
        return SERVERS[kind]().start()
    except EmulatorUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} emulator unavailable under CI: {exc}", pytrace=False)
        pytest.skip(f"{kind} emulator unavailable (outside CI): {exc}")


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster on 127.0.0.1 for the session. Tests that kill a member
    restart it before they end (``restart(i)``); use a fresh key prefix per test."""
    try:
        cluster = EtcdCluster(3).start()
    except EmulatorUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"etcd unavailable under CI: {exc}", pytrace=False)
        pytest.skip(f"etcd unavailable (outside CI): {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def servers() -> Iterator[dict]:
    """Lazily started session servers, by kind; all stopped at the end of the session."""
    started: dict = {}
    yield started
    for srv in started.values():
        srv.stop()


_counter = itertools.count()


@pytest.fixture
def make_store(servers, tmp_path) -> Callable:
    """``make_store(kind, name=None, **open_kw)`` -> an empty Store of that kind."""
    from resilient_train.storage import open_store

    def make(kind: str, name: str | None = None, **open_kw):
        prefix = f"t{next(_counter)}-{uuid.uuid4().hex[:8]}"
        if kind == "local":
            return open_store(str(tmp_path / prefix), name=name or "local")
        if kind == "memory":
            return open_store(f"memory://rt-tests/{prefix}", name=name or "memory", **open_kw)
        if kind not in servers:
            servers[kind] = start_server(kind)
            servers[kind].create_bucket("rt-tests")
        srv = servers[kind]
        return open_store(srv.uri("rt-tests", prefix), srv.storage_options, name=name or kind, **open_kw)

    return make


def make_train_state(seed: int = 0, width: int = 64):
    """A small model + AdamW state (several tensors, optimizer moments after one step)."""
    import torch

    from resilient_train import TrainState

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    return TrainState(model=model, optimizer=opt, extra={"note": "storage tests"}, rng=False)


def state_tensors(state) -> dict:
    """Every tensor of model and optimizer, cloned, by name: to compare bit for bit."""
    out = {f"model/{k}": v.detach().clone() for k, v in state.model.state_dict().items()}
    for i, (idx, per) in enumerate(sorted(state.optimizer.state_dict()["state"].items())):
        for k, v in per.items():
            if hasattr(v, "clone"):
                out[f"opt/{idx}/{k}"] = v.clone()
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"
