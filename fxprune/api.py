"""The one call: ``fxprune.compile(model, example_inputs, method=..., amount=... | target_flops=...)``.

Pipeline: capture -> analysis -> (ignore / per-module amounts) -> method pass decides -> one rewrite engine
slims a copy of the model and the graph -> verification against the hooked full-width original and of the eager
module against the slim graph -> FLOPs/params before and after.

The user's model is never left half-pruned: all work happens on a deep copy; with ``inplace=True`` the verified
result is transplanted into the user's modules at the very end.

Example::

    slim = fxprune.compile(model, torch.randn(2, 3, 32, 32), method="l1", target_flops=0.5, round_to=8)
    res = fxprune.prune(model, x, method="id", amount=0.5, calib=images)   # model, graph, report
    print(res.report)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from . import verify as _verify
from .analysis import Analysis, analyze
from .capture import as_tuple, capture, eval_mode
from .context import PruneContext, Target
from .cost import count_flops, count_params
from .errors import ConfigError, DataError, NothingToPruneError, TargetError
from .rewrite import Decision, Plan
from .targets import DEFAULT_ROUND_TO


@dataclass
class PruneResult:
    model: nn.Module                  # the slim eager module (the user's class)
    graph: object                     # the slim torch.fx GraphModule (for deployment)
    analysis: Analysis
    decisions: dict[int, Decision]
    flops: tuple[int, int]            # before, after, per sample (batch 1)
    params: tuple[int, int]
    method: str
    notes: list[str] = field(default_factory=list)
    verified: float | None = None     # relative difference to the reference, when verified

    @property
    def report(self) -> str:
        from .report import format_report
        return format_report(self)


def _validate(method, amount, target_flops, target_params, round_to, amounts, options):
    given = [n for n, v in (("amount", amount), ("target_flops", target_flops), ("target_params", target_params))
             if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of amount / target_flops / target_params, not {' and '.join(given)}")
    if not given and not amounts and options.get("tol") is None:  # ID may choose k by error tolerance
        raise ConfigError("say how much to prune: amount=0.5 (fraction of channels removed per group), "
                          "target_flops=0.5 or target_params=0.5 (fraction kept)")
    for name, v in (("amount", amount), *(((f"amounts[{k!r}]", a) for k, a in (amounts or {}).items()))):
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise ConfigError(f"{name} must be in [0, 1) (the fraction of channels removed), got {v!r}")
    for name, v in (("target_flops", target_flops), ("target_params", target_params)):
        if v is not None and not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
            raise ConfigError(f"{name} must be in (0, 1] (the fraction kept), got {v!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive int (e.g. 8) or None, got {round_to!r}")
    from fxprune import passes
    return passes.get(method)


def _match_modules(model: nn.Module, patterns, what: str) -> dict[str, str]:
    """module path -> the pattern (or object) that selected it; a pattern that matches nothing is an error."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for p in patterns:
        if isinstance(p, nn.Module):
            if id(p) not in names:
                raise ConfigError(f"{what}: module {type(p).__name__} is not part of the model")
            hits = [names[id(p)]]
        else:
            hits = [n for n in names.values() if n and (fnmatch.fnmatchcase(n, p) or n == p)]
            if not hits:
                raise ConfigError(f"{what}: pattern {p!r} matches no module; module names look like "
                                  f"{', '.join(list(n for n in names.values() if n)[:5])}, ...")
        for h in hits:
            out.setdefault(h, p)
    return out


def _under(module_path: str, selected: dict[str, str]) -> str | None:
    for sel, why in selected.items():
        if module_path == sel or module_path.startswith(sel + "."):
            return why
    return None


def prune(model: nn.Module, example_inputs, method: str = "l1", *, amount: float | None = None,
          target_flops: float | None = None, target_params: float | None = None,
          round_to: int | None = DEFAULT_ROUND_TO,
          ignore=(), amounts: dict | None = None, calib=None, verify: bool = True, inplace: bool = False,
          progress: bool = True, **method_options) -> PruneResult:
    """Prune and return the full result (slim model, slim graph, decisions, costs). See ``compile``."""
    decide = _validate(method, amount, target_flops, target_params, round_to, amounts, method_options)
    if getattr(decide, "needs_calib", False) and calib is None:
        raise DataError(f"method '{method}' needs calibration data: pass calib= (e.g. 1000 held-out training "
                        "images as a tensor, or a DataLoader); on the command line use --calib")
    example = as_tuple(example_inputs)
    ignored = _match_modules(model, ignore, "ignore")
    per_module = _match_modules(model, list(amounts or {}), "amounts")
    gm = capture(model, example)
    an = analyze(gm)
    for g in an.groups:
        why = next((w for m in g.modules if (w := _under(m, ignored)) is not None), None)
        if why is not None and not g.frozen:
            g.frozen = f"ignored by the user ({why if isinstance(why, str) else type(why).__name__})"
    prunable = [g for g in an.groups if g.prunable]
    if not prunable:
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable channel group. " + "; ".join(
                sorted({g.frozen or 'single channel' for g in an.groups})[:5]) +
            ". See fxprune.groups(model, example_inputs) for the full list.")
    if amounts:
        default = amount or 0.0
        group_amounts = {g.gid: default for g in prunable}
        for g in prunable:
            for m in g.modules:
                pat = _under(m, per_module)
                if pat is not None:
                    group_amounts[g.gid] = amounts[pat]
        target = Target(amounts=group_amounts, round_to=round_to)
    elif amount is not None:
        target = Target(amounts={g.gid: amount for g in prunable}, round_to=round_to)
    elif target_flops is None and target_params is None:
        target = Target(round_to=round_to)  # the method chooses widths itself (ID's tol=)
    else:
        metric, value = ("flops", target_flops) if target_flops is not None else ("params", target_params)
        target = Target(metric=metric, value=value, round_to=round_to)
    ctx = PruneContext(model=model, analysis=an, target=target, example_inputs=example,
                       calib=calib, progress=progress)
    decisions = decide(ctx, **method_options)
    _note_rounding(ctx, decisions)
    plan = Plan(an, decisions)
    _check_target(ctx, plan)
    slim_gm, work = plan.slim(gm, model)
    diff = None
    if verify:
        inputs = _verify.random_like(example)
        with eval_mode(work):
            diff = _verify.check_against_reference(plan, gm, slim_gm, inputs, notes=ctx.notes)
            _verify.check_eager_matches_graph(work, slim_gm, inputs)
    one = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in example)  # per sample
    result = PruneResult(model=work, graph=slim_gm, analysis=an, decisions=plan.decisions,
                         flops=(count_flops(model, one), count_flops(work, one)),
                         params=(count_params(model), count_params(work)), method=method,
                         notes=ctx.notes, verified=diff)
    if inplace:
        _transplant(work, model)
        result.model = model
    return result


def _note_rounding(ctx: PruneContext, decisions: dict):
    """Say so when rounding left groups at full width that an amount asked to shrink."""
    t = ctx.target
    if not t.amounts or not t.round_to or t.round_to <= 1:
        return
    untouched = [g for g, a in t.amounts.items() if a > 0 and g not in decisions]
    if untouched:
        ctx.notes.append(f"{len(untouched)} group(s) kept their full width: rounding to multiples of {t.round_to} "
                         f"left no smaller width (groups {', '.join(map(str, untouched[:8]))}); pass round_to=None "
                         "(or 8) to prune them anyway")


def _check_target(ctx: PruneContext, plan: Plan):
    """A method must never return more than the target asked for (the cost model is exact for conv/linear)."""
    t = ctx.target
    if t.metric is None:
        return
    widths = [len(plan.decisions[g.gid].keep) if g.gid in plan.decisions else g.width for g in ctx.groups]
    got = ctx.cost.fraction(widths, t.metric)
    if got > t.value + 1e-9:
        raise TargetError(f"the method kept {got:.4f} of the {t.metric}, above target_{t.metric}={t.value:g}; "
                          "this is a bug in the method pass, please report it")


def compile(model: nn.Module, example_inputs, method: str = "l1", **options) -> nn.Module:  # noqa: A001
    """Return a physically smaller copy of ``model`` (the same class, fewer channels), verified.

    method: a registered pass ("l1", "l2", "id", ...). One of: amount (fraction of each group's channels
    removed), target_flops / target_params (fraction kept, reached within 2 points and never exceeded).
    round_to: kept widths rounded up to a multiple (default 16, measured best for ONNX Runtime's CPU kernels;
    None for exact widths). ignore: modules or
    name patterns whose output channels stay. amounts: {pattern: amount} per module. calib: calibration data
    for data-driven methods. verify: check against the masked reference (default True). inplace: slim the
    user's model object itself (after verification) instead of returning a copy.
    """
    return prune(model, example_inputs, method, **options).model


def _transplant(src: nn.Module, dst: nn.Module):
    """Move the verified slim state into the user's own module objects."""
    src_mods = dict(src.named_modules())
    for name, mod in dst.named_modules():
        new = src_mods[name]
        for k in list(mod._parameters):
            mod._parameters[k] = new._parameters[k]
        for k in list(mod._buffers):
            mod._buffers[k] = new._buffers[k]
        for k, v in vars(new).items():
            if not k.startswith("_") and isinstance(v, (int, float, bool, tuple, str, type(None))):
                setattr(mod, k, v)


def groups(model: nn.Module, example_inputs) -> list:
    """The coupled channel groups of a model (print each with ``g.describe()``)."""
    with eval_mode(model):
        return analyze(capture(model, as_tuple(example_inputs))).groups


def describe_groups(model: nn.Module, example_inputs) -> str:
    gs = groups(model, example_inputs)
    n_free = sum(g.prunable for g in gs)
    head = f"{len(gs)} channel groups: {n_free} prunable, {len(gs) - n_free} frozen"
    return "\n".join([head] + [g.describe() for g in gs])


__all__ = ["compile", "prune", "groups", "describe_groups", "PruneResult"]
