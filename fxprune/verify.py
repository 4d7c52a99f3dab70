"""Verification: the slim model against a reference built by another route.

The reference is the ORIGINAL graph, full width, run with a hook at every consumer (conv/linear that reads a
pruned group): its input Z_j is replaced by Z_j[:, keep] @ T_j (for a selection: pruned channels zeroed); see
reference.py. Nothing is sliced or folded on this route, so it catches slicing, index-map, flatten-order and
folding bugs alike. A second check runs the user's slimmed eager module against the slim graph, which catches a
forward that hard-codes a width and names the module.

The slim graph is compared with the reference at every tensor where a pruning bug first shows, not only at the
model outputs (compare.py): the output of every consumer that reads a pruned group, then the model outputs, in
graph order. A model's output can be numerically blind to what was pruned (a zero-initialized head, a layer scale
of 1e-6); a consumer's output is not. The first tensor where slim and reference part is named in the error (a
VerificationError carrying ``node``, ``module``, ``groups`` and ``diff``, so a caller can act on it), and
``PruneResult.verification`` lists every compared tensor with its relative difference and scale (max|ref|); a
tensor whose reference is ~0 is marked as proving nothing, and the report says so.

Every comparison is normwise relative: max|slim - ref| / max|ref| <= rtol, with rtol = 1e-4 for float32 (float32
rounding through ~60 layers and a folded T stays well below it; a wrong channel gives O(1)) and the same number
of epsilons for other dtypes. Any NaN or inf in the slim tensor where the reference is finite is a failure; a
reference whose outputs are not finite cannot verify anything, so other inputs are tried (calibration samples)
and, failing those, the run stops and says so. Inputs: fresh random normal tensors shaped like the examples, plus
the first calibration samples when calib= is given, or exactly the user's ``verify_inputs``. Half-precision
models (float16, bfloat16) are verified in float32: the same decisions are applied to a float32 copy of the graph
and compared with the float32 reference (a half model's own rounding would swamp the 1e-4 check), and the half
eager model is compared with the half slim graph at a tolerance scaled by the dtype's epsilon.

Example::

    checks = verify(plan, original_gm, slim_gm, slim_model, example_inputs)
    worst = max(c.diff for c in checks)
"""

from __future__ import annotations


import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from .capture import dynamic_dims, node_module_path
from .compare import DRIFT, Check, Comparison, SlimGraphFailed, compare, tensor_diff
from .errors import VerificationError
from .precision import Float32
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
    fa, fb = flat_tensors(a, double=False), flat_tensors(b, double=False)
    if len(fa) != len(fb):
        return float("inf")
    return max((tensor_diff(x, y)[0] for x, y in zip(fa, fb)), default=0.0)  # float64 a block at a time


def finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in flat_tensors(out, double=False))


def flat_tensors(out, double: bool = True) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, detached; in float64 unless ``double=False``."""
    if isinstance(out, torch.Tensor):
        return [out.detach().double() if double else out.detach()]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o, double)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flat_tensors(out[k], double)]
    if hasattr(out, "to_tuple"):
        return flat_tensors(out.to_tuple(), double)
    return []


def rtol_for(dtype: torch.dtype) -> float:
    """The normwise tolerance of a comparison run in ``dtype``: RTOL for float32 (about 840 float32 epsilons:
    rounding through ~60 layers and a folded T stays well below it, a wrong channel gives O(1)), the same number
    of epsilons for other dtypes (verification of half models runs in float32)."""
    return RTOL * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps if dtype.is_floating_point else RTOL


def _groups_text(plan: Plan, gids=None) -> str:
    return ", ".join(f"{g} ({'/'.join(plan.an.groups[g].modules)})" for g in (plan.decisions if gids is None
                                                                               else gids))


@torch.no_grad()
def compare_with_reference(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, inputs: tuple,
                           interpreters=None) -> Comparison:
    """Slim graph vs the hooked full-width original, at every pruned consumer's output and the model outputs.
    A slim graph that cannot run is a VerificationError naming the node."""
    try:
        return compare(plan, original_gm, slim_gm, inputs, interpreters=interpreters)
    except SlimGraphFailed as failed:
        node, exc = failed.node, failed.exc
        module = node_module_path(node)
        where = f"node '{node.name}'" + (f" (module '{module}')" if module else "")
        raise VerificationError(
            f"the slim graph fails to run at {where} ({type(exc).__name__}: {_first_line(exc)}). Pruned groups: "
            f"{_groups_text(plan)}. This is a bug in fxprune's analysis or rewrite; please report it.",
            node=node.name, module=module, groups=tuple(plan.decisions), cause=exc) from None


def raise_if_disagrees(plan: Plan, run: Comparison, rtol: float) -> None:
    """A VerificationError naming the first tensor (in graph order) where slim and reference part."""
    bad = run.first_failure(rtol)
    if bad is None:
        return
    outputs = [c for c in run.checks if c.is_output]
    if bad.local is not None and not bad.local <= rtol:
        how, diff = f"relative difference {bad.local:.3g} > {rtol:g} in its own op (the reference op run on " \
                    "the slim graph's input)", bad.local
    elif bad.is_output:
        how, diff = f"relative difference {bad.diff:.3g} > {rtol:g}", bad.diff
    else:
        how, diff = f"relative difference {bad.diff:.3g} > {DRIFT * rtol:g} (what reached it)", bad.diff
    out_text = f"; at the model outputs: {max(c.diff for c in outputs):.3g}" if outputs and not bad.is_output else ""
    raise VerificationError(
        f"the slim graph disagrees with the masked reference, first at {bad.describe()}: {how} (max|reference| "
        f"{bad.scale:.3g}){out_text}. Pruned groups: {_groups_text(plan, bad.groups or None)}. This is a bug in "
        "fxprune's analysis or rewrite; please report it with the model. Pass verify=False to get the unverified "
        "result anyway.",
        node=bad.name, module=bad.module, groups=bad.groups or tuple(plan.decisions), diff=diff)


@torch.no_grad()
def check_against_reference(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, inputs: tuple,
                            rtol: float | None = None, notes: list | None = None) -> float:
    """Slim graph vs the hooked full-width original (compare_with_reference). Returns the worst relative
    difference or raises; appends to ``notes`` when the check is weak (every reference ~0)."""
    run = compare_with_reference(plan, original_gm, slim_gm, inputs)
    raise_if_disagrees(plan, run, rtol_for(model_dtype(original_gm)) if rtol is None else rtol)
    if notes is not None:
        note_weak(run.checks, notes)
    return run.worst


def note_weak(checks: list[Check], notes: list) -> None:
    """Say where agreement proves nothing: every compared tensor ~0, or the model outputs ~0."""
    outputs = [c for c in checks if c.name.startswith("output")]
    if checks and all(c.vacuous for c in checks):
        notes.append(f"verification is weak: every compared tensor is ~0 (max {max(c.scale for c in checks):.1e}) "
                     "on these inputs, so a relative comparison says little; train the model (or load its weights) "
                     "first")
    elif outputs and all(c.vacuous for c in outputs):
        inner = [c for c in checks if not c.vacuous]
        notes.append(f"the model's outputs are ~0 (max {max(c.scale for c in outputs):.1e}) on these inputs (a "
                     f"zero-initialized head?), so they prove nothing; the certificate rests on the {len(inner)} "
                     "pruned consumers' outputs compared inside the model")


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


def slim_interpreter(plan: Plan, source_gm: GraphModule, slim_gm: GraphModule, half=None, lazy: bool = False):
    """An interpreter of the slim graph that computes each touched tensor afresh from ``source_gm``'s full-width
    one as its get_attr runs (Plan.slim_tensor; in float32 for a half model, ``half``). Copy mode checks the slim
    graph's own half tensor against that recomputation; ``lazy`` (inplace=True): the slim graph holds the
    full-width tensors, so the half tensor the user will get is computed the same way and checked."""
    touched = set(plan.touched())

    class Slim(Float32, Interpreter):
        def get_attr(self, target, args, kwargs):
            if plan.an.canonical(target) not in touched:
                return super().get_attr(target, args, kwargs)
            full = _fetch(source_gm, target)
            fresh = plan.slim_tensor(target, full.float() if half else full)
            if half:
                _check_rounded(target, plan.slim_tensor(target, full) if lazy else _fetch(slim_gm, target), fresh)
            return fresh

    return Slim(slim_gm, half=half)


@torch.no_grad()
def verify(plan: Plan, original_gm: GraphModule, slim_gm: GraphModule, slim_model: nn.Module, example: tuple,
           verify_inputs=None, calib=None, notes: list | None = None, lazy: bool = False,
           eager_check=None) -> list[Check]:
    """Every check, on the first candidate input whose reference output is finite. Returns the compared tensors
    (Check: name, relative difference, scale); the worst difference is the certificate's number.
    Half models run node by node in float32 without a float32 copy (precision.Float32): each tensor upcast as it
    is read, the slim graph's touched tensors sliced/folded afresh from the upcast originals after checking that
    its own half tensor is that recomputation rounded once. ``lazy`` (inplace=True): the slim graph still holds
    the original tensors; each touched one is slimmed as it is read. ``eager_check(inputs, rtol)``: replaces the
    check of ``slim_model`` against the slim graph (inplace: lazy.check_eager on the skeleton)."""
    dtype = model_dtype(original_gm)
    ref_gm, check_gm, cast = original_gm, slim_gm, (lambda xs: xs)
    half = dtype if dtype in HALF else None

    class Ref(Float32, HookedInterpreter):
        pass

    interpreters = None
    if half or lazy:
        interpreters = ((lambda gm, p: Ref(gm, p, half=half)),
                        (lambda gm: slim_interpreter(plan, original_gm, gm, half, lazy)))
    if half and notes is not None:
        notes.append(f"verified in float32, node by node (the model is {str(dtype).replace('torch.', '')}); the "
                     f"{str(dtype).replace('torch.', '')} eager model was checked against its slim graph "
                     f"at a tolerance of {_half_rtol(dtype):.0e}")
    rtol = RTOL if half else rtol_for(dtype)
    tried = []
    from .capture import eval_mode
    for what, inputs in candidate_inputs(example, verify_inputs, calib, dynamic_dims(original_gm)):
        run = compare_with_reference(plan, ref_gm, check_gm, cast(inputs),
                                     **({"interpreters": interpreters} if interpreters else {}))
        if not run.reference_finite:
            tried.append(what)
            continue
        raise_if_disagrees(plan, run, rtol)
        if notes is not None:
            note_weak(run.checks, notes)
            if run.followed:
                notes.append(f"{len(run.followed)} value-selecting op(s) ({', '.join(run.followed[:3])}"
                             f"{', ...' if len(run.followed) > 3 else ''}: top-k, sort) were verified on the values "
                             "they select from; past them the slim graph was given the reference's choice (float "
                             "rounding may flip a near-tie)")
        if eager_check is not None:
            eager_check(inputs, _half_rtol(dtype) if dtype in HALF else RTOL)
        elif slim_model is not None:
            with eval_mode(slim_model):
                check_eager_matches_graph(slim_model, slim_gm, inputs,
                                          rtol=_half_rtol(dtype) if dtype in HALF else RTOL)
        if tried and notes is not None:
            notes.append(f"the model's outputs are NaN or inf on {' and '.join(tried)}; verified on {what}")
        return run.checks
    raise VerificationError(
        f"could not verify: the model's outputs are NaN or inf on {' and '.join(tried)}, so no comparison means "
        "anything. Pass verify_inputs= with inputs from the model's domain (or calib= with real samples), or "
        "verify=False to skip verification", kind="inputs")


def _check_rounded(name: str, actual: torch.Tensor, fresh: torch.Tensor):
    """A slim half tensor must be its float32 recomputation rounded once to the half dtype (a slice is exact)."""
    fi = torch.finfo(actual.dtype)
    if actual.shape != fresh.shape or not bool(
            ((actual.float() - fresh).abs() <= fi.eps * fresh.abs() + fi.smallest_normal).all()):
        raise VerificationError(f"the slim tensor '{name}' is not the rewrite of the original one (shape "
                                f"{tuple(actual.shape)}, expected {tuple(fresh.shape)}, or values beyond the "
                                f"{str(actual.dtype).replace('torch.', '')} rounding). This is a bug in fxprune's "
                                "rewrite; please report it. Pass verify=False to get the unverified result anyway.")


def _fetch(gm: GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0][:limit] + ("..." if len(lines[0]) > limit else "")) if lines else ""


def _half_rtol(dtype) -> float:
    return max(RTOL, 16 * torch.finfo(dtype).eps)
