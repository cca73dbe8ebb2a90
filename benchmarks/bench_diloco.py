"""DDP vs LocalSGD vs DiLoCo (none/int8/int4) vs streaming/overlap on a small GPT, 4 gloo ranks.

The task: a byte-level GPT-style language model trained on the Python standard library's
source files (text every machine with Python has), 4 replicas, one process each, gloo on
127.0.0.1. Every mode sees the same tokens per inner step per replica. Reported per mode:
validation loss at the same number of tokens (of the model the run delivers: DDP's model,
or DiLoCo's global weights G), bytes sent per inner step (per rank, as the
Communicator counts them), and the *emulated* time to reach DDP's final validation loss
under the ``wan`` link profile (150 ms, 100 Mbit/s), where

    emulated time = inner steps x calibrated compute time per step + time blocked on the link

(see resilient_train.sync.wan: a virtual clock, nothing sleeps; the compute time per step is
measured once, single process, before the runs (fastest of 20 steps, or --compute-ms), and is
the same for every mode).

DDP here is data-parallel SGD with the gradients all-reduced (averaged) every step through
the same Communicator, i.e. what DDP does, without bucketing. Writes
benchmarks/results/diloco_cpu.json (or --out).

    python benchmarks/bench_diloco.py             # default config, ~10-12 min on 2 shared cores

"final_val_loss" / "val loss" is measured at --steps inner steps for every mode (same tokens).
The non-DDP modes then keep training to --steps-factor x --steps, so that the time at which
they reach DDP's final loss can be observed even when they need more tokens to get there.
    python benchmarks/bench_diloco.py --steps 60  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------ data and model

def load_corpus(max_bytes: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_model(cfg: dict) -> TinyGPT:
    torch.manual_seed(cfg["seed"])  # one process per rank: the global RNG is private
    return TinyGPT(d=cfg["d"], layers=cfg["layers"], heads=cfg["heads"], ctx=cfg["ctx"])


def batch(data: torch.Tensor, gen: torch.Generator, bsz: int, ctx: int):
    ix = torch.randint(0, data.numel() - ctx - 1, (bsz,), generator=gen)
    x = torch.stack([data[i:i + ctx] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + ctx] for i in ix])
    return x, y


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: dict) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [loss_fn(model, *batch(val, gen, cfg["batch"], cfg["ctx"])).item() for _ in range(cfg["eval_batches"])]
    return sum(losses) / len(losses)


# ------------------------------------------------------------------ one rank

def global_model(model: nn.Module, sync) -> nn.Module:
    """The model a run would deliver: DDP's model, or a copy holding DiLoCo's global weights G
    (identical on every replica; for streaming, each fragment at its last sync; for overlap,
    the last applied outer step). Without overlap or streaming, right after a sync, G equals
    the local weights."""
    if sync is None:
        return model
    import copy

    out = copy.deepcopy(model)
    by_id = {id(p): name for name, p in model.named_parameters()}
    dst = dict(out.named_parameters())
    with torch.no_grad():
        for k in range(sync.num_fragments):
            flat, off = sync.global_weights(k), 0
            for p in sync.fragment_params(k):
                dst[by_id[id(p)]].copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
    return out


def run_rank(rank: int, world: int, mode: dict, cfg: dict, compute_s: float) -> dict:
    import torch.distributed as dist

    from resilient_train.sync import DiLoCo, LocalSGD, ProcessGroupCommunicator, VirtualClock, WanEmulator
    from resilient_train.sync.communicator import allreduce_mean

    torch.set_num_threads(1)
    corpus = load_corpus(cfg["corpus_bytes"])
    split = int(corpus.numel() * 0.95)
    train, val = corpus[:split], corpus[split:]
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    clock = VirtualClock()
    comm = WanEmulator(ProcessGroupCommunicator(), cfg["profile"], clock=clock)
    kind = mode["kind"]
    sync = None
    if kind == "localsgd":
        sync = LocalSGD(model, sync_every=mode["H"], comm=comm)
    elif kind == "diloco":
        sync = DiLoCo(model, sync_every=mode["H"], comm=comm, codec=mode.get("codec", "none"),
                      fragments=mode.get("fragments", 1), overlap_steps=mode.get("overlap", 0),
                      mix=mode.get("mix", 0.5))
    gen = torch.Generator().manual_seed(10_000 + rank)
    curve = []
    params = list(model.parameters())
    wall0 = time.perf_counter()
    total_steps = cfg["steps"] if kind == "ddp" else int(cfg["steps"] * cfg["steps_factor"])
    for step in range(1, total_steps + 1):
        x, y = batch(train, gen, cfg["batch"], cfg["ctx"])
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if kind == "ddp":
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            allreduce_mean(comm, flat).wait()
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        opt.step()
        clock.advance(compute_s)
        if sync is not None:
            sync.step()
        if step % cfg["eval_every"] == 0 or step in (cfg["steps"], total_steps):
            vl = evaluate(global_model(model, sync), val, cfg) if rank == 0 else float("nan")
            curve.append({"step": step, "tokens": step * world * cfg["batch"] * cfg["ctx"], "val_loss": vl,
                          "emulated_s": clock.now_s, "bytes_sent": comm.bytes_sent})
    out = {"curve": curve, "bytes_sent": comm.bytes_sent, "blocked_s": comm.blocked_s,
           "wall_s": time.perf_counter() - wall0,
           "skipped_rounds": sync.skipped_rounds if sync is not None else 0, "rounds": sync.rounds if sync is not None else cfg["steps"], "steps": total_steps}
    if sync is not None:
        sync.close()
    dist.barrier()
    return out


# ------------------------------------------------------------------ driver

def _rank_entry(rank, world, store_path, out_path, mode, cfg, compute_s):
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        res = run_rank(rank, world, mode, cfg, compute_s)
        dist.destroy_process_group()
        Path(out_path).write_text(json.dumps({"ok": True, "result": res}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        Path(out_path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))


def launch(world: int, mode: dict, cfg: dict, compute_s: float, timeout_s: float) -> list[dict]:
    """One spawned process per rank (gloo over a FileStore); results through files."""
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=_rank_entry, args=(r, world, os.path.join(tmp, "store"), outs[r], mode, cfg,
                                                       compute_s), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        results, errors = [], {}
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                errors[r] = f"timed out after {timeout_s} s"
                continue
            if not os.path.exists(outs[r]):
                errors[r] = f"exited with code {p.exitcode} without a result"
                continue
            doc = json.loads(Path(outs[r]).read_text())
            if not doc["ok"]:
                errors[r] = doc["error"]
            results.append(doc.get("result"))
        if errors:
            raise RuntimeError("ranks failed: " + "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
        return results


def calibrate(cfg: dict, steps: int = 20) -> float:
    torch.set_num_threads(1)
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    data = load_corpus(cfg["corpus_bytes"])
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 3):
        x, y = batch(data, gen, cfg["batch"], cfg["ctx"])
        t = time.perf_counter()
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    # the fastest step: the compute cost of a step on an otherwise idle core (the machine this
    # runs on is shared, and a median would charge other people's load to every mode)
    return min(times[3:])


def time_to(curve: list[dict], target: float) -> float | None:
    for pt in curve:
        if pt["val_loss"] <= target:
            return pt["emulated_s"]
    return None


def make_table(runs: dict) -> list[dict]:
    """One row per mode: loss at the same tokens as DDP, bytes, and emulated time to reach
    DDP's final loss (and 1.02 x it), each speed-up against DDP's own time to that target."""
    if "ddp" not in runs:
        return []
    ddp = runs["ddp"]
    target = ddp["final_val_loss"]
    t_ddp, t_ddp_2pct = time_to(ddp["curve"], target), time_to(ddp["curve"], target * 1.02)
    table = []
    for name, r in runs.items():
        t_hit, t_2pct = time_to(r["curve"], target), time_to(r["curve"], target * 1.02)
        table.append({
            "mode": name, "final_val_loss": r["final_val_loss"],
            "vs_ddp_pct": 100 * (r["final_val_loss"] / target - 1),
            "bytes_per_inner_step": r["bytes_per_inner_step"],
            "emulated_s_at_same_tokens": r["emulated_s"], "last_val_loss": r["last_val_loss"],
            "steps_run": r["steps_run"],
            "emulated_s_to_ddp_final_loss": t_hit,
            "speedup_to_ddp_final_loss": (t_ddp / t_hit) if t_hit else None,
            "emulated_s_to_within_2pct_of_ddp": t_2pct,
            "speedup_to_within_2pct": (t_ddp_2pct / t_2pct) if t_2pct else None,
        })
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n{'mode':28s} {'val loss':>9s} {'vs DDP':>8s} {'bytes/step':>11s} {'t->DDP loss':>12s} {'speedup':>8s}")
    for row in table:
        hit = f"{row['emulated_s_to_ddp_final_loss']:.1f} s" if row["emulated_s_to_ddp_final_loss"] else "not reached"
        sp = f"{row['speedup_to_ddp_final_loss']:.1f}x" if row["speedup_to_ddp_final_loss"] else "-"
        print(f"{row['mode']:28s} {row['final_val_loss']:9.4f} {row['vs_ddp_pct']:+7.2f}% "
              f"{row['bytes_per_inner_step']:11.0f} {hit:>12s} {sp:>8s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--H", type=int, default=40, help="inner steps between syncs")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps-factor", type=float, default=1.5,
                    help="non-DDP modes train this many times --steps (to measure time to DDP's final loss); "
                         "the loss comparison is at --steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per replica per step")
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--profile", default="wan")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="compute time per inner step (0: calibrate)")
    ap.add_argument("--modes", default="all", help="comma-separated mode names, or all")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "diloco_cpu.json"))
    ap.add_argument("--retable", default="", help="recompute the table of a saved results JSON and exit")
    args = ap.parse_args()
    if args.retable:
        doc = json.loads(Path(args.retable).read_text())
        doc["table"] = make_table(doc["runs"])
        print_table(doc["table"])
        Path(args.retable).write_text(json.dumps(doc, indent=2) + "\n")
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from resilient_train.sync.wan import get_profile

    cfg = {"steps": args.steps, "batch": args.batch, "ctx": args.ctx, "d": args.d, "layers": args.layers,
           "heads": 4, "lr": args.lr, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
           "profile": args.profile, "corpus_bytes": 4 << 20, "seed": 0, "steps_factor": args.steps_factor}
    H = args.H
    modes = {
        "ddp": {"kind": "ddp"},
        "localsgd": {"kind": "localsgd", "H": H},
        "diloco_none": {"kind": "diloco", "H": H, "codec": "none"},
        "diloco_int8": {"kind": "diloco", "H": H, "codec": "int8"},
        "diloco_int4": {"kind": "diloco", "H": H, "codec": "int4"},
        "streaming_int8_K4": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4},
        "streaming_int8_K4_overlap5": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4, "overlap": 5},
    }
    extra = {  # not in "all": to separate the effects of streaming, overlap and the mixing factor
        "diloco_int8_overlap5": {"kind": "diloco", "H": H, "codec": "int8", "overlap": 5},
        "diloco_int8_overlap5_mix1": {"kind": "diloco", "H": H, "codec": "int8", "overlap": 5, "mix": 1.0},
        "streaming_int8_K4_overlap5_mix1": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4, "overlap": 5,
                                            "mix": 1.0},
    }
    if args.modes != "all":
        modes = {k: {**modes, **extra}[k] for k in args.modes.split(",")}
    compute_s = args.compute_ms / 1e3 if args.compute_ms > 0 else calibrate(cfg)
    nparams = sum(p.numel() for p in make_model(cfg).parameters())
    print(f"model: {nparams} parameters; calibrated compute {compute_s * 1e3:.1f} ms/step", flush=True)
    runs = {}
    for name, mode in modes.items():
        t = time.perf_counter()
        res = launch(args.world, mode, cfg, compute_s, timeout_s=1800)
        r0 = res[0]
        at = next(pt for pt in r0["curve"] if pt["step"] == cfg["steps"])  # same tokens as DDP
        runs[name] = {"mode": mode, "curve": r0["curve"], "bytes_sent_rank0": r0["bytes_sent"],
                      "steps_run": r0["steps"], "bytes_per_inner_step": r0["bytes_sent"] / r0["steps"],
                      "blocked_s": r0["blocked_s"], "emulated_s": at["emulated_s"], "final_val_loss": at["val_loss"],
                      "last_val_loss": r0["curve"][-1]["val_loss"],
                      "rounds": r0["rounds"], "skipped_rounds": r0["skipped_rounds"],
                      "wall_s": time.perf_counter() - t}
        print(f"{name:28s} val {runs[name]['final_val_loss']:.4f}  bytes/step {runs[name]['bytes_per_inner_step']:10.0f}"
              f"  emulated {runs[name]['emulated_s']:8.1f} s  (wall {runs[name]['wall_s']:.0f} s)", flush=True)

    table = make_table(runs)
    print_table(table)
    prof = get_profile(cfg["profile"])
    doc = {"benchmark": "bench_diloco", "config": cfg, "H": H, "world": args.world, "parameters": nparams,
           "calibrated_compute_s_per_step": compute_s,
           "link_profile": {"name": prof.name, "latency_s": prof.latency_s,
                            "bandwidth_bytes_per_s": prof.bandwidth_bytes_per_s},
           "note": "emulated time = steps x calibrated compute + time blocked on the emulated link (virtual clock); "
                   "validation loss on held-out stdlib bytes of DDP's model / DiLoCo's global weights G (rank 0)",
           "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                       "platform": platform.platform()},
           "table": table, "runs": runs, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=lambda o: None if isinstance(o, float) and
                                         math.isnan(o) else o) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
