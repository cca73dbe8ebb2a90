"""No secret in any log line at any verbosity: save, load and failing calls on the S3 (moto)
and Azure (azurite) emulators, with a root handler that captures every record."""

from __future__ import annotations

import io
import logging
import re

import pytest

from resilient_train import load, save
from resilient_train.errors import ResilientTrainError
from resilient_train.logs import configure_logging
from resilient_train.storage import RetryPolicy, open_store
from resilient_train.testing.servers import AZURITE_KEY, free_port

from .conftest import make_train_state, start_server

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

KEY_ID = "AKIARTLOGTESTKEY7Q2Z"
SECRET = "rtLogTestSecret/9xQ2vB7nM4kL1pZ8wY6tR3sD5fG0hJ"
FAST = RetryPolicy(max_attempts=2, max_total_s=5, base_wait_s=0.01, max_wait_s=0.02, call_timeout_s=5, breaker_cooldown_s=0)  # the dead endpoint
PATIENT = RetryPolicy(max_attempts=4, max_total_s=90, call_timeout_s=60, breaker_cooldown_s=0)  # the live one, on a loaded machine


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))


def _exercise(store, dead_store, tmp_name):
    state = make_train_state()
    save(store, state, 1)
    load(store, make_train_state(seed=3), 1)
    for call in (lambda: store.read_bytes("missing/object.bin"), lambda: dead_store.write_bytes("x.bin", b"1")):
        with pytest.raises(ResilientTrainError):
            call()


def _leaks(lines, secrets):
    bad = []
    for line in lines:
        for s in secrets:
            if s in line:
                bad.append((s[:6], line[:300]))
        # header names may stay (masked), values may not
        for m in re.finditer(r"(?:Authorization['\"]?\s*[:=]\s*(?:b?['\"])?|Signature=|Credential=)([^'\"\s,;]*)", line):
            if not m.group(1).startswith("***") and m.group(1) not in ("", "REDACTED"):
                bad.append(("auth", line[max(0, m.start() - 40) : m.end() + 40]))
    return bad


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_no_secret_in_any_log_line(kind, tmp_path, servers):
    if kind not in servers:
        servers[kind] = start_server(kind)
    srv = servers[kind]
    try:
        if not srv.filesystem().exists("rt-logs"):
            srv.create_bucket("rt-logs")
        if kind == "s3":
            opts = {"endpoint_url": srv.endpoint, "key": KEY_ID, "secret": SECRET}
            secrets = [KEY_ID, SECRET]
            dead_opts = dict(opts, endpoint_url=f"http://127.0.0.1:{free_port()}")
        else:
            opts = srv.storage_options
            secrets = [AZURITE_KEY]
            dead_opts = {"account_name": "devstoreaccount1", "connection_string": srv.connection_string.replace(str(srv.port), str(free_port()))}
        root = logging.getLogger()
        old_level = root.level
        for verbosity in (2, 3):  # -vv: the library at DEBUG; -vvv: every dependency at DEBUG too
            cap = Capture()
            configure_logging(verbosity, stream=io.StringIO())
            root.addHandler(cap)
            root.setLevel(logging.DEBUG)
            try:
                store = open_store(srv.uri("rt-logs", f"v{verbosity}"), opts, name=kind, retry=PATIENT)
                dead = open_store(srv.uri("rt-logs", "dead"), dead_opts, name=f"{kind}-dead", retry=FAST)
                _exercise(store, dead, tmp_path.name)
            finally:
                root.removeHandler(cap)
            assert len(cap.lines) >= (2 if verbosity == 2 else 50), f"too few lines captured at verbosity {verbosity}: the test saw nothing"
            if verbosity == 3:
                assert any(not ln.split(" ", 2)[1].startswith("resilient_train") for ln in cap.lines), "no dependency logged at -vvv"
                if kind == "s3":
                    assert any("Authorization" in ln for ln in cap.lines), "botocore's signed request was not logged: the grep proves nothing"
            else:
                for ln in cap.lines:
                    assert "Authorization" not in ln and "Signature=" not in ln, ln[:300]
            leaks = _leaks(cap.lines, secrets)
            assert not leaks, f"{len(leaks)} leaking lines at verbosity {verbosity}, e.g. {leaks[:3]}"
        root.setLevel(old_level)
    finally:
        logging.getLogger("resilient_train").setLevel(logging.NOTSET)
        from resilient_train.logs import CREDENTIAL_LOGGERS

        for name in CREDENTIAL_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
