"""A small TCP proxy on 127.0.0.1 that makes a real server slow or unreachable, on demand.

:class:`FaultProxy` forwards connections to ``127.0.0.1:target_port``. Knobs (change them
while it runs):

* ``bytes_per_s``: a bandwidth limit per direction and connection (None: unlimited), so an
  upload through it takes ``size / bytes_per_s`` seconds like a slow WAN link;
* ``delay_s``: extra latency before each forwarded chunk;
* :meth:`down` / :meth:`up`: while down, new connections are refused (closed at once) and open
  ones are cut, as when a provider's endpoint is unreachable;
* :meth:`hold` / :meth:`release`: while held, connections are accepted and stay up but no byte
  moves (a stalled link); held bytes are forwarded on release;
* :meth:`drop_response` (``match``, ``count``): the next ``count`` requests whose bytes contain
  ``match`` reach the server, but its answer never reaches the client: the connection is cut
  when the first byte of the response arrives (a response lost in transit after the server
  acted on the request). ``responses_dropped`` counts them.
* :meth:`cut_after` (``n``, ``then_down``): once ``n`` more bytes have gone to the server, the
  connections are cut at exactly that byte (the rest of the chunk is not forwarded); with
  ``then_down`` the proxy also goes :meth:`down`. ``cut_done`` is set when it happened and
  ``bytes_to_server_at_cut`` holds the counter then: an event to orchestrate a test on.

Counters: ``bytes_to_server`` and ``bytes_to_client`` (what the server sent back: the bytes a
download really cost), ``bytes_forwarded`` (both).

Point a client at ``proxy.endpoint`` instead of the server's. For tests and benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["FaultProxy"]

_CHUNK = 64 * 1024


class FaultProxy:
    """See module doc. ``start()``/``stop()`` or ``with``."""

    def __init__(self, target_port: int, *, bytes_per_s: float | None = None, delay_s: float = 0.0):
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.delay_s = delay_s
        self.port = 0
        self._down = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self.bytes_forwarded = 0
        self.responses_dropped = 0
        self._drop_match: bytes | None = None
        self._drop_left = 0
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self._cut_at: int | None = None
        self._cut_then_down = False
        self.cut_done = threading.Event()
        self.bytes_to_server_at_cut: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._down.is_set()

    def start(self) -> "FaultProxy":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.settimeout(0.2)
        self._sock = s
        self.port = s.getsockname()[1]
        threading.Thread(target=self._accept, name="rt-proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._flowing.set()
        self._cut_all()
        if self._sock is not None:
            self._sock.close()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        self._down.set()
        self._cut_all()

    def up(self) -> None:
        self._down.clear()

    def hold(self) -> None:
        """Stall the link: keep connections up, move no byte until :meth:`release`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def drop_response(self, match: bytes, count: int = 1) -> None:
        """Lose the server's answer to the next ``count`` requests containing ``match`` (see module doc)."""
        with self._lock:
            self._drop_match, self._drop_left = bytes(match), count

    def cut_after(self, n: int, *, then_down: bool = False) -> None:
        """Cut every connection once ``n`` more bytes have reached the server (see module doc)."""
        with self._lock:
            self.cut_done.clear()
            self._cut_at = self.bytes_to_server + int(n)
            self._cut_then_down = then_down

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            conn: dict[str, Any] = {"drop": False, "seen": b""}
            for a, b, to_client in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, to_client, conn), name="rt-proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool, conn: dict[str, Any] | None = None) -> None:
        conn = conn if conn is not None else {"drop": False, "seen": b""}
        try:
            src.settimeout(None)
            while not self._stop.is_set():
                data = src.recv(_CHUNK)
                if not data:
                    break
                self._flowing.wait()
                if self._down.is_set():
                    break
                if not to_client and self._drop_match is not None:
                    # the tail of the previous chunk too: a match split across two reads counts
                    window = conn["seen"][-len(self._drop_match):] + data
                    conn["seen"] = window[-len(self._drop_match):]
                    with self._lock:
                        if self._drop_left > 0 and self._drop_match in window:
                            self._drop_left -= 1
                            conn["drop"] = True
                if to_client and conn["drop"]:
                    if data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:
                        # "100 Continue" (Expect: 100-continue) is not the answer: pass it, so
                        # the client sends the body and the server acts on the request.
                        interim, _, data = data.partition(b"\r\n\r\n")
                        dst.sendall(interim + b"\r\n\r\n")
                        if not data:
                            continue
                    with self._lock:
                        self.responses_dropped += 1
                    break  # the server answered (it acted on the request): cut, answer unsent
                cut_now = False
                if not to_client and self._cut_at is not None:
                    with self._lock:
                        if self._cut_at is not None and self.bytes_to_server + len(data) >= self._cut_at:
                            data = data[: self._cut_at - self.bytes_to_server]
                            cut_now = True
                if self.delay_s:
                    time.sleep(self.delay_s)
                rate = self.bytes_per_s
                if rate:
                    # Send in small slices so the rate holds within a chunk too.
                    step = max(1024, int(rate / 50))
                    for i in range(0, len(data), step):
                        t0 = time.monotonic()
                        part = data[i : i + step]
                        dst.sendall(part)
                        spare = len(part) / rate - (time.monotonic() - t0)
                        if spare > 0:
                            time.sleep(spare)
                else:
                    dst.sendall(data)
                with self._lock:
                    self.bytes_forwarded += len(data)
                    if to_client:
                        self.bytes_to_client += len(data)
                    else:
                        self.bytes_to_server += len(data)
                if cut_now:
                    with self._lock:
                        self._cut_at = None
                        self.bytes_to_server_at_cut = self.bytes_to_server
                    if self._cut_then_down:
                        self._down.set()
                    self._cut_all()
                    self.cut_done.set()
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _main() -> None:
    """``python -m resilient_train.testing.proxy TARGET_PORT [--bytes-per-s N] [--delay-s S]``:
    run a proxy in its own process (so its forwarding does not compete with the caller for
    the GIL); prints the port it listens on, then serves until killed."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("target_port", type=int)
    ap.add_argument("--bytes-per-s", type=float, default=None)
    ap.add_argument("--delay-s", type=float, default=0.0)
    a = ap.parse_args()
    p = FaultProxy(a.target_port, bytes_per_s=a.bytes_per_s, delay_s=a.delay_s).start()
    print(p.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _main()
