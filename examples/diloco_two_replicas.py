"""DiLoCo in a plain PyTorch loop: two replicas (threads, gloo on 127.0.0.1), int8 pseudo-gradients.

    python examples/diloco_two_replicas.py

In a real job each replica is its own process (torchrun, or one per cloud) and the
Communicator is ``ProcessGroupCommunicator()`` over the default process group; the training
loop is the same.
"""

from __future__ import annotations

import torch

from resilient_train.sync import DiLoCo
from resilient_train.sync.threads import run_thread_ranks


def replica(rank: int, comm) -> float:
    gen = torch.Generator().manual_seed(0)  # same starting weights on every replica
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each replica sees its own data
    w_true = torch.linspace(-1, 1, 8)

    # the two lines DiLoCo needs: construct it with the inner optimizer, then train as usual
    with DiLoCo(model, opt, sync_every=20, codec="int8", comm=comm) as sync:
        for _ in range(200):
            x = torch.randn(32, 8, generator=data)
            loss = (model(x).squeeze(1) - x @ w_true).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()  # every 20th step also runs a DiLoCo outer step
        print(f"rank {rank}: loss {loss.item():.4f}, {sync.rounds} outer steps, {comm.bytes_sent} bytes sent")
    return loss.item()


if __name__ == "__main__":
    run_thread_ranks(replica, 2, timeout_s=300)
