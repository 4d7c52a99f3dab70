"""Reconstruction and BatchNorm re-estimation from calibration data, for any method's decisions.

Given which channels each group keeps, one pass over the calibration data fits, for every tensor Z_j that a
group's consumers read (``Group.sources``), the k x n matrix T_j that best rebuilds the ORIGINAL model's Z_j from
the kept channels of the PRUNED model's Z_j (least squares, so upstream pruning error is corrected too):

    T_j = argmin ||Z_j^orig - Z_j^pruned[:, keep] T||_F = (A + lam I)^-1 B,
    A = Zk^T Zk, B = Zk^T Z_j^orig, Zk = Z_j^pruned[:, keep], lam = RIDGE * mean(diag A)

(the ridge keeps T finite when kept channels are dead or collinear; on a model with nothing pruned upstream it
is the interpolative decomposition's T for the same keep). In the same pass, every BatchNorm whose input the
pruning changed gets running statistics measured on the pruned model: the mean and the population variance of
its input over the calibration data, the values its eval-mode normalization then applies exactly.

The pass is layer-major: each node runs on every calibration chunk before the next node, so a statistic over the
whole calibration set is known before any later node uses it. It holds the live activations of all samples at
once (two copies: original and pruned); ``calibrate`` lowers the sample count to fit MEMORY_BUDGET and says so.

Example::

    cal = calibrate(plan, images, example_inputs)       # plan: rewrite.Plan of the method's decisions
    cal.T[gid]["relu_3"]                                  # k x n, folded by the consumers that read relu_3
    cal.bn["layers.0.bn1.running_mean"]                   # full width, sliced by the rewrite like any buffer
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import torch

from . import distributed
from .calibrate import as_rows, batches, group_columns
from .console import progress_bar
from .ops import bn_stat_args
from .reference import consumer_hooks, hooked_args
from .errors import RewriteError
from .rewrite import Decision, Plan

RIDGE = 1e-8
CHUNK = 100                      # samples per op call inside the layer-major pass
MEMORY_BUDGET = 4 * 2**30        # bytes of live activations the pass may hold (original + pruned)


def least_squares(A: np.ndarray, B: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """T = (A + lam I)^-1 B with lam = ridge * mean(diag A): the ridge least-squares solution of X T ~ Y given
    A = X^T X (k x k) and B = X^T Y (k x n)."""
    k = A.shape[0]
    lam = ridge * max(float(np.trace(A)) / max(k, 1), np.finfo(np.float64).tiny)
    M = A + lam * np.eye(k)
    try:
        return sla.cho_solve(sla.cho_factor(M, lower=False, check_finite=True), B)
    except np.linalg.LinAlgError:  # A not PSD to working precision (rounding in huge Grams): fall back
        return np.linalg.lstsq(M, B, rcond=None)[0]


@dataclass
class Calibration:
    """What the pass found: T per group and source, their relative errors ||Z - Zk T||_F / ||Z||_F, new BatchNorm
    statistics by buffer name (full width), and how many samples it used."""
    T: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    errors: dict[int, dict[str, float]] = field(default_factory=dict)
    bn: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0


@torch.no_grad()
def calibrate(plan: Plan, calib, example: tuple, *, reconstruct: bool = True, recalibrate_bn: bool = True,
              samples: int = 1000, ridge: float = RIDGE, progress: bool = True,
              notes: list | None = None, zeroed: dict[int, np.ndarray] | None = None) -> Calibration:
    """Fit T_j for every foldable source of every decided group (``reconstruct``) and re-estimate the BatchNorms
    downstream of a change (``recalibrate_bn``), in one layer-major pass over the calibration data. The fitted T_j
    replace the method's own T (or selection) in ``plan.decisions``, with their errors in each Decision's info.
    ``zeroed`` (group -> boolean per channel): channels the model reads as zero (a training-time method's masks);
    their columns of the original Z_j are zero in the fit, so T reproduces the masked model."""
    an = plan.an
    gm = an.gm
    fit = _fit_targets(plan) if reconstruct else {}
    hooks = consumer_hooks(plan)
    changed = _downstream(gm, set(hooks)) if recalibrate_bn else set()
    bns = {n.name: bn_stat_args(n) for n in gm.graph.nodes if n.name in changed and bn_stat_args(n) is not None}
    samples = _fit_memory(gm, samples, copies=2 if fit else 1, notes=notes)
    chunks = [xs for xs in batches(calib, example, samples, CHUNK)]
    cal = Calibration(samples=sum(c[0].shape[0] for c in chunks))
    last_fit = max((i for i, n in enumerate(gm.graph.nodes) if n.name in fit), default=-1)
    pruned, orig = _Env(gm, chunks), _Env(gm, chunks) if fit else None
    masked = _mask_plan(an, zeroed, notes) if fit and zeroed else None
    mask_hooks = consumer_hooks(masked) if masked is not None else {}
    nodes = progress_bar(list(gm.graph.nodes), desc="reconstructing", disable=not progress, leave=False)
    for i, node in enumerate(nodes):
        if orig is not None and i <= last_fit:
            if node.name in mask_hooks:  # the original as it was trained: masked channels read as zero
                orig.run(node, hook=lambda args: hooked_args(masked, node, mask_hooks[node.name], args))
            else:
                orig.run(node)
        if node.name in bns:
            (i, j), stats = bns[node.name], _bn_stats(pruned.args(node)[0])
            cal.bn[node.args[i].target], cal.bn[node.args[j].target] = stats
            pruned.run(node, override={i: stats[0], j: stats[1]})
        elif node.name in hooks:
            pruned.run(node, hook=lambda args: hooked_args(plan, node, hooks[node.name], args))
        else:
            pruned.run(node)
        for g, src in fit.get(node.name, []):
            T, err = _fit(plan, g, src, pruned.value(node), orig.value(node), ridge, (zeroed or {}).get(g))
            cal.T.setdefault(g, {})[src] = T
            cal.errors.setdefault(g, {})[src] = err
            _set_T(plan, g, src, T, err)  # later consumers of this source read the reconstruction
        pruned.free_after(node)
        if orig is not None:
            orig.free_after(node)
    return cal


def _mask_plan(an, zeroed: dict[int, np.ndarray], notes: list | None) -> Plan | None:
    """The masks as a plan of selections, for the reference hooks (None if there are none, or they break a
    group's constraints: then the unmasked model is the reference, and the report says so)."""
    decisions = {g: Decision(np.flatnonzero(~np.asarray(z, dtype=bool))) for g, z in zeroed.items() if np.any(z)}
    if not decisions:
        return None
    try:
        return Plan(an, decisions)
    except RewriteError as e:
        if notes is not None:
            notes.append(f"reconstruction fitted the unmasked model: the training masks are not a valid plan ({e})")
        return None


def _fit_targets(plan: Plan) -> dict[str, list[tuple[int, str]]]:
    """source node -> [(group, source)] for every foldable source of a decided group."""
    out: dict[str, list] = {}
    for g in plan.decisions:
        for src in plan.an.groups[g].foldable_sources:
            if group_columns(plan.an, src, g) is not None:
                out.setdefault(src, []).append((g, src))
    return out


def _set_T(plan: Plan, g: int, src: str, T: np.ndarray, err: float):
    d = plan.decisions[g]
    Ts = dict(d.T) if isinstance(d.T, dict) else {}
    Ts[src] = T
    info = {**d.info, "recon_error": {**d.info.get("recon_error", {}), src: err}}
    plan.decisions[g] = Decision(d.keep, Ts, info)


def _fit(plan: Plan, g: int, src: str, pruned: list, orig: list, ridge: float,
         zeroed: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    dim, P = group_columns(plan.an, src, g)
    live = None if zeroed is None else torch.as_tensor(~np.asarray(zeroed, dtype=bool), dtype=torch.float64)
    keep = torch.as_tensor(plan.decisions[g].keep)
    k, n = len(keep), P.shape[1]
    A = torch.zeros(k, k, dtype=torch.float64)
    B = torch.zeros(k, n, dtype=torch.float64)
    energy = torch.zeros(1, dtype=torch.float64)
    for zp, zo in zip(pruned, orig):
        X = as_rows(zp, dim, P)[..., keep].reshape(-1, k).double()
        Y = as_rows(zo, dim, P).reshape(-1, n).double()
        if live is not None:
            Y = Y * live
        A += X.T @ X
        B += X.T @ Y
        energy += Y.square().sum()
    A, B, energy = (distributed.allreduce_sum(t, f"reconstruction sums of {src}") for t in (A, B, energy))
    An, Bn, e = A.numpy(), B.numpy(), float(energy)
    T = least_squares(An, Bn, ridge)
    resid = e - 2 * float(np.sum(T * Bn)) + float(np.sum(T * (An @ T)))
    return T, math.sqrt(max(resid, 0.0) / e) if e > 0 else 0.0  # relative Frobenius error


def _bn_stats(chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over all chunks (channels in dim 1), in float64."""
    c = chunks[0].shape[1]
    acc = torch.zeros(3, c, dtype=torch.float64)
    for x in chunks:
        xd = x.detach().transpose(0, 1).reshape(c, -1)
        acc[0] += xd.sum(1, dtype=torch.float64)
        acc[1] += xd.square().sum(1, dtype=torch.float64)
        acc[2] += xd.shape[1]
    acc = distributed.allreduce_sum(acc, "BatchNorm statistics")
    mean = acc[0] / acc[2]
    var = (acc[1] / acc[2] - mean.square()).clamp_min(0.0)
    dtype = chunks[0].dtype
    return mean.to(dtype), var.to(dtype)


def _downstream(gm, starts: set[str]) -> set[str]:
    out, todo = set(), [n for n in gm.graph.nodes if n.name in starts]
    while todo:
        n = todo.pop()
        if n.name in out:
            continue
        out.add(n.name)
        todo.extend(n.users)
    return out


def _fit_memory(gm, samples: int, copies: int, notes: list | None) -> int:
    """The largest sample count (<= samples) whose live activations fit MEMORY_BUDGET."""
    per_sample = _peak_bytes_per_sample(gm) * copies
    fits = max(1, int(MEMORY_BUDGET // max(per_sample, 1)))
    if fits < samples:
        if notes is not None:
            notes.append(f"reconstruction and BatchNorm re-estimation used {fits} of {samples} calibration samples "
                         f"(the layer-major pass holds every sample's live activations: "
                         f"{per_sample / 2**20:.1f} MiB each, budget {MEMORY_BUDGET / 2**30:.0f} GiB)")
        return fits
    return samples


def _peak_bytes_per_sample(gm) -> int:
    nodes = list(gm.graph.nodes)
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    live, peak = {}, 0
    for i, n in enumerate(nodes):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and n.op == "call_function" and val.dim() > 0:
            live[n] = math.prod(s if isinstance(s, int) else 1 for s in val.shape) * val.element_size()
        peak = max(peak, sum(live.values()))
        for a in [a for a in live if last.get(a, -1) <= i]:
            del live[a]
    return peak


class _Env:
    """Values of one run of the graph, a list per node with one entry per calibration chunk."""

    def __init__(self, gm, chunks: list[tuple]):
        self.gm = gm
        self.chunks = chunks
        self.vals: dict = {}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.last_use = {}
        for n in gm.graph.nodes:
            for a in n.all_input_nodes:
                self.last_use[a] = n

    def value(self, node) -> list:
        return self.vals[node]

    def args(self, node) -> tuple:
        """The node's args per position, each a list over chunks for tensor-valued inputs."""
        return tuple(self._per_chunk(a) for a in node.args)

    def _per_chunk(self, a):
        return self.vals[a] if isinstance(a, torch.fx.Node) else a

    def run(self, node, override: dict | None = None, hook=None):
        if node.op == "placeholder":
            i = self.placeholders.index(node)
            self.vals[node] = [c[i] for c in self.chunks]
        elif node.op == "get_attr":
            self.vals[node] = [_fetch_attr(self.gm, node.target)] * len(self.chunks)
        elif node.op in ("call_function", "call_module"):
            fn = node.target if node.op == "call_function" else self.gm.get_submodule(node.target)
            outs = []
            for i in range(len(self.chunks)):
                pick = lambda a, i=i: self.vals[a][i]  # noqa: E731
                args = list(torch.fx.node.map_arg(node.args, pick))
                kwargs = torch.fx.node.map_arg(node.kwargs, pick)
                for pos, v in (override or {}).items():
                    args[pos] = v
                if hook is not None:
                    args = list(hook(tuple(args)))
                outs.append(fn(*args, **kwargs))
            self.vals[node] = outs

    def free_after(self, node):
        for a in node.all_input_nodes:
            if self.last_use.get(a) is node:
                self.vals.pop(a, None)


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
