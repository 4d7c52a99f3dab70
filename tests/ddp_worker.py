"""Worker for tests/test_ddp.py: the same pruning runs under torchrun (2 ranks, gloo, each half of every global
batch and half of the calibration data) and in one process (whole batches), results saved per rank.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT      |      python tests/ddp_worker.py OUT --single
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxprune

STEPS, BATCH, CALIB = 30, 16, 64


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


# the training-time methods, each in a (DDP) training loop; aofp: every halving prunes (threshold 10), so the
# masks depend on the all-reduced scores from the first halving on
TRAINING = {"csgd": dict(amount=0.5),
            "aofp": dict(target_flops=0.5, threshold=10.0, steps_per_half=3, warmup=0, measure_every=1,
                         search_until=0.8),
            "abfp": dict(target_flops=0.5, stages=2)}


def train(method: str, x, rank: int, world: int, single: bool, **opts) -> dict:
    model = build()
    wrapped = model if single else nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = fxprune.prepare(wrapped, x, method, optimizer=opt, steps=STEPS, round_to=None, progress=False, **opts)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        X, Y = torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 4, (BATCH,), generator=gen)
        loss = F.cross_entropy(wrapped(shard(X, rank, world)), shard(Y, rank, world))
        opt.zero_grad()
        loss.backward()
        opt.step()
    status = pruner.status()
    res = pruner.finalize()
    return {"state": res.model.state_dict(), "keep": {g: d.keep.tolist() for g, d in res.decisions.items()},
            "status": {k: status[k] for k in ("live", "spread") if k in status}}


def main(out_dir: str, single: bool):
    rank, world = 0, 1
    if not single:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(2, 1, 8, 8)
    out = {m: train(m, x, rank, world, single, **opts) for m, opts in TRAINING.items()}
    # ID with sharded calibration data: Gram matrices and reconstruction statistics are all-reduced
    calib = torch.randn(CALIB, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    res = fxprune.prune(build().eval(), x, "id", amount=0.5, calib=shard(calib, rank, world), round_to=None,
                        progress=False)
    ident = {"state": res.model.state_dict(), "keep": {g: d.keep.tolist() for g, d in res.decisions.items()}}
    torch.save({**out, "id": ident, "world": world}, os.path.join(out_dir, f"rank{rank}-of-{world}.pt"))
    if not single:
        dist.barrier()  # neither rank tears gloo down while the other still has work in flight (SIGABRT at exit)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--single" in sys.argv)
