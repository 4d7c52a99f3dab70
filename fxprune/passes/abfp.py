"""Auto-Balanced Filter Pruning (Ding et al., AAAI 2018), method "abfp": an L2 term that is positive on the channels
to be removed and negative on the ones to keep, balanced to zero per group, moves a layer's capacity into the
channels that stay; pruning advances in stages over all groups at once ("abreast"). No code of the authors exists;
what follows is our reading of the paper's abstract and reviews (the factor formula and the
ranking are unverified), with the BatchNorm correction explained below.

Magnitude. A channel's magnitude m_j is the L1 norm of its BatchNorm-FUSED filter, summed over the group's
producers: |gamma_j| / sqrt(running_var_j + eps) * ||W_j||_1 where a BatchNorm directly follows the producer,
||W_j||_1 where none does. Why: with a BatchNorm after the conv the network's function does not depend on the
scale of W_j (the batch statistics divide it out), so ranking or penalizing the kernel alone says and does
nothing about the channel's output; the fused filter is what the next layer actually receives.

Penalty. Every parameter entry that belongs to channel j in the group (the producers' rows, conv biases,
BatchNorm gamma and beta; depthwise kernels that follow the channel) is one vector theta_j, and the term is
R = strength / 2 * sum_j c_j ||theta_j||^2 with, at a stage whose ranking keeps k channels,

    theta = sqrt(m_(k) * m_(k+1))                   the boundary (geometric mean of the weakest kept and the
                                                    strongest removed magnitude, fixed when the stage ranks)
    weak   (removed at the stage's end): c_j = lambda_j = 1 + max(0, ln(theta / m_j))      (>= 1)
    strong (kept):                       c_j = tau * lambda_j,  lambda_j = -(1 + max(0, ln(m_j / theta)))
    tau = -alpha * S_weak / S_strong,    S_x = sum over that side of lambda_j ||theta_j||^2

so that sum_strong c_j ||theta_j||^2 = -alpha * S_weak: with alpha = 1 the two sides cancel exactly, at every
step (the lambdas follow the current magnitudes; m_j is floored at 1e-4 theta so lambda stays <= 1 + ln 1e4).
Penalizing gamma AND beta (not only W) is what drives a weak channel's output itself to zero (gamma alone
would leave the constant beta, which the slim model cannot keep); on strong channels the negative side is an
anti-decay that fades by itself as S_weak decays, so their norms stay bounded. Before each optimizer step
(the gradients are final, DDP has all-reduced them) g_j += strength * c_j * theta_j, capped at
c_j * strength <= 1 / lr (a step never overshoots zero); the optimizer's own weight decay is left as it is.

Strength. No published value. ``strength=None`` (default) schedules it from the optimizer: with learning rate
lr and momentum m (read every step, so lr schedules are followed), strength = ln(1 / shrink) * (1 - m) / (lr * L)
for a stage of L steps: the weakest side (c_j >= 1) alone would shrink by ``shrink`` within the stage. A number
fixes it.

Stages ("abreast advancing"): ``stages`` stages end at prune_by * steps * (s + 1) / stages, each ranks the live
channels of every group anew and picks the channels its end removes: the kept fraction of the FLOPs (params)
target^((s + 1) / stages) through the same global width solver as every method (fxprune.targets.fit_global on
the magnitudes, no group above its live width, then filled back up to just under the goal: removed channels
stay removed), or for amount= a kept count n * (k / n)^((s + 1) /
stages), rounded to ``round_to``. At a stage's end its weak channels are masked for good (pruner.set_mask,
exactly zero at every consumer), so the rest of the budget trains the model as it will be; the last stage
meets the target. finalize() keeps the unmasked channels: a plain selection, the slim model equals the masked
model (with calib=, the core's reconstruction and BatchNorm statistics as for every method). Ranks: the
regularization reads parameters (identical on every DDP rank) and BatchNorm running statistics (each rank's
own), so its coefficients are rank 0's, broadcast before every step; each stage's weak sets are decided on rank 0
and broadcast.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from fxprune.method import (ConfigError, Decision, TrainingMethod, distributed, fill, fit_global, activation_probe,
                            round_width)

from . import register

FLOOR = 1e-4  # m_j is floored at FLOOR * theta: lambda <= 1 + ln(1 / FLOOR)


def factors(m: np.ndarray, sq: np.ndarray, weak: np.ndarray, theta: float, alpha: float) -> np.ndarray:
    """c_j for live channels (see the module docstring): m magnitudes, sq = ||theta_j||^2, weak a bool mask.
    Channels outside both sides (masked) are not passed in."""
    m = np.maximum(m, FLOOR * theta)
    lam = np.where(weak, 1.0 + np.maximum(0.0, np.log(theta / m)), -(1.0 + np.maximum(0.0, np.log(m / theta))))
    s_weak = float(np.sum((lam * sq)[weak]))
    s_strong = float(np.sum((lam * sq)[~weak]))
    tau = -alpha * s_weak / s_strong if s_strong < 0 else 0.0
    return np.where(weak, lam, tau * lam)


@register("abfp")
class ABFP(TrainingMethod):
    """See the module docstring. Options: stages, prune_by, alpha, strength, shrink."""

    def __init__(self, pruner, stages: int = 3, prune_by: float = 0.6, alpha: float = 1.0,
                 strength: float | None = None, shrink: float = 1e-2):
        super().__init__(pruner)
        _check(stages, prune_by, alpha, strength, shrink)
        self.stages, self.alpha, self.shrink = int(stages), float(alpha), float(shrink)
        self.fixed_strength = None if strength is None else float(strength)
        self.ends = [max(1, round(prune_by * pruner.steps * (s + 1) / stages)) for s in range(stages)]
        ctx = pruner.ctx
        self.groups = list(ctx.prunable)
        self.slots = {g: list(pruner.group_slots(g)) for g in self.groups}
        self.fused = {g: self._fusion(g) for g in self.groups}
        self.live = {g: np.ones(ctx.groups[g].width, dtype=bool) for g in self.groups}
        self.final = ctx.widths() if ctx.target.amounts is not None else None
        self.stage = 0
        self.weak: dict[int, np.ndarray] = {}
        self.theta: dict[int, float] = {}
        self.strength = 0.0
        self._rank()

    # ---- magnitudes ---------------------------------------------------------------------------------------
    def _fusion(self, gid: int) -> list:
        """(producer slot, its positions, their channels, BatchNorm names or None) per producer."""
        out = []
        for s, pos, chan in self.slots[gid]:
            if s.role == "out":
                out.append((s, pos, chan, activation_probe(self.pruner, s.fqn, 0)))
        return out

    @torch.no_grad()
    def magnitudes(self, gid: int) -> np.ndarray:
        """The BatchNorm-fused filter L1 norm of every channel, summed over the group's producers."""
        m = np.zeros(self.pruner.ctx.groups[gid].width)
        for s, pos, chan, probe in self.fused[gid]:
            w = self.pruner.tensor(s.fqn).detach().movedim(s.dim, 0)[torch.as_tensor(pos)]
            norm = w.reshape(len(pos), -1).double().abs().sum(1)
            if probe.bn is not None:
                bn = {k: self.pruner.tensor(f) if f else None for k, f in probe.bn.items()}
                gamma = bn["weight"].detach().double() if bn["weight"] is not None else torch.ones_like(norm)
                scale = gamma.abs() / (bn["running_var"].detach().double() + probe.eps).sqrt()
                norm = norm * scale[torch.as_tensor(pos)]  # the BatchNorm indexes the producer's rows
            np.add.at(m, chan, norm.cpu().numpy())
        return m

    @torch.no_grad()
    def sq_norms(self, gid: int) -> np.ndarray:
        """||theta_j||^2: every parameter entry of channel j (producer rows and per-channel parameters)."""
        sq = np.zeros(self.pruner.ctx.groups[gid].width)
        for s, pos, chan in self.slots[gid]:
            p = self.pruner.tensor(s.fqn)
            if isinstance(p, torch.nn.Parameter):
                rows = p.detach().movedim(s.dim, 0)[torch.as_tensor(pos)].reshape(len(pos), -1).double()
                np.add.at(sq, chan, rows.square().sum(1).cpu().numpy())
        return sq

    # ---- stages -------------------------------------------------------------------------------------------
    def _stage_widths(self, scores: dict[int, np.ndarray]) -> dict[int, int]:
        ctx = self.pruner.ctx
        t, frac = ctx.target, (self.stage + 1) / self.stages
        if self.final is not None:  # amount=: kept counts interpolated geometrically
            return {g: min(int(self.live[g].sum()), round_width(int(round(ctx.groups[g].width * (
                self.final[g] / ctx.groups[g].width) ** frac)), ctx.groups[g], t.round_to)) for g in scores}
        upper = np.array([g.width for g in ctx.groups])
        for g in scores:
            upper[g] = int(self.live[g].sum())
        goal = t.value ** frac
        w = np.minimum(fit_global(ctx.analysis, scores, ctx.cost, goal, t.metric, t.round_to), upper)
        w = fill(ctx.analysis, ctx.cost, w, None, goal, t.metric, t.round_to, upper=upper)  # removed stay removed
        return {g: int(w[g]) for g in scores}

    def _rank(self):
        """Pick this stage's weak channels (decided on rank 0, broadcast) and fix its boundaries theta."""
        if self.stage >= self.stages:
            self.weak, self.theta = {}, {}
            return
        weak, theta = {}, {}
        if distributed.rank() == 0:
            scores = {g: np.where(self.live[g], self.magnitudes(g), 0.0) for g in self.groups}
            widths = self._stage_widths({g: np.maximum(s, 1e-30) * self.live[g] for g, s in scores.items()})
            for g in self.groups:
                keep = np.zeros(len(scores[g]), dtype=bool)
                keep[self.pruner.ctx.keep_best(g, scores[g], widths[g])] = True
                w = self.live[g] & ~keep
                if w.any():
                    weak[g] = w
                    theta[g] = math.sqrt(max(float(scores[g][keep].min()), 1e-30) *
                                         max(float(scores[g][w].max()), 1e-30))
        self.weak, self.theta = distributed.broadcast_object((weak, theta))

    def after_step(self):
        while self.stage < self.stages and self.pruner.step >= self.ends[self.stage]:
            for g, w in self.weak.items():
                self.live[g] &= ~w
                self.pruner.set_mask(g, self.live[g].copy())
            self.stage += 1
            self._rank()

    # ---- the regularization gradient --------------------------------------------------------------------------
    def coefficients(self, gid: int) -> np.ndarray:
        """c_j of every channel (0 for masked ones) at the current parameters."""
        live, weak = self.live[gid], self.weak[gid]
        c = np.zeros(len(live))
        c[live] = factors(self.magnitudes(gid)[live], self.sq_norms(gid)[live], weak[live], self.theta[gid],
                          self.alpha)
        return c

    def _strength(self, lr: float, mom: float) -> float:
        if self.fixed_strength is not None:
            return self.fixed_strength
        start = self.ends[self.stage - 1] if self.stage > 0 else 0
        length = max(1, self.ends[self.stage] - start)
        return math.log(1.0 / self.shrink) * (1.0 - mom) / (lr * length) if lr > 0 else 0.0

    def _shared_coefficients(self) -> dict[int, np.ndarray]:
        """c of every group with weak channels, rank 0's under torchrun: the magnitudes read the BatchNorm running
        variance, which each rank's forward updates on its own batch, so the ranks' c differ slightly and the
        gradients they add (after DDP's all-reduce) would make their weights drift apart."""
        cs = {g: self.coefficients(g) for g in self.weak}
        if distributed.active() and cs:
            flat = distributed.broadcast(torch.as_tensor(np.concatenate(list(cs.values()))), 0,
                                         "Auto-Balanced's coefficients")
            at = 0
            for g, c in cs.items():
                cs[g] = flat[at:at + len(c)].numpy()
                at += len(c)
        return cs

    @torch.no_grad()
    def before_step(self):
        cs = self._shared_coefficients()
        for gid in self.weak:
            c = cs[gid]
            for s, pos, chan in self.slots[gid]:
                p = self.pruner.tensor(s.fqn)
                if not isinstance(p, torch.nn.Parameter) or p.grad is None:
                    continue
                lr, mom, _ = self.pruner.learning_rate(p)
                if lr <= 0:
                    continue
                self.strength = self._strength(lr, mom)
                coef = np.clip(self.strength * c[chan], -1.0 / lr, 1.0 / lr)
                index = torch.as_tensor(pos, device=p.device)
                shape = (-1,) + (1,) * (p.dim() - 1)
                g = p.grad.movedim(s.dim, 0)
                w = p.detach().movedim(s.dim, 0).index_select(0, index)
                add = torch.as_tensor(coef, dtype=p.dtype, device=p.device).reshape(shape) * w
                g.index_add_(0, index, add.to(g.dtype))

    # ---- the user's view -----------------------------------------------------------------------------------
    def balance(self) -> dict[str, float]:
        """sum over weak channels of c_j ||theta_j||^2 and the same over strong ones (they cancel at alpha=1)."""
        weak_sum = strong_sum = 0.0
        for g, w in self.weak.items():
            c, sq = self.coefficients(g), self.sq_norms(g)
            weak_sum += float(np.sum((c * sq)[w]))
            strong_sum += float(np.sum((c * sq)[self.live[g] & ~w]))
        return {"weak": weak_sum, "strong": strong_sum}

    def status(self) -> dict:
        ctx = self.pruner.ctx
        ratio = {}
        for g, w in self.weak.items():  # how far the stage has pushed its weak channels down
            m = self.magnitudes(g)
            ratio[ctx.groups[g].modules[0]] = float(m[w].mean() / max(m[self.live[g] & ~w].mean(), 1e-30))
        widths = [int(self.live[g.gid].sum()) if g.gid in self.live else g.width for g in ctx.groups]
        out = {"stage": self.stage, "stages": self.stages, "stage_ends": list(self.ends),
               "strength": self.strength, "weak_over_strong_magnitude": ratio, "balance": self.balance(),
               "live": {ctx.groups[g].modules[0]: f"{int(k.sum())}/{len(k)}" for g, k in self.live.items()}}
        if ctx.target.metric is not None:
            out[f"{ctx.target.metric}_live"] = ctx.cost.fraction(widths, ctx.target.metric)
        return out

    def decisions(self) -> dict[int, Decision]:
        keep = {g: k.copy() for g, k in self.live.items()}
        if self.stage < self.stages:  # finalize() came early: the last stage's cut by the current ranking
            saved = self.stage
            self.stage = self.stages - 1
            scores = {g: np.where(self.live[g], self.magnitudes(g), 0.0) for g in self.groups}
            widths = self._stage_widths({g: np.maximum(s, 1e-30) * self.live[g] for g, s in scores.items()})
            self.stage = saved
            for g in self.groups:
                keep[g] = np.zeros(len(scores[g]), dtype=bool)
                keep[g][self.pruner.ctx.keep_best(g, scores[g], widths[g])] = True
            self.pruner.ctx.notes.append("abfp: finalize() came before the last stage: the rest of the cut was "
                                         "chosen by the current fused-filter magnitudes")
        return {g: Decision(keep=np.flatnonzero(k), info={"pruned": int((~k).sum())})
                for g, k in keep.items() if not k.all()}

    def state_dict(self) -> dict:
        key = self.pruner.group_key
        return {"stage": self.stage, "live": {key(g): k.tolist() for g, k in self.live.items()},
                "weak": {key(g): w.tolist() for g, w in self.weak.items()},
                "theta": {key(g): t for g, t in self.theta.items()}}

    def load_state_dict(self, state: dict):
        gid = self.pruner.gid_of
        self.stage = int(state["stage"])
        self.live = {gid(k): np.asarray(v, dtype=bool) for k, v in state["live"].items()}
        self.weak = {gid(k): np.asarray(v, dtype=bool) for k, v in state["weak"].items()}
        self.theta = {gid(k): float(v) for k, v in state["theta"].items()}


def _check(stages, prune_by, alpha, strength, shrink):
    def num(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if not (isinstance(stages, numbers.Integral) and not isinstance(stages, bool) and stages >= 1):
        raise ConfigError(f"stages must be a positive int (pruning stages over the budget), got {stages!r}")
    if not (num(prune_by) and 0 < prune_by <= 1):
        raise ConfigError(f"prune_by must be in (0, 1] (the fraction of steps= by which the last stage has "
                          f"pruned), got {prune_by!r}")
    if not (num(alpha) and 0 <= alpha <= 1):
        raise ConfigError(f"alpha must be in [0, 1] (how much of the weak side the strong side balances), "
                          f"got {alpha!r}")
    if strength is not None and not (num(strength) and strength >= 0):
        raise ConfigError(f"strength must be a number >= 0, or None to schedule it from the budget, "
                          f"got {strength!r}")
    if not (num(shrink) and 0 < shrink < 1):
        raise ConfigError(f"shrink must be in (0, 1) (how far a stage pushes its weak channels down), "
                          f"got {shrink!r}")
