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
exactly the user's ``verify_inputs``. Half-precision models (float16, bfloat16) are verified in float32 without
a float32 copy of the model: both graphs run node by node with each tensor upcast as it is read, the slim
graph's touched tensors sliced/folded afresh from the upcast originals (precision.Float32), and must agree to
1e-4; where a graph cannot run in float32 the comparison runs in the model's dtype at 16 eps. The half eager model
is compared with the half slim graph at 16 eps.

Example::

    diff = verify(plan, original_gm, slim_gm, slim_model, example_inputs)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from .errors import VerificationError
from .capture import dynamic_dims
from .precision import HALF, Float32, model_dtype
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
    fa, fb = _flat(a), _flat(b)
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
    return all(bool(torch.isfinite(t).all()) for t in _flat(out))


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
                            rtol: float = RTOL, notes: list | None = None, ref=None) -> float:
    """Slim graph vs the hooked full-width original. Returns the relative difference or raises; appends to
    ``notes`` when the check is weak (outputs ~0 on random inputs, e.g. zero-initialized heads)."""
    ref = HookedInterpreter(original_gm, plan).run(*inputs) if ref is None else ref
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




def candidate_inputs(example: tuple, verify_inputs=None, calib=None, dynamic=None) -> list[tuple[str, tuple]]:
    """What to verify on: the user's verify_inputs alone, else random normal inputs and the first calibration
    samples."""
    if verify_inputs is not None:
        return [("verify_inputs", verify_inputs)]
    out = [("random normal inputs", random_like(example))]
    if calib is not None:
        from .calibrate import batches
        try:
            out.append(("calibration samples", next(iter(batches(calib, example, max_samples=16, batch_size=16,
                                                                     dynamic=dynamic)))))
        except Exception:  # noqa: BLE001 - bad calibration data is reported by the stage that reads it
            pass
    return out


@torch.no_grad()
def verify(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, slim_model: nn.Module, example: tuple,
           verify_inputs=None, calib=None, notes: list | None = None, lazy: bool = False) -> float:
    """Every check, on every candidate input whose reference output is finite. Returns the worst difference.
    ``lazy``: the slim graph still holds the original tensors (Plan.graph_only, for inplace=True): each touched
    one is sliced/folded as it is read and freed after use, and there is no eager model yet (slim_model None)."""
    dtype = model_dtype(original_gm)
    if dtype in HALF:
        return _verify_half(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes, dtype,
                            lazy)
    run_slim = slim_gm
    if lazy:
        touched = set(plan.touched())

        class Lazy(Interpreter):
            def get_attr(self, target, args, kwargs):
                t = super().get_attr(target, args, kwargs)
                return plan.slim_tensor(target, t) if plan.an.canonical(target) in touched else t

        def run_slim(*xs):
            return Lazy(slim_gm).run(*xs)
    return _verify_on(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes,
                      lambda xs: HookedInterpreter(original_gm, plan).run(*xs), run_slim, RTOL)


def _verify_half(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes, dtype,
                 lazy: bool = False) -> float:
    """A half model's own rounding would swamp 1e-4: the decisions are checked in float32, node by node, without
    a float32 copy of the model (precision.Float32): the reference reads each original tensor upcast; the slim
    graph reads each untouched tensor upcast and each touched one sliced/folded afresh from the upcast original
    (Plan.slim_tensor, the rewrite's own arithmetic, in float32), after checking that the slim graph's own half
    tensor is that recomputation rounded once to the dtype. So they must agree to float32 rounding. The half
    slim graph itself is then compared with the half eager model at 16 eps of the dtype. A graph that
    cannot run in float32 is compared in its own dtype at 16 eps."""
    name = str(dtype).replace("torch.", "")
    half_tol = half_rtol(dtype)
    touched = set(plan.touched())

    class Ref(Float32, HookedInterpreter):
        pass

    class Slim(Float32, Interpreter):
        def get_attr(self, target, args, kwargs):
            if plan.an.canonical(target) not in touched:
                return super().get_attr(target, args, kwargs)
            fresh = plan.slim_tensor(target, _fetch(original_gm, target).float())
            if not lazy:  # lazy: the slim graph holds no slim tensor yet
                _check_rounded(target, _fetch(slim_gm, target), fresh)
            return fresh

    def ref32(xs):
        return Ref(original_gm, plan, half=dtype).run(*xs)

    def slim32(*xs):
        return Slim(slim_gm, half=dtype).run(*xs)

    try:
        ref32(random_like(example))
    except Exception as exc:  # noqa: BLE001 - a graph that pins its dtype in an op float32 cannot run
        if notes is not None:
            notes.append(f"verified in {name} at a tolerance of {half_tol:.0e} (the graph does not run in "
                         f"float32: {type(exc).__name__})")
        if lazy:
            raise VerificationError(f"cannot verify this {name} model in float32 ({type(exc).__name__}: {exc}) "
                                    "and inplace=True verifies before any tensor is slimmed: prune a copy "
                                    "(inplace=False) or pass verify=False") from exc
        return _verify_on(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes,
                          lambda xs: HookedInterpreter(original_gm, plan).run(*xs), slim_gm, half_tol,
                          eager_rtol=half_tol)
    if notes is not None:
        notes.append(f"verified in float32, node by node (the model is {name}); the {name} eager model was "
                     f"checked against its slim graph at a tolerance of {half_tol:.0e}")
    return _verify_on(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes, ref32,
                      slim32, RTOL, eager_rtol=half_tol)


def _check_rounded(name: str, actual: torch.Tensor, fresh: torch.Tensor):
    """A slim half tensor must be its float32 recomputation rounded once to the half dtype (a slice is exact)."""
    fi = torch.finfo(actual.dtype)
    bad = actual.shape != fresh.shape or not bool(
        ((actual.float() - fresh).abs() <= fi.eps * fresh.abs() + fi.smallest_normal).all())
    if bad:
        raise VerificationError(f"the slim tensor '{name}' is not the rewrite of the original one (shape "
                                f"{tuple(actual.shape)}, expected {tuple(fresh.shape)}, or values beyond the "
                                f"{str(actual.dtype).replace('torch.', '')} rounding). This is a bug in fxprune's "
                                "rewrite; please report it. Pass verify=False to get the unverified result anyway.")


def _fetch(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _verify_on(plan, original_gm, slim_gm, slim_model, example, verify_inputs, calib, notes, run_ref, run_slim,
               rtol: float, eager_rtol: float = RTOL) -> float:
    worst, tried = 0.0, []
    from .capture import eval_mode
    for what, inputs in candidate_inputs(example, verify_inputs, calib, dynamic_dims(original_gm)):
        ref = run_ref(inputs)
        if not finite(ref):
            tried.append(what)
            continue
        worst = max(worst, check_against_reference(plan, original_gm, run_slim, inputs, rtol=rtol, notes=notes,
                                                   ref=ref))
        if slim_model is not None:
            with eval_mode(slim_model):
                check_eager_matches_graph(slim_model, slim_gm, inputs, rtol=eager_rtol)
        if tried and notes is not None:
            notes.append(f"the model's outputs are NaN or inf on {' and '.join(tried)}; verified on {what}")
        return worst
    raise VerificationError(
        f"could not verify: the model's outputs are NaN or inf on {' and '.join(tried)}, so no comparison means "
        "anything. Pass verify_inputs= with inputs from the model's domain (or calib= with real samples), or "
        "verify=False to skip verification")


def half_rtol(dtype) -> float:
    return max(RTOL, 16 * torch.finfo(dtype).eps)
