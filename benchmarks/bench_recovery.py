"""Recovery after losing one of three providers: torchrun restart + DCP vs torchft vs resilient-train.

    python benchmarks/bench_recovery.py --sizes 2m 20m --reps 2 --large-reps 1

Three replica groups ("providers") a, b, c with one process each, gloo on 127.0.0.1, the same
MLP (AdamW inner optimizer) for two state sizes. Provider b is SIGKILLed at step 70 while the
others are inside that step's exchange (b waits until a and c have entered it; with
``--kill-on-entry`` b dies on entering it, and a survivor still computing that step, up to 3
inner steps behind when 3 processes share 2 cores, adds its own compute to the figure),
relaunched once the survivors train again, and the run is stopped once b is back in. Methods (interleaved A B C D A B C D per size):

* ``torchrun``: one ``torchrun --nproc-per-node=3 --max-restarts=1`` job, plain DDP, ``dcp.save``
  every 50 steps; the agent restarts every worker, which ``dcp.load`` the last checkpoint
  (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, else the restarted gloo workers fail).
Every provider of the last three methods is its own ``torchrun --standalone --nproc-per-node=1``
job; "SIGKILL the provider" kills its agent and its worker.

* ``torchft-ddp``: torchft (0.2.x) Manager + lighthouse, gradients all-reduced every step through
  ``manager.allreduce`` (torchft's own DDP wrapper crashes the survivors when a peer dies), no
  checkpoints (torchft heals a joiner from a live peer over HTTP).
* ``torchft-diloco``: torchft's ``DiLoCo`` (sync every 10 steps, outer Nesterov SGD 0.7/0.9);
  b dies inside round 7's all-reduce, i.e. after the quorum of that round included it.
* ``rt``: this library: one process per provider with ``rt.wrap(..., TrainerConfig(group=,
  membership=tcp://..., sync=SyncConfig(mode="diloco", sync_every=10, codec="none")))``
  (the exchange is a ring all-reduce), checkpoints every 50 steps; b dies in round 7's
  exchange (the hook of examples/provider_train.py). ``rt-int8``: the same with the int8
  codec (the exchange is an all-gather).

torchft's servers bind every interface: with ``--netns`` (default when run as root) the whole
benchmark re-executes itself inside ``unshare -n`` with only the loopback up.

Measured per run, from the workers' JSON-lines logs (wall-clock ``time.time()`` on one host):
``fault_to_resumed_s`` (the SIGKILL until every survivor has completed a training step past the
failed one: its first committed step of index >= the fault step finished after the SIGKILL, or
for torchrun its first step after the restart; the slowest survivor's, from its own log, with
each survivor's own figure in ``resumed_s_by_survivor``: a run where any survivor stalled
cannot report less than that stall),
``after_last_notice_s`` (rt only: from the moment the last survivor left the failed exchange,
having reached it, until every survivor completed its step: the recovery without a survivor's
own compute up to the exchange when it was behind at the SIGKILL),
``sync_step_s`` (median duration of a fault-free step of the same kind: the floor of the former),
``steps_lost`` (optimizer steps whose update the survivors threw away), ``steps_redone``
(batches computed again), ``rejoin_s`` (b's relaunch to its first step inside the job),
``process_up_s`` (b's relaunch to its script running after imports: the part no library saves),
and bytes moved for recovery. Results: benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

GROUPS = ("a", "b", "c")
SIZES = {"2m": 1024, "20m": 4096}  # MLP 512 -> w -> w -> 512: 2.1M and 20.0M parameters
METHODS = ("torchrun", "torchft-ddp", "torchft-diloco", "rt", "rt-int8")
H = 10  # DiLoCo round length
FAULT_STEP = 70  # b dies during step index 69 (the 70th step; DiLoCo round 7's exchange)
EVERY = 50  # checkpoints (torchrun, rt)
BATCH = 8
KILL_ON_ENTRY = False  # --kill-on-entry: b dies on entering the exchange, not once a and c are inside it


# ---------------------------------------------------------------------------------- workers

class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, ev: str, **fields: Any) -> None:
        self.f.write(json.dumps({"t": time.time(), "ev": ev, **fields}) + "\n")


def _model(width: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, width), torch.nn.GELU(), torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 512))


def _batch(i: int, g: str):
    import torch

    gen = torch.Generator().manual_seed(1000003 * i + ord(g))
    return torch.randn(BATCH, 512, generator=gen)


def _loss(net, x):
    return (net(x) - x).pow(2).mean()


def _die(log: Log, whole_job: bool = True, **fields: Any) -> None:
    """SIGKILL this provider: its torchrun agent (the parent) and this worker."""
    log("fault", **fields)
    log.f.flush()
    if whole_job:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _at_fault_exchange(a: argparse.Namespace, log: Log, **fields: Any) -> None:
    """Called by every provider on entering the exchange of the fault step (launch 0). The
    others mark that they are inside it; b waits until a and c are (as the fault's description
    says: "while the others are inside that step's exchange"), then dies. Without the wait
    (``--kill-on-entry``) b dies on entering, and a survivor still computing that step (3
    processes share 2 cores here, and one can be a whole step behind) adds its own remaining
    compute to the figure, which no recovery can save."""
    if a.launch != 0:
        return
    mark = os.path.join(a.out, f"in-exchange-{a.group}")
    if not os.path.exists(mark):
        with open(mark, "w"):
            pass
    if not a.kill:
        return
    if not a.kill_on_entry:
        deadline = time.time() + 60
        while not all(os.path.exists(os.path.join(a.out, f"in-exchange-{g}")) for g in GROUPS if g != a.group):
            if time.time() > deadline:
                break
            time.sleep(0.001)
    _die(log, **fields)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line.split()[1] for line in f if line.startswith("rchar")))


def worker_torchrun(a: argparse.Namespace, log: Log) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model = _model(a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    start = 0
    done = sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(a.ckpt, "step-*")) if os.path.exists(os.path.join(p, ".metadata")))
    if done:
        t0, r0 = time.time(), _rchar()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(a.ckpt, f"step-{done[-1]}"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = done[-1]
        log("resumed", step=start, seconds=time.time() - t0, read_bytes=_rchar() - r0, attempt=attempt)
    g = GROUPS[rank]
    for i in range(start, a.steps):
        if a.kill and rank == 1 and attempt == 0 and i == FAULT_STEP - 1:
            _die(log, whole_job=False, step=i)  # one rank dies; the agent restarts everyone
        t0 = time.time()
        loss = _loss(ddp, _batch(i, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        log("step", i=i, c=1, t0=t0, n=dist.get_world_size(), attempt=attempt)
        if (i + 1) % EVERY == 0:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(a.ckpt, f"step-{i + 1}"))
            log("checkpoint", step=i + 1)


def _torchft_manager(a: argparse.Namespace, log: Log, state_dict, load_state_dict, use_async_quorum: bool):
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    t = timedelta(seconds=30)
    manager = Manager(pg=ProcessGroupGloo(timeout=t), min_replica_size=1, load_state_dict=load_state_dict, state_dict=state_dict,
                          use_async_quorum=use_async_quorum, replica_id=a.group, store_addr="127.0.0.1", store_port=store.port,
                          rank=0, world_size=1, lighthouse_addr=a.lighthouse, hostname="localhost", timeout=t, quorum_timeout=t,
                          connect_timeout=t)
    transport = manager._checkpoint_transport
    recv = transport.recv_checkpoint

    def recv_checkpoint(*args: Any, **kw: Any):
        t0 = time.time()
        sd = recv(*args, **kw)
        log("healed", bytes=_tensor_bytes(sd), seconds=time.time() - t0)
        return sd

    transport.recv_checkpoint = recv_checkpoint
    return store, manager


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _count_commits(manager, on_commit) -> None:
    inner = manager.should_commit

    def should_commit(*args: Any, **kw: Any) -> bool:
        ok = inner(*args, **kw)
        on_commit(ok)
        return ok

    manager.should_commit = should_commit


def worker_torchft_ddp(a: argparse.Namespace, log: Log) -> None:
    import torch

    model = _model(a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    store, manager = _torchft_manager(a, log, lambda: {"model": model.state_dict(), "optim": opt.state_dict()}, load_state_dict, True)
    commits: list[bool] = []
    _count_commits(manager, commits.append)
    params = list(model.parameters())
    while manager.current_step() < a.steps:
        t0 = time.time()
        manager.start_quorum()
        i = manager.current_step()  # the batch index: a step that did not commit is computed again
        opt.zero_grad()
        loss = _loss(model, _batch(i, a.group))
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if a.kill and i == FAULT_STEP - 1:
            _die(log, step=i)
        manager.allreduce(flat).wait()
        off = 0
        for p in params:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        if manager.should_commit():
            opt.step()
            log("step", i=i, c=1, t0=t0, n=manager.num_participants(), cs=manager.current_step())
        else:
            log("step", i=i, c=0, t0=t0, n=manager.num_participants(), cs=manager.current_step())


def worker_torchft_diloco(a: argparse.Namespace, log: Log) -> None:
    import torch
    from torchft.local_sgd import DiLoCo

    model = _model(a.width)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner_optim"])

    store, manager = _torchft_manager(a, log, lambda: {"model": model.state_dict(), "inner_optim": inner.state_dict()}, load_state_dict, False)
    rnd = {"i": 0, "round_commits": []}
    _count_commits(manager, rnd["round_commits"].append)
    inner_allreduce = manager.allreduce

    def allreduce(tensor, *args: Any, **kw: Any):
        if rnd["i"] == FAULT_STEP - 1:
            _at_fault_exchange(a, log, step=rnd["i"])
        return inner_allreduce(tensor, *args, **kw)

    manager.allreduce = allreduce
    with DiLoCo(manager, [model], inner, [outer], sync_every=H, backup_device=torch.device("cpu"), pin_memory=False):
        for i in range(a.steps):
            rnd["i"] = i
            t0 = time.time()
            loss = _loss(model, _batch(i, a.group))
            inner.zero_grad()
            loss.backward()
            del rnd["round_commits"][:]
            inner.step()  # DiLoCo's post-hook runs the round every H steps
            c = rnd["round_commits"]
            log("step", i=i, c=int(all(c)) if c else 1, sync=bool(c), t0=t0, n=manager.num_participants() if c else None, cs=manager.current_step())


def worker_rt(a: argparse.Namespace, log: Log) -> None:
    import torch

    import logging

    import resilient_train as rt

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = _model(a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    log("model_built")
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=os.path.join(a.ckpt, a.group), every_n_steps=EVERY, keep_last=2, async_save=False,
        sync=rt.SyncConfig(mode="diloco", sync_every=H, codec="int8" if a.method == "rt-int8" else "none"), group=a.group, membership=a.membership,
        start_groups=3, round_deadline_s=30.0, join_timeout_s=120.0, heartbeat_timeout_s=a.heartbeat_s,
        event_log=os.path.join(a.out, f"rt-{a.group}-{a.launch}-rank{{rank}}.jsonl"), timeout_s=120))
    log("wrapped", step=trainer.step_count)
    cur = {"i": -1}
    cross = trainer.cross  # as examples/provider_train.py --kill-at-round: die inside the round's exchange
    inner = cross._collective

    def collective(op: str, buf):
        if cur["i"] == FAULT_STEP - 1:
            _at_fault_exchange(a, log, step=cur["i"], op=op)
        return inner(op, buf)

    cross._collective = collective
    while trainer.step_count < a.steps:
        i = cur["i"] = trainer.step_count
        t0 = time.time()
        loss = _loss(trainer.model, _batch(i, a.group))
        opt.zero_grad()
        loss.backward()
        trainer.step()
        log("step", i=i, c=1, t0=t0, after=trainer.step_count)


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--group", default="a")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="")
    p.add_argument("--launch", type=int, default=0)
    p.add_argument("--kill", action="store_true")
    p.add_argument("--kill-on-entry", action="store_true")
    p.add_argument("--lighthouse", default="")
    p.add_argument("--membership", default="")
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.method == "torchrun":
        a.group = GROUPS[int(os.environ["RANK"])]
        a.launch = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if a.method == "torchrun":
        import torch.distributed.checkpoint  # noqa: F401
    elif a.method.startswith("rt"):
        import resilient_train  # noqa: F401
    else:
        import torchft.local_sgd  # noqa: F401
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # its first construction imports torch._dynamo: ~4 s here
    log = Log(os.path.join(a.out, f"w-{a.group}-{a.launch}.jsonl"))
    log("up", group=a.group, launch=a.launch, pid=os.getpid())  # imports done: what no library can save a restarted process
    {"torchrun": worker_torchrun, "torchft-ddp": worker_torchft_ddp, "torchft-diloco": worker_torchft_diloco, "rt": worker_rt, "rt-int8": worker_rt}[a.method](a, log)
    return 0


# ---------------------------------------------------------------------------------- orchestrator

def read_logs(out: str) -> list[dict]:
    evs = []
    for path in glob.glob(os.path.join(out, "w-*.jsonl")):
        g, launch = os.path.basename(path)[2:-6].split("-")
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                e["g"], e["launch"] = g, int(launch)
                evs.append(e)
    return sorted(evs, key=lambda e: e["t"])


def read_rt_events(out: str) -> list[dict]:
    evs = []
    for path in glob.glob(os.path.join(out, "rt-*.jsonl")):
        _, g, launch, _ = os.path.basename(path).split("-", 3)
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                e["g"], e["launch"] = g, int(launch)
                evs.append(e)
    return sorted(evs, key=lambda e: e["t"])


def back_in(method: str, e: dict) -> bool:
    """A step of the relaunched b that counts as "back in the job": rt: any step (rt.wrap returns
    once b is admitted with the live state); torchft: a committed step in a quorum of all three
    (a torchft replica may commit steps in a quorum of its own or while healing again);
    torchft-diloco: a committed round in a quorum of all three."""
    if e["ev"] != "step" or e["g"] != "b" or e["launch"] != 1 or not e["c"]:
        return False
    if method.startswith("rt"):
        return True
    return (e.get("n") or 0) >= 3 and (method != "torchft-diloco" or bool(e.get("sync")))


def run_one(method: str, width: int, out: str, torchft_hb_ms: int, rt_hb_s: float, timeout_s: float, rejoin_wait_s: float = 60.0) -> dict:
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    py = sys.executable
    me = os.path.abspath(__file__)
    procs: dict[str, subprocess.Popen] = {}
    logfiles = []
    extra: list[str] = []
    lighthouse = kv = None
    relaunched_t = None

    def launch(name: str, cmd: list[str]) -> None:
        f = open(os.path.join(out, f"stdout-{name}.txt"), "a")
        logfiles.append(f)
        procs[name] = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    torchrun = os.path.join(os.path.dirname(py), "torchrun")

    def wcmd(group: str, launch_no: int, kill: bool) -> list[str]:  # one torchrun per provider
        return [torchrun, "--standalone", "--nproc-per-node=1", me, "worker", "--method", method, "--group", group, "--width", str(width), "--out", out, "--ckpt", ckpt,
                "--launch", str(launch_no), *(["--kill"] if kill else []), *(["--kill-on-entry"] if KILL_ON_ENTRY else []), *extra]

    t_start = time.time()
    try:
        if method == "torchrun":
            launch("job", [torchrun, "--standalone", "--nproc-per-node=3", "--max-restarts=1", me, "worker", "--method", method,
                           "--width", str(width), "--out", out, "--ckpt", ckpt, "--kill"])
        else:
            if method.startswith("torchft"):
                from torchft.coordination import LighthouseServer

                lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, heartbeat_timeout_ms=torchft_hb_ms)
                extra = ["--lighthouse", lighthouse.address()]
            else:
                from resilient_train.membership.kvstore import TCPKVStore

                kv = TCPKVStore.host(0)
                extra = ["--membership", f"tcp://127.0.0.1:{kv.port}", "--heartbeat-s", str(rt_hb_s)]
            for g in GROUPS:
                launch(f"{g}0", wcmd(g, 0, g == "b"))
        deadline = time.time() + timeout_s
        phase = "fault"
        while True:
            if time.time() > deadline:
                raise RuntimeError(f"{method}: timed out in phase {phase}; see {out}")
            for n, p in procs.items():
                if p.poll() not in (None, -signal.SIGKILL) and not (method == "torchrun" and p.returncode == 0):
                    raise RuntimeError(f"{method}: process {n} exited with {p.returncode}; see {out}/stdout-{n}.txt")
            evs = read_logs(out)
            fault = next((e for e in evs if e["ev"] == "fault"), None)
            if phase == "fault" and fault:
                phase = "resume"
            if phase == "resume":
                after = [e for e in evs if e["ev"] == "step" and e["t"] > fault["t"] and e["c"] and e["g"] != "b"
                         and (e["launch"] == 1 if method == "torchrun" else e["launch"] == 0 and e["i"] >= FAULT_STEP - 1)]
                if {e["g"] for e in after} >= {"a", "c"}:
                    if method == "torchrun":
                        phase = "done_wait"
                    else:
                        procs["b0"].wait(timeout=30)
                        time.sleep(1.0)  # the survivors train alone for a moment
                        relaunched_t = time.time()
                        with open(os.path.join(out, "orchestrator.json"), "w") as f:
                            json.dump({"relaunched_t": relaunched_t}, f)
                        launch("b1", wcmd("b", 1, False))
                        phase = "rejoin"
            if phase == "rejoin":
                back = [e for e in evs if back_in(method, e)]
                if not back and time.time() - relaunched_t > rejoin_wait_s:
                    back = [{"t": time.time()}]  # not back in: analyse() reports it
                if back:
                    phase = "done_wait"
                    t_back = back[0]["t"]
            if phase == "done_wait":
                last = max(e["t"] for e in evs)
                survivors_after = [e for e in evs if e["ev"] == "step" and e["g"] != "b" and e["t"] > (t_back if method != "torchrun" else fault["t"])]
                if len(survivors_after) >= 2 * (H + 2) or (method == "torchrun" and len(survivors_after) >= 6):
                    break
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        # torchrun starts each worker in a session of its own: end them by the pids they logged
        for e in read_logs(out):
            if e["ev"] == "up" and e.get("pid"):
                try:
                    with open(f"/proc/{e['pid']}/cmdline", "rb") as f:
                        if b"bench_recovery.py" not in f.read():
                            continue
                    os.kill(e["pid"], signal.SIGKILL)
                except (ProcessLookupError, FileNotFoundError):
                    pass
        for f in logfiles:
            f.close()
        if lighthouse is not None:
            lighthouse.shutdown()
        del kv
    return analyse(method, out, relaunched_t, time.time() - t_start)


def analyse(method: str, out: str, relaunched_t: float | None, wall_s: float) -> dict:
    evs = read_logs(out)
    fault = next(e for e in evs if e["ev"] == "fault")
    tf = fault["t"]
    surv = ("a", "c")
    steps = [e for e in evs if e["ev"] == "step"]
    res: dict[str, Any] = {"fault_step_index": fault.get("step"), "wall_s": round(wall_s, 2)}
    # resumed: every survivor completed a step past the failed one (a step that was already in
    # flight before the fault and ends after it does not count), from each survivor's own log
    first = {}
    for g in surv:
        first[g] = next(e for e in steps if e["g"] == g and e["t"] > tf and e["c"]
                        and (e["launch"] == 1 if method == "torchrun" else e["i"] >= FAULT_STEP - 1))
    res["resumed_s_by_survivor"] = {g: round(e["t"] - tf, 3) for g, e in first.items()}
    res["fault_to_resumed_s"] = round(max(e["t"] for e in first.values()) - tf, 3)
    # the floor: a fault-free step of the same kind (the sync step for DiLoCo, any step otherwise)
    pre = [e for e in steps if e["g"] in surv and e["t"] < tf and e["i"] >= 20 and e["launch"] == 0]
    if method in ("rt", "rt-int8", "torchft-diloco"):
        pre = [e for e in pre if (e["i"] + 1) % H == 0]
    res["sync_step_s"] = round(statistics.median(e["t"] - e["t0"] for e in pre), 3) if pre else None
    # steps lost / redone on the survivors
    if method == "torchrun":
        resumed = [e for e in evs if e["ev"] == "resumed"]
        last_before = max(e["i"] for e in steps if e["launch"] == 0) + 1
        res["resumed_from_step"] = min(e["step"] for e in resumed)
        res["steps_lost"] = last_before - res["resumed_from_step"]
        res["steps_redone"] = res["steps_lost"]
        res["steps_redone_note"] = "on every rank (3 ranks)"
        res["rejoin_s"] = res["fault_to_resumed_s"]
        res["rejoin_note"] = "everyone restarts: the lost rank is back when training resumes"
        up = [e for e in evs if e["ev"] == "up" and e["launch"] == 1]
        res["process_up_s"] = round(max(e["t"] for e in up) - tf, 3) if up else None
        res["load_s"] = round(max(e["seconds"] for e in resumed), 3)
        res["bytes_moved"] = sum(e["read_bytes"] for e in resumed)
        res["bytes_note"] = "bytes read by the 3 restarted ranks during dcp.load (rchar)"
        return res
    lost = redone = 0
    for g in surv:
        after = [e for e in steps if e["g"] == g and e["t"] > tf]
        bad = [e for e in after if not e["c"]]
        if method == "torchft-ddp":
            lost = max(lost, len(bad))
            redone = max(redone, len(bad))
        elif method == "torchft-diloco":
            lost = max(lost, H * len(bad))
        else:
            idx = [e["i"] for e in steps if e["g"] == g]
            redone = max(redone, len(idx) - len(set(idx)))
            lost = redone
    res["steps_lost"], res["steps_redone"] = lost, redone
    if method == "torchft-diloco":
        res["steps_lost_note"] = "inner steps of a failed round, discarded on the survivors (batches not recomputed)"
    bups = [e for e in evs if e["g"] == "b" and e["launch"] == 1]
    up = next(e for e in bups if e["ev"] == "up")
    res["process_up_s"] = round(up["t"] - relaunched_t, 3)
    back = [e for e in bups if back_in(method, e)]
    res["rejoin_s"] = round(back[0]["t"] - relaunched_t, 3) if back else None
    if not back:
        last = max(e["t"] for e in evs)
        res["rejoin_note"] = f"b was not in a quorum of all three within {last - relaunched_t:.0f} s of its relaunch (run stopped then)"
    if method.startswith("torchft"):
        res["joiner_heals"] = sum(1 for e in bups if e["ev"] == "healed")
        res["joiner_quorum_sizes"] = sorted({e.get("n") for e in bups if e["ev"] == "step" and e.get("n")})
    healed = [e for e in bups if e["ev"] == "healed"]
    if method.startswith("torchft"):
        res["bytes_moved"] = sum(e["bytes"] for e in healed)
        res["bytes_note"] = "tensor bytes of every state the joiner received from a live peer (torchft HTTP transport), all heals summed"
        if method == "torchft-diloco":
            first_b = [e for e in bups if e["ev"] == "step"]
            first_round = next((e for e in first_b if e.get("sync")), None)
            res["joiner_inner_steps_before_first_round"] = sum(1 for e in first_b if e["t"] <= first_round["t"]) if first_round else None
        else:
            res["joiner_uncommitted_steps"] = sum(1 for e in bups if e["ev"] == "step" and not e["c"])
        return res
    rtev = read_rt_events(out)
    joined = [e for e in rtev if e["event"] == "joined" and e["g"] == "b" and e["launch"] == 1]
    recs = [e for e in rtev if e["event"] == "reconfigured" and e["g"] in surv]
    failed = [e for e in rtev if e["event"] == "round_failed" and e["g"] in surv]
    if joined:
        res["joined_s"] = round(joined[0]["t"] - relaunched_t, 3)
        res["joined_step"] = joined[0]["step"]
        res["bytes_moved"] = joined[0].get("received_bytes")
        res["bytes_note"] = "global state the joiner received from a live peer (rt 'joined' event)"
        # the survivors' step when b's process was up: rejoin at the next round after that?
        s_at_up = max((e["after"] for e in steps if e["g"] in surv and e["t"] <= up["t"]), default=None)
        res["survivor_step_when_b_up"] = s_at_up
    res["roll_call_s"] = max((e["seconds"] for e in recs), default=None)
    res["round_failed_after_fault_s"] = round(min(e["t"] for e in failed) - tf, 3) if failed else None
    # from the moment the last survivor left the failed exchange (it had reached it and learned
    # of the failure) until every survivor completed its step: the recovery itself, without a
    # survivor's own compute up to that exchange when it was behind at the SIGKILL (3 processes
    # on 2 cores: without a synchronising step, one can be 1-3 inner steps behind the others)
    notice = {g: min(e["t"] for e in failed if e["g"] == g) for g in surv if any(e["g"] == g for e in failed)}
    res["notice_after_fault_s_by_survivor"] = {g: round(t - tf, 3) for g, t in notice.items()}
    if len(notice) == len(surv):
        res["after_last_notice_s"] = round(max(e["t"] for e in first.values()) - max(notice.values()), 3)
    res["rt_steps_redone_reported"] = max((e.get("steps_redone", 0) for e in recs), default=None)
    return res


SUMMARY_KEYS = ("fault_to_resumed_s", "after_last_notice_s", "sync_step_s", "steps_lost", "steps_redone", "rejoin_s", "process_up_s", "joined_s", "bytes_moved", "roll_call_s")


def summarise(runs: dict) -> dict:
    summary: dict[str, dict[str, dict]] = {}
    for size, methods in runs.items():
        summary[size] = {}
        for method, rs in methods.items():
            ok = [r for r in rs if "error" not in r]
            row: dict[str, Any] = {"runs_ok": len(ok), "runs_failed": len(rs) - len(ok)}
            for k in SUMMARY_KEYS:
                vals = [r[k] for r in ok if r.get(k) is not None]
                if vals:
                    row[k] = statistics.median(vals)
                    row[k + "_all"] = vals
                elif k == "rejoin_s" and ok:
                    row[k] = None
            summary[size][method] = row
    return summary


def reanalyse(root: str, name: str) -> int:
    """Recompute the per-run results from kept run folders (relaunch time from orchestrator.json,
    or, for folders of older runs, from the stored process_up_s)."""
    from common import RESULTS

    path = os.path.join(RESULTS, f"{name}.json")
    with open(path) as f:
        res = json.load(f)
    for size, methods in res["runs"].items():
        for method, rs in methods.items():
            for rep, r in enumerate(rs):
                out = os.path.join(root, f"{size}-{method}-{rep}")
                if "error" in r or not os.path.isdir(out):
                    continue
                rel = None
                if os.path.exists(os.path.join(out, "orchestrator.json")):
                    with open(os.path.join(out, "orchestrator.json")) as f:
                        rel = json.load(f)["relaunched_t"]
                elif method != "torchrun":
                    up = next(e for e in read_logs(out) if e["ev"] == "up" and e["g"] == "b" and e["launch"] == 1)
                    rel = up["t"] - r["process_up_s"]
                new = analyse(method, out, rel, r["wall_s"])
                new["loadavg_before"] = r.get("loadavg_before")
                rs[rep] = new
    res["summary"] = summarise(res["runs"])
    res["reanalysed_unix_s"] = int(time.time())
    with open(path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    print(markdown_table(res["summary"], res["setup"]["params"]))
    print(f"wrote {path}")
    return 0


def markdown_table(summary: dict, params: dict) -> str:
    """The README table: medians per size and method."""
    def fmt(v: Any, unit: str = "") -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:g}{unit}" if v.is_integer() else f"{v:.2f}{unit}"
        return f"{v}{unit}"

    rows = ["| state | method | fault -> survivors train again (s) | normal sync step (s) | steps lost / redone | relaunch -> back in (s) | of which process start + imports (s) | bytes moved | runs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in sorted(summary, key=lambda k: params[k]):
        for method in [m for m in METHODS if m in summary[size]]:
            r = summary[size][method]
            mb = r.get("bytes_moved")
            rows.append(f"| {params[size] / 1e6:.1f}M params | {method} | {fmt(r.get('fault_to_resumed_s'))} | {fmt(r.get('sync_step_s'))} | "
                        f"{fmt(r.get('steps_lost'))} / {fmt(r.get('steps_redone'))} | {fmt(r.get('rejoin_s')) if r.get('rejoin_s') is not None or 'rejoin_s' not in r else 'not back in'} | {fmt(r.get('process_up_s'))} | "
                        f"{fmt(mb / 1e6 if mb is not None else None, ' MB')} | {r['runs_ok']} ok, {r['runs_failed']} failed |")
    return "\n".join(rows)


def machine_load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--large-reps", type=int, default=1, help="repetitions of the largest size (at most --reps; it is the slow one)")
    p.add_argument("--torchft-heartbeat-ms", type=int, default=500, help="lighthouse heartbeat timeout (torchft default 5000)")
    p.add_argument("--rt-heartbeat-s", type=float, default=10.0, help="rt heartbeat_timeout_s (kept at its default to show recovery does not depend on it)")
    p.add_argument("--netns", choices=["auto", "yes", "no"], default="auto", help="run inside `unshare -n` with only loopback up")
    p.add_argument("--timeout", type=float, default=600.0, help="per run")
    p.add_argument("--kill-on-entry", action="store_true", help="b dies on entering the fault step's exchange, even when a survivor "
                   "is still computing that step (the figure then includes that survivor's own compute); default: once a and c are inside it")
    p.add_argument("--keep", help="keep the run folders here")
    p.add_argument("--result", default="recovery")
    p.add_argument("--append", action="store_true", help="add these runs to the existing results/<--result>.json (same setup) and summarise all")
    p.add_argument("--reanalyse", metavar="ROOT", help="recompute results/<--result>.json from the run folders kept with --keep ROOT")
    p.add_argument("--table", metavar="JSON", help="only print the markdown table of a results file")
    args = p.parse_args(argv)
    global KILL_ON_ENTRY
    KILL_ON_ENTRY = args.kill_on_entry
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.result)
    if args.table:
        with open(args.table) as f:
            res = json.load(f)
        print(markdown_table(res["summary"], res["setup"]["params"]))
        return 0
    from common import reexec_in_netns

    rc = reexec_in_netns(args.netns, __file__, argv)
    if rc is not None:
        return rc
    if any(m.startswith("torchft") for m in args.methods):
        try:
            import numpy  # noqa: F401  (torchft's state transfer needs it)
            import torchft  # noqa: F401
        except ImportError as exc:
            print(f"torchft unavailable ({exc}); skipping it")
            args.methods = [m for m in args.methods if not m.startswith("torchft")]
    root = args.keep or tempfile.mkdtemp(prefix="bench-recovery-")
    runs: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in args.methods} for s in args.sizes}
    t0 = time.time()
    for rep in range(args.reps):
        for size in args.sizes:
            if size == args.sizes[-1] and len(args.sizes) > 1 and rep >= args.large_reps:
                continue
            for method in args.methods:  # interleaved: A B C D A B C D
                out = os.path.join(root, f"{size}-{method}-{rep}")
                load = machine_load()
                try:
                    r = run_one(method, SIZES[size], out, args.torchft_heartbeat_ms, args.rt_heartbeat_s, args.timeout)
                except Exception as exc:  # noqa: BLE001  (a failed run is a result too)
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                r["loadavg_before"], r["loadavg_after"] = load, machine_load()
                runs[size][method].append(r)
                print(f"[{time.time() - t0:6.0f} s] rep {rep} {size} {method}: {json.dumps(r, sort_keys=True)}", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                else:  # keep the logs for --reanalyse, not the checkpoints (about 3 GB per 21M run: 40 runs filled the disk)
                    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
    reps_done = {s: args.reps if (s != args.sizes[-1] or len(args.sizes) == 1) else min(args.reps, args.large_reps) for s in args.sizes}
    if args.append:
        from common import RESULTS

        with open(os.path.join(RESULTS, f"{args.result}.json")) as f:
            old = json.load(f)
        for size, methods in old["runs"].items():
            for method, rs in methods.items():
                runs.setdefault(size, {}).setdefault(method, [])[:0] = rs
        for size, n in old["setup"].get("reps_by_size", {}).items():
            reps_done[size] = reps_done.get(size, 0) + n
    summary = summarise(runs)
    import torch

    params = {s: sum(p.numel() for p in _model(SIZES[s]).parameters()) for s in runs}
    from common import write_result

    path = write_result(args.result, {
        "setup": {"groups": 3, "processes_per_group": 1, "backend": "gloo", "inner_optimizer": "AdamW", "batch": BATCH,
                  "fault": (f"group b SIGKILLed on entering the exchange of step index {FAULT_STEP - 1} (--kill-on-entry: a survivor may still be computing that step)"
                            if KILL_ON_ENTRY else f"group b SIGKILLed during step index {FAULT_STEP - 1} once a and c are inside that step's exchange"),
                  "diloco_sync_every": H, "checkpoint_every": EVERY, "torchft_heartbeat_timeout_ms": args.torchft_heartbeat_ms,
                  "rt_heartbeat_timeout_s": args.rt_heartbeat_s, "netns": bool(os.environ.get("RT_BENCH_IN_NETNS")),
                  "params": params, "state_bytes_fp32_with_adamw": {s: 3 * 4 * n for s, n in params.items()}, "reps_by_size": reps_done,
                  "torchft_version": _version("torchft"), "torch": torch.__version__},
        "summary": summary, "runs": runs, "total_wall_s": round(time.time() - t0, 1)})
    print(json.dumps(summary, indent=1, sort_keys=True))
    print(markdown_table(summary, params))
    print(f"wrote {path}")
    return 0


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
