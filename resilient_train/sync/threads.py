"""Run N gloo ranks as threads of this process (tests, examples, small benchmarks).

``run_thread_ranks(fn, world_size)`` starts a ``TCPStore`` on 127.0.0.1 with a free port,
gives each thread its own ``ProcessGroupGloo`` on the loopback device, and calls
``fn(rank, comm)`` with a :class:`ProcessGroupCommunicator`. Results come back in rank order;
an exception on any rank is re-raised in the caller as one :class:`DistributedError` naming
every failed rank. Every collective has ``pg_timeout``; the join has ``timeout_s``.

Threads share the GIL, so this is for correctness, not for measuring compute speed (the
benchmarks use one process per rank).
"""

from __future__ import annotations

import threading
import traceback
from datetime import timedelta
from typing import Any, Callable

from ..errors import DistributedError
from .communicator import ProcessGroupCommunicator

__all__ = ["run_thread_ranks", "make_gloo_group", "connect_cancellable", "ConnectCancelled"]


def gloo_device() -> Any:
    """The network device the cross-provider gloo groups listen on and advertise to their peers:
    ``GLOO_SOCKET_IFNAME`` (an interface name, as torch's own gloo groups read it), else
    ``RT_GLOO_HOST`` (an address or host name of this machine that the other providers can
    reach), else the loopback (127.0.0.1: every provider on one machine, as in the tests and the
    demo). Providers on several machines must set one of the two."""
    import os

    import torch.distributed as dist

    iface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    if iface:
        return dist.ProcessGroupGloo.create_device(interface=iface)
    return dist.ProcessGroupGloo.create_device(hostname=os.environ.get("RT_GLOO_HOST", "").strip() or "127.0.0.1")


def make_gloo_group(store: Any, rank: int, world_size: int, timeout: timedelta) -> Any:
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [gloo_device()]
    return dist.ProcessGroupGloo(store, rank, world_size, opts)


class ConnectCancelled(Exception):
    """Raised by :func:`connect_cancellable` when ``cancelled()`` gave a reason."""


def connect_cancellable(build: Callable[[], Any], cancelled: Callable[[], str | None], poll_s: float = 0.05,
                        abandon: Callable[[], None] | None = None) -> Any:
    """``build()`` (a gloo group's constructor: its rendezvous blocks until every rank arrives
    or its timeout) on a helper thread, while this thread asks ``cancelled()`` every ``poll_s``.
    A reason from it raises :class:`ConnectCancelled` at once: a member known dead, or an epoch
    another member already gave up on, never costs the connect timeout. The abandoned
    constructor runs on to its own end on the helper thread and its group, if any, is dropped
    there; ``abandon()`` (e.g. the store's ``cancel``) is called to make that end come sooner.
    The helper thread is not a daemon: a rendezvous that cannot be cut short (torch's native
    TCPStore) delays the interpreter's exit until its own timeout instead of aborting the
    process, which a C++ thread left inside gloo at exit does. Exceptions of ``build()`` are
    re-raised here."""
    done = threading.Event()
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def body() -> None:
        try:
            pg = build()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            with lock:
                box["error"] = exc
        else:
            with lock:
                if box.get("abandoned"):
                    del pg  # nobody will use it: destroyed here, not on the caller's thread
                    return
                box["pg"] = pg
        done.set()

    threading.Thread(target=body, name="gloo-connect", daemon=False).start()
    while not done.wait(poll_s):
        why = cancelled()
        if why:
            with lock:
                if "pg" not in box and "error" not in box:
                    box["abandoned"] = True
                    if abandon is not None:
                        abandon()
                    raise ConnectCancelled(why)
            break  # it finished meanwhile: use it
    with lock:
        if "error" in box:
            raise box["error"]
        return box["pg"]


def run_thread_ranks(fn: Callable[[int, ProcessGroupCommunicator], Any], world_size: int, *,
                     timeout_s: float = 60.0, pg_timeout: timedelta = timedelta(seconds=30)) -> list[Any]:
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=pg_timeout,
                           wait_for_workers=False)
    port = master.port
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}

    def body(rank: int) -> None:
        try:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=pg_timeout)
            pg = make_gloo_group(store, rank, world_size, pg_timeout)
            results[rank] = fn(rank, ProcessGroupCommunicator(pg))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller with its traceback
            failures[rank] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            errors[rank] = exc

    errors: dict[int, BaseException] = {}
    threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    for r, t in enumerate(threads):
        if t.is_alive():
            failures.setdefault(r, f"rank {r} did not finish within {timeout_s} s")
    del master
    if failures:
        err = DistributedError(f"{len(failures)} of {world_size} thread ranks failed", failures)
        err.errors = errors  # the original exceptions, for tests that check their types
        raise err
    return [results[r] for r in range(world_size)]
