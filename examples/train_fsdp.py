"""A small GPT/Llama-style transformer trained with FSDP2 (``fully_shard`` per block), made
resilient by ``rt.wrap``: five lines differ from the plain FSDP2 script (marked ``# rt``).

    torchrun --nproc-per-node=2 --max-restarts=3 examples/train_fsdp.py --epochs 3

Each rank writes only its own shards of the weights and of AdamW's moments; nothing is
gathered. Kill a worker and torchrun restarts the job: it resumes from the last checkpoint in
./ckpts (resharded if the job comes back on another number of ranks) and ends with the same
weights as a run that was never interrupted. ``resilient-train ckpt export-hf ./ckpts
./hf`` streams the sharded checkpoint into a plain Hugging Face folder.
"""

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import resilient_train as rt  # rt


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(torch.nn.Module):
    """Pre-norm block: causal self-attention, then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        hidden = 4 * dim
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 4, seq: int = 16):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(seq, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=1 / math.sqrt(p.shape[1]))

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tokens(samples: int, seq: int, vocab: int) -> torch.Tensor:
    """Synthetic text with structure to learn: each token is 3 x the previous + 1 (mod vocab)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (samples, 1), generator=g)
    steps = torch.arange(seq + 1).view(1, -1)
    return (start * (3 ** steps) + (3 ** steps - 1) // 2) % vocab


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--checkpoint", default="./ckpts")
    args = p.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = TinyGPT(dim=args.dim, layers=args.layers)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    dataset = TensorDataset(tokens(args.samples, 16, 64))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    trainer = rt.wrap(model, optimizer, checkpoint=args.checkpoint, every_n_steps=args.every, sampler=sampler)  # rt
    for epoch in trainer.epochs(args.epochs):  # rt: was range(args.epochs)
        sampler.set_epoch(epoch)
        for (batch,) in loader:
            optimizer.zero_grad()
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            trainer.step()  # rt: was optimizer.step()
        if dist.get_rank() == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)
    trainer.close()  # rt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
