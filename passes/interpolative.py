"""Interpolative-decomposition (ID) pruning (Chee, Renz, Damle, De Sa, arXiv 2108.00065), method "id".

Each group keeps the channels that best span its activations Z (the consumers' common input: after the
nonlinearity, after a max-pool when one sits before the consumer; conv maps give one row per spatial position),
and T = [I, R11^-1 R12] lets the consumers rebuild the rest: Z ~ Z[:, keep] @ T. The core folds T into the
consumers' weights. Z is never materialized: a float64 Gram matrix per group is accumulated batch by batch
(O(C^2) memory, summable across processes), and pivoted Cholesky of it gives the QR's pivots and R
(passes/_id_math.py).

Choosing k:
  - amount / amounts: a uniform fraction per group;
  - tol=...: per group, the smallest k whose relative ID error is <= tol;
  - target_flops / target_params: greedy over all groups by ID error added per FLOP (or parameter) saved, in
    ``rounds`` stages (default 3) toward the target; each stage re-measures the activations of the partly pruned
    model (the graph runs with every consumer reading Z[:, keep] @ T) before it chooses again.

Groups whose consumers cannot absorb T (the residual stream, SE-scaled maps) keep ID's pivots as a plain
selection; the report notes each such group.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from fxprune.calibrate import DEFAULT_SAMPLES, stream
from fxprune.rewrite import Decision, segments
from fxprune.targets import check_reachable, fill, unit

from . import register
from ._id_math import GramAccumulator, id_from_gram


def _sources(ctx, gid: int) -> list[str]:
    """Nodes whose outputs hold the group's Z: the fold point, else every consumer's input source."""
    an, g = ctx.analysis, ctx.groups[gid]
    if g.z_node is not None:
        return [g.z_node]
    srcs = []
    for s in an.slots.values():
        if s.role in ("in", "grouped_in") and (an.positions(s)[0] == gid).any():
            for user in an.param_users[s.fqn]:
                src = an.source(user.args[0], gid)
                if src not in srcs:
                    srcs.append(src)
    return srcs


def _columns(an, node_name: str, gid: int, width: int):
    """(channel dim, position matrix tags x width) to pull the group's columns out of a node's output."""
    node = next(n for n in an.gm.graph.nodes if n.name == node_name)
    cm = an.cmap(node)
    gids, idx = an.positions(cm)
    segs = [P for (g, _, c), P in segments(gids, idx, cm.tags).items() if g == gid and c == 0 and len(P) == width]
    return (cm.dim, np.stack(segs)) if segs else None


def _gram_all(ctx, groups: list[int], decisions: dict, samples: int, desc: str) -> dict[int, GramAccumulator]:
    an = ctx.analysis
    where: dict[int, list] = {}
    for g in groups:
        for src in _sources(ctx, g):
            cols = _columns(an, src, g, ctx.groups[g].width)
            if cols is not None:
                where.setdefault(g, []).append((src, *cols))
    accs = {g: GramAccumulator(ctx.groups[g].width) for g in where}
    nodes = sorted({s for w in where.values() for s, _, _ in w})
    for acts in stream(an, ctx.calib, nodes, decisions, ctx.example_inputs, samples, ctx.progress, desc):
        for g, acc in accs.items():
            for name, dim, P in where[g]:
                a = acts[name].movedim(dim, -1)
                a = a.reshape(-1, a.shape[-1])[:, torch.as_tensor(P.reshape(-1))]
                acc.update(a.reshape(-1, P.shape[1]))
    for acc in accs.values():
        acc.allreduce()
    return accs


def _step_down(w: int, u: int) -> int | None:
    """The next smaller width in steps of the group's unit, or None at the floor."""
    nxt = (w - 1) // u * u
    return nxt if nxt >= u else None


def _allocate(ctx, widths: np.ndarray, curves: dict[int, np.ndarray], target: float, metric: str):
    """Greedy: remove the step that adds the least ID error per unit of cost saved until within target."""
    cost, r = ctx.cost, ctx.target.round_to
    upper = widths.copy()
    frac = cost.fraction(widths, metric)
    bar = tqdm(total=round(max(frac - target, 0) * 1000), desc="allocating widths", disable=not ctx.progress,
               leave=False)
    while frac > target:
        best = None
        for g, e in curves.items():
            nxt = _step_down(widths[g], unit(ctx.groups[g], r))
            if nxt is None:
                continue
            trial = widths.copy()
            trial[g] = nxt
            saved = frac - cost.fraction(trial, metric)
            if saved <= 0:
                continue
            score = (e[nxt - 1] - e[widths[g] - 1]) / saved
            if best is None or score < best[0]:
                best = (score, g, nxt, saved)
        if best is None:
            break
        widths[best[1]] = best[2]
        frac -= best[3]
        bar.update(round(best[3] * 1000))
    bar.close()
    # the last steps may overshoot on coarse groups: add back what fits, largest error reduction first
    gain = lambda g, w: curves[g][w - 1] - curves[g][min(w + unit(ctx.groups[g], r), len(curves[g])) - 1] if g in curves else -1.0  # noqa: E731
    widths = fill(ctx.analysis, cost, widths, gain, target, metric, r, upper)
    return _tighten(ctx, widths, curves, gain, target, metric, upper)


def _tighten(ctx, widths, curves, gain, target, metric, upper, slack: float = 0.02):
    """Coarse units (round_to, blocks) can leave the greedy more than ``slack`` below target with no single unit
    that fits back: trade one unit down on a group for whatever fill can then add, while that gets closer."""
    cost, r = ctx.cost, ctx.target.round_to
    frac = cost.fraction(widths, metric)
    while target - frac > slack:
        best = None
        for g in curves:
            nxt = _step_down(widths[g], unit(ctx.groups[g], r))
            if nxt is None:
                continue
            trial, cap = widths.copy(), upper.copy()
            trial[g] = cap[g] = nxt  # the unit taken from g must go elsewhere
            trial = fill(ctx.analysis, cost, trial, gain, target, metric, r, cap)
            f = cost.fraction(trial, metric)
            if f > frac + 1e-12 and (best is None or f > best[0]):
                best = (f, trial)
        if best is None:
            break
        frac, widths = best
    return widths


@register("id")
def decide(ctx, tol: float | None = None, rounds: int = 3, calib_samples: int = DEFAULT_SAMPLES, **_):
    prunable = ctx.prunable
    kept = {g: np.arange(ctx.groups[g].width) for g in prunable}     # current keep, original numbering
    trans = {g: np.eye(ctx.groups[g].width) for g in prunable}       # current T (k x n)
    info: dict[int, dict] = {}
    t = ctx.target
    if t.metric is not None:
        check_reachable(ctx.analysis, ctx.cost, prunable, t.value, t.metric, t.round_to)
    stages = [None] if t.metric is None else [t.value ** ((i + 1) / max(rounds, 1)) for i in range(max(rounds, 1))]
    for i, stage in enumerate(stages):
        decisions = _decisions(ctx, kept, trans)
        accs = _gram_all(ctx, prunable, decisions, calib_samples, f"ID calibration {i + 1}/{len(stages)}")
        grams = {g: acc.G[np.ix_(kept[g], kept[g])] for g, acc in accs.items()}
        if stage is None and tol is not None:
            new_k = {g: id_from_gram(G, tol=tol).k for g, G in grams.items()}
        elif stage is None:
            new_k = ctx.widths()
        else:
            curves = {g: id_from_gram(G, k=len(G)).errors for g, G in grams.items()}
            widths = np.array([len(kept[g]) if g in kept else ctx.groups[g].width for g in range(len(ctx.groups))])
            new_k = _allocate(ctx, widths, curves, stage, t.metric)
        for g, G in grams.items():
            k = int(new_k[g])
            if k >= len(kept[g]):
                continue
            block_of = ctx.groups[g].block_of
            if block_of is None:
                res = id_from_gram(G, k=k)
                kept[g], trans[g] = kept[g][res.keep], res.T @ trans[g]
                info[g] = {"id_error": float(res.rel_error)}
            else:  # blocks keep equal counts: ID pivots per block, kept as a selection (grouped consumers)
                sub = _blocked_pivots(G, block_of[kept[g]], k)
                kept[g], trans[g] = kept[g][sub], trans[g][sub]
    return _decisions(ctx, kept, trans, info, final=True)


decide.needs_calib = True


def _blocked_pivots(G: np.ndarray, block_of: np.ndarray, k: int) -> np.ndarray:
    blocks = int(block_of.max()) + 1
    picks = []
    for b in range(blocks):
        members = np.flatnonzero(block_of == b)
        picks.append(members[id_from_gram(G[np.ix_(members, members)], k=k // blocks).keep])
    return np.sort(np.concatenate(picks))


def _decisions(ctx, kept, trans, info=None, final=False) -> dict[int, Decision]:
    out = {}
    for g, keep in kept.items():
        n = ctx.groups[g].width
        if len(keep) == n:
            continue
        order = np.argsort(keep)
        foldable = ctx.groups[g].z_node is not None
        d = Decision(keep=keep[order], T=trans[g][order] if foldable else None, info=dict((info or {}).get(g, {})))
        d.info["folded"] = not d.is_selection()
        out[g] = d
        if final and not foldable:
            ctx.notes.append(f"group {g} ({', '.join(ctx.groups[g].modules)}): ID pivots kept as a plain "
                             f"selection, T not folded: {ctx.groups[g].fold_reason}")
    return out
