"""The slim graph against the hooked reference, node by node: the tensors verification compares.

A model's output can be numerically blind to what was pruned (a zero-initialized head, a layer scale of 1e-6),
so outputs alone prove little. Both graphs are therefore run in lockstep (the slim graph is a copy of the
original with the same node names) and compared at the output of every consumer that reads a pruned group
(the conv/linear whose input the reference rebuilds as Z[:, keep] @ T) and at the model's outputs. Where a
consumer's own output channels are pruned too, the reference's kept rows are compared. Only the values both
graphs still need are alive at a time (each interpreter frees a value after its last use), so memory stays
about two forwards, not every intermediate of both.

Example::

    run = compare(plan, original_gm, slim_gm, (x,))
    run.checks[0]          # Check(name='convolution_1', module='c2', diff=3e-8, scale=1.9, groups=(0,))
    run.first_failure(1e-4)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node

from .capture import node_module_path
from .ops import handler
from .reference import HookedInterpreter, hooked_args

TINY = 1e-12  # a reference tensor this small (max |ref|) is ~0: no relative comparison means anything there
# An inner tensor's accumulated difference may exceed rtol by this factor: each folded T amplifies the float
# rounding that reaches it (measured: 2.1e-4 at MobileNetV2's 9th block with least-squares T from 24 samples,
# output 2.7e-5), while a wrong channel, fold or slice gives O(1). The consumer's own rewrite is held to rtol.
DRIFT = 100.0


@dataclass(frozen=True)
class Check:
    """One compared tensor: a consumer's output (node ``name`` of ``module``, reading pruned ``groups``) or a
    model output ('output' / 'output[i]'). ``diff`` = max|slim - ref| / max|ref| over finite entries (inf on a
    shape or finiteness mismatch), ``scale`` = max|ref|."""
    name: str
    module: str
    groups: tuple[int, ...]
    diff: float
    scale: float
    local: float | None = None  # the consumer alone: its slim op vs the reference op on the SLIM graph's input

    @property
    def is_output(self) -> bool:
        return self.name.startswith("output")

    def failed(self, rtol: float) -> bool:
        """Outputs and a consumer's own rewrite (``local``) are held to ``rtol``; the accumulated difference at
        an inner tensor (``diff``) to DRIFT x rtol (float rounding compounds through reconstructions)."""
        if self.is_output:
            return not self.diff <= rtol
        return not self.diff <= DRIFT * rtol or (self.local is not None and not self.local <= rtol)

    @property
    def certified(self) -> float:
        """The number this check contributes to the certificate (held to rtol): local where known."""
        return self.diff if self.is_output or self.local is None else self.local

    @property
    def vacuous(self) -> bool:
        """The reference is ~0 here: agreement proves nothing (a zero-initialized head)."""
        return self.scale <= TINY

    def describe(self) -> str:
        where = f"node '{self.name}'" + (f" (module '{self.module}')" if self.module else "")
        if self.groups:
            where += f", reading pruned group{'s' if len(self.groups) > 1 else ''} {', '.join(map(str, self.groups))}"
        return where


@dataclass
class Comparison:
    """The outcome of one lockstep run: the checks in graph order, and whether the reference's outputs are
    finite (a non-finite reference verifies nothing; other inputs are tried)."""
    checks: list[Check]
    reference_finite: bool
    followed: list[str] = field(default_factory=list)  # value-selecting ops given the reference's result

    def first_failure(self, rtol: float) -> Check | None:
        return next((c for c in self.checks if c.failed(rtol)), None)

    @property
    def worst(self) -> float:
        """The certificate's number: the worst model-output or local consumer difference."""
        return max((c.certified for c in self.checks), default=0.0)


class SlimGraphFailed(Exception):
    """The slim graph raised while running ``node`` (kept as the cause)."""

    def __init__(self, node, exc: Exception):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


BLOCK = 1 << 20  # elements compared at a time: float64 copies of a language model's logits would cost 4x them


def abs_diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float] | None:
    """(max|got - ref|, max|ref|) in float64 over the entries where ref is finite, a block at a time; None when
    the shapes or the places of non-finite values differ."""
    if got.shape != ref.shape:
        return None
    got, ref = got.detach().reshape(-1), ref.detach().reshape(-1)
    diff = scale = 0.0
    for i in range(0, ref.numel(), BLOCK):
        r, g = ref[i:i + BLOCK].double(), got[i:i + BLOCK].double()
        fin = torch.isfinite(r)
        if not torch.equal(torch.isfinite(g), fin):
            return None
        if fin.all():
            scale, diff = max(scale, r.abs().max().item()), max(diff, (g - r).abs().max().item())
        elif fin.any():
            scale, diff = max(scale, r[fin].abs().max().item()), max(diff, (g[fin] - r[fin]).abs().max().item())
    return diff, scale


def tensor_diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|got - ref| / max|ref|, max|ref|) over the entries where ref is finite; inf when the shapes or the
    places of non-finite values differ."""
    found = abs_diff(got, ref)
    if found is None:
        fin = torch.isfinite(ref.detach())
        return float("inf"), (ref.detach()[fin].abs().max().double().item() if fin.any() else 0.0)
    diff, scale = found
    return (diff / max(scale, TINY) if diff else 0.0), scale


def _steps(interp: Interpreter, args: tuple, blame: bool = False):
    """Run an interpreter one node at a time, yielding (node, value); a value is freed after its last use, as
    Interpreter.run does. A parameter (get_attr) is fetched just before its first reader runs, not where
    torch.export put it (all at the top): a half model's parameters are upcast to float32 as they are fetched
    (precision.Float32), so fetching them all first would hold a float32 copy of the model, twice when the
    reference and the slim graph run side by side. ``blame``: an op that raises becomes SlimGraphFailed naming
    its node."""
    interp.env = {}
    interp.args_iter = iter(interp.graph.process_inputs(*args))
    for node in interp.graph.nodes:
        if node.op == "get_attr":
            continue
        try:
            for a in node.all_input_nodes:
                if a.op == "get_attr" and a not in interp.env:
                    interp.env[a] = interp.run_node(a)
            interp.env[node] = interp.run_node(node)
        except Exception as exc:
            if blame:
                raise SlimGraphFailed(node, exc) from exc
            raise
        yield node, interp.env[node]
        for dead in interp.user_to_last_uses.get(node, []):
            del interp.env[dead]
        if node.op == "output":
            return


def _kept_index(plan, node) -> torch.Tensor | None:
    """Positions of the reference tensor the slim one keeps along the node's channel dim (None: all). Read from
    the decisions' keep lists directly, not from the rewrite's own bookkeeping."""
    cm = plan.an.cmap(node)
    if cm is None or cm.heads:
        return None
    mask = _lookup(plan)(cm)
    return None if mask.all() else torch.as_tensor(np.flatnonzero(mask))


_LOOKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lookup(plan):
    """The decisions' keep lists as one position lookup, built once per plan (a plan's keep lists are fixed when
    it is made; reconstruction changes only T)."""
    if plan not in _LOOKUPS:
        masks = {g: np.isin(np.arange(plan.an.groups[g].width), d.keep) for g, d in plan.decisions.items()}
        _LOOKUPS[plan] = plan.an.kept_lookup(masks)
    return _LOOKUPS[plan]


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    return []


@torch.no_grad()
def compare(plan, ref_gm: GraphModule, slim_gm: GraphModule, inputs: tuple, every: bool = False,
            interpreters=None) -> Comparison:
    """Run the hooked reference and the slim graph side by side; a Check per pruned consumer's output and per
    model output, in graph order. ``every``: also every other op's tensor output (to find where a bug starts;
    a tensor whose channel dim is split into heads shows a shape mismatch). Raises SlimGraphFailed when the slim
    graph cannot run."""
    make_ref, make_slim = interpreters or (HookedInterpreter, Interpreter)  # precision.Float32 / lazy ones
    ref = make_ref(ref_gm, plan)
    nodes = {n.name: n for n in plan.an.gm.graph.nodes}
    wanted = {name: () for name, n in nodes.items() if n.op == "call_function" and (every or _selects(n))}
    # an RMSNorm is compared at its output (rules._rms_norm), so is a projection scaled for a per-head norm
    wanted.update({plan.compared_at(nodes[name]): tuple(sorted({seg.g for h in hooks for seg in h.segments}))
                   for name, hooks in ref.hooks.items() if name in nodes and plan.compared_at(nodes[name])})
    ref_steps, pending = _steps(ref, inputs), {}
    checks: list[Check] = []
    followed: list[str] = []
    ref_out = None
    slim = make_slim(slim_gm)
    for node, got in _steps(slim, inputs, blame=True):
        if node.op != "output" and node.name not in wanted:
            continue
        found = _advance(ref_steps, pending, node.name, set(wanted) | {"output"})
        if found is None:
            continue
        ref_node, want = found
        if node.op == "output":
            ref_out = want
            outs, refs = _leaves(got), _leaves(want)
            if len(outs) != len(refs):
                checks.append(Check("output", "", (), float("inf"), 0.0))
            for i, (o, r) in enumerate(zip(outs, refs)):
                checks.append(Check("output" if len(refs) == 1 else f"output[{i}]", "", (), *tensor_diff(o, r)))
            continue
        an_node = nodes[node.name]
        if _selects(node):  # a near-tie may flip: compare what it selects from, then follow the reference
            checks.append(_selected_from(plan, ref, ref_node, slim, node, an_node))
            if _same_shapes(got, want):
                slim.env[node] = want
                followed.append(node.name)
            continue
        if not isinstance(got, torch.Tensor):
            continue
        local = _local(plan, ref, ref_node, slim, node, an_node, got) if node.name in ref.hooks else None
        diff, scale = tensor_diff(got, _kept(plan, an_node, want))
        checks.append(Check(node.name, node_module_path(an_node), wanted[node.name], diff, scale, local))
    finite = all(bool(torch.isfinite(t).all()) for t in _leaves(ref_out))
    return Comparison(checks, finite, followed)


def _selects(node) -> bool:
    return node.op == "call_function" and handler(node.target).selects


def _same_shapes(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb))


def _selected_from(plan, ref, ref_node, slim, node, an_node) -> Check:
    """A value-selecting op (top-k, sort): the Check of its input, the values it orders."""
    src, ref_src = node.args[0], ref_node.args[0]
    diff, scale = float("inf"), 0.0
    if isinstance(src, Node) and src in slim.env and ref_src in ref.env:
        diff, scale = tensor_diff(slim.env[src], _kept(plan, an_node.args[0], ref.env[ref_src]))
    return Check(node.name, node_module_path(an_node), (), diff, scale)


def _kept(plan, an_node, value):
    """The reference tensor restricted to the positions the slim one keeps."""
    index = _kept_index(plan, an_node)
    if index is None or not isinstance(value, torch.Tensor):
        return value
    return value.index_select(plan.an.cmap(an_node).dim, index.to(value.device))


def _local(plan, ref: HookedInterpreter, ref_node, slim: Interpreter, node, an_node, got) -> float | None:
    """The consumer's own rewrite, apart from what reached it: the reference op (hooked) run on the slim graph's
    input put back at full width (zeros where channels were removed: the hook reads only kept ones), against the
    slim op's output. None where the input cannot be put back (a head map)."""
    i = handler(ref_node.target).data_arg
    data = an_node.args[i]
    if not isinstance(data, Node) or plan.an.cmap(data) is None or plan.an.cmap(data).heads:
        return None
    try:
        args, kwargs = ref.fetch_args_kwargs_from_env(ref_node)
    except KeyError:  # met out of order and its inputs are gone: the accumulated comparison stands alone
        return None
    full, small = args[i], slim.env[node.args[i]]
    index = _kept_index(plan, data)
    if index is not None:
        full = torch.zeros_like(full).index_copy_(plan.an.cmap(data).dim, index.to(full.device), small)
    elif full.shape == small.shape:
        full = small
    else:
        return None
    args = (*args[:i], full, *args[i + 1:])
    out = ref.call_function(ref_node.target, hooked_args(plan, ref_node, ref.hooks[ref_node.name], args), kwargs)
    return tensor_diff(got, _kept(plan, an_node, out))[0]


def _advance(steps, pending: dict, name: str, wanted: set):
    """Run the reference until it has computed node ``name``; values of other wanted nodes met on the way are
    kept in ``pending`` (the graphs are copies, so normally there are none)."""
    if name in pending:
        return pending.pop(name)
    for node, value in steps:
        key = "output" if node.op == "output" else node.name
        if key == name:
            return node, value
        if key in wanted:
            pending[key] = node, value
    return None
