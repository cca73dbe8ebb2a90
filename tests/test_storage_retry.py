"""Retries: transient failures are retried (bounded), permanent ones are not; errors are redacted."""

from __future__ import annotations

import errno
import os

import pytest

from resilient_train import load, save
from resilient_train.checkpoint.writer import SaveOptions
from resilient_train.errors import ConfigError, StoreNotFoundError, StorePermissionError, StoreTransientError, StoreUnavailableError
from resilient_train.storage import LocalStore, RetryingStore, RetryPolicy, classify, open_store, redact
from resilient_train.storage.providers import Provider
from resilient_train.testing.faults import FaultyStore, ServiceUnavailable
from resilient_train.testing.servers import free_port

from .conftest import assert_same_tensors, make_train_state, state_tensors

pytestmark = pytest.mark.timeout(120)

FAST = RetryPolicy(max_attempts=8, max_total_s=20, base_wait_s=0.001, max_wait_s=0.01, call_timeout_s=10)


class _Throttled(Exception):
    def __init__(self):
        self.response = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}


class _Denied(Exception):
    def __init__(self):
        self.response = {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}


class _Coded(Exception):
    """A botocore-style error that carries only an error code, no HTTP status."""

    def __init__(self, code):
        self.response = {"Error": {"Code": code}}


class EndpointConnectionError(Exception):
    """Same name as botocore's: matched by name, no client import."""


@pytest.mark.parametrize(
    "exc,kind",
    [
        (TimeoutError("t"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "transient"),
        (OSError(errno.ECONNREFUSED, "refused"), "transient"),
        (ServiceUnavailable("503"), "transient"),
        (_Throttled(), "transient"),
        (EndpointConnectionError("x"), "transient"),
        (FileNotFoundError("k"), "not_found"),
        (PermissionError("p"), "permission"),
        (_Denied(), "permission"),
        (_Coded("SlowDown"), "transient"),
        (_Coded("NoSuchKey"), "not_found"),
        (_Coded("AccessDenied"), "permission"),
        (ValueError("bad"), "permanent"),
        (StoreUnavailableError("exhausted"), "permanent"),
    ],
)
def test_classify(exc, kind):
    assert classify(exc) == kind


def test_classify_follows_the_cause_chain():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise OSError("s3fs wrapped it") from inner
    except OSError as outer:
        assert classify(outer) == "transient"


def test_transient_faults_are_absorbed(tmp_path):
    faulty = FaultyStore(LocalStore(str(tmp_path)), rate=0.4, seed=3)
    store = RetryingStore(faulty, FAST)
    for i in range(40):
        store.write_bytes(f"f/{i}", bytes([i]) * 10)
    assert [store.read_bytes(f"f/{i}") for i in range(40)] == [bytes([i]) * 10 for i in range(40)]
    assert store.list("f") == sorted(str(i) for i in range(40))
    assert faulty.injected > 20, faulty.injected


def test_permanent_failure_is_not_retried(tmp_path):
    faulty = FaultyStore(LocalStore(str(tmp_path)))
    store = RetryingStore(faulty, FAST)
    with pytest.raises(StoreNotFoundError):
        store.read_bytes("missing")
    assert faulty.calls == 1


def test_retry_budget_is_bounded_and_names_provider(tmp_path):
    faulty = FaultyStore(LocalStore(str(tmp_path), name="flaky-provider"), down=True)
    store = RetryingStore(faulty, RetryPolicy(max_attempts=4, max_total_s=5, base_wait_s=0.001, max_wait_s=0.002))
    with pytest.raises(StoreUnavailableError) as ei:
        store.write_bytes("x", b"1")
    assert faulty.calls == 4
    assert "flaky-provider" in str(ei.value) and ei.value.provider == "flaky-provider"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_save_and_load_succeed_through_injected_faults(make_store, kind):
    state = make_train_state()
    want = state_tensors(state)
    base = make_store(kind)
    faulty = FaultyStore(getattr(base, "inner", base), rate=0.25, seed=11)
    store = RetryingStore(faulty, FAST)
    save(store, state, 5, options=SaveOptions(max_file_bytes=4096, io_threads=4))
    after_save = faulty.injected
    assert after_save > 0
    fresh = make_train_state(seed=99)
    res = load(store, fresh, 5)
    assert res.step == 5
    assert faulty.injected > after_save
    assert_same_tensors(state_tensors(fresh), want)


def test_policy_validation():
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError):
        RetryPolicy(base_wait_s=5, max_wait_s=1)


def test_unreachable_endpoint_fails_fast_naming_provider_without_secrets(caplog):
    port = free_port()  # nothing listens there
    p = Provider(
        "aws-dead",
        "s3://bucket/run",
        "us-east-1",
        storage_options={"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIAEXAMPLEKEY", "secret": "TOP-SECRET-VALUE"},
        retry=RetryPolicy(max_attempts=2, max_total_s=10, base_wait_s=0.01, max_wait_s=0.02, call_timeout_s=10),
    )
    with caplog.at_level("DEBUG", logger="resilient_train"), pytest.raises(StoreUnavailableError) as ei:
        p.open().write_bytes("x", b"1")
    # Our own log lines only: botocore's DEBUG logging prints request headers itself.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("resilient_train"))
    assert "retrying" in ours  # the retry was logged ...
    assert "TOP-SECRET-VALUE" not in ours and "AKIAEXAMPLEKEY" not in ours  # ... without secrets
    msg = str(ei.value)
    assert "aws-dead" in msg and "reachable" in msg
    assert "TOP-SECRET-VALUE" not in msg and "AKIAEXAMPLEKEY" not in msg
    assert "TOP-SECRET-VALUE" not in repr(p) and "TOP-SECRET-VALUE" not in str(p.describe())


def test_missing_credentials_is_a_permission_error(make_store, servers, monkeypatch):
    make_store("s3")  # starts the server
    srv = servers["s3"]
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store("s3://rt-tests/nocreds", {"endpoint_url": srv.endpoint, "skip_instance_cache": True}, name="aws-nocreds", retry=FAST)
    with pytest.raises(StorePermissionError) as ei:
        store.write_bytes("x", b"1")
    assert "aws-nocreds" in str(ei.value) and "credentials" in str(ei.value)


def test_unknown_scheme_and_missing_client_refused_at_construction():
    with pytest.raises(ConfigError, match="unknown URL scheme"):
        Provider("p", "nosuchscheme://x/y", "eu-west-1")
    with pytest.raises(ConfigError, match="region"):
        Provider("p", "memory://x", "")
    with pytest.raises(ConfigError):
        open_store("nosuchscheme://x/y").exists("a")


def test_redact_masks_signed_urls_and_keys():
    text = "GET https://user:pw@host/b/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/2026 key=SECRETKEY sig=zzz AccountKey=K1=="
    out = redact(text)
    for secret in ("pw@", "abc123", "AKIA/2026", "SECRETKEY", "zzz", "K1=="):
        assert secret not in out, (secret, out)


def test_transient_error_type_is_a_storage_error():
    e = StoreTransientError("x", provider="p")
    assert classify(e) == "transient" and "[p]" in str(e)


def test_breaker_fails_fast_after_a_spent_budget_then_tries_again(tmp_path):
    now = [100.0]
    faulty = FaultyStore(LocalStore(str(tmp_path), name="dead"), down=True)
    pol = RetryPolicy(max_attempts=3, max_total_s=5, base_wait_s=0.001, max_wait_s=0.002, breaker_cooldown_s=30)
    store = RetryingStore(faulty, pol, clock=lambda: now[0])
    with pytest.raises(StoreUnavailableError):
        store.read_bytes("a")
    assert faulty.calls == 3 and not store.available
    child = store.child("sub")
    for call in (lambda: store.exists("b"), lambda: child.write_bytes("c", b"1")):
        with pytest.raises(StoreUnavailableError, match="not attempted"):
            call()
    assert faulty.calls == 3  # nothing reached the provider
    now[0] += 31
    faulty.down = False
    store.write_bytes("d", b"back")  # half-open: tried again, succeeds, breaker closes
    assert store.available and store.read_bytes("d") == b"back"
