"""A GPT-style training loop converted to resilient_train (the shape of widely used public scripts).

What the script does on its own: initialises the process group, wraps the model in
torch.compile and DDP, accumulates gradients over micro-steps with
``require_backward_grad_sync``, scales the loss with a GradScaler, sets the learning rate from
the step every iteration, draws random batches per rank and prefetches the next one before the
backward pass, and loops ``while`` the run is not finished. The lines marked ``# rt`` are the
conversion: wrap, the per-rank prefetched batch, ``trainer.step()`` in place of
``scaler.step(optimizer); scaler.update()``, and ``trainer.finished`` in place of the step
counter's break.

    torchrun --standalone --nproc-per-node=2 examples/gpt_style_resilient.py CKPT_DIR [MAX_STEPS]

Environment: ``COMPILE_BACKEND`` (default ``inductor``; ``aot_eager``/``eager`` need no C
compiler), ``OVERFLOW_AT`` (a step whose gradients overflow on rank 1, to show a skipped step).
"""

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import resilient_train as rt

CKPT = sys.argv[1]
MAX_STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
ACCUM, BATCH, BLOCK, VOCAB = 2, 4, 8, 32
OVERFLOW_AT = int(os.environ.get("OVERFLOW_AT", "0"))

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(1337 + rank)  # each rank draws its own batches
data = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))


def get_batch():
    ix = torch.randint(len(data) - BLOCK - 1, (BATCH,))
    x = torch.stack([data[i: i + BLOCK] for i in ix])
    y = torch.stack([data[i + 1: i + 1 + BLOCK] for i in ix])
    return x, y


class TinyGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, 16)
        self.pos = torch.nn.Embedding(BLOCK, 16)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, idx, targets):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = h + self.mlp(h)
        return F.cross_entropy(self.head(h).view(-1, VOCAB), targets.view(-1))


def get_lr(it, warmup=4, lr=3e-3):
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, MAX_STEPS - warmup))))


torch.manual_seed(0)  # the same initial weights on every rank
model = TinyGPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=get_lr(0), weight_decay=0.1)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
model = torch.compile(model, backend=os.environ.get("COMPILE_BACKEND", "inductor"))
model = DDP(model)
torch.manual_seed(1337 + rank)

trainer = rt.wrap(model, optimizer, checkpoint=CKPT, every_n_steps=3, max_steps=MAX_STEPS, scaler=scaler)  # rt
x, y = trainer.extra_per_rank.get("batch") or get_batch()  # rt: the prefetched batch of this rank
while not trainer.finished:  # rt
    for g in optimizer.param_groups:
        g["lr"] = get_lr(trainer.step_count)
    for micro in range(ACCUM):
        model.require_backward_grad_sync = micro == ACCUM - 1
        loss = model(x, y) / ACCUM
        if trainer.step_count + 1 == OVERFLOW_AT and rank == 1:
            loss = loss * float("inf")
        x, y = get_batch()  # prefetch while the backward pass runs
        scaler.scale(loss).backward()
    trainer.extra_per_rank["batch"] = (x, y)  # rt
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    trainer.step()  # rt: scaler.step(optimizer); scaler.update()
    optimizer.zero_grad(set_to_none=True)
if rank == 0:
    print(f"finished at step {trainer.step_count}; loss scale {scaler.get_scale()}; {trainer.amp_skipped_steps} overflowed step(s) skipped in this launch", flush=True)
trainer.close()
dist.destroy_process_group()
