"""Worker for tests/test_ddp.py's agreement tests: a small VGG with BatchNorm under torchrun (2 ranks, gloo).

    torchrun --nproc_per_node=2 tests/ddp_agree_worker.py OUT MODE

MODE "agree": ID with target_flops=0.5 on unequal calibration shards (rank 0: 40 images, rank 1: 24), and C-SGD
(with the same shards at finalize), AOFP and Auto-Balanced with target_flops=0.5 in a DDP loop where every rank's
BatchNorm running statistics are its own; every rank saves its slim state_dict (also run alone with ``--single``: ID on all 64 images).
MODE "diverge": ID four times, each with a deliberately diverging rank 1 (perturbed weights; an allocation that
decides other widths; the same with the decision checks off, so that the next all-reduce has other sizes; a
verification that fails on rank 1 only); every rank saves the error it got in each case, then exits 3.
"""

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.passes import interpolative

STEPS, BATCH = 24, 16
REAL_ALLOCATE = interpolative.allocate
SHARDS = (40, 24)  # unequal calibration shards
ROUND_TO = 2  # coarse widths: the magnitude-width candidate is measured too


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def calib_shard(rank: int, world: int) -> torch.Tensor:
    """Shards from different distributions, so that measuring on one's own shard alone decides other widths."""
    gen = torch.Generator().manual_seed(2)
    images = torch.cat([torch.randn(SHARDS[0], 1, 8, 8, generator=gen),
                        torch.randn(SHARDS[1], 1, 8, 8, generator=gen).cumsum(-1) * 0.5])
    if world == 1:
        return images
    start = sum(SHARDS[:rank])
    return images[start:start + SHARDS[rank]]


def trained() -> nn.Module:
    """A model with BatchNorm statistics (the same on every rank)."""
    model = build()
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8, generator=gen))
    return model.eval()


def one_shot_id(rank: int, world: int, model=None, **opts):
    model = trained() if model is None else model
    return fxprune.prune(model, torch.randn(2, 1, 8, 8), "id", target_flops=0.5, round_to=ROUND_TO,
                         calib=calib_shard(rank, world), progress=False, **opts)


TRAINING = {"csgd": dict(target_flops=0.5, calib=True),  # with reconstruction and BatchNorm statistics at finalize
            "aofp": dict(target_flops=0.5, threshold=10.0, steps_per_half=3, warmup=0, measure_every=1,
                         search_until=0.8),
            "abfp": dict(target_flops=0.5, stages=2)}


def train(method: str, rank: int, world: int, **opts):
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if opts.pop("calib", False):
        opts["calib"] = calib_shard(rank, world)
    pruner = fxprune.prepare(ddp, torch.randn(2, 1, 8, 8), method, optimizer=opt, steps=STEPS, round_to=None,
                             progress=False, **opts)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batches (and so its own BN statistics)
    for _ in range(STEPS):
        X, Y = torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 4, (BATCH,), generator=gen)
        loss = F.cross_entropy(ddp(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pruner.finalize()


def summary(res) -> dict:
    return {"state": res.model.state_dict(), "keep": {g: d.keep.tolist() for g, d in res.decisions.items()},
            "flops": res.flops, "verified": res.verified}


@contextlib.contextmanager
def patched(module, name: str, value, on: bool = True):
    old = getattr(module, name)
    if on:
        setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def other_widths(ctx, *args, **kwargs):
    """ID's allocation, one unit (2 channels) less in the widest group: a rank that decides otherwise."""
    w = REAL_ALLOCATE(ctx, *args, **kwargs)
    w[max(ctx.prunable, key=lambda g: w[g])] -= 2
    return w


def refuse(*args, **kwargs):
    raise fxprune.errors.VerificationError("planted: the slim graph disagrees on this rank")


def diverge(case: str, rank: int, world: int):
    """One deliberately diverging rank (rank 1); returns the error this rank got (None: no error)."""
    from fxprune import distributed, verify
    model = trained()
    if case == "weights":
        with torch.no_grad():
            model[3].weight[0, 0, 0, 0] += 1e-3 * rank
    with contextlib.ExitStack() as stack:
        if case in ("decision", "sizes"):
            stack.enter_context(patched(interpolative, "allocate", other_widths, on=rank == 1))
        if case == "sizes":  # the decision checks off: the next all-reduce has other sizes on rank 1
            stack.enter_context(patched(distributed, "agree", lambda what, value, shown=None: value))
        if case == "fail":
            stack.enter_context(patched(verify, "verify", refuse, on=rank == 1))
        try:
            one_shot_id(rank, world, model=model)
        except fxprune.errors.FxPruneError as e:
            return f"{type(e).__name__}: {e}"
    return None


def main(out_dir: str, mode: str, single: bool):
    rank, world = 0, 1
    if not single:  # a short timeout: a hang would fail the test within a minute instead of 30
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
    path = os.path.join(out_dir, f"{mode}-rank{rank}-of-{world}.pt")
    if mode == "agree":
        out = {"id": summary(one_shot_id(rank, world))}
        if not single:
            out.update({m: summary(train(m, rank, world, **opts)) for m, opts in TRAINING.items()})
        torch.save(out, path)
    else:
        errors = {case: diverge(case, rank, world) for case in ("weights", "decision", "sizes", "fail")}
        torch.save(errors, path)
        if any(errors.values()):
            dist.destroy_process_group()
            sys.exit(3)
    if not single:
        dist.barrier()  # neither rank tears gloo down while the other still has work in flight (SIGABRT at exit)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--single" in sys.argv)
