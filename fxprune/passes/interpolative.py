"""Interpolative-decomposition (ID) pruning (Chee, Renz, Damle, De Sa, arXiv 2108.00065), method "id".

Each group keeps the channels that best span its activations: for every tensor Z_j its consumers read
(``Group.sources``: after the nonlinearity, after a max-pool when one sits before the consumer; conv maps give one
row per spatial position), the pivots come from all Z_j stacked (each scaled to unit energy), and each Z_j gets
its own least-squares T_j with Z_j ~ Z_j[:, keep] @ T_j (for a group with one source, T = [I, R11^-1 R12], the
ID's own T). Z is never materialized: a float64 Gram matrix per source is accumulated batch by batch (O(C^2)
memory, summable across processes), and pivoted Cholesky of it gives the QR's pivots and R (_id_math.py).

Choosing k:
  - amount / amounts: a uniform fraction per group;
  - tol=...: per group, the smallest k whose relative ID error is <= tol;
  - target_flops / target_params: greedy over all groups by reconstruction error added per FLOP (or parameter)
    saved, in ``rounds`` stages (default 3) toward the target; each stage re-measures the activations of the
    partly pruned model (the graph runs with every consumer reading Z_j[:, keep] @ T_j) before it chooses again.
    Each group's error curve is calibrated at the model output (_id_allocate.py). With coarse widths (round_to
    > 1) a second complete candidate, ID at the widths of the global magnitude ranking, is measured at the
    output too, and the result with the smaller output error is kept.

With calibration data the core then refits every T_j against the original model's activations and re-estimates
BatchNorm statistics (fxprune/reconstruct.py); ``reconstruct=False`` keeps ID's own T_j. Sources whose consumers
cannot absorb T (grouped convs, partial reads) take ID's pivots as a plain selection; the report notes them.
"""

from __future__ import annotations

import numpy as np

from fxprune.method import (ConfigError, Decision, batches, check_reachable, distributed, dynamic_dims, group_grams,
                            least_squares, top_k, width_step)

from . import register
from ._id_allocate import PROBES, OutputProbe, allocate, calibrated_curve
from ._id_math import id_from_gram
from ._id_units import channel_order, unit_pivots
from .magnitude import scores as magnitude_scores


@register("id")
def decide(ctx, tol: float | None = None, rounds: int = 3, probe_samples: int = 64):
    _check_options(tol, rounds, probe_samples)
    t = ctx.target
    if t.metric is not None:
        check_reachable(ctx.analysis, ctx.cost, ctx.prunable, t.value, t.metric, t.round_to)
    stages = [None] if t.metric is None else [t.value ** ((i + 1) / rounds) for i in range(rounds)]
    probe = _Probe(ctx, probe_samples) if t.metric is not None and probe_samples else None
    best = _run(ctx, stages, tol, probe)
    if probe is not None and (t.round_to or 1) > 1:
        # With coarse units the greedy moves a whole unit per step and can be myopic (measured: a 4-group VGG at
        # round_to=16 lost 1.1 points to the widths a global magnitude ranking picks). So ID also runs at those
        # widths, both complete results are measured at the model output, and the better one is kept.
        other = _run(ctx, [None], None, None, widths=ctx.widths(magnitude_scores(ctx)), quiet=True)
        errors = distributed.agree("ID's output errors of the greedy and the magnitude-width candidates",
                                   [probe.out.set_current(d) for d in (best, other)])
        if errors[1] < errors[0]:
            best = other
            ctx.notes.append(f"id: widths of the global magnitude ranking measured a smaller output error than "
                             f"the greedy's ({errors[1]:.3g} vs {errors[0]:.3g}); ID chose the channels within them")
    for g in best:
        for src in ctx.groups[g].sources.values():
            if not src.foldable:
                ctx.notes.append(f"group {g} ({', '.join(ctx.groups[g].modules)}): consumers of {src.node} "
                                 f"take a plain selection: {src.why}")
    return best


def _run(ctx, stages, tol, probe, widths: dict | None = None, quiet: bool = False) -> dict[int, Decision]:
    """ID's rounds: measure the Gram matrices of the partly pruned model, choose widths (``widths`` if given, the
    tolerance, the uniform amounts, or the calibrated greedy toward each stage's target), shrink. The Grams stream
    block by block (fxprune/blockwise.py): each group is measured, used and freed before later blocks run, so a
    width known up front shrinks the group in the same pass; the greedy takes a first pass for every group's error
    curve and a second, over the groups it cuts, to shrink them."""
    prunable = ctx.prunable
    kept = {g: np.arange(ctx.groups[g].width) for g in prunable}     # current keep, original numbering
    trans = {g: {} for g in prunable}                                # current T per source (k x n)
    info: dict[int, dict] = {}
    chunks = list(batches(ctx.calib, ctx.example_inputs, ctx.calib_samples, dynamic=dynamic_dims(ctx.analysis.gm)))
    for i, stage in enumerate(stages):
        decisions = _decisions(ctx, kept, trans)
        desc = f"ID calibration {i + 1}/{len(stages)}"
        if stage is None:
            fixed = widths if widths is not None else None if tol is not None else ctx.widths()
            for g, sub, G in _measured(ctx, chunks, prunable, decisions, kept, desc):
                k = int(fixed[g]) if fixed is not None else id_from_gram(G, tol=tol).k
                k = distributed.agree(f"ID's width of group {g} in round {i + 1}", k)
                if k < len(kept[g]):
                    kept[g], trans[g], info[g] = _shrink(ctx, g, kept[g], trans[g], sub, G, k, quiet)
            continue
        if probe is not None:
            probe.begin(decisions)
        curves = {}
        for g, sub, G in _measured(ctx, chunks, prunable, decisions, kept, desc):
            curves[g] = _error_curve(sub, _order(ctx, g, kept[g], G))
            if probe is not None:
                curves[g] = probe.calibrate(g, curves[g], kept, trans, sub, G)
        now = np.array([len(kept[g]) if g in kept else ctx.groups[g].width for g in range(len(ctx.groups))])
        new_k = allocate(ctx, now, {g: curves[g] for g in prunable if g in curves}, stage, ctx.target.metric)
        new_k = distributed.agree(f"ID's widths in round {i + 1}", {g: int(new_k[g]) for g in curves})
        cut = [g for g in prunable if g in curves and int(new_k[g]) < len(kept[g])]
        for g, sub, G in _measured(ctx, chunks, cut, decisions, kept, f"ID shrink {i + 1}/{len(stages)}"):
            kept[g], trans[g], info[g] = _shrink(ctx, g, kept[g], trans[g], sub, G, int(new_k[g]), quiet)
    return _decisions(ctx, kept, trans, info)


def _measured(ctx, chunks, groups, decisions, kept, desc):
    """(group, its Grams per source restricted to its kept channels, their pooled Gram), group by group as the
    calibration data streams through the partly pruned model."""
    for g, by_src in group_grams(ctx.analysis, chunks, groups, decisions, progress=ctx.progress, desc=desc):
        sub = {src: G[np.ix_(kept[g], kept[g])] for src, G in by_src.items()}
        yield g, sub, _pooled(sub)


decide.needs_calib = True


def _shrink(ctx, g: int, kept: np.ndarray, trans: dict, sub: dict, pooled: np.ndarray, k: int,
            quiet: bool = False):
    """Group g cut from its current kept channels to k: (kept, T per source, info)."""
    block_of, unit_of = ctx.groups[g].block_of, ctx.groups[g].unit_of
    res, info = None, {}
    if unit_of is not None:  # attention heads: whole heads are the pivots; T by least squares below
        local = unit_pivots(pooled, unit_of[kept], k, None if block_of is None else block_of[kept])
    elif block_of is None and not np.trace(pooled) > 0:  # every channel is zero on the calibration data
        local = np.sort(top_k(magnitude_scores(ctx)[g][kept], k))
        info = {"id_error": 0.0}
        note = (f"group {g} ({', '.join(ctx.groups[g].modules)}): every channel is zero on the calibration data; "
                "kept by filter magnitude (L1)")
        if not quiet and note not in ctx.notes:
            ctx.notes.append(note)
    elif block_of is None:
        res = id_from_gram(pooled, k=k)
        local = res.keep
        info = {"id_error": float(res.rel_error)}
    else:  # blocks keep equal counts: ID pivots per block, kept as a selection (grouped consumers)
        local = _blocked_pivots(pooled, block_of[kept], k)
    energy = np.full(ctx.groups[g].width, -np.inf)  # channels cut in earlier rounds cannot come back
    energy[kept] = np.diag(pooled)
    whole = ctx.every_reader_kept(g, kept[local], energy)
    if len(whole) > len(local):  # a tensor reading or writing part of the group lost every channel: its strongest one stays
        local, res = np.flatnonzero(np.isin(kept, whole)), None
    new = {}
    for src, Gs in sub.items():
        if res is not None and len(sub) == 1:
            T_local = res.T  # one source: the ID's own T = [I, R11^-1 R12]
        else:  # each source's own least-squares T from the shared pivots
            T_local = least_squares(Gs[np.ix_(local, local)], Gs[local], ridge=1e-10)
        new[src] = T_local @ trans.get(src, np.eye(len(kept), ctx.groups[g].width))
    return kept[local], new, info


class _Probe:
    """Measures what cutting one group does at the model output (see _id_allocate.py)."""

    def __init__(self, ctx, samples: int):
        self.ctx = ctx
        self.out = OutputProbe(ctx.analysis, next(iter(batches(ctx.calib, ctx.example_inputs, samples, samples,
                                                                  dynamic_dims(ctx.analysis.gm)))))

    def begin(self, decisions: dict):
        """The current decisions, which every probe of this round changes in one group."""
        self.now = self.out.set_current(decisions)

    def calibrate(self, g, curve, kept, trans, sub, pooled):
        """Group g's error curve calibrated at the model output by cutting it alone to the probe widths."""
        ctx = self.ctx
        w, u = len(kept[g]), width_step(ctx.groups[g], ctx.target.round_to)
        probes = {}
        for k in sorted({max(u, int(round(w * f / u)) * u) for f in PROBES}):
            if k >= w:
                continue
            kk, tt, _ = _shrink(ctx, g, kept[g], trans[g], sub, pooled, k, quiet=True)
            trial = _decisions(ctx, {**kept, g: kk}, {**trans, g: tt})
            probes[k] = self.out.error(trial, g) - self.now
        return calibrated_curve(curve, w, probes) if probes else curve


def _check_options(tol, rounds, probe_samples):
    if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0.0 <= tol < 1.0):
        raise ConfigError(f"tol must be a number in [0, 1) (the relative ID error allowed per group), got {tol!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive int (greedy stages toward a FLOPs target), got {rounds!r}")
    if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 0:
        raise ConfigError(f"probe_samples must be an int >= 0 (calibration samples that measure each cut at the "
                          f"model output; 0: allocate by ID error alone), got {probe_samples!r}")


def _pooled(by_src: dict[str, np.ndarray]) -> np.ndarray:
    """One Gram for the pivots: every source's Z stacked, each scaled to unit energy so none dominates."""
    return sum(G / max(np.trace(G), 1e-300) for G in by_src.values())


def _error_curve(by_src: dict[str, np.ndarray], order: np.ndarray) -> np.ndarray:
    """errors[k-1]: the mean over sources of the least-squares residual energy ||Z - Z_k T||_F^2 / ||Z||_F^2
    when the first k channels of ``order`` are kept (the reconstruction every source really gets)."""
    curves = []
    for G in by_src.values():
        Gp = G[np.ix_(order, order)]
        total = max(np.trace(Gp), 1e-300)
        L = np.linalg.cholesky(Gp + 1e-12 * total / len(Gp) * np.eye(len(Gp)))
        captured = np.cumsum(np.square(L).sum(0))
        curves.append(np.clip(1.0 - captured / total, 0.0, 1.0))
    return np.mean(curves, axis=0)


def _order(ctx, g: int, kept: np.ndarray, G: np.ndarray) -> np.ndarray:
    """The greedy pivot order of a group's kept channels (whole heads together for attention heads)."""
    unit_of = ctx.groups[g].unit_of
    return id_from_gram(G, k=len(G)).pivots if unit_of is None else channel_order(G, unit_of[kept])


def _blocked_pivots(G: np.ndarray, block_of: np.ndarray, k: int) -> np.ndarray:
    blocks = int(block_of.max()) + 1
    picks = []
    for b in range(blocks):
        members = np.flatnonzero(block_of == b)
        picks.append(members[id_from_gram(G[np.ix_(members, members)], k=k // blocks).keep])
    return np.sort(np.concatenate(picks))


def _decisions(ctx, kept, trans, info=None) -> dict[int, Decision]:
    out = {}
    for g, keep in kept.items():
        n = ctx.groups[g].width
        if len(keep) == n:
            continue
        order = np.argsort(keep)
        foldable = set(ctx.groups[g].foldable_sources)
        T = {src: T[order] for src, T in trans[g].items() if src in foldable}
        out[g] = Decision(keep=keep[order], T=T or None, info=dict((info or {}).get(g, {})))
    return out
