"""The only place fxprune talks to torch.distributed: sums and broadcasts that are no-ops in a single process.

Every rank must call these in the same order with tensors of the same shape (fxprune visits groups, sources and
nodes in graph order, which is the same on every rank).

Example::

    total = allreduce_sum(torch.tensor([rows, energy], dtype=torch.float64))
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def _device_for(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


@torch.no_grad()
def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor on t's device; ``t`` itself when not distributed)."""
    if not active():
        return t
    buf = t.detach().to(_device_for(t), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


@torch.no_grad()
def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``t`` on every rank (a new tensor; ``t`` itself when not distributed)."""
    if not active():
        return t
    buf = t.detach().to(_device_for(t), copy=True)
    dist.broadcast(buf, src)
    return buf.to(t.device)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object (picklable, small: decisions, cluster labels) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]
