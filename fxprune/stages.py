"""The stages every pruning run goes through, shared by the one-shot ``fxprune.prune`` and the training-time
``fxprune.prepare(...).finalize()``:

    begin:  validate options -> capture -> analyse -> ignore / per-module amounts -> target   (nothing changed yet)
    (the method decides {group: Decision(keep, T)})
    finish: rounding notes -> Plan -> target check -> reconstruction + BatchNorm statistics from calibration data
            -> one rewrite engine -> the new BatchNorm statistics into the slim model and the reference ->
            verification -> costs -> (inplace: slim the user's own model tensor by tensor)

The core never looks a method up by name: the entry points (fxprune.api, the command line, the demo) do, and
hand the method object to ``begin``. Example::

    job = begin(model, x, "l1", fxprune.passes.get("l1"), target_flops=0.5)
    result = finish(job, job.decide(job.ctx))
"""

from __future__ import annotations

import functools
import inspect
import numbers
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed
from . import verify as _verify
from .analysis import Analysis, analyze
from .capture import as_tuple, capture, dynamic_dims
from .context import PruneContext, Target
from .cost import count_flops, count_params
from .errors import ConfigError, DataError, NothingToPruneError, TargetError, VerificationError
from .latency import check_latency_options
from .matching import group_amounts, match_modules, under
from .lazy import Materializer, check_eager
from .retry import Retry, apply_updates, next_step
from .rewrite import Decision, Plan
from .targets import DEFAULT_ROUND_TO
from .transplant import slim_in_place
from .verify import slim_interpreter

DEFAULT_CALIB_SAMPLES = 1000
_SAME_WEIGHTS = ("Under torchrun every rank must prune the same model: load the same checkpoint on every rank, or "
                 "broadcast rank 0's (for t in model.state_dict().values(): torch.distributed.broadcast(t, 0)); "
                 "after DistributedDataParallel training BatchNorm statistics are each rank's own until then")


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
    # training-time methods: max relative difference of the slim model's outputs to the model as trained (its
    # masks on) on the example inputs; exact for the selecting methods, C-SGD's merge once clusters converged
    trained_diff: float | None = None
    verified: float | None = None     # the worst relative difference to the reference, when verified
    verification: list = field(default_factory=list)  # every compared tensor (compare.Check), in graph order
    recalibrated_bn: list[str] = field(default_factory=list)  # BatchNorm modules whose statistics were re-estimated
    calib_samples: int = 0            # samples the reconstruction / BatchNorm pass used (0: none)
    frozen: dict[int, str] = field(default_factory=dict)  # every group kept whole -> why (analysis and job)
    frozen_by_verification: dict[int, str] = field(default_factory=dict)  # group -> why (freeze and retry)
    retry_rounds: int = 0             # verification rounds after the first (stored widths updated, groups frozen)
    latency: dict | None = None       # target_latency: measured / predicted latency per round (latency_target)

    @property
    def report(self) -> str:
        from .report import format_report
        return format_report(self)


@dataclass
class Options:
    """The core's own options (the method's are in Job.method_options)."""
    round_to: int | None = DEFAULT_ROUND_TO
    calib: object = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    reconstruct: bool = False
    recalibrate_bn: bool = False
    verify: bool = True
    verify_inputs: tuple | None = None
    inplace: bool = False
    progress: bool = True
    strict: bool = False              # refuse (raise) when the eager forward cannot follow, instead of retrying


@dataclass
class Job:
    """Everything known before a method decides."""
    model: nn.Module
    example: tuple
    method: str
    decide: object
    method_options: dict
    gm: torch.fx.GraphModule
    ctx: PruneContext
    opts: Options

    @property
    def analysis(self) -> Analysis:
        return self.ctx.analysis

    @property
    def one(self) -> tuple:
        """The example inputs cut to one sample (FLOPs are reported per sample)."""
        return tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in self.example)

    @functools.cached_property
    def flops_before(self) -> int:
        """The original model's FLOPs, counted once per job (a forward of the whole model), not per retry round."""
        return count_flops(self.model, self.one)


def begin(model: nn.Module, example_inputs, method: str, decide, *, amount=None, target_flops=None,
          target_params=None, round_to=DEFAULT_ROUND_TO, ignore=(), amounts=None, calib=None,
          calib_samples=DEFAULT_CALIB_SAMPLES, reconstruct=None, recalibrate_bn=None, verify=True, verify_inputs=None,
          inplace=False, progress=True, method_options=None, target_latency=None, latency_batch=1,
          latency_threads=None, latency_timer=None, latency_cache=None, strict=False, prune_hidden=False,
          latency_dtype="float32") -> Job:
    """Validate every option, capture and analyse the model, and fix the target. Changes nothing. ``decide``:
    the method object (a decide function or a TrainingMethod class) that the entry point looked ``method`` up as."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    method_options = dict(method_options or {})
    check_method_options(method, decide, method_options)
    _check_amounts(amount, target_flops, target_params, amounts, method_options, target_latency)
    check_latency_options(target_latency, latency_batch, latency_threads, latency_dtype, calib)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral)
                                 or round_to < 1):
        raise ConfigError(f"round_to must be a positive int (e.g. 8) or None, got {round_to!r}")
    if not isinstance(strict, bool):
        raise ConfigError(f"strict must be True (refuse when the model's forward cannot follow a pruned width) or "
                          f"False (freeze those groups and prune the rest), got {strict!r}")
    if not isinstance(prune_hidden, bool):  # before the capture: bad input costs nothing
        raise ConfigError(f"prune_hidden must be True or False, got {prune_hidden!r}")
    if isinstance(calib_samples, bool) or not isinstance(calib_samples, numbers.Integral) or calib_samples < 1:
        raise ConfigError(f"calib_samples must be a positive int, got {calib_samples!r}")
    opts = Options(round_to=None if round_to is None else int(round_to), calib=calib,
                   calib_samples=int(calib_samples), verify=bool(verify), inplace=bool(inplace),
                   progress=bool(progress), strict=bool(strict))
    opts.reconstruct = _flag("reconstruct", reconstruct, calib)
    opts.recalibrate_bn = _flag("recalibrate_bn", recalibrate_bn, calib)
    if getattr(decide, "needs_calib", False) and calib is None:
        raise DataError(f"method '{method}' needs calibration data: pass calib= (e.g. 1000 held-out training "
                        "images as a tensor, or a DataLoader); on the command line use --calib")
    _check_finite(model)
    if not getattr(decide, "training", False):  # training checks what it trained at finalize (DDP broadcasts at wrap)
        distributed.same_tensors("weights (parameters or buffers)", model.state_dict(), _SAME_WEIGHTS)
    example = as_tuple(example_inputs)
    ignored = match_modules(model, _patterns(ignore, "ignore"), "ignore")
    per_module = match_modules(model, list(amounts or {}), "amounts")
    gm = capture(model, example)
    dynamic = dynamic_dims(gm)  # where calibration / verification inputs may differ from the example
    opts.calib = calib = _replayable(calib, example, opts.calib_samples, dynamic)
    opts.verify_inputs = None if verify_inputs is None else _check_verify_inputs(verify_inputs, example, dynamic)
    an = analyze(gm, prune_hidden)
    frozen = {}  # the job's own freezing (the analysis is read-only): the user's ignore
    for g in an.groups:
        why = next((w for m in g.modules if (w := under(m, ignored)) is not None), None)
        if why is not None and not g.frozen:
            frozen[g.gid] = f"ignored by the user ({why if isinstance(why, str) else type(why).__name__})"
    prunable = [g for g in an.groups if g.prunable and g.gid not in frozen]
    if not prunable:
        reasons = sorted({g.frozen or frozen.get(g.gid) or "a single channel" for g in an.groups})
        raise NothingToPruneError(
            f"{type(model).__name__} has no prunable channel group"
            + (f" (every group is frozen: {'; '.join(reasons[:3])})" if reasons else " (it has no conv or linear "
               "layer whose output channels could shrink)")
            + _barrier_text(an)
            + ". See fxprune.describe_groups(model, example_inputs) for every group and why.")
    target = _target(an, prunable, amount, target_flops, target_params, amounts, per_module, opts.round_to)
    ctx = PruneContext(analysis=an, target=target, example_inputs=example, calib=calib,
                       progress=opts.progress, calib_samples=opts.calib_samples, frozen=frozen)
    if target_latency is not None:
        from .latency_target import latency_cost
        ctx.target = Target(metric="latency", value=float(target_latency), round_to=opts.round_to)
        ctx._cost = latency_cost(an, model, example, batch=latency_batch, threads=latency_threads,
                                 round_to=opts.round_to, timer=latency_timer, cache_dir=latency_cache,
                                 progress=opts.progress, dtype=latency_dtype, calib=calib)
    return Job(model, example, method, decide, method_options, gm, ctx, opts)


def finish(job: Job, decisions: dict[int, Decision], zeroed: dict[int, np.ndarray] | None = None,
           redecide=None) -> PruneResult:
    """Apply a method's decisions: reconstruct, rewrite, verify, re-estimate BatchNorms, count. The user's model
    is untouched unless inplace=True, and then only after everything passed. ``zeroed``: per group, the channels
    the model already reads as zero (masked while training); reconstruction fits the model as it ran that way.

    When the user's eager forward cannot follow a pruned width (a module stores it), the module's stored widths
    are updated where unambiguous, else the groups reaching it are frozen and ``redecide()`` (the method run
    again; None: the other decisions stand) decides the rest: retry.py. ``strict=True`` refuses instead."""
    ctx, opts, retry = job.ctx, job.opts, Retry()
    notes0 = list(ctx.notes)  # the method's; each round adds its own
    while True:
        try:
            result = _finish_once(job, decisions, zeroed, retry)
            break
        except VerificationError as exc:
            attempt = getattr(exc, "fxprune_attempt", None)
            step = None if opts.strict or attempt is None else next_step(retry, exc, *attempt)
            if step is None:
                raise
            ctx.notes[:] = notes0
            if step == "freeze":
                decisions = _redecide(job, decisions, retry, redecide)
                if zeroed:  # a frozen group keeps every channel, the ones its training-time mask zeroed too
                    zeroed = {g: z for g, z in zeroed.items() if g not in retry.frozen}
                ctx.notes[:] = notes0 = list(dict.fromkeys(ctx.notes))  # the method ran again: its notes once
    _retry_notes(job, retry, result)
    result.frozen_by_verification, result.retry_rounds = dict(retry.frozen), retry.rounds
    result.frozen = ctx.all_frozen  # with the groups this round froze
    return result


def _finish_once(job: Job, decisions, zeroed, retry: Retry) -> PruneResult:
    ctx, opts = job.ctx, job.opts
    distributed.agree("the decisions (kept channels and T per group)", (decisions, zeroed),
                      shown={g: len(d.keep) for g, d in decisions.items()})
    _note_rounding(ctx, decisions)
    plan = Plan(ctx.analysis, decisions, ctx.frozen)  # the one plan: reconstruction folds its T into it
    _check_target(ctx, plan, loose=bool(retry.frozen))
    cal = None
    if opts.reconstruct or opts.recalibrate_bn:
        from .reconstruct import calibrate
        cal = calibrate(plan, opts.calib, job.example, reconstruct=opts.reconstruct,
                        recalibrate_bn=opts.recalibrate_bn, samples=opts.calib_samples, progress=opts.progress,
                        notes=ctx.notes, zeroed=zeroed)
    bn = cal.bn if cal is not None else {}
    reference_gm = _with_tensors(job.gm, bn) if bn else job.gm  # shares every other tensor
    recalibrated = sorted({k.rsplit(".", 1)[0] for k in bn})
    # The T_j were fitted with the re-estimated statistics in place, so the model returned is verified as it is,
    # against a reference with the same statistics (old statistics + new T can overflow a deep net).
    if opts.inplace:  # no slim copy: a graph holding the full tensors and a skeleton, both slimmed as they are read
        slim_gm, work = plan.graph_only(reference_gm), plan.skeleton(job.model, bn)
        mat = Materializer(plan, work, lambda fqn: _full(job.model, bn, plan, fqn))
        retry.updated = apply_updates(retry, plan, job.gm, slim_gm, work)
    else:
        slim_gm, work = _slim_copy(job, plan, retry, bn)
    checks = []
    if opts.verify:
        eager = None
        if opts.inplace:
            eager = functools.partial(check_eager, mat, slim_interpreter(plan, reference_gm, slim_gm, lazy=True),
                                      full_copy=lambda: _slim_copy(job, plan, retry, bn))
        try:
            checks = _verify.verify(plan, reference_gm, slim_gm, work, job.example, opts.verify_inputs, opts.calib,
                                    ctx.notes, lazy=opts.inplace, eager_check=eager)
        except VerificationError as exc:
            exc.fxprune_attempt = (plan, job.gm, slim_gm, work)  # what freeze-and-retry inspects
            raise
    diff = max((c.certified for c in checks), default=0.0) if opts.verify else None
    samples = cal.samples if cal is not None else 0
    if distributed.active():  # each rank verified on its own calibration samples: report the worst, the total
        # (a rank whose verification raised is reported at this first collective, on every rank)
        diff = None if diff is None else distributed.allreduce_max(diff, "the verified difference")
        samples = int(distributed.allreduce_sum(torch.tensor(samples), "the calibration sample count"))
        distributed.same_tensors("slim models", mat.state_dict() if opts.inplace else work.state_dict(),
                                 "Every rank must build the same slim model from the same decisions: this is a bug "
                                 "in fxprune, please report it")
    flops_before, params_before = job.flops_before, count_params(job.model)
    if opts.inplace:  # everything passed: only now is the user's model changed, one tensor at a time
        del mat
        slim_in_place(plan, job.model, work, graphs=(slim_gm,), released=tuple({id(g): g for g in
                                                                               (job.gm, reference_gm)}.values()),
                      values=bn)
        # No eager forward of the user's object afterwards: its tensors are bitwise the ones the skeleton's checked
        # forward computed (Plan.slim_tensor), and a check that failed now could no longer leave the model as it was.
        del reference_gm
        work = job.model
    return PruneResult(model=work, graph=slim_gm, analysis=ctx.analysis, decisions=dict(plan.decisions),
                       flops=(flops_before, count_flops(work, job.one)), params=(params_before, count_params(work)),
                       method=job.method, notes=ctx.notes, verified=diff, verification=checks,
                       recalibrated_bn=recalibrated, calib_samples=samples, frozen=ctx.all_frozen)


def _slim_copy(job: Job, plan: Plan, retry: Retry, bn: dict):
    """The slim graph and a slim copy of the eager model (each pruned tensor sliced once, shared by both), with
    this round's stored-width updates and the re-estimated statistics. Returns (slim graph, slim model)."""
    slim_gm, work, _ = plan.build(job.gm, job.model)
    retry.updated = apply_updates(retry, plan, job.gm, slim_gm, work)
    if bn:
        plan.replace_tensors(work, bn)  # the slim graph shares the slim model's tensors
    return slim_gm, work


def _full(model: nn.Module, bn: dict, plan: Plan, fqn: str) -> torch.Tensor:
    """The full-width tensor a slim one is computed from: the re-estimated statistic, else the model's own."""
    from .rewrite import _get
    fqn = plan.an.canonical(fqn)
    return bn[fqn] if fqn in bn else _get(model, fqn)


def _redecide(job: Job, decisions: dict, retry, redecide) -> dict:
    """Freeze the groups verification blamed (on the job's PruneContext: the analysis is read-only and the user's
    model is not involved) and let the method decide the rest again; without ``redecide`` the other decisions
    stand."""
    t = job.ctx.target
    for g, why in retry.frozen.items():
        job.ctx.freeze(g, why)
    if t.amounts is not None:
        t.amounts = {g: a for g, a in t.amounts.items() if g not in retry.frozen}
    if redecide is None:  # a training-time method: its decisions were made while training
        note = ("the groups frozen after verification keep every channel (a training-time method's other "
                "decisions stand)")
        if note not in job.ctx.notes:
            job.ctx.notes.append(note)
        return {g: d for g, d in decisions.items() if g not in retry.frozen}
    if not job.ctx.prunable:
        raise NothingToPruneError(
            f"{type(job.model).__name__}: every prunable group reaches a module whose forward reads a stored "
            f"width ({'; '.join(sorted(set(retry.frozen.values()))[:3])}); nothing is left to prune")
    return redecide()


def _retry_notes(job: Job, retry, result: PruneResult):
    if retry.updated:
        result.notes.append("stored widths updated (verified): " + ", ".join(retry.updated))
    if retry.frozen:
        result.notes.append(f"{len(retry.frozen)} group(s) frozen after verification in {retry.rounds} round(s) "
                            f"(pass strict=True to refuse instead): groups {', '.join(map(str, sorted(retry.frozen)))}")
        t = job.ctx.target
        if t.metric is not None:
            fr = job.ctx.cost.fraction([len(result.decisions[g.gid].keep) if g.gid in result.decisions
                                        else g.width for g in job.ctx.groups], t.metric)
            if fr > t.value + 1e-9:
                result.notes.append(f"with those groups at full width the model keeps {fr:.3f} of its {t.metric}, "
                                    f"above target_{t.metric}={t.value:g}")


# ---- validation -----------------------------------------------------------------------------------------------
def method_option_names(decide) -> list[str]:
    """The keyword options a method's decide(ctx, ...) takes."""
    sig = inspect.signature(decide)
    return [p.name for p in list(sig.parameters.values())[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_method_options(method: str, decide, options: dict):
    accepted = method_option_names(decide)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for method "
            f"'{method}'; it takes {', '.join(accepted) if accepted else 'no method options'}, and every method "
            "takes amount, target_flops, target_params, target_latency (latency_batch, latency_threads), round_to, "
            "ignore, amounts, calib, calib_samples, "
            "reconstruct, recalibrate_bn, verify, verify_inputs, inplace, progress, strict")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_amounts(amount, target_flops, target_params, amounts, method_options, target_latency=None):
    given = [n for n, v in (("amount", amount), ("target_flops", target_flops), ("target_params", target_params),
                            ("target_latency", target_latency)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of amount / target_flops / target_params / target_latency, not "
                          f"{' and '.join(given)}")
    if target_latency is not None and amounts:
        raise ConfigError("amounts= (per-module amounts) cannot be combined with target_latency; give one of them")
    if not given and not amounts and method_options.get("tol") is None:  # ID may choose k by error tolerance
        raise ConfigError("say how much to prune: amount=0.5 (fraction of channels removed per group), "
                          "target_flops=0.5, target_params=0.5 or target_latency=0.5 (fraction kept)")
    if amounts is not None and not isinstance(amounts, dict):
        raise ConfigError(f"amounts must be a dict {{module name pattern: amount}}, got {type(amounts).__name__}")
    for name, v in (("amount", amount), *(((f"amounts[{k!r}]", a) for k, a in (amounts or {}).items()))):
        if v is not None and not (_is_number(v) and 0.0 <= float(v) < 1.0):
            raise ConfigError(f"{name} must be a number in [0, 1) (the fraction of channels removed), got {v!r}")
    for name, v in (("target_flops", target_flops), ("target_params", target_params)):
        if v is not None and not (_is_number(v) and 0.0 < float(v) <= 1.0):
            raise ConfigError(f"{name} must be a number in (0, 1] (the fraction kept), got {v!r}")


def _flag(name: str, value, calib) -> bool:
    """reconstruct / recalibrate_bn: None means 'on when calibration data is given'."""
    if value is None:
        return calib is not None
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True, False or None (on when calib= is given), got {value!r}")
    if value and calib is None:
        raise DataError(f"{name}=True needs calibration data: pass calib= (e.g. 1000 held-out training images)")
    return value


def _check_finite(model: nn.Module):
    """NaN/inf weights make every score and every comparison meaningless: refuse them up front."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"model tensor '{name}' has {bad} NaN/inf value(s); fxprune can neither rank nor "
                              "verify such a model: fix or re-initialize those weights first")


def _all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """torch.isfinite of a whole tensor makes float and bool temporaries of its size (1.7x the embedding of a
    language model, measured): check a block at a time."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + block]).all()) for i in range(0, flat.numel(), block))


def _with_tensors(gm, values: dict[str, torch.Tensor]):
    """The captured graph with some buffers (full width, keyed by FQN) replaced; every other tensor is shared,
    not copied."""
    from .rewrite import copy_structure
    return copy_structure(gm, lambda name, t: values[name].detach().clone() if name in values else t)


def _replayable(calib, example: tuple, samples: int, dynamic: tuple):
    """Calibration data is read several times (ID's rounds and probes, reconstruction, verification): a one-shot
    iterator (a generator) is read once here, up to ``samples`` samples, and kept as a list of batches."""
    if calib is None or isinstance(calib, (torch.Tensor, tuple, list)) or iter_is_self(calib) is False:
        return calib
    from .calibrate import batches
    return list(batches(calib, example, samples, dynamic=dynamic))


def iter_is_self(obj) -> bool | None:
    try:
        return iter(obj) is obj
    except Exception:  # not iterable, or opening it fails: the calibration reader reports that with context
        return None


def _patterns(value, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, nn.Module)):
        return [value]  # one pattern, not a sequence of letters
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{what} must be a module name pattern, a module, or a list of them; "
                          f"got {type(value).__name__}") from None
    for p in items:
        if not isinstance(p, (str, nn.Module)):
            raise ConfigError(f"{what} entries must be module name patterns (str) or modules, got {p!r}")
    return items


def _check_verify_inputs(value, example: tuple, dynamic: tuple) -> tuple:
    xs = as_tuple(value)
    if len(xs) != len(example) or any(not isinstance(t, torch.Tensor) or t.dim() != e.dim()
                                      or any(a != b for d, (a, b) in enumerate(zip(t.shape, e.shape))
                                             if d and d not in free)
                                      for t, e, free in zip(xs, example, dynamic + (frozenset(),) * len(xs))):
        raise ConfigError("verify_inputs must be tensor(s) shaped like example_inputs (any batch size"
                          + (", any sequence length" if any(d - {0} for d in dynamic) else "") + ")")
    return xs


def _target(an, prunable, amount, target_flops, target_params, amounts, per_module, round_to) -> Target:
    if amounts:
        amounts_by_group = group_amounts(prunable, amounts, per_module, default=float(amount or 0.0))
        return Target(amounts=amounts_by_group, round_to=round_to)
    if amount is not None:
        return Target(amounts={g.gid: float(amount) for g in prunable}, round_to=round_to)
    if target_flops is None and target_params is None:
        return Target(round_to=round_to)  # the method chooses widths itself (ID's tol=)
    metric, value = ("flops", target_flops) if target_flops is not None else ("params", target_params)
    return Target(metric=metric, value=float(value), round_to=round_to)


def _layer_kind(module: str) -> str:
    """A module path with its layer indices blanked: the q_proj of every layer is one kind."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", module)


def uniform_target(ctx: PruneContext, decisions: dict) -> Target:
    """Every layer keeps the same widths (``uniform=True``): the method's per-layer allocation, then one count
    per kind of group (the same modules in every layer: one attention's heads, one MLP), the mean over layers
    rounded DOWN to whole units (heads; a kv head with its query heads, so kv heads stay a divisor) — the kept
    cost never grows. Returned as per-group amounts for the method to decide again."""
    kinds: dict[tuple, list] = {}
    for gid in ctx.prunable:
        g = ctx.groups[gid]
        kinds.setdefault((tuple(_layer_kind(m) for m in g.modules), g.width, g.unit_size), []).append(g)
    amounts = {}
    for (_, width, unit), groups in kinds.items():
        counts = [len(decisions[g.gid].keep) if g.gid in decisions else width for g in groups]
        count = max(unit, int(np.mean(counts)) // unit * unit)
        for g in groups:
            amounts[g.gid] = (width - count) / width
    return Target(amounts=amounts, round_to=None)


def _barrier_text(an) -> str:
    """When a model has no prunable group, the ops that stopped it (weights computed in forward, ops outside the
    table) say more than the groups left over (often just the output layer)."""
    seen = list(dict.fromkeys(b.reason.split(" (node ")[0] for b in an.barriers))
    return f"; the first barriers: {'; '.join(seen[:3])}" if seen else ""


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


def _check_target(ctx: PruneContext, plan: Plan, loose: bool = False):
    """A method must never return more than the target asked for (the cost model is exact for conv/linear).
    ``loose``: groups were frozen after the method decided (retry without re-deciding); the report says so."""
    t = ctx.target
    if t.metric is None or loose:
        return
    widths = [len(plan.decisions[g.gid].keep) if g.gid in plan.decisions else g.width for g in ctx.groups]
    got = ctx.cost.fraction(widths, t.metric)
    if got > t.value + 1e-9:
        raise TargetError(f"the method kept {got:.4f} of the {t.metric}, above target_{t.metric}={t.value:g}; "
                          "this is a bug in the method pass, please report it")

