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

The pass is sequential, block by block (fxprune/blockwise.py, as SparseGPT-style tools move calibration data): each
segment of the graph runs on every calibration chunk before the next one starts, with a cut after every fitted
source and before every re-estimated BatchNorm, so a statistic over the whole calibration set is known before any
later node uses it, and the next block runs on the PRUNED outputs. It holds, for all samples, only the values that
cross the current cut (two copies: original and pruned), plus one chunk's activations inside the block; it stops
at the last node it needs (a language model's logits are never computed). ``calibrate`` lowers the sample count to
fit MEMORY_BUDGET and says so.

Example::

    cal = calibrate(plan, images, example_inputs)       # folds the fitted T into plan (rewrite.Plan)
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
from .blockwise import Segments, Stream, example_batch, live_after, plan_hook
from .calibrate import as_rows, batches, group_columns
from .capture import dynamic_dims
from .console import progress_bar
from .ops import bn_stat_args
from .reference import consumer_hooks, hooked_args
from .errors import RewriteError
from .rewrite import Decision, Plan

RIDGE = 1e-8
CHUNK = 8                        # samples per op call: inside a block only one chunk's activations are alive
MEMORY_BUDGET = 4 * 2**30        # bytes of block-boundary values the pass may hold (original + pruned)


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
    downstream of a change (``recalibrate_bn``), in one sequential pass over the calibration data. The fitted T_j
    are folded into ``plan`` (Plan.fold: the one plan of the prune), with their errors in each Decision's info.
    ``zeroed`` (group -> boolean per channel): channels the model reads as zero (a training-time method's masks);
    their columns of the original Z_j are zero in the fit, so T reproduces the masked model."""
    an = plan.an
    gm = an.gm
    fit = _fit_targets(plan) if reconstruct else {}
    hooks = consumer_hooks(plan)
    changed = _downstream(gm, set(hooks)) if recalibrate_bn else set()
    bns = {n.name: bn_stat_args(n) for n in gm.graph.nodes if n.name in changed and bn_stat_args(n) is not None}
    seg, last_fit = _segments(gm, fit, bns)
    samples = _fit_memory(gm, seg, samples, copies=2 if fit else 1, notes=notes)
    chunks = [xs for xs in batches(calib, example, samples, CHUNK, dynamic_dims(gm))]
    cal = Calibration(samples=sum(c[0].shape[0] for c in chunks))
    masked = _mask_plan(an, zeroed, notes) if fit and zeroed else None
    stats: dict[str, tuple] = {}
    pruned = Stream(gm, chunks, _pruned_hook(plan, hooks, bns, stats))
    orig = Stream(gm, chunks, plan_hook(masked) if masked is not None else lambda n: None) if fit else None
    for a, b in progress_bar(seg.spans, desc="reconstructing", disable=not progress, leave=False, unit="block"):
        first, last = seg.nodes[a], seg.nodes[b]
        if first.name in bns:  # a BatchNorm starts its segment: its input is known on every chunk
            (i, j), stats[first.name] = bns[first.name], _bn_stats(pruned.value(first.args[0]))
            cal.bn[first.args[i].target], cal.bn[first.args[j].target] = stats[first.name]
        if orig is not None:  # the original (as it was trained: masked channels read as zero)
            orig.segment(seg, (a, b))
        pruned.segment(seg, (a, b))
        for g, src in fit.get(last.name, []):  # a fitted source ends its segment: T before any consumer runs
            T, err = _fit(plan, g, src, pruned.value(last), orig.value(last), ridge, (zeroed or {}).get(g))
            cal.T.setdefault(g, {})[src] = T
            cal.errors.setdefault(g, {})[src] = err
            plan.fold(g, src, T, err)  # later consumers of this source read the reconstruction
        if orig is not None and b >= last_fit:
            orig = None
    return cal


def _segments(gm, fit: dict, bns: dict):
    """The cut for the sequential pass, and the index of the last fitted source. Forced cuts: after each fitted
    source (its T is solved before a consumer reads it) and before each re-estimated BatchNorm (its statistics
    are measured on every chunk first); the pass ends at the last node it needs."""
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    last_fit = max((index[s] for s in fit), default=-1)
    stop = max([last_fit, 0] + [index[b] for b in bns])
    cuts = [index[s] for s in fit] + [index[b] - 1 for b in bns if index[b] > 0] + [stop]
    return Segments(nodes[:stop + 1], cuts), last_fit


def _pruned_hook(plan: Plan, hooks: dict, bns: dict, stats: dict):
    """Stream hook of the pruned model: consumers read their reconstruction, BatchNorms their new statistics."""
    def hook(node):
        if node.name in bns:
            (i, j), (mean, var) = bns[node.name], stats[node.name]
            return lambda args: tuple(mean if k == i else var if k == j else a for k, a in enumerate(args))
        if node.name in hooks:
            return lambda args: hooked_args(plan, node, hooks[node.name], args)
        return None
    return hook


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


def _fit_memory(gm, seg: Segments, samples: int, copies: int, notes: list | None) -> int:
    """The largest sample count (<= samples) whose values crossing the segments' cuts fit MEMORY_BUDGET."""
    per_sample = _boundary_bytes_per_sample(gm, seg) * copies
    fits = max(1, int(MEMORY_BUDGET // max(per_sample, 1)))
    if fits < samples:
        if notes is not None:
            notes.append(f"reconstruction and BatchNorm re-estimation used {fits} of {samples} calibration samples "
                         f"(the sequential pass holds every sample's values at a block boundary: "
                         f"{per_sample / 2**20:.1f} MiB each, budget {MEMORY_BUDGET / 2**30:.0f} GiB)")
        return fits
    return samples


def _boundary_bytes_per_sample(gm, seg: Segments) -> float:
    live = live_after(seg.nodes, seg.last_use, example_batch(gm))
    return max((live[b] for _, b in seg.spans), default=0.0)


