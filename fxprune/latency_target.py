"""``target_latency=``: prune until the slim model's MEASURED ONNX Runtime latency is within the target.

The method allocates widths against the measured latency model (``latency.LatencyModel``: the same greedy or
global ranking as a FLOPs target, with the predicted fraction of the model's latency as the cost). The real slim
model (its widths are all that matter for time, so no reconstruction yet) is then timed beside the original,
interleaved; when it is above the target, or more than ``LAND`` under it, the allocation's target is set to the
prediction that the measured/predicted ratio of these widths says the target corresponds to, and the method
decides again, at most ``MAX_ROUNDS`` times.
The slim model kept is the one measured closest under the target; it is then reconstructed, verified and
counted like any other (``stages.finish``). Every round's predicted and measured latency goes in the report.

Example::

    res = fxprune.prune(model, x, "id", target_latency=0.5, calib=images, latency_threads=1)
    print(res.latency["rounds"])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import distributed
from .errors import ConfigError, TargetError
from .latency import LatencyCost, LatencyModel

MAX_ROUNDS = 4
LAND = 0.9     # measured latency should land in [LAND * target, target]
MARGIN = 0.98  # a lowered allocation aims this much under what the measured overshoot says (timing noise)
SURPRISE, RETIME = 0.25, 2  # a measured ratio this far (relative) from the prediction is timed up to 2 more times


@dataclass
class Round:
    allocated: float   # the target the allocation was run with (predicted fraction)
    predicted: float   # the latency model's prediction for the widths chosen
    measured: float    # slim / original, timed side by side
    original_ms: float
    slim_ms: float


def latency_cost(an, model, example, *, batch: int, threads, round_to, timer=None, cache_dir=None,
                 progress: bool = True, dtype: str = "float32", calib=None) -> LatencyCost:
    """The cost model of a latency target: the measured table (rank 0 measures; every rank gets its numbers).
    ``dtype`` "int8": layers and models are timed quantized (``timing.OrtTimer(dtype="int8")``)."""
    if timer is None:
        from .timing import OrtTimer
        timer = OrtTimer(threads=threads, dtype=dtype, calib=calib)
    elif getattr(timer, "dtype", "float32") != dtype:
        raise ConfigError(f"latency_dtype={dtype!r} but the latency_timer given times "
                          f"{getattr(timer, 'dtype', 'float32')!r} models")
    lat = LatencyModel(an, timer, model, example, batch=batch, round_to=round_to, cache_dir=cache_dir,
                       progress=progress)
    return LatencyCost(an, lat)


def widths_of(ctx, decisions: dict) -> np.ndarray:
    return np.array([len(decisions[g.gid].keep) if g.gid in decisions else g.width for g in ctx.groups])


def prune_to_latency(job):
    """Decide, time, adjust; then finish with the best decisions. See the module doc."""
    from .rewrite import Plan
    from .stages import finish
    ctx = job.ctx
    lat: LatencyModel = ctx.cost.latency
    target, notes = ctx.target.value, list(ctx.notes)
    from .targets import floor_widths
    floor = lat.fraction(floor_widths(ctx.analysis, ctx.cost, ctx.prunable, "latency", ctx.target.round_to))
    alloc, rounds, best = target, [], None
    for _ in range(MAX_ROUNDS):
        ctx.notes = list(notes)
        ctx.target = replace(ctx.target, value=alloc)
        try:
            decisions = job.decide(ctx, **job.method_options)
        except TargetError:
            if not rounds:
                raise  # the target itself is below the table's floor: that error says so
            break  # a lowered allocation went below the floor: keep what was measured, if anything
        predicted = lat.fraction(widths_of(ctx, decisions))
        _, slim = Plan(ctx.analysis, decisions).slim(job.gm, job.model)
        orig_ms, slim_ms = distributed.broadcast_object(_time(lat, job, slim, predicted))
        r = Round(alloc, predicted, slim_ms / orig_ms, orig_ms, slim_ms)
        rounds.append(r)
        if r.measured <= target and (best is None or r.measured > best[0].measured):
            best = (r, decisions, list(ctx.notes))
        if LAND * target <= r.measured <= target:
            break
        # the allocation lands its PREDICTION under its target; aim the prediction where the measurement says
        # the target is (the model's error on these widths), a little under it when the last one was above
        new = min(1.0, target * r.predicted / max(r.measured, 1e-12) * (MARGIN if r.measured > target else 1.0))
        new = max(new, floor + 1e-9)  # below the floor no allocation exists: the fastest widths are the last try
        if abs(new - alloc) < 1e-4:
            break
        alloc = new
    if best is None:
        raise TargetError(f"target_latency={target:g} was not reached in {len(rounds)} rounds: the slim models "
                          f"measured {', '.join(f'{r.measured:.3f}' for r in rounds)} of the original's latency "
                          "(predicted " + ", ".join(f"{r.predicted:.3f}" for r in rounds) + "); ask for a larger "
                          "target_latency, or time with fixed threads (latency_threads=1) on a quieter machine")
    r, decisions, ctx.notes = best
    ctx.target = replace(ctx.target, value=r.allocated)
    result = finish(job, decisions)
    result.latency = summary(lat, target, rounds, r)
    result.notes.append(note(result.latency))
    ctx.target = replace(ctx.target, value=target)
    return result


def _time(lat: LatencyModel, job, slim, predicted: float) -> tuple[float, float]:
    """(original ms, slim ms) timed side by side; a ratio far from the prediction is timed again (up to
    RETIME times) and the median ratio's pair kept: on a shared machine one burst of load can halve or double a
    measurement, and one such outlier would steer the next round."""
    pairs = []
    for _ in range(1 + RETIME):
        o, s = lat.timer.models_ms([job.model, slim], job.example, lat.batch)
        pairs.append((o, s))
        if abs(s / o - predicted) <= SURPRISE * predicted:
            break
    pairs.sort(key=lambda p: p[1] / p[0])
    return pairs[len(pairs) // 2]


def summary(lat: LatencyModel, target: float, rounds: list[Round], chosen: Round) -> dict:
    return {"target": target, "batch": lat.batch, "dtype": getattr(lat.timer, "dtype", "float32"), "key": lat.table.key, "table": lat.table.path,
            "measured": chosen.measured, "predicted": chosen.predicted, "slim_ms": chosen.slim_ms,
            "original_ms": chosen.original_ms,
            "prediction_error": abs(chosen.predicted - chosen.measured) / chosen.measured,
            "rounds": [r.__dict__ for r in rounds]}


def note(s: dict) -> str:
    per_round = "; ".join(f"round {i + 1}: predicted {r['predicted']:.3f}, measured {r['measured']:.3f}"
                          for i, r in enumerate(s["rounds"]))
    return (f"latency (ONNX Runtime{', int8' if s.get('dtype') == 'int8' else ''}, batch {s['batch']}, threads {s['key'].get('threads')}): {s['measured']:.3f} "
            f"of the original measured, target {s['target']:g} ({per_round})")
