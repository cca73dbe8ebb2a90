"""One provider's training job in a multi-provider run: launch one torchrun per provider.

    torchrun --standalone --nproc-per-node=2 examples/provider_train.py --group a \
        --membership tcp://127.0.0.1:29600 --providers providers.json --out runs/x [--fsdp]

Each provider trains a small character-level language model on its own shard of the text (data
stays where it lives) with AdamW inside the group (DDP over its ranks) and DiLoCo between the
groups (int8 pseudo-gradients by default). The only resilient-train lines are the ``rt.wrap``
call and ``trainer.step()``. ``--providers`` describes the storage providers (JSON list of
``{name, uri, region, egress_cost_per_gb}``); checkpoints are replicated to 2 of them, each
group under its own ``group-<name>`` folder. Fault switches (for the demo and the tests):
``--kill-at-round R`` SIGKILLs this whole torchrun job (agent and workers) while round R is in
flight; ``--leave-before-round R`` leaves cleanly before round R (the fault-free reference);
``--hold-at-step S`` stops before step S and waits to be killed. A worker sent SIGUSR1 prints its
threads' Python stacks to the log.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import resilient_train as rt  # noqa: E402
from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy  # noqa: E402
from resilient_train.storage.retry import RetryPolicy  # noqa: E402

VOCAB, CONTEXT = 128, 16
PROVIDERS = ("a", "b", "c")


class CharLM(torch.nn.Module):
    """Embeddings of the last CONTEXT bytes -> MLP -> next byte."""

    def __init__(self, dim: int = 16, hidden: int = 128):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(CONTEXT * dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, VOCAB))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ctx).flatten(1))


def corpus() -> torch.Tensor:
    """Text this machine already has: the sources of a few standard-library modules."""
    import argparse as m1
    import json.decoder as m4
    import logging as m2
    import subprocess as m3

    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (m1, m2, m3, m4))
    return torch.tensor([min(ord(ch), VOCAB - 1) for ch in text], dtype=torch.long)


def shard(data: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Provider ``name``'s own training text, and the shared validation text (the last 5%)."""
    n = len(data)
    val, train = data[int(n * 0.95):], data[: int(n * 0.95)]
    i = PROVIDERS.index(name) if name in PROVIDERS else sum(map(ord, name)) % len(PROVIDERS)
    per = len(train) // len(PROVIDERS)
    return train[i * per:(i + 1) * per], val


def batch(text: torch.Tensor, step: int, name: str, rank: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` on ``rank`` of provider ``name``: a pure function of the three."""
    g = torch.Generator().manual_seed(1000003 * step + 7919 * rank + sum(map(ord, name)))
    starts = torch.randint(0, len(text) - CONTEXT - 1, (size,), generator=g)
    ctx = torch.stack([text[s:s + CONTEXT] for s in starts.tolist()])
    return ctx, text[starts + CONTEXT]


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor, n: int = 256) -> float:
    starts = torch.arange(0, min(len(val) - CONTEXT - 1, n * 7), 7)[:n]
    ctx = torch.stack([val[s:s + CONTEXT] for s in starts.tolist()])
    return torch.nn.functional.cross_entropy(model(ctx), val[starts + CONTEXT]).item()


def placement(spec: str) -> Placement:
    with open(spec) as f:
        items = json.load(f)
    # a short retry budget: a provider whose storage is down is given up on (and skipped by the
    # circuit breaker) after 3 s, in the background saver, not after the default 60 s
    retry = RetryPolicy(max_attempts=3, max_total_s=3.0, call_timeout_s=30.0)
    providers = [Provider(p["name"], p["uri"], p["region"], egress_cost_per_gb=p.get("egress_cost_per_gb", 0.0), storage_options=p.get("storage_options", {}), retry=retry) for p in items]
    return Placement(providers, ReplicationPolicy(copies=min(2, len(providers))))


def kill_torchrun_job() -> None:
    """SIGKILL the torchrun agent (this process's parent) and every worker it started (Linux:
    the agent's children from /proc; torchrun puts each worker in its own session)."""
    agent = os.getppid()
    try:
        with open(f"/proc/{agent}/task/{agent}/children") as f:
            workers = [int(p) for p in f.read().split()]
    except OSError:
        workers = []
    os.kill(agent, signal.SIGKILL)
    for pid in workers:
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def arm_fault(trainer: rt.Trainer, round_: int, group: str, kind: str, stop_s: float = 0.0) -> None:
    """When this group's leader enters the cross-provider exchange of round ``round_`` (the
    other providers are inside it, waiting): ``kill``: SIGKILL this whole torchrun job (agent
    and every worker); ``stop``: SIGSTOP this worker for ``stop_s`` seconds, then SIGCONT."""
    cross = trainer.cross
    inner = cross._collective
    fired: list[str] = []

    def collective(op: str, buf: torch.Tensor):
        if trainer.sync.rounds == round_ and not fired:  # the round's exchange: all-gather (codecs) or all-reduce ("none")
            fired.append(op)
            trainer.events.emit("fault", kind=kind, step=trainer.step_count, member=group)
            if kind == "kill":
                kill_torchrun_job()
            else:
                import subprocess

                subprocess.Popen(["sh", "-c", f"kill -STOP {os.getpid()}; sleep {stop_s}; kill -CONT {os.getpid()}"])
                time.sleep(1.0)  # stopped here
        return inner(op, buf)

    cross._collective = collective


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", required=True, help="this provider's name (its replica group)")
    p.add_argument("--membership", required=True, help="membership store: tcp://host:port or etcd://h1:p1,h2:p2,...")
    p.add_argument("--providers", help="JSON file of storage providers (checkpoints replicated to 2)")
    p.add_argument("--ckpt", help="a checkpoint folder/URL instead of --providers")
    p.add_argument("--out", required=True, help="folder for event logs and final weights")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps (a multiple of --sync-every)")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--codec", default="int8")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--start-groups", type=int, default=3, help="wait for this many providers before training")
    p.add_argument("--round-deadline", type=float, default=30.0)
    p.add_argument("--join-timeout", type=float, default=120.0, help="give up joining the others after this long")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (keeps a CPU demo watchable)")
    p.add_argument("--kill-at-round", type=int, default=None)
    p.add_argument("--leave-before-round", type=int, default=None)
    p.add_argument("--stop-at-round", type=int, default=None, help="SIGSTOP this provider's leader inside round R (a straggler)")
    p.add_argument("--stop-seconds", type=float, default=10.0)
    p.add_argument("--hold-at-step", type=int, default=None, help="stop training before step S and wait to be killed (a whole-job kill at a known point)")
    p.add_argument("--kill-rank-at-step", type=int, default=None, help="SIGKILL this group's last rank at step S (first torchrun attempt only)")
    p.add_argument("--fsdp", action="store_true", help="shard the model over this provider's ranks with FSDP2 (fully_shard): "
                                                         "every rank exchanges its own shard with the other providers")
    p.add_argument("--stop-file", default=None, help="a file the launcher writes a step number into: train until that step instead of --steps "
                                                      "(read at every round boundary, so every provider stops at the same step)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # `kill -USR1 <worker pid>` prints every thread's Python stack to the log (the tests do it to a
    # job that hangs, before they kill it)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    torch.manual_seed(0)
    model = CharLM()
    if args.fsdp:
        shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    text, val = shard(corpus(), args.group)
    ckpt = placement(args.providers) if args.providers else args.ckpt
    os.makedirs(args.out, exist_ok=True)
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=ckpt, every_n_steps=args.every, keep_last=args.keep_last,
        sync=rt.SyncConfig(mode="diloco", sync_every=args.sync_every, codec=args.codec),
        group=args.group, membership=args.membership, start_groups=args.start_groups, round_deadline_s=args.round_deadline, join_timeout_s=args.join_timeout,
        event_log=os.path.join(args.out, f"events-{args.group}-rank{{rank}}.jsonl"), timeout_s=120))
    H = args.sync_every
    while trainer.step_count < args.steps:
        s = trainer.step_count
        if args.leave_before_round is not None and s == args.leave_before_round * H - 1:
            trainer.events.emit("fault", kind="leave", step=s, member=args.group)
            trainer.close()
            return 0
        if args.kill_at_round is not None and s == args.kill_at_round * H - 1 and trainer.rank == 0:
            arm_fault(trainer, args.kill_at_round, args.group, "kill")
        if args.stop_at_round is not None and s == args.stop_at_round * H - 1 and trainer.rank == 0:
            arm_fault(trainer, args.stop_at_round, args.group, "stop", args.stop_seconds)
        if args.hold_at_step == s:
            trainer.events.emit("fault", kind="hold", step=s, member=args.group, rank=trainer.rank)
            while True:
                time.sleep(1)
        if (args.kill_rank_at_step == s and trainer.rank == trainer.world_size - 1
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            trainer.events.emit("fault", kind="kill-rank", step=s, member=args.group, rank=trainer.rank)
            os.kill(os.getpid(), signal.SIGKILL)
        ctx, target = batch(text, s, args.group, trainer.rank)
        loss = torch.nn.functional.cross_entropy(trainer.model(ctx), target)
        opt.zero_grad()
        loss.backward()
        trainer.step()
        if args.step_delay:
            time.sleep(args.step_delay)
        if args.stop_file and trainer.step_count % H == 0 and os.path.exists(args.stop_file):
            with open(args.stop_file) as f:
                args.steps = int(f.read().strip() or args.steps)
        if trainer.step_count % H == 0 and (trainer.rank == 0 or args.fsdp):  # an FSDP2 forward is collective
            vl = val_loss(model, val)
            if trainer.rank == 0:
                trainer.events.emit("loss", member=args.group, step=trainer.step_count, train_loss=round(loss.item(), 5), val_loss=round(vl, 5))
    summary = trainer.summary()
    trainer.close()
    # the final weights, whole (an FSDP2 model's pieces gathered here, at the end, for the comparison)
    final = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous() for k, v in model.state_dict().items()}
    vl = val_loss(model, val) if trainer.rank == 0 or args.fsdp else None
    if trainer.rank == 0:
        from safetensors.torch import save_file

        save_file(final, os.path.join(args.out, f"final-{args.group}.safetensors"))
        trainer.events.emit("done", member=args.group, step=trainer.step_count, val_loss=round(vl, 5), summary=summary)
    return 0


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 inside the provider: every layer sharded over this torchrun job's ranks (each rank
    holds 1/N of every parameter; DiLoCo's state and the exchange with the other providers are
    sharded alike)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model.emb, model.mlp[0], model.mlp[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


if __name__ == "__main__":
    sys.exit(main())
