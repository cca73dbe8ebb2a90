"""Three providers train one model; one provider is lost (its processes SIGKILLed and its
storage taken down) in the middle of training; the survivors carry on from the last committed
checkpoint read from the other providers' copies; the provider comes back and rejoins.

    python examples/provider_loss.py --out runs/provider-loss            # the demo
    python examples/provider_loss.py --out DIR --fault none               # same membership history, no fault

Each provider is one process (its replica group) with its own storage (a local folder here;
the tests use S3 and Azure emulators) and its own shard of the training text (data stays where
it lives). Providers synchronise with DiLoCo every --sync-every steps over the membership's
current epoch; checkpoints (every --every steps) are written by the first member and
replicated to 2 providers. Outputs in --out: events-*.jsonl (every save, sync, membership
change and recovery), final-*.safetensors, summary.json and timeline.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PROVIDERS = ("a", "b", "c")
VOCAB, CONTEXT = 128, 16


# ------------------------------------------------------------------ the model and the data


class CharLM(torch.nn.Module):
    """A small character-level language model: embeddings of the last CONTEXT bytes -> MLP."""

    def __init__(self, dim: int = 32, hidden: int = 256):
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
    val = data[int(n * 0.95):]
    train = data[: int(n * 0.95)]
    i = PROVIDERS.index(name)
    per = len(train) // len(PROVIDERS)
    return train[i * per:(i + 1) * per], val


def batch(text: torch.Tensor, step: int, name: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a pure function of (step, provider), so a replayed step sees the same data."""
    g = torch.Generator().manual_seed(1000003 * step + PROVIDERS.index(name))
    starts = torch.randint(0, len(text) - CONTEXT - 1, (size,), generator=g)
    ctx = torch.stack([text[s:s + CONTEXT] for s in starts.tolist()])
    return ctx, text[starts + CONTEXT]


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor, n: int = 512) -> float:
    starts = torch.arange(0, min(len(val) - CONTEXT - 1, n * 7), 7)[:n]
    ctx = torch.stack([val[s:s + CONTEXT] for s in starts.tolist()])
    return torch.nn.functional.cross_entropy(model(ctx), val[starts + CONTEXT]).item()


# ------------------------------------------------------------------ storage of each provider


class CountingStore:
    """Counts the bytes a provider's Store reads and writes (for the summary)."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.name = inner.name
        self.read_bytes_total = 0
        self.written_bytes_total = 0

    def __getattr__(self, item: str) -> Any:
        return getattr(self._inner, item)

    @property
    def uri(self) -> str:
        return self._inner.uri

    @contextmanager
    def open_write(self, path: str) -> Iterator[Any]:
        with self._inner.open_write(path) as f:
            yield _CountW(f, self)

    @contextmanager
    def open_read(self, path: str) -> Iterator[Any]:
        with self._inner.open_read(path) as f:
            yield _CountR(f, self)

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self._inner.read_bytes(path, start, end)
        self.read_bytes_total += len(data)
        return data

    def write_bytes(self, path: str, data: bytes) -> None:
        self._inner.write_bytes(path, data)
        self.written_bytes_total += len(data)


class _CountW:
    def __init__(self, f: Any, c: CountingStore):
        self._f, self._c = f, c

    def write(self, data: Any) -> Any:
        n = self._f.write(data)
        self._c.written_bytes_total += len(memoryview(data))
        return n

    def __getattr__(self, item: str) -> Any:
        return getattr(self._f, item)


class _CountR:
    def __init__(self, f: Any, c: CountingStore):
        self._f, self._c = f, c

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._c.read_bytes_total += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._c.read_bytes_total += n or 0
        return n

    def __getattr__(self, item: str) -> Any:
        return getattr(self._f, item)


def local_storage_down(root: str, name: str) -> None:
    """Take a local provider's storage down: its folder becomes unreachable (reads and writes fail)."""
    folder = os.path.join(root, name)
    os.rename(folder, folder + ".down")
    with open(folder, "w") as f:  # a file where the folder was: every read and write fails
        f.write("storage of provider %s is down\n" % name)


def local_storage_up(root: str, name: str) -> None:
    folder = os.path.join(root, name)
    os.unlink(folder)
    os.rename(folder + ".down", folder)


# ------------------------------------------------------------------ one provider's process


def member(args: argparse.Namespace) -> int:
    import logging

    from safetensors.torch import save_file

    import resilient_train as rt  # noqa: F401
    from resilient_train.membership import Membership
    from resilient_train.membership.fingerprint import model_fingerprint
    from resilient_train.membership.kvstore import TCPKVStore
    from resilient_train.recovery.elastic import ElasticGroup
    from resilient_train.storage.providers import Placement, Provider, ReplicationPolicy
    from resilient_train.trainer import EventLog

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    name = args.name
    spec = json.loads(args.providers)
    providers = [Provider(p["name"], p["uri"], p["region"], egress_cost_per_gb=p.get("egress_cost_per_gb", 0.0), storage_options=p.get("storage_options", {})) for p in spec]
    stores = {p.name: CountingStore(p.open()) for p in providers}
    placement = Placement(providers, ReplicationPolicy(copies=2), stores=stores)
    events = EventLog(os.path.join(args.out, f"events-{name}.jsonl"))

    torch.manual_seed(0)
    model = CharLM()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    text, val = shard(corpus(), name)
    kv = TCPKVStore("127.0.0.1", args.kv_port)
    membership = Membership(kv, name, model_fingerprint(model, "provider-loss-demo-1"), heartbeat_interval_s=0.2, timeout_s=args.detect_timeout, collective_timeout_s=5.0).start()
    group = ElasticGroup(name, model, opt, membership, placement, sync_every=args.sync_every, every_n_steps=args.every, events=events, change_timeout_s=60, collective_timeout_s=5.0)
    expect = tuple(PROVIDERS) if not args.rejoining else (name,)
    group.start(expect=expect)
    events.emit("started", member=name, step=group.step_count, rejoining=args.rejoining)
    while group.step_count < args.steps:
        if group.step_count == args.rejoin_at and not args.rejoining and args.fault_member != name:
            group.admit((args.fault_member,))
        ctx, target = batch(text, group.step_count, name)
        loss = torch.nn.functional.cross_entropy(model(ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        group.step()
        if group.step_count % args.sync_every == 0:
            events.emit("loss", member=name, step=group.step_count, train_loss=round(loss.item(), 5), val_loss=round(val_loss(model, val), 5))
        if name == args.fault_member and not args.rejoining and group.step_count == args.fault_at:
            events.emit("fault", member=name, step=group.step_count, kind=args.fault)
            if args.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            group.close()  # the fault-free twin: leave cleanly at the same step
            return 0
    events.emit("io", member=name, bytes={n: {"read": s.read_bytes_total, "written": s.written_bytes_total} for n, s in stores.items()}, received_state_bytes=group.bytes_received)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out, f"final-{name}.safetensors"))
    events.emit("done", member=name, step=group.step_count, val_loss=round(val_loss(model, val), 5))
    group.close()
    return 0


# ------------------------------------------------------------------ the orchestrator


def read_events(out: str) -> list[dict]:
    evs = []
    for fname in sorted(os.listdir(out)):
        if fname.startswith("events-") and fname.endswith(".jsonl"):
            with open(os.path.join(out, fname)) as f:
                evs += [json.loads(line) for line in f if line.strip()]
    return sorted(evs, key=lambda e: e["t"])


def wait_for(out: str, pred, timeout_s: float, what: str, procs: dict[str, subprocess.Popen]) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in read_events(out):
            if pred(e):
                return e
        for n, p in procs.items():
            if p.poll() not in (None, 0, -signal.SIGKILL):
                raise SystemExit(f"provider {n} failed with exit code {p.returncode}; see {out}/log-{n}.txt")
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")


def run(args: argparse.Namespace, providers: list[dict], storage_down: Any, storage_up: Any) -> dict:
    """Run the scenario; ``storage_down(name)``/``storage_up(name)`` stop and restart a provider's storage."""
    from resilient_train.membership.kvstore import TCPKVStore

    os.makedirs(args.out, exist_ok=True)
    kv_host = TCPKVStore.host(0)
    port = kv_host.port
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = [sys.executable, os.path.abspath(__file__), "--member", "--kv-port", str(port), "--providers", json.dumps(providers), "--out", args.out,
              "--steps", str(args.steps), "--sync-every", str(args.sync_every), "--every", str(args.every), "--fault", args.fault,
              "--fault-member", args.fault_member, "--fault-at", str(args.fault_at), "--rejoin-at", str(args.rejoin_at),
              "--detect-timeout", str(args.detect_timeout), "--lr", str(args.lr)]
    procs: dict[str, subprocess.Popen] = {}
    logs = {}

    def launch(name: str, *extra: str) -> None:
        logs[name] = open(os.path.join(args.out, f"log-{name}.txt"), "a")
        procs[name] = subprocess.Popen(common + ["--name", name, *extra], env=env, stdout=logs[name], stderr=subprocess.STDOUT)

    orch = _Orchestrator(args.out)
    t0 = time.time()
    try:
        for n in PROVIDERS:
            launch(n)
        orch.emit("launched", members=list(PROVIDERS))
        fault = wait_for(args.out, lambda e: e["event"] == "fault", 600, f"provider {args.fault_member} to reach step {args.fault_at}", procs)
        procs[args.fault_member].wait(timeout=60)
        t_fault = fault["t"]
        if args.fault == "kill":
            storage_down(args.fault_member)
            orch.emit("storage_down", provider=args.fault_member)
        recovered = [wait_for(args.out, lambda e, n=n: e["event"] == "recovered" and e["member"] == n, 300, f"{n} to recover", procs) for n in PROVIDERS if n != args.fault_member]
        if args.fault == "kill":
            storage_up(args.fault_member)
            orch.emit("storage_up", provider=args.fault_member)
        launch(args.fault_member, "--rejoining")
        orch.emit("relaunched", provider=args.fault_member)
        for n, p in procs.items():
            code = p.wait(timeout=900)
            if code != 0:
                raise SystemExit(f"provider {n} exited with {code}; see {args.out}/log-{n}.txt")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
        del kv_host
    evs = read_events(args.out)
    committed_before = [e["step"] for e in evs if e["event"] == "checkpoint_committed" and e["t"] < t_fault]
    rolled_back_to = sorted({r["rolled_back_to"] for r in recovered})
    summary = {
        "fault": args.fault,
        "fault_member": args.fault_member,
        "fault_at_step": args.fault_at,
        "last_committed_before_fault": max(committed_before) if committed_before else None,
        "rolled_back_to": rolled_back_to,
        "committed_steps_lost": (max(committed_before) - min(rolled_back_to)) if committed_before else None,
        "steps_redone": max(r["steps_redone"] for r in recovered),
        "recovery_s_from_fault": round(max(r["t"] for r in recovered) - t_fault, 3),
        "recovery_s_after_detection": max(r["seconds"] for r in recovered),
        "detection_timeout_s": args.detect_timeout,
        "checkpoint_loaded_from": [e["files_by_provider"] for e in evs if e["event"] == "checkpoint_loaded" and e["t"] > t_fault and e["member"] != args.fault_member],
        "rejoin": [e for e in evs if e["event"] == "membership" and e["member"] == args.fault_member and e["t"] > t_fault][-1:],
        "bytes_by_provider": _bytes_by_provider(evs),
        "final_val_loss": {e["member"]: e["val_loss"] for e in evs if e["event"] == "done"},
        "first_val_loss": {e["member"]: e["val_loss"] for e in reversed(evs) if e["event"] == "loss"},
        "wall_s": round(time.time() - t0, 2),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def _bytes_by_provider(evs: list[dict]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for e in evs:
        if e["event"] == "io":
            for prov, b in e["bytes"].items():
                t = total.setdefault(prov, {"read": 0, "written": 0})
                t["read"] += b["read"]
                t["written"] += b["written"]
    return total


class _Orchestrator:
    def __init__(self, out: str):
        from resilient_train.trainer import EventLog

        self.log = EventLog(os.path.join(out, "events-orchestrator.jsonl"))

    def emit(self, event: str, **fields: Any) -> None:
        self.log.emit(event, actor="orchestrator", **fields)


def plot_timeline(out: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evs = read_events(out)
    t0 = evs[0]["t"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    for n in PROVIDERS:
        pts = [(e["t"] - t0, e["val_loss"]) for e in evs if e["event"] == "loss" and e["member"] == n]
        if pts:
            ax.plot(*zip(*pts), ".-", ms=3, lw=1, color=colors[n], label=f"provider {n}: validation loss")
    for e in evs:
        x = e["t"] - t0
        if e["event"] == "checkpoint_committed":
            ax.axvline(x, color="grey", lw=0.6, ls=":")
        elif e["event"] == "fault":
            ax.axvline(x, color="red", lw=2, label=f"provider {e['member']} lost (SIGKILL + storage down)" if e["kind"] == "kill" else f"provider {e['member']} leaves")
        elif e["event"] == "recovered":
            ax.axvline(x, color="purple", lw=1.5, ls="--", label=f"{e['member']} recovered (rolled back to step {e['rolled_back_to']})")
        elif e["event"] == "relaunched":
            ax.axvline(x, color="black", lw=1, ls="-.", label=f"provider {e['provider']} relaunched")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("resilient-train: three providers, one lost and recovered (dotted: committed checkpoints)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
    mem = [(e["t"] - t0, len(e["members"])) for e in evs if e["event"] == "membership" and e["member"] == "a"]
    if mem:
        xs, ys = zip(*mem)
        ax2.step(list(xs) + [evs[-1]["t"] - t0], list(ys) + [ys[-1]], where="post", color="black")
    ax2.set_ylim(0, 3.5)
    ax2.set_ylabel("members")
    ax2.set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "provider-loss"), help="output folder (replaced)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps (a multiple of --sync-every)")
    p.add_argument("--fault", choices=["kill", "none"], default="kill", help="kill: SIGKILL + storage down; none: leave cleanly (the fault-free twin)")
    p.add_argument("--fault-member", default="b", choices=PROVIDERS)
    p.add_argument("--fault-at", type=int, default=178, help="the step at which the provider is lost")
    p.add_argument("--rejoin-at", type=int, default=260, help="the step at which the survivors admit it back")
    p.add_argument("--detect-timeout", type=float, default=2.0, help="membership failure-detection timeout (s)")
    p.add_argument("--lr", type=float, default=0.3)
    # internal: one provider's process
    p.add_argument("--member", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--kv-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--providers", help=argparse.SUPPRESS)
    p.add_argument("--rejoining", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.member:
        return member(args)
    if args.every % args.sync_every or not (args.every < args.fault_at < args.rejoin_at < args.steps):
        p.error("need --every a multiple of --sync-every and --every < --fault-at < --rejoin-at < --steps")
    args.out = os.path.abspath(args.out)
    shutil.rmtree(args.out, ignore_errors=True)
    storage = os.path.join(args.out, "storage")
    # Declared order = write order: b holds the primary copy, c the replica; a joins in when one is down.
    providers = [{"name": n, "uri": os.path.join(storage, n), "region": r, "egress_cost_per_gb": cost} for n, r, cost in (("b", "us-east", 0.02), ("c", "eu-north", 0.05), ("a", "eu-west", 0.09))]
    for pr in providers:
        os.makedirs(pr["uri"], exist_ok=True)
    print(f"provider-loss demo: 3 providers ({', '.join(PROVIDERS)}), DiLoCo every {args.sync_every} steps, checkpoints every {args.every} replicated to 2 providers, "
          f"provider {args.fault_member} {'lost' if args.fault == 'kill' else 'leaves'} at step {args.fault_at}, rejoins at step {args.rejoin_at}; output in {args.out}")
    summary = run(args, providers, lambda n: local_storage_down(storage, n), lambda n: local_storage_up(storage, n))
    try:
        plot_timeline(args.out, os.path.join(args.out, "timeline.png"))
        summary["timeline_png"] = os.path.join(args.out, "timeline.png")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    except ImportError:
        print("matplotlib is not installed: no timeline.png (pip install matplotlib)")
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
