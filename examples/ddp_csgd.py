"""Centripetal SGD under DistributedDataParallel on the real Fashion-MNIST, then one verified slim model.

    torchrun --standalone --nproc_per_node=2 examples/ddp_csgd.py --epochs 1 --out slim.pt
    python examples/ddp_csgd.py --epochs 1 --out slim.pt            # the same in one process

Every rank trains on its own shard of each global batch; fxprune's optimizer hook transforms the gradients after
DDP has all-reduced them, k-means clusters are decided on rank 0 and broadcast, so every rank finalizes to the
same slim model. Rank 0 prints the report and saves it (fxprune.load(path, fresh_model) reads it back).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxprune
from fxprune import zoo
from fxprune.data import load_fashion_mnist, split_train
from fxprune.finetune import evaluate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--out", default="slim-csgd.pt")
    ap.add_argument("--train-samples", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--model", default="vgg-small", choices=["vgg-small", "lenet5"],
                    help="lenet5 has no BatchNorm, so 2 processes compute exactly what 1 process does; BatchNorm "
                         "layers normalize with each rank's own half batch (no SyncBatchNorm on CPU)")
    args = ap.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    images, labels = load_fashion_mnist("train")
    train_x, train_y, calib, _ = split_train(images, labels, calib=1000, seed=0)
    train_x, train_y = train_x[:args.train_samples], train_y[:args.train_samples]
    torch.manual_seed(0)
    model = zoo.build(args.model, in_channels=1, image_size=28)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    per_rank = args.batch // world
    steps_per_epoch = len(train_x) // args.batch
    steps = args.epochs * steps_per_epoch
    pruner = fxprune.prepare(wrapped, train_x[:2], "csgd", optimizer=opt, steps=steps,
                             target_flops=args.target_flops, calib=calib, progress=rank == 0)

    gen = torch.Generator().manual_seed(0)  # the same shuffle on every rank; each takes its own slice
    wrapped.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch + rank * per_rank:i * args.batch + (rank + 1) * per_rank]
            loss = F.cross_entropy(wrapped(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 and i % 100 == 0:
                print(f"epoch {epoch} step {i}/{steps_per_epoch} loss {loss.item():.3f} "
                      f"spread {pruner.status()['spread']['kernels']:.2e}", flush=True)

    result = pruner.finalize()  # the same slim model on every rank
    if rank == 0:
        test = tuple(t[:2000] for t in load_fashion_mnist("test")) if args.train_samples else load_fashion_mnist("test")
        print(result.report)
        print(f"test accuracy: trained {evaluate(model, test):.2%}, merged {evaluate(result.model, test):.2%}")
        fxprune.save(result, args.out)
        print(f"slim model saved to {args.out}")
    if distributed:
        dist.barrier()  # neither rank tears gloo down while the other still has work in flight
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
