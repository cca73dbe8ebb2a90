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
    """Part 2: three providers, one lost (SIGKILL + storage down) and recovered in-process."""
    sys.path.insert(0, HERE)
    import provider_loss

    print("\n==== part 2: three providers, one lost mid-training and recovered without restarting ====")
    out = os.path.join(os.path.dirname(root), "provider-loss")
    twin = os.path.join(os.path.dirname(root), "provider-loss-fault-free")
    provider_loss.main(["--out", out])
    print("\nthe same membership history without the fault (provider b leaves cleanly at the same step) ...")
    provider_loss.main(["--out", twin, "--fault", "none"])
    from safetensors.torch import load_file

    same = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for m in "abc"
        for a, b in [(load_file(os.path.join(out, f"final-{m}.safetensors")), load_file(os.path.join(twin, f"final-{m}.safetensors")))]
    )
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    print("\nsummary of the provider loss:")
    print(f"  provider {s['fault_member']} SIGKILLed at step {s['fault_at_step']} and its storage taken down")
    print(f"  last committed step before the fault: {s['last_committed_before_fault']}; survivors rolled back to {s['rolled_back_to']}: committed steps lost = {s['committed_steps_lost']}")
    print(f"  recovery: {s['recovery_s_from_fault']:.2f} s from the fault to training resumed (detection timeout {s['detection_timeout_s']} s)")
    print(f"  checkpoint read from: {s['checkpoint_loaded_from']}")
    print(f"  bytes moved per provider: {s['bytes_by_provider']}")
    print(f"  validation loss: {s['first_val_loss']} at the first sync -> {s['final_val_loss']} at the end")
    print(f"  final weights equal the fault-free run bit for bit: {same}")
    print(f"  timeline: {s.get('timeline_png', 'not drawn (matplotlib missing)')}; event logs: {out}/events-*.jsonl")
    if not same or s["committed_steps_lost"] != 0:
        print("DEMO FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
