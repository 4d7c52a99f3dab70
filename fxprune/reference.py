"""The hooked reference: the ORIGINAL graph, full width, with every consumer's input replaced by its
reconstruction Z_j[:, keep] @ T_j (a selection zeroes the removed channels). Nothing is sliced or folded on this
route, so it is the independent side of verification; calibration reads a partly pruned model's activations
through it, at full width and with the original group numbering.

Example::

    ref = HookedInterpreter(gm, plan, capture={"relu_3"})
    out = ref.run(x)                  # what the slim model must compute
    z = ref.captured["relu_3"]        # an activation of the partly pruned model
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter

from .analysis import Slot
from .ops import handler
from .rewrite import Plan, segments


class _Segment:
    """One run of a group's channels in a consumer's input, with its index tensors built once."""

    def __init__(self, plan: Plan, s, g: int, P: np.ndarray, idx: np.ndarray):
        d = plan.decisions[g]
        self.g, self.src = g, plan.an.slot_source.get((s.fqn, s.dim, g))
        self.pos = torch.as_tensor(P)
        self.keep = self.pos[torch.as_tensor(d.keep)] if len(P) == len(plan.keep_mask[g]) else None
        self.dropped = self.pos[torch.as_tensor(~plan.keep_mask[g][idx[P]])]


class _Hook:
    """How one consumer slot's input is rebuilt: its segments and the channel dim of the node's input."""

    def __init__(self, plan: Plan, s, gid: np.ndarray, idx: np.ndarray, dim: int):
        self.s, self.dim = s, dim
        self.segments = [_Segment(plan, s, g, P, idx) for (g, _, _), P in segments(gid, idx, s.tags).items()
                         if g in plan.decisions]


def consumer_hooks(plan: Plan) -> dict[str, list]:
    """node name -> [_Hook] for every consumer node that reads a decided group. The input is the node's data
    argument (``data_arg``: its first, addmm's second); ``hooked_args`` replaces it."""
    an = plan.an
    hooks: dict[str, list] = {}
    for s in an.slots.values():
        if s.role not in ("in", "grouped_in"):
            continue
        gid, idx = an.positions(s)
        if not np.isin(gid, list(plan.decisions)).any():
            continue
        for user in an.slot_users[(s.fqn, s.dim)]:
            dim = an.cmap(an.data_input(user)).dim  # where the consumer's input carries the channels
            hooks.setdefault(user.name, []).append(_Hook(plan, s, gid, idx, dim))
    for name, norm in getattr(an, "rms_norms", {}).items():  # an RMSNorm takes a selection: zero its input there
        cm = norm["cmap"]
        gid, idx = an.positions(cm)
        if np.isin(gid, list(plan.decisions)).any():
            s = Slot(name, cm.dim, "select", cm.ids, cm.tags)
            hooks.setdefault(name, []).append(_Hook(plan, s, gid, idx, cm.dim))
    return hooks


def reconstruct(plan: Plan, x: torch.Tensor, hook: _Hook) -> torch.Tensor:
    """A consumer's input with each decided group's channels replaced by Z_j[:, keep] @ T_j (or zeroed)."""
    dim, out = hook.dim, None
    for seg in hook.segments:
        T = plan.decisions[seg.g].T
        T = (T.get(seg.src) if isinstance(T, dict) else T) if seg.keep is not None else None
        if T is None:  # plan decisions are normalized: no selection matrix is stored as a T
            if len(seg.dropped):
                out = (x if out is None else out).index_fill(dim, seg.dropped.to(x.device), 0.0)
        else:
            zk = x.index_select(dim, seg.keep.to(x.device)).movedim(dim, -1)
            rebuilt = (zk @ _as_tensor(plan, T, x)).movedim(-1, dim)
            out = (x.clone() if out is None else out).index_copy_(dim, seg.pos.to(x.device), rebuilt)
    return x if out is None else out


def _as_tensor(plan: Plan, T: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    cache = plan.__dict__.setdefault("_torch_T", {})
    key = (id(T), like.dtype, like.device)
    if key not in cache:
        cache[key] = (T, torch.as_tensor(T, dtype=like.dtype, device=like.device))  # T kept alive: id stays valid
    return cache[key][1]


def hooked_args(plan: Plan, node, entries: list, args: tuple) -> tuple:
    """A consumer node's arguments with its data argument replaced by the reconstruction (``entries``: the
    node's list from consumer_hooks)."""
    i = handler(node.target).data_arg
    x = args[i]
    for hook in entries:
        x = reconstruct(plan, x, hook)
    return (*args[:i], x, *args[i + 1:])


class HookedInterpreter(Interpreter):
    """Runs the original graph with every consumer reading its reconstruction. ``capture`` names nodes whose
    outputs are kept in ``captured``."""

    def __init__(self, gm: GraphModule, plan: Plan, capture=frozenset()):
        super().__init__(gm)
        self.plan = plan
        self.capture = set(capture)
        self.captured: dict[str, torch.Tensor] = {}
        self.hooks = consumer_hooks(plan)

    def run_node(self, n):
        if n.name in self.hooks:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, hooked_args(self.plan, n, self.hooks[n.name], args), kwargs)
        else:
            out = super().run_node(n)
        if n.name in self.capture:
            self.captured[n.name] = out
        return out
