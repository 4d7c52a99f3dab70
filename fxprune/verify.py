"""Verification: the slim model against a reference built by another route.

The reference is the ORIGINAL graph, full width, run with a hook at every consumer (conv/linear that reads a
pruned group): its input Z_j is replaced by Z_j[:, keep] @ T_j (for a selection: pruned channels zeroed); see
reference.py. Nothing is sliced or folded on this route, so it catches slicing, index-map, flatten-order and
folding bugs alike. A second check runs the user's slimmed eager module against the slim graph, which catches a
forward that hard-codes a width and names the module.

Both comparisons are normwise relative: max|slim - ref| / max|ref| <= rtol, with rtol = 1e-4 (float32 rounding
through ~60 layers and a folded T stays well below it; a wrong channel gives O(1)). Any NaN or inf in the slim
output where the reference is finite is a failure; a reference that is itself not finite cannot verify anything,
so other inputs are tried (calibration samples) and, failing those, the run stops and says so. Inputs: fresh
random normal tensors shaped like the examples, plus the first calibration samples when calib= is given, or
exactly the user's ``verify_inputs``. Half-precision models (float16, bfloat16) are verified in float32: the same
decisions are applied to a float32 copy of the graph and compared with the float32 reference (a half model's own
rounding would swamp the 1e-4 check), and the half eager model is compared with the half slim graph at a
tolerance scaled by the dtype's epsilon.

Example::

    diff = verify(plan, original_gm, slim_gm, slim_model, example_inputs)
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import VerificationError
from .reference import HookedInterpreter
from .rewrite import Plan

RTOL = 1e-4


def random_like(example: tuple, seed: int = 0) -> tuple:
    """Fresh inputs shaped like the examples: normal floats; integer inputs are reused (token ids etc.)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(a.shape, generator=gen, dtype=a.dtype) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in example)


def rel_diff(a, b) -> float:
    """max|a - b| / max|b| over all output tensors; inf when shapes differ or a is not finite where b is."""
    fa, fb = flat_tensors(a), flat_tensors(b)
    if len(fa) != len(fb):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape or not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return float("inf")
        if not y.numel():
            continue
        fin = torch.isfinite(y)
        if not fin.any():
            continue
        scale = y[fin].abs().max().item()
        worst = max(worst, (x[fin] - y[fin]).abs().max().item() / max(scale, 1e-12))
    return worst


def finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in flat_tensors(out))


def flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().double()]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_tensors(out[k])]
    if hasattr(out, "to_tuple"):
        return flat_tensors(out.to_tuple())
    return []


@torch.no_grad()
def check_against_reference(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, inputs: tuple,
                            rtol: float = RTOL, notes: list | None = None, ref=None) -> float:
    """Slim graph vs the hooked full-width original. Returns the relative difference or raises; appends to
    ``notes`` when the check is weak (outputs ~0 on random inputs, e.g. zero-initialized heads)."""
    ref = HookedInterpreter(original_gm, plan).run(*inputs) if ref is None else ref
    try:
        got = slim_gm(*inputs)
    except Exception as exc:  # noqa: BLE001 - a slim graph that cannot run is a verification failure
        groups = ", ".join(f"{g} ({'/'.join(plan.an.groups[g].modules)})" for g in plan.decisions)
        raise VerificationError(f"the slim graph fails to run ({type(exc).__name__}: {exc}). Pruned groups: "
                                f"{groups}. This is a bug in fxprune's analysis or rewrite; please report it.",
                                kind="graph", cause=exc) from None
    diff = rel_diff(got, ref)
    scale = max((t.abs().max().item() for t in flat_tensors(ref) if t.numel()), default=0.0)
    if notes is not None and scale < 1e-12:
        notes.append(f"verification is weak: the model's outputs are ~0 (max {scale:.1e}) on random inputs, so "
                     "a relative comparison says little; train the model (or load its weights) first")
    if not diff <= rtol:
        groups = ", ".join(f"{g} ({'/'.join(plan.an.groups[g].modules)})" for g in plan.decisions)
        raise VerificationError(
            f"the slim graph disagrees with the masked reference: relative difference {diff:.3g} > {rtol:g}. "
            f"Pruned groups: {groups}. This is a bug in fxprune's analysis or rewrite; please report it with "
            "the model. Pass verify=False to get the unverified result anyway.", kind="graph",
            detail=f"relative difference {diff:.3g}")
    return diff


@torch.no_grad()
def check_eager_matches_graph(slim_model: nn.Module, slim_gm: GraphModule, inputs: tuple,
                              rtol: float = RTOL) -> float:
    """The user's slimmed eager module vs the slim graph; names the first module that breaks or differs
    (VerificationError with kind="eager" and ``module``)."""
    recorder = _ModuleRecorder(slim_model)
    try:
        got = slim_model(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported with the module that raised
        where = recorder.current  # '' is the model itself
        raise VerificationError(
            f"the slimmed model's forward fails in module '{where or type(slim_model).__name__}': "
            f"{type(exc).__name__}: {exc}. Its forward probably hard-codes a channel count; compute it from the "
            "tensor (x.size(1), x.flatten(1)) or exclude that module with ignore=[...].",
            kind="eager", module=where, cause=exc) from None
    finally:
        recorder.remove()
    ref = slim_gm(*inputs)
    diff = rel_diff(got, ref)
    if not diff <= rtol:
        where = first_differing_module(slim_model, slim_gm, inputs, rtol)
        raise VerificationError(
            f"the slimmed eager model disagrees with the slim graph (relative difference {diff:.3g})"
            + (f", first in module '{where}'" if where else "") + ". Its forward probably slices or splits "
            "channels at hard-coded offsets; exclude those modules with ignore=[...].",
            kind="eager", module=where, detail=f"relative difference {diff:.3g}")
    return diff


@torch.no_grad()
def first_differing_module(model: nn.Module, gm: GraphModule, inputs: tuple, rtol: float = RTOL) -> str | None:
    """The first module, in the order modules finish (innermost first), whose eager output differs from the
    graph's value of the last op that module issued; None when no module's output can be matched."""
    last: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if node.op == "call_function":
                last[path] = node.name
    values: dict[str, torch.Tensor] = {}
    wanted = set(last.values())

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                values[n.name] = out
            return out

    try:
        _Rec(gm).run(*inputs)
    except Exception:  # noqa: BLE001 - the graph ran a moment ago; a failure here only loses the location
        return None
    order: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_hook(_keep(name, order)) for name, mod in model.named_modules() if name]
    try:
        model(*inputs)
    except Exception:  # noqa: BLE001
        return None
    finally:
        for h in handles:
            h.remove()
    for name, out in order:
        ref = values.get(last.get(name, ""))
        if ref is not None and ref.shape == out.shape and not rel_diff(out, ref) <= rtol:
            return name
    return None


def _keep(name: str, order: list):
    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            order.append((name, out))
    return hook


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


HALF = (torch.float16, torch.bfloat16)


def model_dtype(module: nn.Module) -> torch.dtype:
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def candidate_inputs(example: tuple, verify_inputs=None, calib=None) -> list[tuple[str, tuple]]:
    """What to verify on: the user's verify_inputs alone, else random normal inputs and the first calibration
    samples."""
    if verify_inputs is not None:
        return [("verify_inputs", verify_inputs)]
    out = [("random normal inputs", random_like(example))]
    if calib is not None:
        from .calibrate import batches
        try:
            out.append(("calibration samples", next(iter(batches(calib, example, max_samples=16, batch_size=16)))))
        except Exception:  # noqa: BLE001 - bad calibration data is reported by the stage that reads it
            pass
    return out


@torch.no_grad()
def verify(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, slim_model: nn.Module, example: tuple,
           verify_inputs=None, calib=None, notes: list | None = None) -> float:
    """Every check, on every candidate input whose reference output is finite. Returns the worst difference."""
    dtype = model_dtype(original_gm)
    ref_gm, check_gm, cast = original_gm, slim_gm, (lambda xs: xs)
    if dtype in HALF:  # verify the decisions in float32: the half model's own rounding would swamp 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_gm = copy.deepcopy(original_gm).float()
            check_gm = copy.deepcopy(original_gm).float()
        plan.apply_params(check_gm)
        plan.fix_graph(check_gm)
        cast = lambda xs: tuple(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
                                for x in xs)
        if notes is not None:
            notes.append(f"verified in float32 (the model is {str(dtype).replace('torch.', '')}); the "
                         f"{str(dtype).replace('torch.', '')} eager model was checked against its slim graph "
                         f"at a tolerance of {_half_rtol(dtype):.0e}")
    worst, tried = 0.0, []
    from .capture import eval_mode
    for what, inputs in candidate_inputs(example, verify_inputs, calib):
        ref = HookedInterpreter(ref_gm, plan).run(*cast(inputs))
        if not finite(ref):
            tried.append(what)
            continue
        worst = max(worst, check_against_reference(plan, ref_gm, check_gm, cast(inputs), notes=notes, ref=ref))
        with eval_mode(slim_model):
            check_eager_matches_graph(slim_model, slim_gm, inputs,
                                      rtol=_half_rtol(dtype) if dtype in HALF else RTOL)
        if tried and notes is not None:
            notes.append(f"the model's outputs are NaN or inf on {' and '.join(tried)}; verified on {what}")
        return worst
    raise VerificationError(
        f"could not verify: the model's outputs are NaN or inf on {' and '.join(tried)}, so no comparison means "
        "anything. Pass verify_inputs= with inputs from the model's domain (or calib= with real samples), or "
        "verify=False to skip verification", kind="inputs")


def _half_rtol(dtype) -> float:
    return max(RTOL, 16 * torch.finfo(dtype).eps)
