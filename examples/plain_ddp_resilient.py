"""plain_ddp.py made resilient: six lines differ (tests/test_dropin.py counts them).

    torchrun --nproc-per-node=2 --max-restarts=3 examples/plain_ddp_resilient.py --epochs 3

Kill a worker and torchrun restarts the job; it resumes mid-epoch from the last checkpoint in
./ckpts (the final step is saved by close()), and ends with the same weights as a run that
was never interrupted.
"""

import argparse

import torch

import resilient_train as rt
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 4) + 0.01 * torch.randn(256, 4)
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = rt.wrap(model, optimizer, checkpoint="./ckpts", every_n_steps=10, sampler=sampler)
    for epoch in trainer.epochs(args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            trainer.step()
        if dist.get_rank() == 0:
            print(f"epoch {epoch}: loss {loss.item():.5f}", flush=True)
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
