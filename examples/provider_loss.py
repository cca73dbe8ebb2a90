"""Three providers train one model; one provider is lost in the middle of a synchronisation
round (its torchrun agent and workers SIGKILLed, its storage taken down); the survivors redo
only that round among themselves and carry on without restarting; the provider is relaunched
and rejoins with the live state from a peer.

    python examples/provider_loss.py --out runs/provider-loss              # the demo
    python examples/provider_loss.py --out DIR --fault none                # b leaves cleanly instead

Each provider is one ``torchrun`` job (``examples/provider_train.py``, 2 ranks, DDP inside,
AdamW) with its own storage (a local folder here; the tests also use S3 and Azure emulators)
and its own shard of the training text. Providers synchronise with DiLoCo (int8) through a
membership store (a TCPStore hosted by this process). Checkpoints are replicated to two
providers. Outputs in --out: events-*.jsonl, final-*.safetensors, summary.json, timeline.png.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

PROVIDERS = ("a", "b", "c")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


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


def read_events(out: str) -> list[dict]:
    evs = []
    for path in sorted(glob.glob(os.path.join(out, "events-*.jsonl"))):
        who = os.path.basename(path)[len("events-"):-len(".jsonl")]
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        e = json.loads(line)
                    except ValueError:  # a line cut by the SIGKILL
                        continue
                    e.setdefault("who", who)
                    evs.append(e)
    return sorted(evs, key=lambda e: e["t"])


def wait_for(out: str, pred: Callable[[dict], bool], timeout_s: float, what: str, procs: dict[str, subprocess.Popen]) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in read_events(out):
            if pred(e):
                return e
        for n, p in procs.items():
            if p.poll() not in (None, 0, -signal.SIGKILL):
                raise SystemExit(f"provider {n} failed with exit code {p.returncode}; see {out}/log-{n}.txt")
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")


def warm_codec_cache() -> None:
    """Build the CPU codec kernel once here, not in six processes at once (first use only)."""
    from resilient_train.compression import _ext

    t0 = time.perf_counter()
    _ext.load_cpu(required=False)
    if time.perf_counter() - t0 > 2:
        print(f"(built the CPU codec kernel in {time.perf_counter() - t0:.0f} s; cached for next time)")


UNTIL_STOP_FILE = 10**7
"""--steps of a provider that trains until the launcher writes the stop file."""


def write_stop_step(path: str, step: int) -> None:
    """Write the step every provider stops at (atomically: a reader never sees half a number)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(step))
    os.replace(tmp, path)


def run(args: argparse.Namespace, providers: list[dict], storage_down: Callable[[str], None], storage_up: Callable[[str], None]) -> dict:
    """Run the scenario; ``storage_down(name)``/``storage_up(name)`` stop and restart a provider's storage."""
    from resilient_train.membership.kvstore import TCPKVStore

    os.makedirs(args.out, exist_ok=True)
    spec = os.path.join(args.out, "providers.json")
    with open(spec, "w") as f:
        json.dump(providers, f)
    warm_codec_cache()
    kv_host = TCPKVStore.host(0)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    H = args.sync_every
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Any] = {}

    # Every provider trains until the step written into this file (read at round boundaries):
    # when the lost provider is relaunched, only once it has rejoined, so that on a slow machine
    # the survivors cannot finish before it is admitted (events decide, not how many steps fit
    # in a time). Without a relaunch, it holds --steps from the start.
    stop_file = os.path.join(args.out, "stop-at-step")
    relaunch = getattr(args, "relaunch", True)
    if os.path.exists(stop_file):
        os.unlink(stop_file)
    if not relaunch:
        write_stop_step(stop_file, args.steps)

    def launch(name: str, *extra: str) -> None:
        logs[name] = open(os.path.join(args.out, f"log-{name}.txt"), "a")
        cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={args.ranks}", os.path.join(HERE, "provider_train.py"), "--group", name,
               "--membership", f"tcp://127.0.0.1:{kv_host.port}", "--providers", spec, "--out", args.out,
               "--steps", str(UNTIL_STOP_FILE if relaunch else args.steps), "--stop-file", stop_file,
               "--sync-every", str(H), "--every", str(args.every), "--start-groups", "3", "--step-delay", str(args.step_delay),
               "--round-deadline", str(args.round_deadline), "--keep-last", str(args.keep_last),
               *(["--fsdp"] if getattr(args, "fsdp", False) else []), *extra]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True)

    def orch(event: str, **fields: Any) -> None:
        with open(os.path.join(args.out, "events-orchestrator.jsonl"), "a") as f:
            f.write(json.dumps({"t": round(time.time(), 4), "event": event, **fields}) + "\n")

    t0 = time.time()
    b = args.fault_member
    fault_flag = ["--kill-at-round", str(args.fault_round)] if args.fault == "kill" else ["--leave-before-round", str(args.fault_round)]
    try:
        for n in PROVIDERS:
            launch(n, *(fault_flag if n == b else ()))
        orch("launched", members=list(PROVIDERS))
        fault = wait_for(args.out, lambda e: e["event"] == "fault", 600, f"provider {b} to reach round {args.fault_round}", procs)
        procs[b].wait(timeout=120)
        if args.fault == "kill":
            storage_down(b)
            orch("storage_down", provider=b)
        survivors = [n for n in PROVIDERS if n != b]
        recovered = [wait_for(args.out, lambda e, n=n: e["event"] == "reconfigured" and e.get("group") == n, 300, f"{n} to recover", procs) for n in survivors]
        # let the survivors train on alone for a while (the comparison with the fault-free run is
        # made on their checkpoints of this stretch), then bring the provider back
        back_at = (args.fault_round + args.rejoin_after_rounds) * H
        wait_for(args.out, lambda e: e["event"] == "loss" and e.get("member") in survivors and e["step"] >= back_at, 600, f"survivors to reach step {back_at}", procs)
        if args.fault == "kill":
            storage_up(b)
            orch("storage_up", provider=b)
        if relaunch:
            launch(b)
            orch("relaunched", provider=b)
            joined = wait_for(args.out, lambda e: e["event"] == "joined" and e.get("group") == b and e["t"] > fault["t"], 600, f"{b} to rejoin", procs)
            # a few rounds past the rejoin (every provider reads the file at a round boundary,
            # at most one round apart), and never fewer than --steps
            stop_at = max(args.steps, (joined["step"] // H + 3) * H)
            write_stop_step(stop_file, stop_at)
            orch("stop_at", step=stop_at)
        for n, p in procs.items():
            code = p.wait(timeout=900)
            if code != 0:
                raise SystemExit(f"provider {n} exited with {code}; see {args.out}/log-{n}.txt")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()
        del kv_host
    evs = read_events(args.out)
    t_fault = fault["t"]
    leaders = [e for e in evs if e["who"].endswith("rank0")]
    rejoin = [e for e in leaders if e["event"] == "joined" and e.get("group") == b and e["t"] > t_fault]
    steps_by_group: dict[str, list[int]] = {}
    for e in leaders:
        if e["event"] == "sync" and e.get("group", e["who"][0]) in survivors:
            steps_by_group.setdefault(e["who"][0], []).append(e["step"])
    # every survivor's rounds follow each other H steps apart: a step redone would show as a gap < H
    redone = sum(prev + H - cur for s in steps_by_group.values() for prev, cur in zip(s, s[1:]) if cur < prev + H)
    first_loss = {}
    for e in leaders:
        if e["event"] == "loss":
            first_loss.setdefault(e["member"], e["val_loss"])
    summary = {
        "fault": args.fault,
        "fault_member": b,
        "fault_round": args.fault_round,
        "fault_step": fault["step"],
        # what a user feels: every rank of every survivor completed a round again (the redone one),
        # read from each rank's own events; the figure is the slowest rank's
        "recovery_s_from_fault": round(max(min(e["t"] for e in evs if e["event"] == "sync" and e["who"] == who and e["t"] > t_fault)
                                           for who in {e["who"] for e in evs if e["who"][0] in survivors}) - t_fault, 3),
        "reconfigured_s_from_fault": round(max(r["t"] for r in recovered) - t_fault, 3),
        "roll_call_s": max(r["seconds"] for r in recovered),
        "steps_redone": redone,
        "survivor_epochs": sorted({r["epoch"] for r in recovered}),
        "rejoin": [{k: e[k] for k in ("step", "epoch", "members", "state_from", "received_bytes", "seconds")} for e in rejoin[-1:]],
        "rejoin_s_after_relaunch": round(rejoin[-1]["t"] - [e for e in evs if e["event"] == "relaunched"][-1]["t"], 3) if rejoin else None,
        "rejoin_wait_s": round(rejoin[-1]["seconds"], 3) if rejoin else None,
        "checkpoint_commits": sorted({(e.get("group") or e["who"][0], e["step"]) for e in leaders if e["event"] == "checkpoint_committed"}),
        "final_val_loss": {e["member"]: e["val_loss"] for e in leaders if e["event"] == "done"},
        "first_val_loss": first_loss,
        "wall_s": round(time.time() - t0, 2),
        # cross-provider bytes each rank sent per round (a sharded group: every rank its shard on
        # its lane; a replicated group: the leader the whole model), from each rank's own events
        "sync_bytes_per_round_by_rank": {who: round(last["bytes_sent"] / last["rounds"]) for who in sorted({e["who"] for e in evs if e["event"] == "sync"})
                                         for last in [[e for e in evs if e["event"] == "sync" and e["who"] == who and e.get("rounds")][-1]]},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def plot_timeline(out: str, png: str, summary: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evs = read_events(out)
    leaders = [e for e in evs if e["who"].endswith("rank0")]
    t0 = evs[0]["t"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    for n in PROVIDERS:
        xs, ys = [], []
        for e in leaders:
            if e["event"] == "loss" and e["member"] == n:
                if xs and e["t"] - t0 - xs[-1] > 3:  # the provider was away: no line across the gap
                    xs.append(float("nan")), ys.append(float("nan"))
                xs.append(e["t"] - t0), ys.append(e["val_loss"])
        if xs:
            ax.plot(xs, ys, ".-", ms=3, lw=1, color=colors[n], label=f"provider {n}: validation loss")
    t_fault = next((e["t"] for e in evs if e["event"] == "fault"), float("inf"))
    for e in evs:
        x = e["t"] - t0
        if e["event"] == "checkpoint_committed" and e["who"] == "a-rank0":
            ax.axvline(x, color="grey", lw=0.6, ls=":")
        elif e["event"] == "fault":
            ax.axvline(x, color="red", lw=2, label=f"provider {e['member']} SIGKILLed mid-round (+ storage down)" if e["kind"] == "kill" else f"provider {e['member']} leaves")
        elif e["event"] == "reconfigured" and e["who"] == "a-rank0":
            ax.axvline(x, color="purple", lw=1.5, ls="--", label=f"survivors continue (epoch {e['epoch']}, round redone, 0 steps redone)")
        elif e["event"] == "relaunched":
            ax.axvline(x, color="black", lw=1, ls="-.", label=f"provider {e['provider']} relaunched")
        elif e["event"] == "joined" and e["t"] > t_fault and e["who"].endswith("rank0") and e.get("received_bytes"):
            ax.axvline(x, color="tab:orange", lw=1, ls="--", label=f"provider {e['group']} back in (state from {e['state_from']})")
    if summary:
        ax.text(0.01, 0.02, f"steps redone: {summary['steps_redone']}   survivors training again {summary['recovery_s_from_fault']:.2f} s after the kill   "
                f"rejoin: {summary['rejoin_wait_s']} s after its process was up" if summary.get("rejoin") else f"steps redone: {summary['steps_redone']}",
                transform=ax.transAxes, fontsize=8, va="bottom", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("resilient-train: three providers (2 ranks each, AdamW, DiLoCo int8), one lost mid-round and back")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
    mem = [(e["t"] - t0, len(e["members"])) for e in leaders if e["who"] == "a-rank0" and e["event"] in ("joined", "reconfigured", "membership")]
    if mem:
        xs, ys = zip(*mem)
        ax2.step(list(xs) + [evs[-1]["t"] - t0], list(ys) + [ys[-1]], where="post", color="black")
    ax2.set_ylim(0, 3.5)
    ax2.set_ylabel("providers in")
    ax2.set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "provider-loss"), help="output folder (replaced)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--ranks", type=int, default=2, help="ranks per provider (torchrun --nproc-per-node)")
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps (a multiple of --sync-every)")
    p.add_argument("--fault", choices=["kill", "none"], default="kill", help="kill: SIGKILL mid-round + storage down; none: leave cleanly before that round")
    p.add_argument("--fault-member", default="b", choices=PROVIDERS)
    p.add_argument("--fault-round", type=int, default=10, help="the synchronisation round during which the provider is lost")
    p.add_argument("--rejoin-after-rounds", type=int, default=3, help="relaunch the provider this many rounds later")
    p.add_argument("--round-deadline", type=float, default=30.0)
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept per group")
    p.add_argument("--step-delay", type=float, default=0.08, help="sleep per step so that the CPU demo is watchable")
    p.add_argument("--fsdp", action="store_true", help="shard the model over each provider's ranks with FSDP2: every rank "
                                                      "exchanges its own shard with the other providers")
    args = p.parse_args(argv)
    if args.every % args.sync_every or (args.fault_round + args.rejoin_after_rounds) * args.sync_every >= args.steps:
        p.error("need --every a multiple of --sync-every and (--fault-round + --rejoin-after-rounds) * --sync-every < --steps")
    args.out = os.path.abspath(args.out)
    shutil.rmtree(args.out, ignore_errors=True)
    storage = os.path.join(args.out, "storage")
    # Declared order = write order: b holds the primary copy, c the replica; a joins in when one is down.
    providers = [{"name": n, "uri": os.path.join(storage, n), "region": r, "egress_cost_per_gb": cost} for n, r, cost in (("b", "us-east", 0.02), ("c", "eu-north", 0.05), ("a", "eu-west", 0.09))]
    for pr in providers:
        os.makedirs(pr["uri"], exist_ok=True)
    print(f"provider-loss demo: 3 providers x {args.ranks} ranks ({', '.join(PROVIDERS)}), {'FSDP2' if args.fsdp else 'DDP'} + AdamW inside, DiLoCo int8 every {args.sync_every} steps, "
          f"checkpoints every {args.every} replicated to 2 providers; provider {args.fault_member} "
          f"{'SIGKILLed during' if args.fault == 'kill' else 'leaves before'} round {args.fault_round}; output in {args.out}", flush=True)
    summary = run(args, providers, lambda n: local_storage_down(storage, n), lambda n: local_storage_up(storage, n))
    try:
        plot_timeline(args.out, os.path.join(args.out, "timeline.png"), summary)
        summary["timeline_png"] = os.path.join(args.out, "timeline.png")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    except ImportError:
        print("matplotlib is not installed: no timeline.png (pip install matplotlib)")
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
