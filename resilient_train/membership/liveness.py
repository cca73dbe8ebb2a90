"""Telling a dead member from a slow one without waiting for heartbeat silence.

Every :class:`~.service.Membership` listens on a small TCP port (the *liveness port*) on the
address its gloo groups use (:func:`liveness_host`) and publishes ``host:port`` in its
heartbeat. The port belongs to the process: when the process dies (SIGKILL, OOM kill, a crash),
its kernel closes the listening socket at once and refuses every later connection. A roll call
that waits for a member can therefore *probe* it (:func:`probe`):

* ``"dead"``: the connection was refused or reset, or the process answering the port is not the
  one that published it (its token differs). The member is dropped at once.
* ``"alive"``: the connection was accepted (by the kernel: a SIGSTOPped process still accepts)
  and, if it answered, with the published token. The member is waited for as before.
* ``"unknown"``: no answer within the timeout (its machine is down or unreachable, a firewall
  drops the packets). The heartbeat-silence rule decides, as it did without the probe.

A refusal is proof of death only for a port that once answered with its token (:func:`answers`,
checked by every member when the port is first published): a firewall that rejects connections
must not make a live member look dead. So a SIGKILLed process on a machine that stays up is told
from a slow one in one round trip; a lost machine, a partition or a port never reached still
cost the silence window (``3 * heartbeat_interval_s``). The
server sends its token (the random per-process nonce that is already in the heartbeat, not a
secret) and closes; it reads nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

__all__ = ["LivenessServer", "answers", "liveness_host", "probe"]

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915


def liveness_host() -> str:
    """The address this process's liveness port listens on: the one its cross-provider gloo
    groups use (``RT_GLOO_HOST``, else the IPv4 address of ``GLOO_SOCKET_IFNAME``, else the
    loopback), so that whoever can reach its gloo groups can reach the port."""
    host = os.environ.get("RT_GLOO_HOST", "").strip()
    if host:
        return host
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if iface:
        import fcntl

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", iface[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    return "127.0.0.1"


class LivenessServer:
    """A listening socket owned by this process; each accepted connection gets ``token``."""

    def __init__(self, token: str, host: str | None = None):
        self.token = token.encode()
        host = liveness_host() if host is None else host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(64)
        port = self._sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="membership-liveness", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                conn.settimeout(1.0)
                conn.sendall(self.token)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        """Stop listening (idempotent): from now on the port refuses, like a dead process's."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2.0)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, token: str, timeout_s: float = 0.2) -> str:
    """``"dead"``, ``"alive"`` or ``"unknown"`` for the process that published ``address`` with
    ``token`` (module docstring). Never raises for a bad or unreachable address."""
    return _probe(address, token, timeout_s)[0]


def answers(address: str, token: str, timeout_s: float = 1.0) -> bool:
    """True when the port answered with ``token`` itself: the proof, taken once per published
    port, that a later refusal there means the process is gone (and not a firewall that
    rejects)."""
    return _probe(address, token, timeout_s)[1]


def _probe(address: str, token: str, timeout_s: float) -> tuple[str, bool]:
    try:
        host, port = _split(address)
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except (ConnectionRefusedError, ConnectionResetError):
        return "dead", False
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None) in (errno.ECONNREFUSED, errno.ECONNRESET):
            return "dead", False
        return "unknown", False
    with conn:
        got = b""
        try:
            conn.settimeout(timeout_s)
            while len(got) < len(token):
                part = conn.recv(64)
                if not part:
                    break
                got += part
        except ConnectionResetError:
            return "dead", False
        except OSError:
            return "alive", False  # accepted by its kernel but not answered in time: a stopped or busy process
    if not got:
        # accepted, then closed without a word: the listener is gone (the process is exiting)
        return "dead", False
    ok = got.decode(errors="replace") == token
    return ("alive" if ok else "dead"), ok
