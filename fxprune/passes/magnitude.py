"""Magnitude pruning (Li et al. 2017): a channel's score is the L1 (or L2) norm of its filter, summed over every
producer in its group. Uniform per-group amounts, or a global ranking toward a FLOPs/params target (scores
normalized by each group's mean, so wide and narrow layers compete fairly). Plain selection: T is None."""

from __future__ import annotations

import numpy as np

from . import register


def scores(ctx, norm: str = "l1") -> dict[int, np.ndarray]:
    p = {"l1": 1, "l2": 2}[norm]
    out = {}
    for gid in ctx.prunable:
        s = np.zeros(ctx.groups[gid].width)
        for rows, idx in ctx.producer_rows(gid):
            np.add.at(s, idx, rows.flatten(1).double().norm(p=p, dim=1).numpy())
        out[gid] = s
    return out


@register("l1")
def decide_l1(ctx, **_):
    return ctx.select_top(scores(ctx, "l1"))


@register("l2")
def decide_l2(ctx, **_):
    return ctx.select_top(scores(ctx, "l2"))
