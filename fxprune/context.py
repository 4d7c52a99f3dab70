"""What a method pass sees: the groups, their targets, the calibration data and helpers that turn per-channel
scores into decisions. A pass returns {group id: Decision}; it never edits a tensor.

Example (a whole method)::

    def decide(ctx):
        scores = {g: my_scores(ctx, g) for g in ctx.prunable}
        return ctx.select_top(scores)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .analysis import Analysis
from .rewrite import Decision
from .targets import CostModel, fit_global, fit_uniform, uniform_widths


@dataclass
class Target:
    """Exactly one of: per-group amounts (fraction removed), or a global fraction of flops/params kept."""
    amounts: dict[int, float] | None = None
    metric: str | None = None     # "flops" | "params"
    value: float | None = None
    round_to: int | None = None


@dataclass
class PruneContext:
    analysis: Analysis
    target: Target
    example_inputs: tuple
    calib: object = None           # calibration data as the user gave it (tensor, DataLoader, iterable)
    progress: bool = True
    calib_samples: int = 1000      # how many calibration samples a method should read
    notes: list[str] = field(default_factory=list)  # lines the method wants in the report
    frozen: dict[int, str] = field(default_factory=dict)  # this job's freezing on top of the analysis' own
    _cost: CostModel | None = None
    _producer_slots: dict | None = field(default=None, repr=False)

    @property
    def cost(self) -> CostModel:
        """FLOPs/params as functions of group widths, built on first use (amount mode never needs it)."""
        if self._cost is None:
            self._cost = CostModel(self.analysis)
        return self._cost

    @property
    def groups(self):
        return self.analysis.groups

    @property
    def prunable(self) -> list[int]:
        """Groups a method may decide: neither the analysis nor this job froze them, and wider than one."""
        return [g.gid for g in self.analysis.groups if g.prunable and g.gid not in self.frozen]

    def freeze(self, gid: int, why: str) -> None:
        """Keep group ``gid`` whole in this job (the user's ``ignore``, a method that cannot use it, a failed
        verification); the first reason given stays. The shared, read-only Analysis is not touched."""
        if self.analysis.groups[gid].frozen is None:
            self.frozen.setdefault(gid, why)

    def frozen_reason(self, gid: int) -> str | None:
        """Why group ``gid`` stays whole: the analysis' reason, else this job's, else None."""
        return self.analysis.groups[gid].frozen or self.frozen.get(gid)

    @property
    def all_frozen(self) -> dict[int, str]:
        """{group id: reason} for every frozen group, the analysis' and this job's."""
        return {g.gid: self.frozen_reason(g.gid) for g in self.analysis.groups if self.frozen_reason(g.gid)}

    def producer_rows(self, gid: int):
        """Yield (weight tensor with channels in dim 0, group index per row) for every producer of a group."""
        for s in self._producers_of().get(gid, ()):
            g, idx = self.analysis.positions(s)
            mine = g == gid
            if mine.any():
                w = self.analysis.tensor(s.fqn).detach().movedim(s.dim, 0)[torch.as_tensor(np.flatnonzero(mine))]
                yield w, idx[mine]

    def _producers_of(self) -> dict[int, list]:
        """{group id: the "out" slots with a row in it}, in slot order (built once: scanning every slot for every
        group was most of l1's time on deep nets)."""
        if self._producer_slots is None:
            by_group: dict[int, list] = {}
            for s in self.analysis.slots.values():
                if s.role == "out":
                    for g in np.unique(self.analysis.positions(s)[0]):
                        by_group.setdefault(int(g), []).append(s)
            self._producer_slots = by_group
        return self._producer_slots

    def widths(self, scores: dict[int, np.ndarray] | None = None) -> dict[int, int]:
        """Kept count per prunable group for this target: uniform amounts, or a global fit (by score when
        scores are given, else the same amount everywhere)."""
        t, an = self.target, self.analysis
        if t.amounts is not None:
            w = uniform_widths(an, t.amounts, t.round_to)
        elif scores is not None:
            w = fit_global(an, scores, self.cost, t.value, t.metric, t.round_to)
        else:
            w = fit_uniform(an, self.cost, self.prunable, t.value, t.metric, t.round_to)
        return {g: int(w[g]) for g in self.prunable}

    def select_top(self, scores: dict[int, np.ndarray], widths: dict[int, int] | None = None) -> dict[int, Decision]:
        """Keep the highest-scoring channels of each group (ties: lower index first), never emptying a tensor
        that reads or writes part of a group (keep_best)."""
        widths = widths or self.widths(scores)
        out = {}
        for g, s in scores.items():
            k = widths[g]
            if k >= len(s):
                continue
            keep = self.keep_best(g, s, k)
            out[g] = Decision(keep=keep, info={"score_kept": float(np.sum(np.asarray(s)[keep]))})
        return out

    def keep_best(self, gid: int, scores, k: int) -> np.ndarray:
        """The k best channels of a group (sorted), with every part that one tensor reads or writes alone (a
        split chunk read by its own conv, a producer of part of a concat) keeping its best channel or head:
        torch has no 0-channel conv or linear. Where the k best already reach every part this is top_k; else
        each part's best channel is kept first and the rest filled by score (k grows only when there are more
        parts than k). Blocks (grouped convs, equal chunks) keep k / blocks each, as top_k does."""
        grp = self.groups[gid]
        s = np.asarray(scores, dtype=np.float64)
        keep = top_k(s, k, grp.block_of, grp.unit_of)
        if grp.block_of is not None:
            return keep
        missing = [p for p in self.parts(gid) if not np.isin(p, keep).any()]
        if not missing:
            return keep
        unit = np.arange(len(s)) if grp.unit_of is None else grp.unit_of
        us = np.bincount(unit, weights=s, minlength=int(unit.max()) + 1)
        must = {int(max(set(unit[p].tolist()), key=lambda u: (us[u], -u))) for p in self.parts(gid)}
        rest = [u for u in np.lexsort((np.arange(len(us)), -us)).tolist() if u not in must]
        units = sorted(must) + rest[:max(0, k // max(1, grp.unit_size) - len(must))]
        return np.flatnonzero(np.isin(unit, units))

    def every_reader_kept(self, gid: int, keep: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``keep`` plus, for each part a tensor reads or writes alone that was left with nothing, its
        highest-scoring channel (or head): for methods that choose the kept set themselves (ID's pivots)."""
        grp = self.groups[gid]
        if grp.block_of is not None:
            return keep
        for mine in self.parts(gid):
            if not np.isin(mine, keep).any():
                best = mine[np.argmax(scores[mine])]
                keep = np.union1d(keep, [best] if grp.unit_of is None
                                  else np.flatnonzero(grp.unit_of == grp.unit_of[best]))
        return keep

    def parts(self, gid: int) -> list[np.ndarray]:
        """The channel indices of the group that each producer / consumer tensor holds, where that is not the
        whole group (distinct sets only)."""
        cache = self.__dict__.setdefault("_parts", {})
        if gid not in cache:
            seen, out, width = set(), [], self.groups[gid].width
            for sl in self.analysis.slots.values():
                if sl.role not in ("out", "in", "grouped_in"):
                    continue
                g, idx = self.analysis.positions(sl)
                mine = np.unique(idx[g == gid])
                key = mine.tobytes()
                if 0 < len(mine) < width and key not in seen:
                    seen.add(key)
                    out.append(mine)
            cache[gid] = out
        return cache[gid]


def top_k(scores: np.ndarray, k: int, block_of: np.ndarray | None = None,
          unit_of: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the k best scores (ties: lower index); with blocks, the k/blocks best of each block; with
    units (attention heads), the k/unit size best whole units by their summed score."""
    if unit_of is not None:
        units = int(unit_of.max()) + 1
        size = len(scores) // units
        first = np.array([np.flatnonzero(unit_of == u)[0] for u in range(units)])
        picked = top_k(np.bincount(unit_of, weights=scores, minlength=units), k // size,
                       None if block_of is None else block_of[first])
        return np.flatnonzero(np.isin(unit_of, picked))
    if block_of is None:
        return np.sort(np.lexsort((np.arange(len(scores)), -scores))[:k])
    blocks = int(block_of.max()) + 1
    picks = [np.flatnonzero(block_of == b)[top_k(scores[block_of == b], k // blocks)] for b in range(blocks)]
    return np.sort(np.concatenate(picks))
