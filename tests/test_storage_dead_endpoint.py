"""A provider's endpoint that stops answering costs one short failure per call, on every client.

RetryingStore owns the retry budget (attempts, back-off, circuit breaker); a client library
that retries on its own underneath hides a dead provider from it. Measured before the clients'
loops were shortened: azure-storage ~12 s per call, gcsfs 34 s per call (6 tries, 1+2+4+8+16 s
of back-off, fixed at class definition). Each case starts a real emulator, writes through the
store, kills the emulator (SIGKILL: connections refused from then on), and times one call of
each kind on the bare FsspecStore (no RetryingStore above it).
"""

from __future__ import annotations

import time

import pytest

from resilient_train.errors import StoreTransientError
from resilient_train.storage.fsspec_store import FsspecStore

from .conftest import start_server

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

# 2 attempts of a refused connection and one back-off (gcsfs: 1-2 s); far below the 12-34 s
# the clients' own loops took, loose for a loaded machine
BOUND_S = 10.0


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_a_dead_endpoint_fails_each_call_fast_with_a_transient_error(kind):
    srv = start_server(kind)
    try:
        srv.create_bucket("rt-dead")
        store = FsspecStore(srv.uri("rt-dead", "p"), storage_options=srv.storage_options)
        store.write_bytes("x", b"hello" * 1000)
        assert store.read_bytes("x") == b"hello" * 1000
        srv.kill()
        calls = {"exists": lambda: store.exists("x"), "read": lambda: store.read_bytes("x"),
                 "write": lambda: store.write_bytes("y", b"z" * 100), "list": lambda: store.list("")}
        took = {}
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(StoreTransientError):
                call()
            took[name] = round(time.monotonic() - t0, 2)
        assert max(took.values()) < BOUND_S, f"{kind}: a call to a dead endpoint took {took} s"
        print(f"{kind}: dead endpoint, seconds per call {took}")
    finally:
        srv.stop()
