"""Centripetal SGD (Ding et al., CVPR 2019), method "csgd": train twins together, then merge them losslessly.

Per channel GROUP (so every producer of a coupled residual stage follows the same clusters: the authors'
pacesetter/follower rule falls out of the analysis) the channels are split into k clusters, k from the same
width solver as every method (amount / target_flops / target_params, round_to). Clusters: k-means
(scipy.cluster.vq.kmeans2, seeded, on rank 0 and broadcast) on the channel's kernels concatenated over the
group's producers, or an even split (``cluster="even"``); grouped convs and chunks cluster within each block.

Before every optimizer step, for every channel i of cluster H, on every producer row and per-channel parameter:

    g_i' = mean_{j in H} g_j + eta * w_i + eps * (w_i - mean_{j in H} w_j)

(kernels take eps; biases and BatchNorm weight/bias take 0.1 * eps, as in the authors' current code). The eta
term is the weight decay: it is added only where the optimizer's own weight_decay is 0 for that parameter, so
decay is never applied twice (with weight_decay > 0 the optimizer's decay plays eta's role). Twins then receive
identical gradients and their differences shrink by about lr_eff * (eps + eta) per step, whatever the data.

Schedule (``steps=``): eps starts at ``eps`` (the authors' 3e-3) and is raised when needed so that the clusters
have converged by the end of the budget. At the start and every ``check_every`` steps the within-cluster spreads
of the kernels and of the per-channel vectors are measured (rho, relative to their start); the contraction needed is
r = (converge / rho)^(1 / steps_left), and under SGD with momentum m the twins' differences contract by r when
lr * eps = 1 + m - r - m / r (the slower root of the momentum recursion), at most by sqrt(m) per step (critical
damping). eps = max(eps, that / lr). The authors keep eps constant over 600 epochs; a budget of a few epochs needs
this. With SGD the final spread is <= ``converge``; adaptive optimizers (Adam) converge only to within their step.

finalize(): each cluster keeps its lowest-index channel; T[j, c] = 1 for every member c of kept channel j's
cluster, so consumers add their input weights over the cluster: lossless once kernels, BatchNorm parameters and
running statistics have converged (status() reports all three spreads). With calib=, the core's least-squares
reconstruction refits T from data instead (exact as well once converged). Groups whose consumers cannot absorb T
(grouped convs, partial reads) cannot merge and stay at full width (noted in status()), and so does the residual
stream under prune_hidden=True: an RMSNorm over it takes a selection only, and its mean of squares over the kept
channels is not the one over every twin the trained model computed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.cluster.vq as vq
import torch

from fxprune.method import ConfigError, Decision, TrainingMethod, distributed, norm_inputs

from . import register


VECTOR_FACTOR = {"kernels": 1.0, "bn_params": 0.1}  # eps multiplier: kernels, per-channel vectors


@register("csgd")
class CSGD(TrainingMethod):
    def __init__(self, pruner, *, eps: float = 3e-3, eta: float = 1e-4, cluster: str = "kmeans", seed: int = 0,
                 converge: float = 1e-4, check_every: int = 20):
        super().__init__(pruner)
        for name, v in (("eps", eps), ("eta", eta)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if cluster not in ("kmeans", "even"):
            raise ConfigError(f"cluster must be 'kmeans' or 'even', got {cluster!r}")
        if not (isinstance(converge, float) and 0 < converge < 1):
            raise ConfigError(f"converge must be in (0, 1) (the relative within-cluster spread to reach), "
                              f"got {converge!r}")
        self.eps0, self.eps, self.eta, self.converge = float(eps), float(eps), float(eta), converge
        self.check_every = int(check_every)
        self.notes: list[str] = []
        self.clusters = self._make_clusters(cluster, seed)   # gid -> cluster label per channel
        self.spread0 = None
        self._schedule()

    # ---- clusters -----------------------------------------------------------------------------------------
    def _make_clusters(self, how: str, seed: int) -> dict[int, np.ndarray]:
        ctx = self.pruner.ctx
        for gid in list(ctx.prunable):
            g = ctx.groups[gid]
            bad = [s for s in g.sources.values() if not s.foldable]
            if bad:  # the merge needs every consumer to sum its input weights over a cluster
                why = f"csgd cannot merge here: consumers of {bad[0].node} cannot absorb T ({bad[0].why})"
                ctx.freeze(gid, why)
                self.notes.append(f"group {gid} ({', '.join(g.modules)}) stays at full width: {why}")
                continue
            norms, lost = norm_inputs(self.pruner, gid)
            if norms or lost:  # the residual stream (prune_hidden=True): an RMSNorm averages over the twins
                why = (f"csgd cannot merge here: RMSNorm {norms[0].fqn if norms else lost[0]} normalizes over "
                       "these channels and takes a selection only (its slim mean of squares is over the kept "
                       "channels, eps * n / k), not the sum over each cluster's twins the trained norm sees, so "
                       "the merge would not be lossless")
                ctx.freeze(gid, why)
                self.notes.append(f"group {gid} ({', '.join(g.modules)}) stays at full width: {why}")
        widths = ctx.widths()
        labels = {}
        if distributed.rank() == 0:
            for gid, k in widths.items():
                if k < ctx.groups[gid].width:
                    labels[gid] = self._cluster(gid, k, how, seed)
        return distributed.broadcast_object(labels)

    def _cluster(self, gid: int, k: int, how: str, seed: int) -> np.ndarray:
        g = self.pruner.ctx.groups[gid]
        n = g.width
        feats = self._features(gid)
        blocks = g.block_of if g.block_of is not None else np.zeros(n, dtype=np.int64)
        nb = int(blocks.max()) + 1
        labels = np.zeros(n, dtype=np.int64)
        for b in range(nb):  # every block keeps the same count (grouped convs, chunks)
            members = np.flatnonzero(blocks == b)
            kb = k // nb
            if how == "even":
                local = np.arange(len(members)) * kb // len(members)
            else:
                local = _kmeans(feats[members], kb, seed)
            labels[members] = local + b * kb
        return labels

    def _features(self, gid: int) -> np.ndarray:
        """One row per channel: its rows in every producer, concatenated (zeros where a producer lacks it)."""
        n = self.pruner.ctx.groups[gid].width
        parts = []
        for s, pos, chan in self.pruner.group_slots(gid, roles=("out",)):
            w = self.pruner.tensor(s.fqn).detach().movedim(s.dim, 0)
            rows = w[torch.as_tensor(pos)].flatten(1).double().numpy()
            block = np.zeros((n, rows.shape[1]))
            block[chan] = rows
            parts.append(block)
        return np.concatenate(parts, axis=1) if parts else np.zeros((n, 1))

    # ---- the gradient transform ---------------------------------------------------------------------------
    def _targets(self) -> list:
        """(fqn, dim, positions, cluster label per position) of every parameter the rule transforms, built once
        (the per-step work is then a few tensor ops per parameter)."""
        if getattr(self, "_cached", None) is None:
            self._cached = [(s.fqn, s.dim, torch.as_tensor(pos), torch.as_tensor(labels[chan]))
                            for gid, labels in self.clusters.items() for s, pos, chan in self.pruner.group_slots(gid)
                            if isinstance(self.pruner.tensor(s.fqn), torch.nn.Parameter)]
        return self._cached

    @torch.no_grad()
    def before_step(self):
        for fqn, dim, index, lab in self._targets():
            p = self.pruner.tensor(fqn)
            if p.grad is None:
                continue
            lr, mom, wd = self.pruner.learning_rate(p)
            eps = self.eps * VECTOR_FACTOR["kernels" if p.dim() > 1 else "bn_params"]
            eta = self.eta if wd == 0 and p.dim() > 1 else 0.0
            index, lab = index.to(p.device), lab.to(p.device)
            w = p.detach().movedim(dim, 0).index_select(0, index)
            g = p.grad.movedim(dim, 0)
            new = _cluster_mean(g.index_select(0, index), lab) + eta * w + eps * (w - _cluster_mean(w, lab))
            g.index_copy_(0, index, new.to(g.dtype))

    def after_step(self):
        if self.pruner.step % self.check_every == 0:
            self._schedule()

    def _schedule(self):
        """Raise eps so the spreads reach ``converge`` (relative to their start) by the end of the budget."""
        spread = self.spread()
        if self.spread0 is None:
            self.spread0 = {k: spread[k] for k in VECTOR_FACTOR}
        left = self.pruner.steps - self.pruner.step
        lr, mom = self._lr_momentum()
        if left <= 0 or lr <= 0:
            return
        need = self.eps0
        for kind, factor in VECTOR_FACTOR.items():  # kernels pull with eps, biases and BatchNorm with 0.1 eps
            ratio = spread[kind] / self.spread0[kind] if self.spread0[kind] > 0 else 0.0
            if ratio > self.converge:
                need = max(need, _contraction_gain(self.converge / ratio, left, mom) / (factor * lr))
        self.eps = need

    def _lr_momentum(self) -> tuple[float, float]:
        for gid in self.clusters:
            for s, _, _ in self.pruner.group_slots(gid, roles=("out",)):
                lr, mom, _ = self.pruner.learning_rate(self.pruner.tensor(s.fqn))
                return lr, mom
        return 0.0, 0.0

    # ---- state, status, decisions ---------------------------------------------------------------------------
    @torch.no_grad()
    def spread(self) -> dict[str, float]:
        """Relative within-cluster spread sqrt(sum ||x_i - mean_H x||^2 / sum ||x_i||^2), worst group, for the
        kernels, the per-channel parameters (bias, BatchNorm) and the BatchNorm running statistics."""
        worst = {"kernels": 0.0, "bn_params": 0.0, "running_stats": 0.0}
        for gid, labels in self.clusters.items():
            acc = {k: [0.0, 0.0] for k in worst}
            for s, pos, chan in self.pruner.group_slots(gid):
                t = self.pruner.tensor(s.fqn)
                kind = ("kernels" if t.dim() > 1 else "bn_params") if isinstance(t, torch.nn.Parameter) \
                    else "running_stats"
                if not t.is_floating_point():
                    continue
                x = t.detach().movedim(s.dim, 0)[torch.as_tensor(pos)].double()
                dev = x - _cluster_mean(x, torch.as_tensor(labels[chan]))
                acc[kind][0] += float(dev.square().sum())
                acc[kind][1] += float(x.square().sum())
            for k, (num, den) in acc.items():
                if den > 0:
                    worst[k] = max(worst[k], math.sqrt(num / den))
        return worst

    def status(self) -> dict:
        ctx = self.pruner.ctx
        widths = [len(set(self.clusters[g.gid].tolist())) if g.gid in self.clusters else g.width for g in ctx.groups]
        out = {"eps": self.eps, "spread": self.spread(), "groups_clustered": len(self.clusters)}
        if ctx.target.metric is not None:
            out[f"{ctx.target.metric}_after_merge"] = ctx.cost.fraction(widths, ctx.target.metric)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def decisions(self) -> dict[int, Decision]:
        out = {}
        for gid, labels in self.clusters.items():
            n = len(labels)
            k = int(labels.max()) + 1
            keep = np.array([np.flatnonzero(labels == c).min() for c in range(k)])
            order = np.argsort(keep)
            keep = keep[order]
            T = np.zeros((k, n))
            for j, c in enumerate(np.arange(k)[order]):
                T[j, labels == c] = 1.0
            out[gid] = Decision(keep, T, {"cluster_sizes": float(np.mean(np.bincount(labels)))})
        return out

    def state_dict(self) -> dict:
        return {"clusters": {self.pruner.group_key(g): lab.tolist() for g, lab in self.clusters.items()},
                "eps": self.eps, "spread0": self.spread0}

    def load_state_dict(self, state: dict):
        self.clusters = {self.pruner.gid_of(k): np.asarray(v, dtype=np.int64) for k, v in state["clusters"].items()}
        self._cached = None
        self.eps, self.spread0 = float(state["eps"]), dict(state["spread0"])


def _contraction_gain(goal: float, steps: int, momentum: float) -> float:
    """The smallest lr * (eps + eta) that shrinks twin differences by ``goal`` within ``steps`` steps of SGD with
    momentum m. The differences follow d' = d - lr v', v' = m v + c d: two modes with roots r and m / r where
    lr c = 1 + m - r - m / r; from rest, the slow mode starts with weight r (r - m) / (r^2 - m), which grows
    without bound as r nears sqrt(m) (critical damping), so the fastest useful r is found numerically."""
    s = math.sqrt(momentum)
    r = s + (1.0 - s) * np.linspace(1e-4, 1.0 - 1e-9, 4000)  # from near-critical to no pull at all
    shrink = r ** steps * (r * (r - momentum) / np.maximum(r * r - momentum, 1e-300) if momentum > 0 else 1.0)
    ok = np.flatnonzero(shrink <= goal)
    best = r[ok[-1]] if len(ok) else r[np.argmin(shrink)]  # the weakest pull that reaches the goal
    return float(1.0 + momentum - best - momentum / best)


def _cluster_mean(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean of its cluster's rows (dim 0)."""
    k = int(labels.max()) + 1
    sums = torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (sums / counts).index_select(0, labels)


def _kmeans(feats: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels 0..k-1 with no empty cluster (an empty one takes the point farthest from its centroid)."""
    if k >= len(feats):
        return np.arange(len(feats))
    with warnings.catch_warnings():  # an empty cluster is repaired below
        warnings.simplefilter("ignore")
        _, labels = vq.kmeans2(feats, k, minit="++", seed=np.random.default_rng(seed))
    for c in range(k):
        if not (labels == c).any():
            sizes = np.bincount(labels, minlength=k)
            big = np.flatnonzero(labels == np.argmax(sizes))
            centre = feats[big].mean(0)
            labels[big[np.argmax(((feats[big] - centre) ** 2).sum(1))]] = c
    _, labels = np.unique(labels, return_inverse=True)  # 0..k-1 in order of first appearance of a label value
    return labels.astype(np.int64)
