"""Targets: how many channels each group keeps, for an amount or a global FLOPs/params target.

The cost model takes the FLOPs of every op whose handler says it has them (ops.OpHandler.has_flops) from
torch.utils.flop_counter.FlopCounterMode (run once per op on meta tensors, batch 1) and scales them by the kept
fraction of the op's input and output channels; parameters scale the same way along their channel dims. For
conv/linear this is exact, so a width vector can be priced without building the slim model, and a solver can try
thousands of them.

Example::

    cm = CostModel(an)
    widths = fit_global(an, scores, cm, target=0.5, metric="flops", round_to=8)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .analysis import Analysis
from .errors import ConfigError, TargetError
from .ops import node_handler


def _meta(arg):
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        shape = [s if isinstance(s, int) else 1 for s in val.shape]  # batch 1
        return torch.empty(shape, dtype=val.dtype, device="meta")
    return arg


def _op_flops(node) -> int:
    args = torch.fx.node.map_aggregate(node.args, _meta)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, _meta)
    try:
        with FlopCounterMode(display=False) as fc:
            node.target(*args, **kwargs)
        return fc.get_total_flops()
    except Exception:  # noqa: BLE001 - ops that cannot run on meta tensors cost nothing we can count
        return 0


class CostModel:
    """FLOPs and parameters as functions of the kept width of every group."""

    def __init__(self, an: Analysis):
        self.an = an
        self.n = np.array([g.width for g in an.groups], dtype=np.float64)
        self.flop_terms = []   # (flops, in fraction vector, out fraction vector)
        for node in an.gm.graph.nodes:
            h = node_handler(node)
            f = _op_flops(node) if h is not None and h.has_flops else 0
            if not f:
                continue
            src, out = an.cmap(an.data_input(node)), an.cmap(node)
            # FLOPs scale with the input's kept fraction too, unless the output carries the input's own channels
            # (depthwise conv: one scaling, not two)
            same = src is not None and out is not None and np.array_equal(src.ids, out.ids)
            fin = self._fraction(src) if src is not None and not same else None
            if src is not None and src.heads and out is not None:
                fin = None  # per head (q @ k^T, attention): linear in the heads kept, which the output carries
            self.flop_terms.append((float(f), fin, self._fraction(out) if out is not None else None))
        self.param_terms = []  # (numel, [fraction vectors of its channel dims])
        slots_by_fqn: dict[str, list] = {}
        for s in an.slots.values():
            slots_by_fqn.setdefault(s.fqn, []).append(s)
        for fqn, tensor in list(an.gm.named_parameters()):
            fr = [self._fraction(s) for s in slots_by_fqn.get(fqn, [])]
            self.param_terms.append((float(tensor.numel()), fr))
        self.base_flops = self.flops(self.n)
        self.base_params = self.params(self.n)

    def _fraction(self, holder) -> tuple[float, np.ndarray]:
        """(constant part, per-group coefficient): kept fraction = const + coef . (k / n)."""
        gid, _ = self.an.positions(holder)
        m = len(gid)
        coef = np.bincount(gid[gid >= 0], minlength=len(self.n)).astype(np.float64) / m
        return float((gid < 0).sum()) / m, coef

    @staticmethod
    def _eval(fr, ratio):
        return 1.0 if fr is None else fr[0] + fr[1] @ ratio

    def flops(self, widths) -> float:
        ratio = np.asarray(widths, dtype=np.float64) / self.n
        return sum(f * self._eval(fi, ratio) * self._eval(fo, ratio) for f, fi, fo in self.flop_terms)

    def params(self, widths) -> float:
        ratio = np.asarray(widths, dtype=np.float64) / self.n
        return sum(p * math.prod(self._eval(fr, ratio) for fr in frs) for p, frs in self.param_terms)

    def fraction(self, widths, metric: str) -> float:
        if metric == "flops":
            return self.flops(widths) / max(self.base_flops, 1.0)
        return self.params(widths) / max(self.base_params, 1.0)


# Kept widths are rounded up to a multiple of this by default. Measured (benchmarks/RESULTS.md, "Realized
# speedup"): ONNX Runtime's CPU conv kernels pad channels to blocks of 16 on AVX-512 (8 on AVX2), so 16 is the
# only policy that kept batch-64 latency at about the FLOPs ratio on VGG-16 and ResNet-56; 8 and None (odd
# widths) were up to 1.6x and 2.6x worse. A group that cannot shrink at 16 (a 16-wide layer) falls back to 8,
# 4, ... (see width_step / aligned_width), so a requested cut is never dropped. round_to=None (or 1): exact widths.
DEFAULT_ROUND_TO = 16


def alignments(round_to: int | None):
    """round_to, then ever finer alignments down to exact widths: 16, 8, 4, 2, 1."""
    a = max(1, int(round_to or 1))
    while a > 1:
        yield a
        a //= 2
    yield 1


def width_step(group, round_to: int | None) -> int:
    """Widths move in multiples of this: the coarsest of round_to, round_to / 2, ... 1 at which the group can
    shrink at all (a 16-wide group under round_to=16 moves in 8s), times the group's block count (grouped conv,
    chunk) and the size of its whole units (attention heads: every block keeps whole heads)."""
    whole = group.blocks * group.unit_size
    for a in alignments(round_to):
        u = math.lcm(a, whole)
        if u < group.width:
            return u
    return whole


def round_width(k: int, group, round_to: int | None) -> int:
    """Round a kept count up to a multiple of the group's width step (never above its width, never below one step)."""
    n, u = group.width, width_step(group, round_to)
    return min(n, max(u, int(math.ceil(max(1, int(k)) / u)) * u))


def aligned_width(k: int, group, round_to: int | None) -> int:
    """k rounded up at the coarsest alignment (round_to, round_to / 2, ... 1) that still leaves a cut: the width
    an amount asks for is never silently dropped because of rounding."""
    n = group.width
    for a in alignments(round_to):
        u = math.lcm(a, group.blocks * group.unit_size)
        w = min(n, max(u, int(math.ceil(max(1, int(k)) / u)) * u))
        if w < n:
            return w
    return n


def uniform_widths(an: Analysis, amounts: dict[int, float], round_to: int | None,
                   fallback: bool = True) -> np.ndarray:
    """Keep n - round(amount * n) channels in each prunable group (amounts keyed by group id): aligned as coarsely
    as still allows the cut (``fallback``), or to the group's fixed unit (the target solvers)."""
    widths = np.array([g.width for g in an.groups])
    for gid, a in amounts.items():
        g = an.groups[gid]
        k = g.width - int(round(a * g.width))
        widths[gid] = g.width if k >= g.width else (aligned_width if fallback else round_width)(k, g, round_to)
    return widths


def fit_uniform(an: Analysis, cost: CostModel, prunable: list[int], target: float, metric: str,
                round_to: int | None) -> np.ndarray:
    """The largest uniform amount whose cost stays within target (bisection)."""
    check_reachable(an, cost, prunable, target, metric, round_to)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        w = uniform_widths(an, {g: mid for g in prunable}, round_to, fallback=False)
        lo, hi = (lo, mid) if cost.fraction(w, metric) <= target else (mid, hi)
    return fill(an, cost, uniform_widths(an, {g: hi for g in prunable}, round_to, fallback=False), None, target,
                metric, round_to)


def fit_global(an: Analysis, scores: dict[int, np.ndarray], cost: CostModel, target: float, metric: str,
               round_to: int | None) -> np.ndarray:
    """Global ranking: a group keeps its channels whose normalized score is above one shared threshold;
    the threshold is bisected to the cheapest width vector within target, then filled back up greedily."""
    prunable = list(scores)
    check_reachable(an, cost, prunable, target, metric, round_to)
    norm = {g: np.sort(s / max(float(np.mean(s)), 1e-30))[::-1] for g, s in scores.items()}
    gain = lambda g, k: norm[g][k] if g in norm else -np.inf  # noqa: E731
    w = threshold_widths(an, norm, cost, target, metric, round_to)
    if metric != "latency":
        return fill(an, cost, w, gain, target, metric, round_to)
    # A measured time is not monotone in width (blocked kernels: an 8-wide conv can be slower than a 16-wide
    # one), so the bisection can end above target. The threshold is still the allocation to prefer: error per ms
    # saved (fit_greedy) cuts the expensive early layers deep and lost accuracy at equal measured latency
    # (benchmarks/RESULTS.md, issue 15); it and then the fastest widths are the fallbacks.
    if cost.fraction(w, metric) > target:
        removed = {g: np.concatenate([np.cumsum(s[::-1])[::-1][1:], [0.0]]) for g, s in norm.items()}
        w = fit_greedy(an, cost, removed, target, metric, round_to)
    if cost.fraction(w, metric) > target:
        w = floor_widths(an, cost, prunable, metric, round_to)
    w = fill(an, cost, w, gain, target, metric, round_to)
    return tighten(an, cost, w, prunable, gain, target, metric, round_to, np.array([g.width for g in an.groups]))


def threshold_widths(an: Analysis, norm: dict[int, np.ndarray], cost: CostModel, target: float, metric: str,
                     round_to: int | None) -> np.ndarray:
    """The widths at the smallest shared threshold (over the sorted normalized scores ``norm``) whose cost is
    within target, by bisection; the smallest widths when none is."""
    thresholds = np.unique(np.concatenate(list(norm.values()) + [np.array([0.0])]))

    def widths_at(t):
        w = np.array([g.width for g in an.groups])
        for g, s in norm.items():
            w[g] = round_width(int((s >= t).sum()), an.groups[g], round_to)
        return w

    lo, hi = 0, len(thresholds)  # find the smallest threshold index whose widths fit
    while lo < hi:
        mid = (lo + hi) // 2
        if cost.fraction(widths_at(thresholds[mid]), metric) <= target:
            hi = mid
        else:
            lo = mid + 1
    return widths_at(thresholds[lo]) if lo < len(thresholds) else minimum_widths(an, list(norm), round_to)


LOOKAHEAD = 4  # fit_greedy tries steps of 1..LOOKAHEAD units: a measured time can be flat over one unit


def fit_greedy(an, cost, errors: dict[int, np.ndarray], target: float, metric: str, round_to) -> np.ndarray:
    """From full width, take the step (one to LOOKAHEAD units off one group) that adds the least error per unit
    of cost saved, until the cost is within target. ``errors[g][k - 1]``: the error of keeping k channels. Steps
    that save nothing are never taken, so a cost that rises as a width falls (an 8-wide conv slower than a
    16-wide one) is handled."""
    widths = np.array([g.width for g in an.groups])
    frac = cost.fraction(widths, metric)
    while frac > target:
        best = None
        for g, e in errors.items():
            u = width_step(an.groups[g], round_to)
            w = int(widths[g])
            for j in range(1, LOOKAHEAD + 1):
                nxt = (w - 1) // u * u - (j - 1) * u
                if nxt < u:
                    break
                trial = widths.copy()
                trial[g] = nxt
                f = cost.fraction(trial, metric)
                if frac - f <= 0:
                    continue
                score = (e[nxt - 1] - e[w - 1]) / (frac - f)
                if best is None or score < best[0]:
                    best = (score, g, nxt, f)
        if best is None:
            break
        _, g, nxt, frac = best
        widths[g] = nxt
    return widths


def fill(an, cost, widths, gain, target, metric, round_to, upper=None) -> np.ndarray:
    """Add channels back while the cost stays within target, the largest gain(group, width) first (default:
    the group cut most, relative to its width), never past upper (default: the full widths). Lands the cost
    just under the target."""
    widths = widths.copy()
    upper = upper if upper is not None else np.array([g.width for g in an.groups])
    gain = gain or (lambda g, w: 1.0 - w / an.groups[g].width)
    while True:
        best, best_key = None, None
        for g in range(len(an.groups)):
            n = int(upper[g])
            if widths[g] >= n or not an.groups[g].prunable:
                continue
            trial = widths.copy()
            trial[g] = min(n, widths[g] + width_step(an.groups[g], round_to))
            if cost.fraction(trial, metric) > target:
                continue
            key = gain(g, int(widths[g]))
            if best_key is None or key > best_key:
                best, best_key = g, key
        if best is None:
            return widths
        widths[best] = min(int(upper[best]), widths[best] + width_step(an.groups[best], round_to))


def tighten(an, cost, widths, groups, gain, target, metric, round_to, upper, slack: float = 0.02):
    """Coarse units (round_to, blocks) can leave a greedy more than ``slack`` below target with no single unit
    that fits back: trade one unit down on a group for whatever fill can then add, while that gets closer."""
    frac = cost.fraction(widths, metric)
    while target - frac > slack:
        best = None
        for g in groups:
            u = width_step(an.groups[g], round_to)
            nxt = (int(widths[g]) - 1) // u * u
            if nxt < u:
                continue
            trial, cap = widths.copy(), upper.copy()
            trial[g] = cap[g] = nxt  # the unit taken from g must go elsewhere
            trial = fill(an, cost, trial, gain, target, metric, round_to, cap)
            f = cost.fraction(trial, metric)
            if f > frac + 1e-12 and (best is None or f > best[0]):
                best = (f, trial)
        if best is None:
            break
        frac, widths = best
    return widths


def minimum_widths(an: Analysis, prunable, round_to) -> np.ndarray:
    w = np.array([g.width for g in an.groups])
    for g in prunable:
        w[g] = round_width(1, an.groups[g], round_to)
    return w


def floor_widths(an, cost, prunable, metric, round_to) -> np.ndarray:
    """The cheapest widths: every group at its smallest for FLOPs/params; for a measured latency (not monotone
    in width) each group in turn at its cheapest aligned width, two passes from the smallest widths."""
    w = minimum_widths(an, prunable, round_to)
    if metric != "latency":
        return w
    for _ in range(2):
        for g in prunable:
            grp = an.groups[g]
            u = width_step(grp, round_to)
            cands = sorted(set(range(u, grp.width + 1, u)) | {grp.width})
            costs = []
            for k in cands:
                trial = w.copy()
                trial[g] = k
                costs.append(cost.fraction(trial, metric))
            w[g] = cands[int(np.argmin(costs))]
    return w


def check_reachable(an, cost, prunable, target, metric, round_to):
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target_{metric} must be in (0, 1] (the fraction of {metric} kept), got {target}")
    floor = cost.fraction(floor_widths(an, cost, prunable, metric, round_to), metric)
    if floor > target:
        raise TargetError(
            f"target_{metric}={target:g} is unreachable: "
            + ("the fastest measured widths of every prunable group still keep" if metric == "latency" else
               f"pruning every prunable group down to {'one channel' if not round_to else 'its smallest aligned width'}"
               " still keeps") + f" {floor:.3f} of the {metric}. "
            "Frozen groups (see fxprune.groups(model, x)) and layers that do not shrink set this floor; "
            f"ask for {metric} >= {math.ceil(floor * 1000) / 1000:g}"
            + (", or round widths more finely (round_to=8, or None for exact widths; they run less efficiently "
               "in ONNX Runtime)." if round_to and round_to > 1 else "."))
