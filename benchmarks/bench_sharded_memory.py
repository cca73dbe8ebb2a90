"""Memory per rank of a sharded model trained across providers (issue 17): a GPT-style model of
about 117M parameters, FSDP2 (``fully_shard`` per block) inside each of 2 providers of 2 ranks,
AdamW inside, DiLoCo (int8) between the providers through ``rt.wrap(group=...)``.

Every rank samples its own RSS every 5 ms and keeps the peak of each phase:

* ``wrap``: ``rt.wrap`` (a fresh start: joining the job);
* ``step``: a step with no exchange; ``round``: a step that runs the cross-provider exchange
  (this rank's shard only, on its lane); ``round+save``: a round followed by a synchronous
  checkpoint save (every rank writes its own pieces; hashing included);
* ``load+join``: the second run's ``rt.wrap`` of provider b: it loads its own checkpoint, then
  joins a running provider a and takes the live global state lane by lane.

Reported beside the model's fp32 sizes: the whole parameters, the whole training state
(parameters, gradients, AdamW's two moments, DiLoCo's global weights, outer momentum and
error-feedback residuals: 7 fp32 copies), and one rank's share of that (half). The bound we
claim: a rank's peak stays about its shard of the state plus a fixed buffer, never the whole
model. Run: ``python benchmarks/bench_sharded_memory.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

VOCAB, DIM, LAYERS, HEADS, SEQ = 8192, int(os.environ.get("RT_BENCH_DIM", 1024)), int(os.environ.get("RT_BENCH_LAYERS", 7)), 16, 32
H, EVERY = 2, 4


class Sampler:
    """This process's peak RSS per phase label (sampled every 5 ms by a thread)."""

    def __init__(self) -> None:
        self.phase = "init"
        self.peaks: dict[str, int] = {}
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while True:
            r, p = self.rss(), self.phase
            if r > self.peaks.get(p, 0):
                self.peaks[p] = r
            time.sleep(0.005)


def worker(args: argparse.Namespace) -> int:
    sampler = Sampler()
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import resilient_train as rt
    from train_fsdp import TinyGPT

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    baseline = sampler.rss()
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, dim=DIM, layers=LAYERS, heads=HEADS, seq=SEQ)
    params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = sum(p.to_local().numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler.phase = "wrap" if args.run == 1 else "load+join"
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=args.ckpt, every_n_steps=EVERY, keep_last=2, async_save=False,
        sync=rt.SyncConfig(mode="diloco", sync_every=H, codec="int8"), group=args.group, membership=args.membership,
        start_groups=args.start_groups, heartbeat_timeout_s=120.0, round_deadline_s=600.0, join_timeout_s=900.0,
        event_log=os.path.join(args.out, f"events-{args.group}-run{args.run}-rank{{rank}}.jsonl"), timeout_s=900))
    g = torch.Generator().manual_seed(rank + 100 * args.run)
    while trainer.step_count < args.steps:
        if args.stop_file and os.path.exists(args.stop_file):
            with open(args.stop_file) as f:
                args.steps = min(args.steps, int(f.read().strip()))
            if trainer.step_count >= args.steps:
                break
        s = trainer.step_count + 1
        sampler.phase = "round+save" if s % EVERY == 0 else "round" if s % H == 0 else "step"
        idx = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
        loss = torch.nn.functional.cross_entropy(trainer.model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        trainer.step()
        sampler.phase = "idle"
        if args.ready_file and trainer.step_count >= 2 and rank == 0 and not os.path.exists(args.ready_file):
            open(args.ready_file, "w").close()
    summary = trainer.summary()
    trainer.close(save=False)
    with open(os.path.join(args.out, f"mem-{args.group}-run{args.run}-rank{rank}.json"), "w") as f:
        json.dump({"group": args.group, "run": args.run, "rank": rank, "world": world, "params": params, "local_params": local,
                   "baseline_rss": baseline, "peaks": sampler.peaks, "rounds": summary.get("rounds"),
                   "sync_bytes_sent": trainer.sync.comm.bytes_sent}, f)
    dist.destroy_process_group()
    return 0


def launch(args: argparse.Namespace, group: str, run: int, port: int, *extra: str) -> subprocess.Popen:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc-per-node={args.ranks}", os.path.abspath(__file__), "--worker", "--group", group,
           "--attempt", str(run), "--membership", f"tcp://127.0.0.1:{port}", "--ckpt", os.path.join(args.out, "ck", f"{group}"),
           "--out", args.out, *extra]
    log = open(os.path.join(args.out, f"log-{group}-run{run}.txt"), "a")
    # glibc's malloc raises its mmap threshold after each large free (up to 32 MiB) and then keeps
    # freed blocks below it resident: RSS would count memory the process no longer uses. A fixed
    # threshold returns every block of 128 KiB or more to the system when freed, so RSS tracks
    # what is live (see the JSON's "malloc" note; a user can set the same variable)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ok(procs: list[subprocess.Popen], timeout_s: float) -> None:
    for p in procs:
        if p.wait(timeout=timeout_s) != 0:
            raise SystemExit(f"a provider exited with {p.returncode}; see the logs in the output folder")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group")
    p.add_argument("--attempt", dest="run", type=int, default=1)
    p.add_argument("--membership")
    p.add_argument("--ckpt")
    p.add_argument("--start-groups", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-file")
    p.add_argument("--ready-file")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold (RSS then includes freed blocks malloc keeps)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-sharded-memory"))
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from common import RESULTS, machine_info

    from resilient_train.membership.kvstore import TCPKVStore

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    load_before = os.getloadavg()
    t0 = time.time()
    kv = TCPKVStore.host(0)
    print("run 1: providers a and b from scratch, 6 steps (rounds at 2, 4, 6; a save at 4)", flush=True)
    wait_ok([launch(args, g, 1, kv.port, "--steps", "6") for g in "ab"], 3600)
    kv2 = TCPKVStore.host(0)
    stop, ready = os.path.join(args.out, "stop"), os.path.join(args.out, "a-ready")
    print("run 2: a resumes alone and trains; then b resumes its checkpoint and joins a (live state lane by lane)", flush=True)
    a = launch(args, "a", 2, kv2.port, "--start-groups", "1", "--steps", "1000", "--stop-file", stop, "--ready-file", ready)
    while not os.path.exists(ready):
        if a.poll() is not None:
            raise SystemExit("provider a ended before it trained")
        time.sleep(0.5)
    b = launch(args, "b", 2, kv2.port, "--start-groups", "1", "--steps", "1000", "--stop-file", stop)
    deadline = time.time() + 3600
    while not any(f.startswith("events-b-run2-rank0") for f in os.listdir(args.out)) or not _joined(args.out):
        if b.poll() is not None or time.time() > deadline:
            raise SystemExit("provider b did not join")
        time.sleep(0.5)
    with open(stop + ".tmp", "w") as f:
        f.write(str(_step(args.out, "a") + 2 * H))
    os.replace(stop + ".tmp", stop)
    wait_ok([a, b], 3600)
    rows = []
    for name in sorted(os.listdir(args.out)):
        if name.startswith("mem-"):
            with open(os.path.join(args.out, name)) as f:
                rows.append(json.load(f))
    params = rows[0]["params"]
    mib = 1 << 20
    table = {f"{r['group']}-run{r['run']}-rank{r['rank']}": {ph: round((v - r["baseline_rss"]) / mib, 1) for ph, v in sorted(r["peaks"].items()) if ph not in ("init", "idle")}
             for r in rows}
    sync = {f"{r['group']}-run{r['run']}-rank{r['rank']}": round(r["sync_bytes_sent"] / max(1, r["rounds"] or 1) / 1e6, 3) for r in rows if r["rounds"]}
    out = {
        "benchmark": "sharded_memory",
        "machine": machine_info(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "wall_s": round(time.time() - t0, 1),
        "model": {"kind": "examples/train_fsdp.py TinyGPT, fully_shard per block", "params": params, "vocab": VOCAB, "dim": DIM, "layers": LAYERS, "seq": SEQ},
        "setup": f"2 providers x {args.ranks} ranks, FSDP2 inside, AdamW, DiLoCo int8 every {H} steps, synchronous save every {EVERY} steps, batch 2 x {SEQ} tokens",
        "full_fp32_mib": {"parameters": round(params * 4 / mib, 1), "training_state_7_copies": round(7 * params * 4 / mib, 1),
                          "one_rank_share_of_it": round(7 * params * 4 / mib / args.ranks, 1)},
        "local_params_per_rank": {f"rank{r['rank']}": r["local_params"] for r in rows if r["group"] == "a" and r["run"] == 1},
        "peak_rss_above_baseline_mib": table,
        "baseline": "RSS after imports and the process group, before the model is built",
        "malloc": "glibc default (dynamic mmap threshold: freed blocks stay resident)" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=131072 (freed blocks of 128 KiB or more go back to the system, so RSS tracks live memory)",
        "cross_provider_mb_per_round_per_rank": sync,
        "notes": "RSS is a process's resident memory (torch's allocator keeps freed blocks, so a phase's peak includes what earlier phases left resident). "
                 "The whole model is never gathered by the library: DiLoCo's state, the exchange and the checkpoint pieces are per local shard.",
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "sharded_memory.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(json.dumps({k: out[k] for k in ("full_fp32_mib", "peak_rss_above_baseline_mib", "cross_provider_mb_per_round_per_rank")}, indent=1))
    return 0


def _events(folder: str, prefix: str) -> list[dict]:
    evs = []
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                evs += [json.loads(line) for line in f if line.strip()]
    return evs


def _joined(folder: str) -> bool:
    return any(e["event"] == "start" for e in _events(folder, "events-b-run2-rank0"))


def _step(folder: str, group: str) -> int:
    return max((e["step"] for e in _events(folder, f"events-{group}-run2-rank0") if e["event"] == "sync"), default=0)


if __name__ == "__main__":
    sys.exit(main())
