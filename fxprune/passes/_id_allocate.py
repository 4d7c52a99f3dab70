"""How ID spends a FLOPs (or parameter) budget across groups: greedy, by the error each cut really causes.

An ID error curve per group is cheap (from the Gram matrices, for every width) but it does not say what a cut does
to the model: measured on a ResNet-20, the output error per unit of ID error differs 100-fold between groups (a
residual stream feeds every block; a block-internal map feeds one conv). So each group's curve is calibrated at
the model output: the group alone is cut to a few probe widths (3/4, 1/2, 1/4 of its current width) with its
pivots and least-squares T per source, the partly pruned model runs on ``probe_samples`` calibration samples, and
the increase of the relative output error ||f - f_orig||^2 / ||f_orig||^2 is recorded. Between and beyond the
probes the output error follows the group's own ID error curve (piecewise-linear in it). The greedy then removes,
one unit at a time, the step that adds the least measured output error per unit of cost saved.
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.method import (HookedInterpreter, Plan, distributed, fill, flat_tensors, progress_bar, tighten,
                            width_step)

PROBES = (0.75, 0.5, 0.25)


class OutputProbe:
    """The relative output error ||f - f_orig||^2 / ||f_orig||^2 of the model run with some decisions, on a fixed
    batch X. ``set_current`` runs the current decisions once and keeps every activation (when they fit
    CACHE_BYTES); a probe that changes one group then reruns only the nodes downstream of that group's
    consumers."""

    CACHE_BYTES = 2 * 2**30

    def __init__(self, an, X: tuple):
        self.an, self.X = an, X
        with torch.no_grad():
            self.base = flat_tensors(HookedInterpreter(an.gm, Plan(an, {})).run(*X))
        self.cache: dict = {}
        self.now = 0.0

    def set_current(self, decisions: dict):
        interp = HookedInterpreter(self.an.gm, Plan(self.an, decisions),
                                   capture={n.name for n in self.an.gm.graph.nodes})
        with torch.no_grad():
            out = interp.run(*self.X)
        size = sum(v.numel() * v.element_size() for v in interp.captured.values() if isinstance(v, torch.Tensor))
        self.cache = {n: interp.captured[n.name] for n in self.an.gm.graph.nodes if n.name in interp.captured} \
            if size <= self.CACHE_BYTES else {}
        self.now = self._error(out)
        return self.now

    def error(self, decisions: dict, changed: int) -> float:
        """The error with ``decisions``, which differ from the current ones in group ``changed`` only."""
        dirty = _downstream(self.an, changed)
        env = {n: v for n, v in self.cache.items() if n.name not in dirty and n.op != "output"}
        with torch.no_grad():
            out = HookedInterpreter(self.an.gm, Plan(self.an, decisions)).run(*self.X, initial_env=env)
        return self._error(out)

    def _error(self, out) -> float:
        """Under torchrun each rank holds its own probe samples: the sums of squares are all-reduced, so every
        rank measures the error of one process holding all of them (and takes the same decisions)."""
        out = flat_tensors(out)
        num = sum(float((a - b).square().sum()) for a, b in zip(out, self.base))
        den = sum(float(b.square().sum()) for b in self.base)
        num, den = distributed.allreduce_sum(torch.tensor([num, den], dtype=torch.float64), "ID's probe error")
        return float(num) / max(float(den), 1e-300)


def _downstream(an, gid: int) -> set[str]:
    """Names of the nodes whose values change when group gid's consumers read something else."""
    starts = [u for s in an.slots.values() if s.role in ("in", "grouped_in") and (an.positions(s)[0] == gid).any()
              for u in an.param_users.get(s.fqn, [])]
    out, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n.name not in out:
            out.add(n.name)
            todo.extend(n.users)
    return out


def calibrated_curve(proxy: np.ndarray, width: int, probes: dict[int, float]) -> np.ndarray:
    """Output error added at each width 1..width: the measured probe points, interpolated (and extrapolated past
    the last probe) piecewise-linearly in the proxy ID error, never decreasing as the width shrinks."""
    pts = sorted([(proxy[width - 1], 0.0)] + [(proxy[k - 1], d) for k, d in probes.items()])
    xs = np.array([p[0] for p in pts])
    ys = np.maximum.accumulate(np.maximum([p[1] for p in pts], 0.0))
    xs, idx = np.unique(xs, return_index=True)
    ys = ys[idx]
    e = proxy[:width]
    out = np.interp(e, xs, ys)
    if len(xs) > 1:  # beyond the last probe: the last segment's slope
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
        out = np.where(e > xs[-1], ys[-1] + slope * (e - xs[-1]), out)
    return np.maximum.accumulate(out[::-1])[::-1]  # smaller width -> never less error


def _step_down(w: int, u: int) -> int | None:
    """The next smaller width in steps of the group's unit, or None at the floor."""
    nxt = (w - 1) // u * u
    return nxt if nxt >= u else None


def allocate(ctx, widths: np.ndarray, curves: dict[int, np.ndarray], target: float, metric: str):
    """Greedy: remove the step that adds the least error per unit of cost saved until within target."""
    cost, r = ctx.cost, ctx.target.round_to
    upper = widths.copy()
    frac = cost.fraction(widths, metric)
    bar = progress_bar(total=round(max(frac - target, 0) * 1000), desc="allocating widths", disable=not ctx.progress,
               leave=False)
    while frac > target:
        best = None
        for g, e in curves.items():
            nxt = _step_down(widths[g], width_step(ctx.groups[g], r))
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
    gain = lambda g, w: curves[g][w - 1] - curves[g][min(w + width_step(ctx.groups[g], r), len(curves[g])) - 1] if g in curves else -1.0  # noqa: E731
    widths = fill(ctx.analysis, cost, widths, gain, target, metric, r, upper)
    return tighten(ctx.analysis, cost, widths, list(curves), gain, target, metric, r, upper)


