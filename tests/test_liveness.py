"""The liveness port (membership/liveness.py): a dead process is told from a slow one at once.

Real processes and real signals: a child process owns a :class:`LivenessServer`; the probe
answers "alive" while it runs and while it is SIGSTOPped (its kernel still accepts), "dead" as
soon as it is SIGKILLed, and "dead" for a port that another process answers with another
token. An address nobody answers is "unknown" (the roll call then falls back to heartbeat
silence)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from resilient_train.membership.liveness import LivenessServer, answers, liveness_host, probe

pytestmark = pytest.mark.timeout(60)

CHILD = """
import sys, time
from resilient_train.membership.liveness import LivenessServer
s = LivenessServer("tok-child")
print(s.address, flush=True)
time.sleep(120)
"""


def test_probe_tells_a_killed_process_from_a_stopped_one():
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = p.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        assert probe(address, "tok-child") == "alive"
        os.kill(p.pid, signal.SIGSTOP)
        try:
            for _ in range(3):  # a stopped process is slow, not dead
                assert probe(address, "tok-child") == "alive"
        finally:
            os.kill(p.pid, signal.SIGCONT)
        assert probe(address, "tok-child") == "alive"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        t0 = time.monotonic()
        assert probe(address, "tok-child") == "dead"
        assert time.monotonic() - t0 < 0.2  # one round trip, not a timeout
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_port_answered_by_another_process_is_dead_and_a_closed_server_refuses():
    s = LivenessServer("tok-1")
    try:
        assert probe(s.address, "tok-1") == "alive"
        assert probe(s.address, "tok-2") == "dead"  # the port is someone else's now
    finally:
        s.close()
    assert probe(s.address, "tok-1") == "dead"
    s.close()  # idempotent


def test_unreachable_or_malformed_address_never_counts_as_verified():
    """A port that never answered with its token is not trusted: a firewall that rejects
    (this sandbox's network refuses unknown destinations at once) or an address nobody
    answers must not let a refusal pass for a death (the roll call checks :func:`answers`
    once per published port)."""
    assert probe("not-an-address", "t") == "unknown"
    assert answers("192.0.2.1:9", "t", timeout_s=0.2) is False  # TEST-NET-1 (RFC 5737): refused or silent
    s = LivenessServer("tok-1")
    try:
        assert answers(s.address, "tok-1") is True
        assert answers(s.address, "tok-2") is False
    finally:
        s.close()


def test_liveness_host_follows_the_gloo_settings(monkeypatch):
    monkeypatch.delenv("RT_GLOO_HOST", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert liveness_host() == "127.0.0.1"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert liveness_host() == "127.0.0.1"
    monkeypatch.setenv("RT_GLOO_HOST", "127.0.0.2")
    assert liveness_host() == "127.0.0.2"
