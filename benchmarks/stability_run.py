"""Long fault-free run of the provider-group topology: does anything drop a healthy provider?

Three providers (``examples/provider_train.py``, one torchrun each, ``--ranks`` ranks per
provider, AdamW inside, DiLoCo int8 between them) train for ``--minutes`` with checkpoints every
``--every`` steps and the default membership timings (heartbeat 0.1 s, heartbeat timeout 10 s,
round deadline 30 s in the example). Nothing is killed. Counted from every leader's event log:
failed rounds, reconfigurations (dropped members), rejoins, membership changes, checkpoint
failures, and whether every round happened exactly once on every provider; the finals must hold
the same global weights. The machine's load average is sampled alongside (a loaded 2-core
machine is the point: heartbeats and rounds compete with training for the CPU).

    python benchmarks/stability_run.py --minutes 10            # writes benchmarks/results/stability.json

Not a timed test: a measurement of spurious drops over a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from common import machine_info, write_result  # noqa: E402

GROUPS = "abc"


def events(folder: str, who: str) -> list[dict]:
    path = os.path.join(folder, f"events-{who}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to train (wall clock)")
    p.add_argument("--ranks", type=int, default=1, help="ranks per provider")
    p.add_argument("--step-delay", type=float, default=0.05, help="sleep per step (lets three providers share 2 cores)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    import provider_loss
    from resilient_train.membership.kvstore import TCPKVStore

    provider_loss.warm_codec_cache()
    work = args.out or tempfile.mkdtemp(prefix="rt-stability-")
    os.makedirs(work, exist_ok=True)
    kv = TCPKVStore.host(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    deadline_steps = 10**9  # until the stop file names a step (below)
    stop_file = os.path.join(work, "stop-step")
    procs = {}
    for g in GROUPS:
        cmd = [provider_loss.TORCHRUN, "--standalone", f"--nproc-per-node={args.ranks}", os.path.join(ROOT, "examples", "provider_train.py"),
               "--group", g, "--membership", f"tcp://127.0.0.1:{kv.port}", "--ckpt", os.path.join(work, "ck"), "--out", work,
               "--steps", str(deadline_steps), "--sync-every", "10", "--every", str(args.every), "--keep-last", "3",
               "--start-groups", "3", "--step-delay", str(args.step_delay), "--stop-file", stop_file]
        procs[g] = subprocess.Popen(cmd, env=env, stdout=open(os.path.join(work, f"log-{g}.txt"), "w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    load: list[float] = []
    try:
        while any(pr.poll() is None for pr in procs.values()):
            load.append(os.getloadavg()[0])
            if time.time() - t0 > args.minutes * 60 and not os.path.exists(stop_file):
                # every provider stops at the same step: a few rounds ahead of the most advanced
                now = max((e["step"] for g in GROUPS for e in events(work, f"{g}-rank0") if e["event"] == "sync"), default=0)
                with open(stop_file + ".tmp", "w") as f:
                    f.write(str(now + 50))
                os.replace(stop_file + ".tmp", stop_file)
            if time.time() - t0 > args.minutes * 60 + 300:
                raise SystemExit("the run did not stop within 5 minutes of its end")
            time.sleep(5)
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)
    wall = time.time() - t0
    per = {}
    for g in GROUPS:
        ev = events(work, f"{g}-rank0")
        syncs = [e["step"] for e in ev if e["event"] == "sync"]
        per[g] = {
            "exit_code": procs[g].returncode,
            "steps": max(syncs, default=0),
            "rounds": len(syncs),
            "rounds_exactly_once": syncs == list(range(10, 10 * len(syncs) + 1, 10)),
            "round_failed": sum(e["event"] == "round_failed" for e in ev),
            "reconfigured": sum(e["event"] == "reconfigured" for e in ev),
            "membership_changes": sum(e["event"] == "membership" for e in ev),
            "dropped": sum(e["event"] == "dropped" for e in ev),
            "checkpoints_committed": sum(e["event"] == "checkpoint_committed" for e in ev),
            "checkpoint_failures": sum(e["event"] == "checkpoint_failed" for e in ev),
        }
    finals_equal = None
    try:
        from safetensors.torch import load_file

        finals = [load_file(os.path.join(work, f"final-{g}.safetensors")) for g in GROUPS]
        finals_equal = all(all((f[k] == finals[0][k]).all().item() for k in finals[0]) for f in finals[1:])
    except OSError:
        finals_equal = False
    spurious = sum(v["round_failed"] + v["reconfigured"] + v["dropped"] + v["membership_changes"] for v in per.values())
    result = {
        "machine": machine_info(),
        "minutes": args.minutes, "wall_s": round(wall, 1), "ranks_per_provider": args.ranks, "step_delay_s": args.step_delay,
        "load_avg_1m": {"median": sorted(load)[len(load) // 2] if load else None, "max": max(load, default=None)},
        "providers": per, "finals_equal": finals_equal, "spurious_events": spurious,
        "ok": spurious == 0 and bool(finals_equal) and all(v["exit_code"] == 0 and v["rounds_exactly_once"] for v in per.values()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    print("wrote", write_result("stability", result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
