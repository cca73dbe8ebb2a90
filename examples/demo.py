"""The main demo: real training that is killed half-way and resumes from its checkpoint.

1. A reference run trains for N steps without interruption.
2. The same script is started again on a fresh checkpoint folder and SIGKILLs itself between
   two checkpoints (losing the steps since the last one, as a lost machine would).
3. The same command is run again: it finds the last committed checkpoint, resumes, finishes.
4. The final weights of 2+3 are compared bit for bit with 1, and the checkpoint is verified.

Everything runs on the CPU with checkpoints on local disk under ./runs/demo/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import resilient_train as rt  # noqa: E402
from resilient_train.checkpoint.export import read_model_tensors  # noqa: E402

STEPS, EVERY, KILL_AT = 300, 40, 230


def run(ckpt: str, *extra: str) -> tuple[list[dict], int, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_small.py"), "--ckpt", ckpt, "--steps", str(STEPS), "--every", str(EVERY), *extra], capture_output=True, text=True, timeout=600)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -9):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"training run failed with exit code {proc.returncode}")
    return events, proc.returncode, time.perf_counter() - t0


def main() -> int:
    root = os.path.join(os.getcwd(), "runs", "demo")
    print("==== part 1: one training process killed with SIGKILL and restarted ====")
    shutil.rmtree(root, ignore_errors=True)
    ref_dir, run_dir = os.path.join(root, "reference"), os.path.join(root, "interrupted")
    print(f"resilient-train demo: {STEPS} steps of a small MLP on two spirals, checkpoints every {EVERY} steps, on {root}\n")

    print("1) reference run, no interruption ...")
    ref_events, _, t_ref = run(ref_dir)
    print(f"   done in {t_ref:.1f} s, accuracy {ref_events[-1]['accuracy']:.3f}")

    print(f"2) same run, killed with SIGKILL at step {KILL_AT} ...")
    events, code, _ = run(run_dir, "--kill-at", str(KILL_AT))
    ckpts = [e["step"] for e in events if e["event"] == "checkpoint"]
    print(f"   checkpoints committed at steps {ckpts}; process ended with signal {-code} at step {KILL_AT}")
    losses = [e["loss"] for e in events if e["event"] == "checkpoint"]
    print(f"   loss at those checkpoints: {losses}")

    print("3) the same command again: it resumes by itself ...")
    events2, _, t_resume = run(run_dir)
    start = events2[0]
    lost = KILL_AT - start["resumed_from"]
    print(f"   resumed from step {start['resumed_from']} (steps redone since the last commit: {lost}), finished step {events2[-1]['step']} in {t_resume:.1f} s, accuracy {events2[-1]['accuracy']:.3f}")

    print("4) checks ...")
    _, ref_w = read_model_tensors(ref_dir)
    _, run_w = read_model_tensors(run_dir)
    same = ref_w.keys() == run_w.keys() and all(torch.equal(ref_w[k], run_w[k]) for k in ref_w)
    _, problems = rt.verify_checkpoint(run_dir)
    print(f"   final weights equal the uninterrupted run bit for bit: {same}")
    print(f"   latest checkpoint verified (every file re-hashed): {'OK' if not problems else problems}")
    print(f"   try: resilient-train ckpt ls {run_dir}   |   resilient-train ckpt inspect {run_dir}")
    if not same or problems:
        print("DEMO FAILED")
        return 1
    print("\nsummary: killed at step %d, resumed from committed step %d, no committed step lost, result identical." % (KILL_AT, start["resumed_from"]))
    return provider_loss_part(root)


def provider_loss_part(root: str) -> int:
    """Part 2: three providers (2 ranks each, the model sharded over them with FSDP2), one lost
    mid-round and back, through rt.wrap."""
    sys.path.insert(0, HERE)
    import glob

    import provider_loss
    from safetensors.torch import load_file

    print("\n==== part 2: three providers, one lost mid-round; the others carry on without restarting ====")
    out = os.path.join(os.path.dirname(root), "provider-loss")
    ref = os.path.join(os.path.dirname(root), "provider-loss-reference")
    common = ["--every", "20", "--keep-last", "100", "--fsdp"]
    provider_loss.main(["--out", out, *common])
    print("\nthe reference: the same run in which provider b leaves cleanly before that round ...", flush=True)
    provider_loss.main(["--out", ref, "--fault", "none", *common])
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    step = (s["fault_step"] // 20 + 1) * 20  # the survivors' first checkpoint after the fault

    def weights(run: str, group: str) -> dict:
        tensors = {}
        for path in sorted(glob.glob(os.path.join(run, "storage", "c", f"group-{group}", f"step-{step:010d}", "model*.safetensors"))):
            tensors.update(load_file(path))
        return tensors

    same = all(weights(out, g).keys() == weights(ref, g).keys() and weights(out, g) and all(torch.equal(weights(out, g)[k], weights(ref, g)[k]) for k in weights(out, g)) for g in ("a", "c"))
    finals = [load_file(os.path.join(out, f"final-{g}.safetensors")) for g in "abc"]
    all_equal = all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in finals[0])
    rejoin = s["rejoin"][0] if s["rejoin"] else {}
    print("\nsummary of the provider loss:")
    print("  every provider: FSDP2 (fully_shard) over its 2 ranks; rank i of each provider exchanges its own shard with rank i of the others")
    per_rank = s.get("sync_bytes_per_round_by_rank", {})
    print(f"  cross-provider bytes sent per round, per rank: {', '.join(f'{w} {b / 1e3:.1f} KB' for w, b in per_rank.items() if w[0] == 'a')} (no rank sends the whole model)")
    print(f"  provider {s['fault_member']}'s torchrun (agent + 2 workers) SIGKILLed inside round {s['fault_round']} (step {s['fault_step']}), its storage taken down")
    print(f"  survivors a and c redid only that round among themselves and went on: {s['recovery_s_from_fault']:.2f} s from the kill to every survivor rank training again (the redone round complete; roll call {s['roll_call_s']:.2f} s), steps redone = {s['steps_redone']}")
    print(f"  provider b relaunched: back in at step {rejoin.get('step')} with the live state from {rejoin.get('state_from')}, shard by shard ({rejoin.get('received_bytes', 0) / 1e6:.2f} MB on rank 0's lane), {s['rejoin_s_after_relaunch']} s after its relaunch (process start and imports included)")
    print(f"  validation loss: {s['first_val_loss']} at the first round -> {s['final_val_loss']} at the end")
    print(f"  survivors' checkpoint at step {step} equals the run where b left cleanly, bit for bit: {same}")
    print(f"  every provider ends with the same weights: {all_equal}")
    print(f"  timeline: {s.get('timeline_png', 'not drawn (matplotlib missing)')}; event logs: {out}/events-*.jsonl")
    if not same or not all_equal or s["steps_redone"] != 0:
        print("DEMO FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
