"""The one call: ``fxprune.compile(model, example_inputs, method=..., amount=... | target_flops=...)``.

Pipeline (fxprune/stages.py): capture -> analysis -> (ignore / per-module amounts) -> method pass decides ->
reconstruction and BatchNorm statistics from calibration data -> one rewrite engine slims a copy of the model and
the graph -> verification against the hooked full-width original and of the eager module against the slim graph
-> FLOPs/params before and after.

The user's model is never left half-pruned: the slim model is a copy (each pruned tensor sliced once, shared with the
slim graph); with ``inplace=True`` no copy is made: everything is verified lazily first (stages.finish, lazy.py),
then the user's tensors are slimmed one at a time.

Example::

    slim = fxprune.compile(model, torch.randn(2, 3, 32, 32), method="l1", target_flops=0.5, round_to=8)
    res = fxprune.prune(model, x, method="id", amount=0.5, calib=images)   # model, graph, report
    print(res.report)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import distributed, passes
from .analysis import analyze
from .capture import as_tuple, capture, eval_mode
from .errors import ConfigError
from .stages import DEFAULT_CALIB_SAMPLES, PruneResult, begin, finish, uniform_target
from .targets import DEFAULT_ROUND_TO
from .training import Pruner, check_optimizer, unwrap


def _method(name: str, training: bool):
    """The method object registered as ``name`` (the one place the core's callers look a method up)."""
    method = passes.get(name)
    if training and not getattr(method, "training", False):
        raise ConfigError(f"method '{name}' prunes a trained model in one shot: use fxprune.prune(model, x, "
                          f"'{name}', ...); training-time methods: {', '.join(passes.training_names())}")
    if not training and getattr(method, "training", False):
        raise ConfigError(f"method '{name}' prunes during training: use pruner = fxprune.prepare(model, x, "
                          f"'{name}', optimizer=opt, steps=n, ...) in your training loop, then pruner.finalize(); "
                          f"one-shot methods: {', '.join(passes.oneshot_names())}")
    return method


def prune(model: nn.Module, example_inputs, method: str = "l1", *, amount: float | None = None,
          target_flops: float | None = None, target_params: float | None = None,
          round_to: int | None = DEFAULT_ROUND_TO, ignore=(), amounts: dict | None = None, calib=None,
          calib_samples: int = DEFAULT_CALIB_SAMPLES, reconstruct: bool | None = None,
          recalibrate_bn: bool | None = None, verify: bool = True, verify_inputs=None, inplace: bool = False,
          progress: bool = True, strict: bool = False, target_latency: float | None = None, latency_batch: int = 1,
          latency_threads: int | None = None, latency_timer=None, latency_cache: str | None = None,
          latency_dtype: str = "float32", prune_hidden: bool = False, uniform: bool = False,
          **method_options) -> PruneResult:
    """Prune and return the full result (slim model, slim graph, decisions, costs, report). See ``compile``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(uniform, bool):
        raise ConfigError(f"uniform must be True (every layer keeps the same widths) or False, got {uniform!r}")
    with distributed.scope("fxprune.prune"):  # under torchrun: a failure on one rank is an error on every rank
        job = begin(model, example_inputs, method, _method(method, training=False), amount=amount,
                    target_flops=target_flops, target_params=target_params, round_to=round_to, ignore=ignore,
                    amounts=amounts, calib=calib, calib_samples=calib_samples, reconstruct=reconstruct,
                    recalibrate_bn=recalibrate_bn, verify=verify, verify_inputs=verify_inputs, inplace=inplace,
                    progress=progress, method_options=method_options, target_latency=target_latency,
                    latency_batch=latency_batch, latency_threads=latency_threads, latency_timer=latency_timer,
                    latency_cache=latency_cache, strict=strict, latency_dtype=latency_dtype,
                    prune_hidden=prune_hidden)
        if target_latency is not None:
            from .latency_target import prune_to_latency
            return prune_to_latency(job)
        decisions = job.decide(job.ctx, **job.method_options)
        if uniform:  # allocate per layer, then one shape for every layer (runtimes that read only the config)
            job.ctx.target = uniform_target(job.ctx, decisions)
            decisions = job.decide(job.ctx, **job.method_options)
        return finish(job, decisions, redecide=lambda: job.decide(job.ctx, **job.method_options))


def compile(model: nn.Module, example_inputs, method: str = "l1", **options) -> nn.Module:  # noqa: A001
    """Return a physically smaller copy of ``model`` (the same class, fewer channels), verified.

    method: a registered pass ("l1", "l2", "id", ...). One of: amount (fraction of each group's channels
    removed), target_flops / target_params (fraction kept, reached within 2 points and never exceeded),
    target_latency (fraction of the model's ONNX Runtime latency on this machine, measured at latency_batch
    (default 1) with latency_threads (default ORT's): the slim model is timed and never above it; see
    fxprune/latency_target.py; latency_timer= replaces the ORT timer, latency_cache= the table's folder;
    latency_dtype="int8" times the model after ONNX Runtime's int8 quantization, calibrated on calib=).
    round_to: kept widths rounded up to a multiple (default 16, measured best for ONNX Runtime's CPU kernels;
    None for exact widths). ignore: modules or name patterns whose output channels stay. amounts:
    {pattern: amount} per module (the most specific pattern wins). calib: calibration data; with it, every
    method gets least-squares reconstruction of the consumers' inputs (reconstruct=False turns it off) and
    re-estimated BatchNorm statistics (recalibrate_bn=False turns it off). verify: check against the masked
    reference (default True; verify_inputs= to verify on your own inputs). inplace: slim the user's model object
    itself, tensor by tensor after verification, instead of returning a copy (peak: the model plus one tensor plus
    verification's working set). strict: when the model's own forward cannot follow a
    pruned width (a module stores it), refuse (True) instead of freezing the groups that reach that module and
    pruning the rest (False, the default; the report lists each frozen group and why). Method options (e.g. ID's tol=) pass through; an
    option no one takes is an error.
    """
    return prune(model, example_inputs, method, **options).model


def prepare(model: nn.Module, example_inputs, method: str = "csgd", *, optimizer: torch.optim.Optimizer,
            steps: int, amount: float | None = None, target_flops: float | None = None,
            target_params: float | None = None, round_to: int | None = DEFAULT_ROUND_TO, ignore=(),
            amounts: dict | None = None, calib=None, calib_samples: int = DEFAULT_CALIB_SAMPLES,
            reconstruct: bool | None = None, recalibrate_bn: bool | None = None, verify: bool = True,
            verify_inputs=None, progress: bool = True, strict: bool = False, target_latency: float | None = None,
            latency_batch: int = 1, latency_threads: int | None = None, latency_timer=None,
            latency_cache: str | None = None, latency_dtype: str = "float32", prune_hidden: bool = False,
            **method_options) -> Pruner:
    """Analyse the model once and hook a training-time method ("csgd", "aofp", "abfp") into its optimizer.

    Takes fxprune.prune's targets and options, plus the optimizer the user steps and the number of optimizer
    steps the user will run (``steps``: methods schedule their strength to be done by then). calib= is used at
    finalize() (reconstruction and BatchNorm statistics, as in fxprune.prune). Nothing about the model changes
    here except the hooks; ``remove()`` takes them off. With target_latency= the widths are allocated here, against
    the latency table measured now (the predicted latency; fxprune.prune also re-times the slim model).
    prune_hidden: as prune's; aofp / abfp prune the stream (their masks also zero the removed channels at every
    RMSNorm's input), csgd keeps it with the reason (an RMSNorm cannot take its merge's T).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be the torch.optim.Optimizer you step, got {type(optimizer).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ConfigError(f"steps must be the number of optimizer steps you will train for (a positive int), "
                          f"got {steps!r}")
    inner = unwrap(model)
    method_cls = _method(method, training=True)
    check_optimizer(inner, optimizer)
    with distributed.scope("fxprune.prepare"):
        job = begin(inner, example_inputs, method, method_cls, amount=amount, target_flops=target_flops,
                    target_params=target_params, round_to=round_to, ignore=ignore, amounts=amounts, calib=calib,
                    calib_samples=calib_samples, reconstruct=reconstruct, recalibrate_bn=recalibrate_bn,
                    verify=verify, verify_inputs=verify_inputs, progress=progress and distributed.rank() == 0,
                    method_options=method_options, target_latency=target_latency, latency_batch=latency_batch,
                    latency_threads=latency_threads, latency_timer=latency_timer, latency_cache=latency_cache,
                    strict=strict, latency_dtype=latency_dtype, prune_hidden=prune_hidden)
        return Pruner(job, inner, optimizer, int(steps), method_cls, job.method_options)


def groups(model: nn.Module, example_inputs, prune_hidden: bool = False) -> list:
    """The coupled channel groups of a model (print each with ``g.describe()``)."""
    with eval_mode(model):
        return analyze(capture(model, as_tuple(example_inputs)), prune_hidden).groups


def describe_groups(model: nn.Module, example_inputs, prune_hidden: bool = False) -> str:
    """Every channel group (what it couples, or why it is frozen) and every barrier op with its node, module
    and reason (``prune_hidden``: as prune's)."""
    with eval_mode(model):
        return analyze(capture(model, as_tuple(example_inputs)), prune_hidden).describe()


__all__ = ["compile", "prune", "prepare", "groups", "describe_groups", "PruneResult"]
