"""One provider of the failure-propagation matrix (tests/test_failure_matrix.py,
benchmarks/bench_recovery.py's quick mode): a real ``rt.wrap(group=..., membership=tcp://...)``
trainer in its own process (one rank per provider, no torchrun), which SIGKILLs itself at a
chosen point when it is the victim.

Fault points (``Case.fault``), each in round ``Case.fault_round``:

* ``exchange``: inside the round's cross-provider collective (all-reduce for codec ``none``,
  all-gather for the codecs), ``kill_delay_ms`` after entering it (0: on entry);
* ``vote``: at the round boundary, while the others are in the vote on the next view;
* ``transfer``: when this member serves the global state to a joiner (``sync_state``);
* ``partition``: inside the round's collective, this member shuts down its TCP connections to
  one peer (``Case.cut_from``) and stays alive: a link broken between two live members. Only
  those two see an error; the others must leave the collective on the store's news.

Every worker appends JSON lines to ``<out>/w-<group>.jsonl``: ``up``, ``step`` (after each
``trainer.step()``: its index and wall time), ``fault`` (right before the SIGKILL), ``done``
(the final step and a digest of the model). Orchestration is on events: the survivors train
to ``stop_step`` and, when a joiner is expected or a partitioned member rejoins, keep training
until it is in, then one round together.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch

import resilient_train as rt

torch.set_num_threads(1)
torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # imports torch._dynamo once, in the forkserver


@dataclass(frozen=True)
class Case:
    groups: tuple[str, ...] = ("a", "b", "c")
    victim: str = "b"
    fault: str = "exchange"  # exchange | vote | transfer | partition
    cut_from: str = "a"  # partition: the peer whose connections the victim cuts
    codec: str = "none"
    mode: str = "diloco"
    sync_every: int = 4
    fault_round: int = 3
    stop_step: int = 24
    kill_delay_ms: int = 0
    width: int = 256
    joiner: str | None = None  # launched after `join_after_step`; the victim serves it (transfer)
    join_after_step: int = 8
    round_deadline_s: float = 30.0
    heartbeat_timeout_s: float = 10.0

    def dump(self) -> str:
        return json.dumps(asdict(self))


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, ev: str, **fields) -> None:
        self.f.write(json.dumps({"t": time.time(), "ev": ev, **fields}) + "\n")


def _model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 64))


def _batch(step: int, group: str) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1000003 * step + ord(group)))


def _die(log: Log, **fields) -> None:
    log("fault", **fields)
    log.f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _sockets(pid: int | str) -> dict[int, int]:
    """inode -> fd of the TCP sockets of process ``pid``."""
    out = {}
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(link[8:-1])] = int(fd)
    return out


def _tcp_table() -> dict[int, tuple[int, int]]:
    """inode -> (local port, remote port) of every IPv4/IPv6 TCP socket of this host."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                cols = line.split()
                table[int(cols[9])] = (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16))
    return table


def cut_connections_to(peer_pid: int) -> int:
    """Shut down every TCP connection between this process and ``peer_pid`` (both ways): the
    peer sees "connection reset/closed", nobody else sees anything. Returns how many."""
    import socket

    table = _tcp_table()
    peer_ports = {table[i][0] for i in _sockets(peer_pid) if i in table}
    n = 0
    for inode, fd in _sockets("self").items():
        if inode in table and table[inode][1] in peer_ports:
            s = socket.socket(fileno=os.dup(fd))
            try:
                s.shutdown(socket.SHUT_RDWR)
                n += 1
            except OSError:
                pass
            finally:
                s.close()
    return n


def run(group: str, membership: str, out: str, case_json: str, joiner: bool = False) -> None:
    case = Case(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(case_json).items()})
    log = Log(os.path.join(out, f"w-{group}.jsonl"))
    log("up", pid=os.getpid())
    model = _model(case.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    founders = len(case.groups)
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=os.path.join(out, "ckpt", group), every_n_steps=10_000, async_save=False, save_on_close=False,
        sync=rt.SyncConfig(mode=case.mode, sync_every=case.sync_every, codec=case.codec), group=group,
        membership=membership, start_groups=founders, round_deadline_s=case.round_deadline_s, join_timeout_s=120.0,
        heartbeat_timeout_s=case.heartbeat_timeout_s, event_log=os.path.join(out, f"rt-{group}.jsonl"), timeout_s=120))
    log("wrapped", step=trainer.step_count)
    victim = group == case.victim
    cross = trainer.cross
    if victim and case.fault == "exchange":
        inner = cross._collective

        def collective(op: str, buf: torch.Tensor):
            if trainer.sync.rounds == case.fault_round - 1:
                if case.kill_delay_ms:
                    threading.Timer(case.kill_delay_ms / 1000, _die, args=(log,), kwargs={"op": op, "step": trainer.step_count}).start()
                else:
                    _die(log, op=op, step=trainer.step_count)
            return inner(op, buf)

        cross._collective = collective
    elif victim and case.fault == "partition":
        inner = cross._collective
        peer = next(e["pid"] for e in read(out, case.cut_from) if e["ev"] == "up")

        def collective(op: str, buf: torch.Tensor):
            if trainer.sync.rounds == case.fault_round - 1 and not getattr(collective, "fired", False):
                collective.fired = True
                n = cut_connections_to(peer)
                log("fault", at="partition", step=trainer.step_count, peer=case.cut_from, connections=n)
            return inner(op, buf)

        cross._collective = collective
    elif victim and case.fault == "vote":
        after = cross.after_round

        def after_round():
            if trainer.sync.rounds == case.fault_round:
                _die(log, at="vote", step=trainer.step_count)
            return after()

        cross.after_round = after_round
    elif victim and case.fault == "transfer":
        from resilient_train.recovery import provider_group

        real = provider_group.sync_state

        def sync_state(comm, view, *a, **kw):
            if view.joiners and case.joiner in view.joiners:
                _die(log, at="transfer", epoch=view.epoch)
            return real(comm, view, *a, **kw)

        provider_group.sync_state = sync_state
    # with a joiner expected, everyone trains one round together after the founders' own view
    # holds it (orchestrated on events, not on how many steps fit in a time)
    stop = max(case.stop_step, trainer.step_count + case.sync_every) if joiner else case.stop_step
    # A partition may drop the victim, which stays alive and rejoins: every member trains until
    # all are in one view again (an epoch after the drop), then one round together. On a busy
    # machine the rejoin can take longer than the steps left before stop_step.
    first_epoch = cross.view.epoch
    everyone = set(case.groups)

    def whole_again() -> bool:
        return case.fault != "partition" or (cross.view.epoch > first_epoch and everyone <= set(cross.view.members))

    rejoined = False
    while True:
        step = trainer.step_count
        if case.joiner is not None and not joiner and stop == case.stop_step and case.joiner in cross.view.members:
            stop = max(case.stop_step, step + case.sync_every)
        if case.fault == "partition" and not rejoined and whole_again():
            rejoined = True
            stop = max(case.stop_step, step + case.sync_every)
        if step >= stop and (case.joiner is None or joiner or case.joiner in cross.view.members) and whole_again():
            break
        x = _batch(step, group)
        loss = (trainer.model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        trainer.step()
        log("step", i=step, after=trainer.step_count, members=list(cross.view.members))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
    log("done", step=trainer.step_count, digest=digest, members=list(cross.view.members))
    trainer.close()


def read(out: str, group: str) -> list[dict]:
    path = os.path.join(out, f"w-{group}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rt(out: str, group: str) -> list[dict]:
    path = os.path.join(out, f"rt-{group}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
