"""DDP vs local SGD vs DiLoCo (each codec) vs streaming/overlap vs torchft's DiLoCo, on a GPT, gloo ranks.

The task: a byte-level GPT-style language model trained on the Python standard library's
source files (text every machine with Python has), one process per replica, gloo on
127.0.0.1. Every mode sees the same tokens per inner step per replica. Reported per mode,
mean and [min, max] over --seeds (each seed against its own DDP run): validation loss at the
same number of tokens (of the model the run delivers: DDP's model, or DiLoCo's global weights
G), bytes sent per inner step (per rank, as the Communicator counts them), the time blocked on
the link over the compute, and the *emulated* time to reach DDP's final validation loss (and
within 1% of it), as a speed-up over DDP and as a fraction of the compute-bound ceiling, where

    emulated time = inner steps x calibrated compute time per step + time blocked on the link

(see resilient_train.sync.wan: a virtual clock, nothing sleeps; each run's exchanges are traced
and replayed on the main link (--profile, default ``wan``: 150 ms, 100 Mbit/s) and on a
heterogeneous one (--hetero: one provider behind a slower link); the compute time per step is
measured once, single process, before the runs (fastest of 20 steps, or --compute-ms), and is
the same for every mode).

DDP here is data-parallel SGD with the gradients all-reduced (averaged) every step through
the same Communicator, i.e. what DDP does, without bucketing. torchft modes run torchft's
``DiLoCo`` (a lighthouse per run; inside ``unshare -n`` when root, see --netns). Runs are
interleaved by seed (every mode for the first seed, then the next); results are written after
every run, and --resume adds missing (mode, seed) pairs to a results file.

    python benchmarks/bench_diloco.py                              # preset small: 43k params, 4 replicas, ~10 min
    python benchmarks/bench_diloco.py --preset 10m --seeds 0,1,2   # 10.9M params, 2 replicas, ~100 min here
    python benchmarks/bench_diloco.py --retable results/diloco_10m.json   # tables and plots again

"final_val_loss" / "val loss" is measured at --steps inner steps for every mode (same tokens;
with overlap at its apply step, where G holds the tokens up to the launch). The non-DDP modes
then keep training to --steps-factor x --steps, so that the time at which they reach DDP's final
loss can be observed even when they need more tokens to get there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def _setup(rank: int, cfg: dict):
    torch.set_num_threads(1)
    corpus = load_corpus(cfg["corpus_bytes"])
    split = int(corpus.numel() * 0.95)
    train, val = corpus[:split], corpus[split:]
    model = make_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(10_000 + 100 * cfg["seed"] + rank)
    return train, val, model, opt, gen


def _shift(mode: dict) -> int:
    """Steps from a round's launch to its apply in this library's overlap (0 without): G at an
    apply step ``s`` holds the tokens of steps <= ``s - overlap``. torchft launches ``overlap``
    steps *before* its sync step, so its shift is 0 and its lag is the overlap."""
    return mode.get("overlap", 0) if mode["kind"] == "diloco" else 0


def _total_steps(mode: dict, cfg: dict) -> int:
    """DDP runs ``steps``; the others ``steps x steps_factor`` (to see when they reach DDP's
    loss), plus the shift so their last round is applied."""
    return cfg["steps"] if mode["kind"] == "ddp" else int(cfg["steps"] * cfg["steps_factor"]) + _shift(mode)


def _eval_due(step: int, mode: dict, cfg: dict) -> bool:
    """Evaluate where G is freshest: at the apply steps of the eval grid (``s - shift`` on the
    grid), and at the equal-tokens point ``steps + shift``."""
    sh = _shift(mode)
    return (step > sh and (step - sh) % cfg["eval_every"] == 0) or step in (cfg["steps"] + sh, _total_steps(mode, cfg))


def _point(step: int, mode: dict, world: int, cfg: dict) -> dict:
    """``tokens``: the tokens G has taken in at this step (all replicas): the overlap's last
    ``overlap`` steps are in the local weights only."""
    return {"step": step, "tokens": max(0, step - mode.get("overlap", 0)) * world * cfg["batch"] * cfg["ctx"]}


def run_rank(rank: int, world: int, mode: dict, cfg: dict, compute_s: float) -> dict:
    """This library's modes (DDP through the same Communicator, local SGD, DiLoCo, streaming)."""
    import torch.distributed as dist

    from resilient_train.sync import DiLoCo, LocalSGD, ProcessGroupCommunicator, VirtualClock, WanEmulator
    from resilient_train.sync.communicator import allreduce_mean

    train, val, model, opt, gen = _setup(rank, cfg)
    clock, trace = VirtualClock(), []
    comm = WanEmulator(ProcessGroupCommunicator(), cfg["profile"], clock=clock, trace=trace)
    kind = mode["kind"]
    sync = None
    if kind == "localsgd":
        sync = LocalSGD(model, sync_every=mode["H"], comm=comm)
    elif kind == "diloco":
        sync = DiLoCo(model, sync_every=mode["H"], comm=comm, codec=mode.get("codec", "none"),
                      fragments=mode.get("fragments", 1), overlap_steps=mode.get("overlap", 0),
                      mix=mode.get("mix", 0.5))
    curve = []
    params = list(model.parameters())
    wall0 = time.perf_counter()
    total_steps = _total_steps(mode, cfg)
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
        if _eval_due(step, mode, cfg):
            vl = evaluate(global_model(model, sync), val, cfg) if rank == 0 else float("nan")
            curve.append({**_point(step, mode, world, cfg), "val_loss": vl,
                          "emulated_s": clock.now_s, "compute_s": comm.compute_s, "bytes_sent": comm.bytes_sent})
    out = {"curve": curve, "bytes_sent": comm.bytes_sent, "blocked_s": comm.blocked_s, "trace": trace,
           "wall_s": time.perf_counter() - wall0,
           "skipped_rounds": sync.skipped_rounds if sync is not None else 0, "rounds": sync.rounds if sync is not None else cfg["steps"], "steps": total_steps}
    if sync is not None:
        sync.close()
    dist.barrier()
    return out


def run_rank_torchft(rank: int, world: int, mode: dict, cfg: dict, compute_s: float) -> dict:
    """torchft 0.2's ``DiLoCo`` (its streaming DiLoCo with ``fragments`` > 1): one replica group of
    one rank per process, a Manager each, the driver's lighthouse; the same model, data, inner
    AdamW, outer Nesterov SGD (0.7, 0.9) per fragment, and the same fragments (this library's
    split by parameter size), ``fragment_sync_delay`` = ``overlap`` and ``fragment_update_alpha``
    = 1 - ``mix`` (torchft mixes ``G + alpha (L - G)``, this library ``L + mix (G - L)``). Its
    pseudo-gradients are all-reduced in fp32 (``should_quantize`` needs a GPU). The link is
    charged by the same rule as this library's exchanges: each exchange (all the all-reduces a
    step starts, bucketed as one) is ``latency + ring bytes / bandwidth``, from its start at the
    fragment's prepare step to the wait in its sync step."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo as FTDiLoCo

    from resilient_train.sync.diloco import _split

    train, val, model, opt, gen = _setup(rank, cfg)
    name_of = {id(p): n for n, p in model.named_parameters()}
    frags, names = [], []
    for grp in _split(list(model.parameters()), mode.get("fragments", 1)):
        m = nn.Module()
        for p in grp:
            m.register_parameter(name_of[id(p)].replace(".", "__"), p)
            names.append((m, name_of[id(p)].replace(".", "__"), name_of[id(p)]))
        frags.append(m)
    outers = [torch.optim.SGD(f.parameters(), lr=0.7, momentum=0.9, nesterov=True) for f in frags]
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    t = timedelta(seconds=600)
    manager = Manager(pg=ProcessGroupGloo(timeout=t), min_replica_size=world, load_state_dict=lambda sd: None,
                      state_dict=lambda: {}, use_async_quorum=False, replica_id=f"r{rank}", store_addr="127.0.0.1",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=cfg["lighthouse"],
                      hostname="localhost", timeout=t, quorum_timeout=t, connect_timeout=t)
    comp = [0.0]
    trace: list[dict] = []
    open_ids: list[int] = []
    sent = [0]
    inner_allreduce = manager.allreduce

    def allreduce(tensor, *args, **kw):
        n = max(1, manager.num_participants())
        nbytes = int(2 * (n - 1) / n * tensor.numel() * tensor.element_size())
        sent[0] += nbytes
        last = trace[-1] if trace else None
        if last is not None and last["ev"] == "start" and last["compute_s"] == comp[0]:
            last["bytes"] += nbytes  # the all-reduces one step starts leave as one exchange
        else:
            trace.append({"ev": "start", "id": len(trace), "compute_s": comp[0], "bytes": nbytes})
            open_ids.append(trace[-1]["id"])
        return inner_allreduce(tensor, *args, **kw)

    manager.allreduce = allreduce
    curve = []
    wall0 = time.perf_counter()
    total_steps = _total_steps(mode, cfg)
    ft = FTDiLoCo(manager, frags, opt, outers, sync_every=mode["H"], backup_device=torch.device("cpu"),
                  pin_memory=False, fragment_sync_delay=mode.get("overlap", 0),
                  fragment_update_alpha=1.0 - mode.get("mix", 0.5) if mode.get("overlap", 0) else 0.0)
    for fr in ft._fragments:  # the wait: where torchft blocks on its in-flight all-reduces
        inner_perform = fr.perform_sync

        def perform(inner_perform=inner_perform):
            while open_ids:
                trace.append({"ev": "wait", "id": open_ids.pop(0), "compute_s": comp[0]})
            return inner_perform()

        fr.perform_sync = perform
    rounds = 0
    with ft:
        for step in range(1, total_steps + 1):
            x, y = batch(train, gen, cfg["batch"], cfg["ctx"])
            loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            comp[0] += compute_s
            opt.step()  # torchft's hooks prepare and perform the fragment syncs
            if _eval_due(step, mode, cfg):
                vl = float("nan")
                if rank == 0:
                    import copy

                    g = copy.deepcopy(model)
                    dst = dict(g.named_parameters())
                    with torch.no_grad():
                        for fr in ft._fragments:
                            for short, tensor in fr.original_parameters.items():
                                dst[next(full for m, s_, full in names if m is fr._model_fragment and s_ == short)].copy_(tensor)
                    vl = evaluate(g, val, cfg)
                curve.append({**_point(step, mode, world, cfg), "val_loss": vl, "compute_s": comp[0],
                              "bytes_sent": sent[0]})
    rounds = manager.current_step()
    manager.shutdown(wait=False)
    dist.barrier()
    return {"curve": curve, "bytes_sent": sent[0], "trace": trace, "wall_s": time.perf_counter() - wall0,
            "skipped_rounds": 0, "rounds": rounds, "steps": total_steps}


# ------------------------------------------------------------------ driver

def _rank_entry(rank, world, store_path, out_path, mode, cfg, compute_s):
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        fn = run_rank_torchft if mode["kind"] == "torchft" else run_rank
        res = fn(rank, world, mode, cfg, compute_s)
        dist.destroy_process_group()
        Path(out_path).write_text(json.dumps({"ok": True, "result": res}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        Path(out_path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))


def launch(world: int, mode: dict, cfg: dict, compute_s: float, timeout_s: float) -> list[dict]:
    """One spawned process per rank (gloo over a FileStore); results through files. torchft
    modes get a lighthouse here for the run."""
    import multiprocessing as mp
    import tempfile

    lighthouse = None
    if mode["kind"] == "torchft":
        from torchft.coordination import LighthouseServer

        os.environ.setdefault("RUST_LOG", "warn")  # torchft's servers log every quorum at INFO
        lighthouse = LighthouseServer(bind="[::]:0", min_replicas=world)
        cfg = {**cfg, "lighthouse": lighthouse.address()}
    ctx = mp.get_context("spawn")
    try:
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
    finally:
        if lighthouse is not None:
            lighthouse.shutdown()


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


# ------------------------------------------------------------------ analysis

def emulate(run: dict, links) -> list[dict]:
    """The run's curve with ``emulated_s`` on ``links`` (replayed from its trace)."""
    from resilient_train.sync.wan import replay

    rep = replay(run["trace"], links, at_compute_s=[pt["compute_s"] for pt in run["curve"]])
    return [{**pt, "emulated_s": t} for pt, t in zip(run["curve"], rep["at"])]


def time_to(curve: list[dict], target: float) -> float | None:
    return crossing(curve, target, "emulated_s")


def crossing(curve: list[dict], target: float, key: str) -> float | None:
    """``key`` where the loss first reaches ``target``, interpolated linearly between the two
    evaluation points around the crossing (the grid is every --eval-every steps; reading the
    first point below would round every time up to the grid)."""
    for i, pt in enumerate(curve):
        if pt["val_loss"] <= target:
            if i == 0:
                return pt[key]
            prev = curve[i - 1]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - pt["val_loss"])
            return prev[key] + frac * (pt[key] - prev[key])
    return None


def _spread(xs: list) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def make_table(runs: dict, seeds: list[int], links, steps: int, compute_s: float) -> list[dict]:
    """One row per mode, mean and range over seeds, each seed against its own DDP run: loss at
    DDP's tokens, bytes per inner step, emulated time to DDP's final loss on ``links`` and the
    speed-up over DDP, and that speed-up as a fraction of the compute-bound ceiling (DDP's
    emulated time to its final loss over the compute it spent getting there: what a mode that
    needed DDP's tokens and hid all of its communication would reach). ``comm_overhead_pct``:
    the time blocked on the link over the compute, over the whole run (0: the exchanges are
    hidden), a measure of the overlap that does not depend on the loss."""
    modes = list(dict.fromkeys(k.split("@")[0] for k in runs))
    table = []
    for name in modes:
        per = {"loss": [], "vs": [], "bytes": [], "t_hit": [], "speedup": [], "ceiling": [], "frac": [], "sp2": [],
               "overhead": [], "reached1": [], "ceiling1": [], "frac1": []}
        for s in seeds:
            r, d = runs.get(f"{name}@{s}"), runs.get(f"ddp@{s}")
            if r is None or d is None:
                continue
            target = d["final_val_loss"]
            dc, rc = emulate(d, links), emulate(r, links)
            t_ddp, t_hit = time_to(dc, target), time_to(rc, target)
            t_ddp2, t_hit2 = time_to(dc, target * 1.01), time_to(rc, target * 1.01)
            ceiling = t_ddp / crossing(d["curve"], target, "compute_s")
            ceiling1 = t_ddp2 / crossing(d["curve"], target * 1.01, "compute_s")
            from resilient_train.sync.wan import replay

            rep = replay(r["trace"], links)
            per["overhead"].append(100 * rep["blocked_s"] / (rep["total_s"] - rep["blocked_s"]))
            per["loss"].append(r["final_val_loss"])
            per["vs"].append(100 * (r["final_val_loss"] / target - 1))
            per["bytes"].append(r["bytes_per_inner_step"])
            per["t_hit"].append(t_hit)
            per["speedup"].append(t_ddp / t_hit if t_hit else None)
            per["sp2"].append(t_ddp2 / t_hit2 if t_hit2 and t_ddp2 else None)
            per["ceiling"].append(ceiling)
            per["frac"].append((t_ddp / t_hit) / ceiling if t_hit else None)
            per["reached1"].append(t_hit2)
            per["ceiling1"].append(ceiling1)
            per["frac1"].append((t_ddp2 / t_hit2) / ceiling1 if t_hit2 else None)
        ddp_bytes = _spread([runs[f"ddp@{s}"]["bytes_per_inner_step"] for s in seeds if f"ddp@{s}" in runs])
        table.append({
            "mode": name, "seeds": len(per["loss"]),
            "final_val_loss": _spread(per["loss"]), "vs_ddp_pct": _spread(per["vs"]),
            "bytes_per_inner_step": _spread(per["bytes"]),
            "bytes_ratio_ddp_over_mode": (ddp_bytes["mean"] / statistics.fmean(per["bytes"])) if ddp_bytes and per["bytes"] else None,
            "reached_ddp_final_loss": f"{sum(1 for t in per['t_hit'] if t)}/{len(per['t_hit'])}",
            "emulated_s_to_ddp_final_loss": _spread(per["t_hit"]),
            "speedup_to_ddp_final_loss": _spread(per["speedup"]),
            "speedup_to_within_1pct_of_ddp": _spread(per["sp2"]),
            "reached_within_1pct": f"{sum(1 for t in per['reached1'] if t)}/{len(per['reached1'])}",
            "compute_bound_ceiling_1pct": _spread(per["ceiling1"]),
            "fraction_of_ceiling_1pct": _spread(per["frac1"]),
            "compute_bound_ceiling": _spread(per["ceiling"]),
            "fraction_of_ceiling": _spread(per["frac"]),
            "comm_overhead_pct": _spread(per["overhead"]),
        })
    return table


def _fmt(sp: dict | None, f: str = "{:.3f}", pct: bool = False) -> str:
    if sp is None:
        return "-"
    suffix = "%" if pct else ""
    if sp["n"] == 1 or sp["min"] == sp["max"]:
        return f.format(sp["mean"]) + suffix
    return f"{f.format(sp['mean'])}{suffix} [{f.format(sp['min'])}, {f.format(sp['max'])}]"


def print_table(table: list[dict], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    print(f"{'mode':30s} {'val loss':>24s} {'vs DDP':>26s} {'bytes/step':>11s} {'DDP/mode':>9s} {'reached':>7s} "
          f"{'speed-up to DDP loss':>22s} {'ceiling':>8s} {'of ceiling':>20s} {'blocked/compute':>22s}")
    for row in table:
        print(f"{row['mode']:30s} {_fmt(row['final_val_loss']):>24s} {_fmt(row['vs_ddp_pct'], '{:+.2f}', True):>26s} "
              f"{row['bytes_per_inner_step']['mean'] if row['bytes_per_inner_step'] else 0:11.0f} "
              f"{(row['bytes_ratio_ddp_over_mode'] or 0):8.0f}x {row['reached_ddp_final_loss']:>7s} "
              f"{_fmt(row['speedup_to_ddp_final_loss'], '{:.1f}'):>22s} {_fmt(row['compute_bound_ceiling'], '{:.1f}'):>8s} "
              f"{_fmt(row['fraction_of_ceiling'], '{:.2f}'):>20s} {_fmt(row['comm_overhead_pct'], '{:.1f}', True):>22s}")


def markdown_table(table: list[dict]) -> str:
    """The table as markdown (docs/sync.md, README): mean [min, max] over seeds."""
    out = ["| mode | seeds | val loss at DDP's tokens | vs DDP | bytes / inner step / rank | DDP's bytes / mode's | "
           "blocked / compute | to DDP's final loss: reached, speed-up, of the ceiling | "
           "to within 1% of it: reached, speed-up, of the ceiling |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        b = r["bytes_per_inner_step"]["mean"] if r["bytes_per_inner_step"] else 0
        out.append(f"| {r['mode']} | {r['seeds']} | {_fmt(r['final_val_loss'])} | {_fmt(r['vs_ddp_pct'], '{:+.2f}', True)} | "
                   f"{b:,.0f} | {(r['bytes_ratio_ddp_over_mode'] or 0):.0f}x | {_fmt(r['comm_overhead_pct'], '{:.1f}', True)} | "
                   f"{r['reached_ddp_final_loss']}, {_fmt(r['speedup_to_ddp_final_loss'], '{:.1f}x')}, "
                   f"{_fmt(r['fraction_of_ceiling'], '{:.2f}')} | {r['reached_within_1pct']}, "
                   f"{_fmt(r['speedup_to_within_1pct_of_ddp'], '{:.1f}x')}, {_fmt(r['fraction_of_ceiling_1pct'], '{:.2f}')} |")
    return "\n".join(out)


def plot(runs: dict, seeds: list[int], links, out_prefix: str, title: str) -> list[str]:
    """Loss against tokens and against emulated wall-clock, mean over seeds with the range shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    modes = list(dict.fromkeys(k.split("@")[0] for k in runs))
    written = []
    for axis, label in (("tokens", "tokens (all replicas)"), ("emulated_s", "emulated wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, name in enumerate(modes):
            curves = [emulate(runs[f"{name}@{s}"], links) for s in seeds if f"{name}@{s}" in runs]
            n = min(len(c) for c in curves)
            xs = [statistics.fmean(c[i][axis] for c in curves) for i in range(n)]
            ys = [[c[i]["val_loss"] for c in curves] for i in range(n)]
            color = plt.get_cmap("tab20")(i % 20)
            ax.plot(xs, [statistics.fmean(y) for y in ys], label=name, color=color,
                    linestyle="--" if name.startswith("torchft") else "-", linewidth=2.2 if name == "ddp" else 1.4)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.12, color=color)
        lows = [pt["val_loss"] for r in runs.values() for pt in r["curve"] if pt["val_loss"] == pt["val_loss"]]
        ax.set_ylim(min(lows) - 0.03, min(max(lows), 1.25 * min(lows)))  # the early, high losses off the top
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (global weights)")
        if axis == "emulated_s":
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = f"{out_prefix}_loss_vs_{'tokens' if axis == 'tokens' else 'wallclock'}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------ main

PRESETS = {
    # the first benchmark: a 43k-parameter model, 4 replicas (kept to reproduce diloco_cpu*.json)
    "small": {"steps": 400, "H": 40, "world": 4, "batch": 8, "ctx": 32, "d": 32, "layers": 2, "heads": 4, "lr": 2e-3,
              "eval_every": 20, "eval_batches": 6, "modes": "ddp,localsgd,diloco_none,diloco_int8,diloco_int4,"
              "streaming_int8_K4,streaming_int8_K4_overlap5"},
    # issue 21's evidence: a 10.9M-parameter GPT (d 384, 6 layers), 2 providers, 3 seeds, torchft side by side
    "10m": {"steps": 240, "H": 24, "world": 2, "batch": 4, "ctx": 64, "d": 384, "layers": 6, "heads": 6, "lr": 1e-3,
            "eval_every": 24, "eval_batches": 8, "modes": "ddp,diloco_none,diloco_int8,diloco_int4,streaming_int4_K4,"
            "diloco_topk,streaming_int4_K4_overlap,torchft_diloco,torchft_streaming_K4_overlap"},
}


def mode_table(H: int, overlap: int) -> dict:
    return {
        "ddp": {"kind": "ddp"},
        "localsgd": {"kind": "localsgd", "H": H},
        "diloco_none": {"kind": "diloco", "H": H, "codec": "none"},
        "diloco_int8": {"kind": "diloco", "H": H, "codec": "int8"},
        "diloco_int4": {"kind": "diloco", "H": H, "codec": "int4"},
        "diloco_bf16": {"kind": "diloco", "H": H, "codec": "bf16"},
        "diloco_topk": {"kind": "diloco", "H": H, "codec": "topk"},
        "streaming_int8_K4": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4},
        "streaming_int8_K4_overlap5": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4, "overlap": 5},
        "streaming_int4_K4": {"kind": "diloco", "H": H, "codec": "int4", "fragments": 4},
        "streaming_int4_K4_overlap": {"kind": "diloco", "H": H, "codec": "int4", "fragments": 4, "overlap": overlap},
        "streaming_none_K4_overlap": {"kind": "diloco", "H": H, "codec": "none", "fragments": 4, "overlap": overlap},
        # the schedule for a slow link: fewer, larger fragments and the longest overlap one round in
        # flight allows (d < H / K), so a fragment's exchange has d x compute to cross the link
        "streaming_int4_K2_overlap_max": {"kind": "diloco", "H": H, "codec": "int4", "fragments": 2,
                                          "overlap": H // 2 - 1},
        # not in the presets: to separate the effects of streaming, overlap and the mixing factor
        "diloco_int8_overlap5": {"kind": "diloco", "H": H, "codec": "int8", "overlap": 5},
        "diloco_int8_overlap5_mix1": {"kind": "diloco", "H": H, "codec": "int8", "overlap": 5, "mix": 1.0},
        "streaming_int8_K4_overlap5_mix1": {"kind": "diloco", "H": H, "codec": "int8", "fragments": 4, "overlap": 5,
                                            "mix": 1.0},
        "torchft_diloco": {"kind": "torchft", "H": H},
        "torchft_streaming_K4": {"kind": "torchft", "H": H, "fragments": 4},
        "torchft_streaming_K4_overlap": {"kind": "torchft", "H": H, "fragments": 4, "overlap": overlap},
    }


def parse_links(spec: str, world: int):
    """``wan`` (every rank on it) or ``slow=wan,wan,...``-style per-rank list ``p0,p1,...``;
    a name may be ``LAT_ms/BW_Mbit`` (e.g. ``300/10``)."""
    from resilient_train.sync.wan import LinkProfile, get_profile

    def one(s: str):
        if "/" in s:
            lat, bw = s.split("/")
            return LinkProfile(s, float(lat) / 1e3, float(bw) * 1e6 / 8)
        return get_profile(s)

    parts = spec.split(",")
    if len(parts) == 1:
        return one(parts[0])
    if len(parts) != world:
        raise SystemExit(f"--hetero {spec!r}: give one link per rank ({world})")
    return [one(p) for p in parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Every option left unset takes the preset's value.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (model init and data order); "
                    "runs are interleaved: every mode for seed 1, then every mode for seed 2, ...")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--H", type=int, help="inner steps between syncs")
    ap.add_argument("--overlap", type=int, help="overlap steps of the *_overlap modes (default H // 8, >= 1)")
    ap.add_argument("--world", type=int)
    ap.add_argument("--steps-factor", type=float, default=1.5,
                    help="non-DDP modes train this many times --steps (to measure time to DDP's final loss); "
                         "the loss comparison is at --steps")
    ap.add_argument("--batch", type=int, help="sequences per replica per step")
    ap.add_argument("--ctx", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-batches", type=int)
    ap.add_argument("--profile", default="wan", help="the link of the main table (every rank)")
    ap.add_argument("--hetero", default="",
                    help="per-rank links replayed on the same runs for the heterogeneous table, LAT_ms/BW_Mbit or a "
                         "profile name per rank (default: the last provider behind 300/10, the others on --profile)")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="compute time per inner step (0: calibrate)")
    ap.add_argument("--modes", default="", help="comma-separated mode names (default: the preset's)")
    ap.add_argument("--netns", choices=["auto", "yes", "no"], default="auto",
                    help="torchft modes: run inside `unshare -n` with only loopback up (its lighthouse binds every interface)")
    ap.add_argument("--out", default="", help="results JSON (default results/diloco_cpu.json, or diloco_<preset>.json)")
    ap.add_argument("--retable", default="", help="recompute the tables and plots of a saved results JSON and exit")
    ap.add_argument("--resume", default="", help="a results JSON of the same configuration (pass its --compute-ms): its "
                    "runs are kept and only the (mode, seed) pairs it lacks are run; everything goes to --out")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import machine_info, reexec_in_netns

    if args.retable:
        doc = json.loads(Path(args.retable).read_text())
        finish(doc, Path(args.retable))
        return
    preset = PRESETS[args.preset]
    pick = lambda k, a: preset[k] if a is None else a  # noqa: E731
    H = pick("H", args.H)
    overlap = args.overlap if args.overlap is not None else max(1, H // 8)
    table_modes = mode_table(H, overlap)
    names = (args.modes or preset["modes"]).split(",")
    unknown = [n for n in names if n not in table_modes]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {sorted(table_modes)}")
    if any(table_modes[n]["kind"] == "torchft" for n in names):
        rc = reexec_in_netns(args.netns, __file__, sys.argv[1:])
        if rc is not None:
            raise SystemExit(rc)
    cfg = {"steps": pick("steps", args.steps), "batch": pick("batch", args.batch), "ctx": pick("ctx", args.ctx),
           "d": pick("d", args.d), "layers": pick("layers", args.layers), "heads": pick("heads", args.heads),
           "lr": pick("lr", args.lr), "eval_every": pick("eval_every", args.eval_every),
           "eval_batches": pick("eval_batches", args.eval_batches), "profile": args.profile,
           "corpus_bytes": 4 << 20, "seed": 0, "steps_factor": args.steps_factor}
    world = pick("world", args.world)
    seeds = [int(s) for s in args.seeds.split(",")]
    compute_s = args.compute_ms / 1e3 if args.compute_ms > 0 else calibrate(cfg)
    nparams = sum(p.numel() for p in make_model(cfg).parameters())
    print(f"model: {nparams} parameters; {world} replicas; calibrated compute {compute_s * 1e3:.1f} ms/step; "
          f"seeds {seeds}; modes {names}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "diloco_cpu.json" if args.preset == "small" else f"diloco_{args.preset}.json")
    doc = {"benchmark": "bench_diloco", "preset": args.preset, "config": cfg, "H": H, "overlap": overlap,
           "world": world, "seeds": seeds, "parameters": nparams, "calibrated_compute_s_per_step": compute_s,
           "modes": {n: table_modes[n] for n in names}, "profile": args.profile,
           "hetero": args.hetero or ",".join([args.profile] * (world - 1) + ["300/10"]),
           "machine": machine_info(), "runs": {}, "order": [],
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        if abs(old["calibrated_compute_s_per_step"] - compute_s) < 1e-6:  # --compute-ms as printed
            compute_s = doc["calibrated_compute_s_per_step"] = old["calibrated_compute_s_per_step"]
        differ = {k: (old.get(k), doc[k]) for k in ("config", "world", "H", "overlap", "calibrated_compute_s_per_step",
                                                     "parameters") if old.get(k) != doc[k]}
        if differ:
            raise SystemExit(f"--resume {args.resume}: a different configuration (old, new): {differ}")
        doc["runs"], doc["order"] = dict(old["runs"]), list(old.get("order", old["runs"]))
        doc["modes"] = {**old.get("modes", {}), **doc["modes"]}
        doc["seeds"] = sorted(set(old["seeds"]) | set(seeds))
        doc["date_utc"] = f"{old.get('date_utc')} .. {doc['date_utc']}"
    for seed in seeds:  # interleaved: A B C A B C
        for name in names:
            mode = table_modes[name]
            if f"{name}@{seed}" in doc["runs"]:
                continue
            t = time.perf_counter()
            res = launch(world, mode, {**cfg, "seed": seed}, compute_s, timeout_s=3600)
            r0 = res[0]
            # G with DDP's tokens (torchft's overlap: d steps fewer, its schedule has no such point)
            at = next(pt for pt in r0["curve"] if pt["step"] == cfg["steps"] + _shift(mode))
            key = f"{name}@{seed}"
            doc["runs"][key] = {"mode": mode, "seed": seed, "curve": r0["curve"], "trace": r0["trace"],
                                "bytes_sent_rank0": r0["bytes_sent"], "steps_run": r0["steps"],
                                "bytes_per_inner_step": r0["bytes_sent"] / r0["steps"],
                                "final_val_loss": at["val_loss"], "last_val_loss": r0["curve"][-1]["val_loss"],
                                "rounds": r0["rounds"], "skipped_rounds": r0["skipped_rounds"],
                                "wall_s": time.perf_counter() - t}
            doc["order"].append(key)
            print(f"{key:36s} val {at['val_loss']:.4f}  bytes/step {doc['runs'][key]['bytes_per_inner_step']:12.0f}"
                  f"  (wall {doc['runs'][key]['wall_s']:.0f} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, default=_nan_none) + "\n")  # partial results survive an interrupted run
    finish(doc, out)


def _nan_none(o):
    return None


def finish(doc: dict, out: Path) -> None:
    """Tables (main link, heterogeneous links) and plots from the runs; writes ``out``."""
    for run in doc["runs"].values():  # JSON null -> nan for the ranks that do not evaluate
        for pt in run["curve"]:
            if pt["val_loss"] is None:
                pt["val_loss"] = float("nan")
    seeds, steps, compute_s = doc["seeds"], doc["config"]["steps"], doc["calibrated_compute_s_per_step"]
    links = parse_links(doc["profile"], doc["world"])
    doc["table"] = make_table(doc["runs"], seeds, links, steps, compute_s)
    print_table(doc["table"], f"link {doc['profile']} for every replica")
    if doc.get("hetero") and doc["world"] > 1:
        hetero = parse_links(doc["hetero"], doc["world"])
        doc["table_hetero"] = make_table(doc["runs"], seeds, hetero, steps, compute_s)
        print_table(doc["table_hetero"], f"one provider behind a slower link: {doc['hetero']}")
    print("\n" + markdown_table(doc["table"]))
    if doc.get("table_hetero"):
        print("\n" + markdown_table(doc["table_hetero"]))
    prefix = str(out.with_suffix(""))
    doc["plots"] = [os.path.relpath(p, out.parent.parent.parent) for p in
                    plot(doc["runs"], seeds, links, prefix, f"{doc['parameters'] / 1e6:.1f}M-param GPT, "
                         f"{doc['world']} replicas, H={doc['H']}, link {doc['profile']}; mean of seeds {seeds}, range shaded")]
    doc["note"] = ("emulated time = inner steps x calibrated compute + time blocked on the emulated link, replayed from "
                   "each run's exchange trace (resilient_train.sync.wan.replay; nothing sleeps); validation loss of "
                   "DDP's model / the global weights G on held-out stdlib bytes (rank 0); each seed is compared with "
                   "its own DDP run; ranges are [min, max] over seeds")
    out.write_text(json.dumps(doc, default=_nan_none) + "\n")
    print("wrote", out, *doc["plots"])


if __name__ == "__main__":
    main()
