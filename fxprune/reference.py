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

from .ops import handler
from .rewrite import Plan, segments


def consumer_hooks(plan: Plan) -> dict[str, list]:
    """node name -> [(slot, group per position, index per position, channel dim of the node's input)] for every
    consumer node that reads a decided group. The input is the node's data argument (``data_arg``: its first,
    addmm's second); ``hooked_args`` replaces it."""
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
            hooks.setdefault(user.name, []).append((s, gid, idx, dim))
    return hooks


def reconstruct(plan: Plan, x: torch.Tensor, s, gid: np.ndarray, idx: np.ndarray, dim: int) -> torch.Tensor:
    """A consumer's input with each decided group's channels replaced by Z_j[:, keep] @ T_j (or zeroed)."""
    out = x.clone()
    for (g, _, _), P in segments(gid, idx, s.tags).items():
        d = plan.decisions.get(g)
        if d is None:
            continue
        pos = torch.as_tensor(P, device=x.device)
        T = plan.T_at(s, g)
        if T is None:
            dropped = pos[torch.as_tensor(~plan.keep_mask[g][idx[P]], device=x.device)]
            out.index_fill_(dim, dropped, 0.0)
        else:
            zk = x.index_select(dim, pos[torch.as_tensor(d.keep, device=x.device)]).movedim(dim, -1)
            rebuilt = (zk @ torch.as_tensor(T, dtype=x.dtype, device=x.device)).movedim(-1, dim)
            out.index_copy_(dim, pos, rebuilt)
    return out


def hooked_args(plan: Plan, node, entries: list, args: tuple) -> tuple:
    """A consumer node's arguments with its data argument replaced by the reconstruction (``entries``: the
    node's list from consumer_hooks)."""
    i = handler(node.target).data_arg
    x = args[i]
    for s, gid, idx, dim in entries:
        x = reconstruct(plan, x, s, gid, idx, dim)
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
