"""Verification: the slim model against a reference built by another route.

The reference is the ORIGINAL graph, full width, run with a hook at every consumer (conv/linear that reads a
pruned group): its input Z is replaced by Z[:, keep] @ T (for a selection: pruned channels zeroed). Nothing is
sliced or folded on this route, so it catches slicing, index-map, flatten-order and folding bugs alike.
A second check runs the user's slimmed eager module against the slim graph, which catches a forward that
hard-codes a width and names the module.

Both comparisons are normwise relative: max|slim - ref| / max|ref| <= rtol, with rtol = 1e-4 for float32
(float32 rounding through ~60 layers and an ID-folded T stays well below it; a wrong channel gives O(1)).

Example::

    report = check_against_reference(plan, original_gm, slim_gm, example_inputs)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from .errors import VerificationError
from .rewrite import Plan, segments

RTOL = 1e-4


class HookedInterpreter(Interpreter):
    """Runs the original graph, replacing each consumer's input channels by their reconstruction.
    ``capture`` names nodes whose outputs are kept in ``captured`` (calibration reads the partly-pruned
    model's activations this way, at full width and with the original group numbering)."""

    def __init__(self, gm: GraphModule, plan: Plan, capture: set[str] = frozenset()):
        super().__init__(gm)
        self.plan = plan
        self.capture = set(capture)
        self.captured: dict[str, torch.Tensor] = {}
        an = plan.an
        self.hooks: dict[str, list] = {}
        for s in an.slots.values():
            if s.role not in ("in", "grouped_in"):
                continue
            gid, idx = an.positions(s)
            if not np.isin(gid, list(plan.decisions)).any():
                continue
            for user in an.param_users[s.fqn]:
                dim = an.cmap(user.args[0]).dim  # where the consumer's input carries the channels
                self.hooks.setdefault(user.name, []).append((s, gid, idx, dim))

    def run_node(self, n):
        if n.name in self.hooks:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            for s, gid, idx, dim in self.hooks[n.name]:
                x = self._reconstruct(x, s, gid, idx, dim)
            out = getattr(self, n.op)(n.target, (x, *args[1:]), kwargs)
        else:
            out = super().run_node(n)
        if n.name in self.capture:
            self.captured[n.name] = out
        return out

    def _reconstruct(self, x: torch.Tensor, s, gid, idx, dim) -> torch.Tensor:
        out = x.clone()
        for (g, _, _), P in segments(gid, idx, s.tags).items():
            d = self.plan.decisions.get(g)
            if d is None:
                continue
            pos = torch.as_tensor(P)
            if d.T is None or d.is_selection() or len(P) != self.plan.an.groups[g].width:
                dropped = pos[torch.as_tensor(~self.plan.keep_mask[g][idx[P]])]
                out.index_fill_(dim, dropped, 0.0)
            else:
                zk = x.index_select(dim, pos[torch.as_tensor(d.keep)]).movedim(dim, -1)
                rebuilt = (zk @ torch.as_tensor(d.T, dtype=x.dtype)).movedim(-1, dim)
                out.index_copy_(dim, pos, rebuilt)
        return out


def random_like(example: tuple, seed: int = 0) -> tuple:
    """Fresh inputs shaped like the examples: normal floats; integer inputs are reused (token ids etc.)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(a.shape, generator=gen, dtype=a.dtype) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in example)


def rel_diff(a, b) -> float:
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return float("inf")
        scale = y.abs().max().item() if y.numel() else 0.0
        worst = max(worst, (x - y).abs().max().item() / max(scale, 1e-12) if y.numel() else 0.0)
    return worst


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().double()]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if hasattr(out, "to_tuple"):
        return _flat(out.to_tuple())
    return []


@torch.no_grad()
def check_against_reference(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, inputs: tuple,
                            rtol: float = RTOL, notes: list | None = None) -> float:
    """Slim graph vs the hooked full-width original. Returns the relative difference or raises; appends to
    ``notes`` when the check is weak (outputs ~0 on random inputs, e.g. zero-initialized heads)."""
    ref = HookedInterpreter(original_gm, plan).run(*inputs)
    try:
        got = slim_gm(*inputs)
    except Exception as exc:  # noqa: BLE001 - a slim graph that cannot run is a verification failure
        groups = ", ".join(f"{g} ({'/'.join(plan.an.groups[g].modules)})" for g in plan.decisions)
        raise VerificationError(f"the slim graph fails to run ({type(exc).__name__}: {exc}). Pruned groups: "
                                f"{groups}. This is a bug in fxprune's analysis or rewrite; please report it.") from exc
    diff = rel_diff(got, ref)
    scale = max((t.abs().max().item() for t in _flat(ref) if t.numel()), default=0.0)
    if notes is not None and scale < 1e-12:
        notes.append(f"verification is weak: the model's outputs are ~0 (max {scale:.1e}) on random inputs, so "
                     "a relative comparison says little; train the model (or load its weights) first")
    if not diff <= rtol:
        groups = ", ".join(f"{g} ({'/'.join(plan.an.groups[g].modules)})" for g in plan.decisions)
        raise VerificationError(
            f"the slim graph disagrees with the masked reference: relative difference {diff:.3g} > {rtol:g}. "
            f"Pruned groups: {groups}. This is a bug in fxprune's analysis or rewrite; please report it with "
            "the model. Pass verify=False to get the unverified result anyway.")
    return diff


@torch.no_grad()
def check_eager_matches_graph(slim_model: nn.Module, slim_gm: GraphModule, inputs: tuple,
                              rtol: float = RTOL) -> float:
    """The user's slimmed eager module vs the slim graph; names the first module that breaks or differs."""
    recorder = _ModuleRecorder(slim_model)
    try:
        got = slim_model(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported with the module that raised
        raise VerificationError(
            f"the slimmed model's forward fails in module '{recorder.current or type(slim_model).__name__}': "
            f"{type(exc).__name__}: {exc}. Its forward probably hard-codes a channel count; compute it from the "
            "tensor (x.size(1), x.flatten(1)) or exclude that module with ignore=[...].") from exc
    finally:
        recorder.remove()
    ref = slim_gm(*inputs)
    diff = rel_diff(got, ref)
    if not diff <= rtol:
        raise VerificationError(
            f"the slimmed eager model disagrees with the slim graph (relative difference {diff:.3g}). Its forward "
            "probably slices or splits channels at hard-coded offsets; exclude those modules with ignore=[...].")
    return diff


class _ModuleRecorder:
    """Tracks the innermost module running, so an exception can be blamed on it."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.current = ""
        self.handles = []
        for name, mod in model.named_modules():
            if name:
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave()))

    def _enter(self, name):
        def hook(mod, args):
            self.stack.append(name)
            self.current = name
        return hook

    def _leave(self):
        def hook(mod, args, out):
            if self.stack:
                self.stack.pop()
            self.current = self.stack[-1] if self.stack else ""
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
