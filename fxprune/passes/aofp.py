"""Approximated Oracle Filter Pruning (Ding et al., ICML 2019), method "aofp": find the channels whose removal the
next layer does not notice, by masking random halves of a shrinking search set while training goes on.

Per searched channel GROUP a search set S (all live channels at first). Every ``measure_every`` training steps
each active group masks a random half of S (the same half on every DDP rank: drawn from a generator seeded by
(seed, step, group)) in an EXTRA path measured at each of the group's consumers: the consumer module is run again
on its input with those channels zeroed (under no_grad: the user's loss and gradients are those of the unmasked
path), and both outputs go through the consumer's next BatchNorm, with its running statistics as in eval mode
(nothing is updated; the authors' code runs this pass through BatchNorm in train mode, which normalizes the
damage away with the masked batch's own statistics and updates the running statistics a second time per step),
and its activation where the graph has them (fxprune.method.activation_probe). Per consumer

    t_c = ||Y_base - Y_masked||^2 / ||Y_base||^2      (sums over the whole batch; all-reduced under DDP)

and the step's t (the mean over the group's consumers) is added to the score of every masked channel.

Every ``steps_per_half`` steps a group takes a decision on the mean score of each member of S (over the steps in
which it was masked): if the lower half's largest mean is under ``threshold``, that half is masked for good
(pruner.set_mask: exactly zero at every consumer from then on) and S restarts as every live channel; otherwise S
shrinks to that lower half; when the failing lower half is a single channel (|S| = 2 or 3) S restarts. Groups
start staggered, ``steps_per_half // groups`` steps apart after ``warmup``. The search stops as soon as the
FLOPs (or parameters) of the live channels, rounded up to ``round_to``, reach the target (a prune that would go
past it is cut to the fewest lowest-scoring channels that reach it); with ``amount=`` each group stops at its
own kept count. Training goes on with the masks. A group that would end between multiples of ``round_to``
gets back its last-pruned channels up to the next multiple (the target was checked on the rounded widths).

Pace (``pace=True``, beyond the authors, who search for as long as it takes): a budget of a few thousand steps
leaves room for a handful of halvings, and the threshold rarely passes a half of a trained layer that early.
So the cut is paced linearly over the search window (from 1 at the end of warm-up to the target at
``search_until * steps``): a halving whose threshold test fails while the live FLOPs are above that line
prunes its lower half anyway, cut to the fewest lowest-scoring channels that bring the FLOPs back to the line
(``amount=``: each group's own line). The channels are still the ones whose masking the consumers noticed
least; status() counts them apart (pruned_by_pace). ``pace=False`` is the authors' rule alone.
Schedule from ``steps=`` (the authors: 1000 steps per halving, threshold 0.01, warm-up 500, with no fixed end).
The search must end by ``search_until * steps`` so the rest of the budget recovers with the masks. That window
is sized for warm-up + ``HALVINGS`` halvings + the stagger at the authors' proportions:
f = min(1, window / (500 + 1000 * (HALVINGS + 1))), steps_per_half = max(2, round(1000 f)),
warmup = round(500 f); with a budget large enough (f = 1) these are the authors' values. If the window ends
before the target is reached (``pace=False``, or the pace fell short), the remaining cut is chosen by score in
one step (a fallback the authors do not have): each live channel's mean t over the whole search (channels never
masked count as the group's largest), the same global width solver as every method (no group above its live
width), the lowest channels masked; status() counts them (pruned_by_fallback). finalize() before the search is
over does the same without changing the pruner.

Beyond the authors: they searched only layers outside residual streams (ResNet: the first conv of each block);
here every prunable group is searched, a coupled group (a residual stream) as one group with t measured at
every consumer and averaged. Groups of grouped convs / chunks (equal counts per block) and groups without a
consumer module to measure at (one the module table, fxprune/modules.py, has a partial rule for) are not
searched (status() notes them; they keep their width).

finalize(): keep the live channels, a plain selection (T = None): the slim model equals the masked model. With
calib=, the core refits each consumer's T and re-estimates BatchNorm statistics as for every method.
Step overhead: per measured step, each active group's consumers run once more on the masked channels only
(a conv/linear is linear in its input, so the masked output is the base output minus what those channels
contribute: |masked| / C_in of the layer's cost, no backward) plus the BatchNorm/activation probe on both
outputs. Measured on ResNet-20 (batch 128, 1 thread, every group searching): about +30 % per step measuring
every step, about half that with the default ``measure_every=2`` (the authors measure every step; each channel
then collects half as many t samples per halving); nothing once the search is over (the hooks come off).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from fxprune.method import (ConfigError, Decision, TrainingMethod, can_measure, check_reachable,
                            consumer_inputs, consumer_partial_output, distributed, fill, fit_global, activation_probe,
                            round_width)

from . import register

AUTHORS = {"steps_per_half": 1000, "warmup": 500, "threshold": 0.01}
HALVINGS = 8  # halvings the search window leaves room for per group


class GroupSearch:
    """One group's search state: live channels, the search set S and the scores of the current halving."""

    def __init__(self, n: int, start: int):
        self.live = np.ones(n, dtype=bool)
        self.S = np.ones(n, dtype=bool)
        self.acc_t = np.zeros(n)         # this halving: sum of t over the steps a channel was masked
        self.acc_cnt = np.zeros(n)
        self.tot_t = np.zeros(n)         # the whole search (the fallback ranks by it)
        self.tot_cnt = np.zeros(n)
        self.pruned_score = np.full(n, np.nan)  # mean t a channel had when it was masked for good
        self.start = start
        self.half_start = start

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A random half (|S| // 2) of S to mask this step (bool over the group)."""
        members = np.flatnonzero(self.S)
        out = np.zeros(len(self.S), dtype=bool)
        out[rng.choice(members, size=len(members) // 2, replace=False)] = True
        return out

    def record(self, masked: np.ndarray, t: float):
        for acc, cnt in ((self.acc_t, self.acc_cnt), (self.tot_t, self.tot_cnt)):
            acc[masked] += t
            cnt[masked] += 1

    def mean_scores(self) -> np.ndarray:
        """Mean t over the steps each member of S was masked; inf for members never masked."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(self.acc_cnt > 0, self.acc_t / self.acc_cnt, np.inf)
        return np.where(self.S, s, np.inf)

    def halve(self, threshold: float, force: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
        """The halving decision: (the lower half of S by mean score, lowest first, when it is to be pruned for
        good, else empty; the mean scores; whether the threshold passed it). The caller prunes it (or a prefix:
        the target may need fewer) with ``prune``, which restarts S. Otherwise S shrinks to that lower half, or
        restarts when the lower half is one channel. ``force``: prune the lower half even when the threshold
        does not pass it (the budget's pace). The scores start afresh."""
        scores = self.mean_scores()
        members = np.flatnonzero(self.S)
        order = members[np.lexsort((members, scores[members]))]
        granu = len(members) // 2
        lower = order[:granu]
        self.acc_t[:] = 0.0
        self.acc_cnt[:] = 0.0
        passed = granu >= 1 and scores[lower[-1]] < threshold
        if passed or (force and granu >= 1):
            return lower, scores, bool(passed)
        if granu > 1:
            self.S = np.zeros_like(self.S)
            self.S[lower] = True
        else:
            self.S = self.live.copy()
        return lower[:0], scores, False

    def prune(self, channels: np.ndarray, scores: np.ndarray | None = None):
        self.live[channels] = False
        if scores is not None:
            self.pruned_score[channels] = scores[channels]
        self.S = self.live.copy()

    def long_run_scores(self) -> np.ndarray:
        """Each live channel's mean t over the whole search (never masked: the group's largest); 0 if pruned."""
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(self.tot_cnt > 0, self.tot_t / self.tot_cnt, np.nan)
        fill = np.nanmax(s) if np.isfinite(s).any() else 1.0
        s = np.where(np.isnan(s), fill, s)
        return np.where(self.live, np.maximum(s, 1e-12), 0.0)

    def state(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()
                if not k.startswith("_")}

    def load(self, state: dict):
        for k, v in state.items():
            cur = getattr(self, k)
            setattr(self, k, np.asarray(v, dtype=cur.dtype) if isinstance(cur, np.ndarray) else int(v))


@register("aofp")
class AOFP(TrainingMethod):
    """See the module docstring. Options: threshold, steps_per_half, warmup, search_until, measure_every, pace,
    seed."""

    def __init__(self, pruner, threshold: float = AUTHORS["threshold"], steps_per_half: int | None = None,
                 warmup: int | None = None, search_until: float = 0.6, measure_every: int = 2, pace: bool = True,
                 seed: int = 0):
        super().__init__(pruner)
        _check(threshold, steps_per_half, warmup, search_until, measure_every, seed)
        if not isinstance(pace, bool):
            raise ConfigError(f"pace must be True or False, got {pace!r}")
        self.pace = pace
        self.threshold, self.measure_every, self.seed = float(threshold), int(measure_every), int(seed)
        self.notes: list[str] = []
        self.consumers = self._searchable()
        ctx = self.pruner.ctx
        self.floor = self._floors()
        self.window = max(1, int(search_until * pruner.steps))
        f = min(1.0, self.window / (AUTHORS["warmup"] + AUTHORS["steps_per_half"] * (HALVINGS + 1)))
        self.steps_per_half = int(steps_per_half or max(2, round(AUTHORS["steps_per_half"] * f)))
        self.warmup = int(warmup if warmup is not None else round(AUTHORS["warmup"] * f))
        stagger = self.steps_per_half // max(1, len(self.consumers))
        self.search = {g: GroupSearch(ctx.groups[g].width, self.warmup + i * stagger)
                       for i, g in enumerate(self.consumers)}
        self.probes = {(g, c.fqn): activation_probe(pruner, c.fqn, c.weight_dim)
                       for g, cs in self.consumers.items() for c in cs}
        self.done = False
        self.forced = 0          # channels pruned by the end-of-window fallback
        self.paced = 0           # channels pruned at a halving the threshold failed, to keep the pace
        self._masked: dict[int, np.ndarray] = {}   # this step's random halves
        self._masked_step = -1
        self._buf: dict[int, torch.Tensor] = {}    # gid -> [consumers, 2] (sum diff^2, sum base^2), float64
        self._hooks: list = []
        self._hook_consumers()

    # ---- setup --------------------------------------------------------------------------------------------
    def _searchable(self) -> dict[int, list]:
        ctx = self.pruner.ctx
        out = {}
        for gid in ctx.prunable:
            g = ctx.groups[gid]
            cons = [c for c in consumer_inputs(self.pruner, gid) if can_measure(c.module)]
            why = ("its blocks must keep equal counts (grouped conv / chunk)" if g.block_of is not None else
                   "no consumer module to measure t at (Conv, ConvTranspose, Linear, Conv1D, or a module given to "
                   "fxprune.register_module with partial=)" if not cons else None)
            if why:
                ctx.freeze(gid, f"aofp does not search this group: {why}")
                self.notes.append(f"group {gid} ({', '.join(g.modules)}) keeps its width: {why}")
                continue
            out[gid] = cons
        if not out:
            raise ConfigError("aofp found no group it can search (each needs a consumer module to measure at: Conv, "
                              "Linear, ...; and no grouped-conv blocks); see fxprune.describe_groups(model, x)")
        t = ctx.target
        if t.metric is not None:
            check_reachable(ctx.analysis, ctx.cost, list(out), t.value, t.metric, t.round_to)
        return out

    def _floors(self) -> dict[int, int]:
        """The fewest channels a group may keep: its kept count for amount targets, else one rounding unit."""
        ctx = self.pruner.ctx
        if ctx.target.amounts is not None:
            widths = ctx.widths()
            return {g: widths[g] for g in self.consumers}
        return {g: round_width(1, ctx.groups[g], ctx.target.round_to) for g in self.consumers}

    def _hook_consumers(self):
        by_module: dict[int, tuple] = {}
        for gid, cons in self.consumers.items():
            for i, c in enumerate(cons):
                by_module.setdefault(id(c.module), (c.module, []))[1].append((gid, i, c))
        for module, entries in by_module.values():
            h = module.register_forward_hook(lambda mod, args, out, entries=entries: self._measure(mod, args,
                                                                                                   out, entries))
            self._hooks.append(self.pruner.track(h))

    def _unhook(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- the extra path -------------------------------------------------------------------------------------
    def _active(self, gid: int) -> bool:
        s = self.search[gid]
        return not self.done and self.pruner.step >= s.start and s.live.sum() > self.floor[gid]

    def _step_masks(self) -> dict[int, np.ndarray]:
        step = self.pruner.step
        if self._masked_step != step:
            self._masked_step = step
            self._masked = {}
            if step % self.measure_every == 0:
                for gid in self.search:
                    if self._active(gid):
                        rng = np.random.default_rng([self.seed, step, gid])
                        self._masked[gid] = self.search[gid].draw(rng)
        return self._masked

    @torch.no_grad()
    def _measure(self, module, args, out, entries):
        if not module.training or not isinstance(out, torch.Tensor):
            return
        masks = self._step_masks()
        if not masks:
            return
        x = args[0]
        base = {}
        for gid, i, c in entries:
            masked = masks.get(gid)
            if masked is None:
                continue
            pos = c.positions(gid, masked)
            if not len(pos):
                continue
            probe = self.probes[(gid, c.fqn)]
            if c.fqn not in base:
                base[c.fqn] = probe(out)
            yb = base[c.fqn]
            ym = probe(out.detach() - consumer_partial_output(module, x, torch.as_tensor(pos, device=x.device)))
            buf = self._buf.setdefault(gid, torch.zeros(len(self.consumers[gid]), 2, dtype=torch.float64,
                                                        device=x.device))
            if (c.fqn, "norm") not in base:
                base[(c.fqn, "norm")] = float(torch.linalg.vector_norm(yb)) ** 2
            buf[i, 0] += float(torch.linalg.vector_norm(ym.sub_(yb))) ** 2
            buf[i, 1] += base[(c.fqn, "norm")]

    def before_step(self):
        masks = self._masked if self._masked_step == self.pruner.step else {}
        if not masks:
            self._buf = {}
            return
        gids = sorted(masks)  # the same on every rank: masks depend only on the step and the shared state
        flat = torch.cat([self._buf.get(g, torch.zeros(len(self.consumers[g]), 2, dtype=torch.float64)).cpu()
                          .reshape(-1) for g in gids])
        flat = distributed.allreduce_sum(flat)
        at = 0
        for g in gids:
            sums = flat[at:at + 2 * len(self.consumers[g])].reshape(-1, 2)
            at += 2 * len(self.consumers[g])
            seen = sums[:, 1] > 0
            if seen.any():
                t = float((sums[seen, 0] / sums[seen, 1]).mean())
                self.search[g].record(masks[g], t)
        self._buf = {}

    # ---- halving, stopping --------------------------------------------------------------------------------
    def after_step(self):
        if self.done:
            return
        step = self.pruner.step
        for gid, s in self.search.items():
            if step < s.start or step - s.half_start < self.steps_per_half or not self._active(gid):
                continue
            s.half_start = step
            behind = self.pace and self._behind(gid, step)
            lower, scores, passed = s.halve(self.threshold, force=behind)
            if len(lower):
                self._prune(gid, lower, scores, pace_only=not passed)
            if self.done:
                return
        if step >= self.window:
            self._apply(self._fallback_keep(), forced=True)

    def _progress(self, step: int) -> float:
        """How far along the search window a linear pace would have the cut by now (0 at warm-up, 1 at its end)."""
        return float(np.clip((step - self.warmup) / max(1, self.window - self.warmup), 0.0, 1.0))

    def _planned_live(self, gid: int, step: int) -> int:
        n = len(self.search[gid].live)
        return int(np.ceil(n - (n - self.floor[gid]) * self._progress(step)))

    def _behind(self, gid: int, step: int) -> bool:
        t = self.pruner.ctx.target
        if t.metric is not None:
            return self._cost() > 1.0 - (1.0 - t.value) * self._progress(step) + 1e-12
        return int(self.search[gid].live.sum()) > self._planned_live(gid, step)

    def _prune(self, gid: int, lower: np.ndarray, scores: np.ndarray, pace_only: bool = False):
        """Mask ``lower`` (lowest first) for good, cut to what the target still needs (``pace_only``: to what
        the pace needs now); stop at the target."""
        s = self.search[gid]
        live = int(s.live.sum())
        step = self.pruner.step
        t = self.pruner.ctx.target
        floor = self.floor[gid]
        if pace_only and t.metric is None:
            floor = max(floor, self._planned_live(gid, step))
        lower = self._keep_each_producer(gid, lower[:max(0, live - floor)])
        if not len(lower):
            s.S = s.live.copy()
            return
        if t.metric is not None:
            goal = 1.0 - (1.0 - t.value) * self._progress(step) if pace_only else t.value
            for c in range(1, len(lower) + 1):  # the fewest channels that reach the goal
                if self._cost(gid, live - c) <= max(goal, t.value) + 1e-12:
                    lower = lower[:c]
                    break
        s.prune(lower, scores)
        self.paced += int(len(lower)) if pace_only else 0
        self.pruner.set_mask(gid, s.live.copy())
        if self._reached():
            self._apply({g: x.live.copy() for g, x in self.search.items()}, forced=False)

    def _keep_each_producer(self, gid: int, chans: np.ndarray) -> np.ndarray:
        """Never empty a producer that mints only part of the group (a cat joined to a residual)."""
        live = self.search[gid].live.copy()
        parts = [np.unique(chan) for _, _, chan in self.pruner.group_slots(gid, roles=("out",))]
        parts = [p for p in parts if len(p) < len(live)]
        out = []
        for c in chans:
            live[c] = False
            if any(not live[p].any() for p in parts if c in p):
                live[c] = True
                continue
            out.append(c)
        return np.array(out, dtype=np.int64)

    def _widths(self, live: dict[int, int]) -> np.ndarray:
        ctx = self.pruner.ctx
        w = np.array([g.width for g in ctx.groups])
        for gid, k in live.items():
            w[gid] = round_width(k, ctx.groups[gid], ctx.target.round_to)
        return w

    def _cost(self, gid: int | None = None, k: int | None = None) -> float:
        live = {g: int(s.live.sum()) for g, s in self.search.items()}
        if gid is not None:
            live[gid] = k
        t = self.pruner.ctx.target
        return self.pruner.ctx.cost.fraction(self._widths(live), t.metric or "flops")

    def _reached(self) -> bool:
        t = self.pruner.ctx.target
        if t.metric is not None:
            return self._cost() <= t.value + 1e-12
        return all(int(s.live.sum()) <= self.floor[g] for g, s in self.search.items())

    def _fallback_keep(self) -> dict[int, np.ndarray]:
        """The rest of the cut by score: the global width solver on the long-run mean t (no group above its
        live width, rounded up), the lowest channels masked."""
        ctx = self.pruner.ctx
        t = ctx.target
        scores = {g: s.long_run_scores() for g, s in self.search.items()}
        if t.metric is not None:
            upper = self._widths({g: int(s.live.sum()) for g, s in self.search.items()})
            w = np.minimum(fit_global(ctx.analysis, scores, ctx.cost, t.value, t.metric, t.round_to), upper)
            w = fill(ctx.analysis, ctx.cost, w, None, t.value, t.metric, t.round_to, upper=upper)
        else:
            w = {g: self.floor[g] for g in scores}
        out = {}
        for g, sc in scores.items():
            keep = np.zeros(len(sc), dtype=bool)
            keep[ctx.keep_best(g, sc, int(w[g]))] = True
            out[g] = keep
        return out

    def _apply(self, keep: dict[int, np.ndarray], forced: bool):
        """End the search: ``keep`` per group, rounded up to round_to with the last-pruned channels."""
        ctx = self.pruner.ctx
        for g, k in keep.items():
            s = self.search[g]
            if forced:
                self.forced += int((s.live & ~k).sum())
            want = round_width(int(k.sum()), ctx.groups[g], ctx.target.round_to)
            back = np.flatnonzero(~k)
            back = back[np.argsort(-np.nan_to_num(s.pruned_score[back], nan=-1.0), kind="stable")]
            k = k.copy()
            k[back[:max(0, want - int(k.sum()))]] = True
            s.live = k
            s.S = k.copy()
            self.pruner.set_mask(g, k.copy())
        self.done = True
        self._unhook()

    # ---- the user's view -----------------------------------------------------------------------------------
    def status(self) -> dict:
        ctx = self.pruner.ctx
        out = {"searching": not self.done, "steps_per_half": self.steps_per_half, "warmup": self.warmup,
               "search_ends": self.window,
               "live": {ctx.groups[g].modules[0]: f"{int(s.live.sum())}/{len(s.live)}" for g, s in
                        self.search.items()},
               "pruned_by_threshold": int(sum((~s.live).sum() for s in self.search.values())) - self.forced
               - self.paced, "pruned_by_pace": self.paced, "pruned_by_fallback": self.forced}
        if ctx.target.metric is not None:
            out[f"{ctx.target.metric}_live"] = self._cost()
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def decisions(self) -> dict[int, Decision]:
        if self.done:
            keep = {g: s.live for g, s in self.search.items()}
        else:
            keep = self._fallback_keep()
            self.pruner.ctx.notes.append("aofp: finalize() came before the search reached the target: the rest of "
                                         "the cut was chosen by each channel's mean t so far")
        return {g: Decision(keep=np.flatnonzero(k), info={"pruned": int((~k).sum())})
                for g, k in keep.items() if not k.all()}

    def state_dict(self) -> dict:
        return {"search": {self.pruner.group_key(g): s.state() for g, s in self.search.items()},
                "done": self.done, "forced": self.forced, "paced": self.paced}

    def load_state_dict(self, state: dict):
        for key, st in state["search"].items():
            self.search[self.pruner.gid_of(key)].load(st)
        self.done, self.forced, self.paced = bool(state["done"]), int(state["forced"]), int(state["paced"])
        if self.done:
            self._unhook()
        self._masked_step = -1


def _check(threshold, steps_per_half, warmup, search_until, measure_every, seed):
    def num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    def count(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not (num(threshold) and threshold > 0):
        raise ConfigError(f"threshold must be a number > 0 (the relative output change a prunable half may "
                          f"cause; the authors use 0.01), got {threshold!r}")
    if steps_per_half is not None and not (count(steps_per_half) and steps_per_half >= 1):
        raise ConfigError(f"steps_per_half must be a positive int or None (scaled to steps=), got {steps_per_half!r}")
    if warmup is not None and not (count(warmup) and warmup >= 0):
        raise ConfigError(f"warmup must be an int >= 0 or None (scaled to steps=), got {warmup!r}")
    if not (num(search_until) and 0 < search_until <= 1):
        raise ConfigError(f"search_until must be in (0, 1] (the fraction of steps= by which the search ends), "
                          f"got {search_until!r}")
    if not (count(measure_every) and measure_every >= 1):
        raise ConfigError(f"measure_every must be a positive int (measure t every that many steps), "
                          f"got {measure_every!r}")
    if not count(seed):
        raise ConfigError(f"seed must be an int, got {seed!r}")
