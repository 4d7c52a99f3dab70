"""An accuracy-latency sweep: prune one model to a series of targets with one or more methods, time and score
every slim model, and write the points as JSON, a PNG plot (score vs measured latency, Pareto front marked, one
series per method) and a text table.

One capture and one analysis serve every point (``stages.begin`` once; each point sets the target and asks the
method again), and with latency targets one measured latency table serves them all (it is also cached on disk).
FLOPs targets are timed too (slim beside the original, interleaved), so both kinds land on the same axis.

Example::

    res = fxprune.sweep(model, x, ["l1", "id"], targets=[0.7, 0.5, 0.3], calib=images,
                        metric=lambda m: fxprune.evaluate(m, (test_x, test_y)), out="sweep")
    print(res.table())
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence


from .console import progress_bar
from .context import Target
from .errors import ConfigError, FxPruneError
from .fileio import atomic_write, atomic_write_text

SWEEP_JSON, SWEEP_PNG = "sweep.json", "sweep.png"


@dataclass
class SweepResult:
    points: list[dict]          # one per (method, target): measured latency, FLOPs, score, rounds, error
    base: dict                  # the unpruned model's score and latency
    kind: str                   # "latency" | "flops"
    metric_name: str = "score"
    higher_is_better: bool = True
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "metric": self.metric_name, "higher_is_better": self.higher_is_better,
                "base": self.base, "points": self.points, "pareto": [p["name"] for p in pareto(self)]}

    def table(self) -> str:
        text = self._table()
        if any("int8_ms" in p for p in self.points):
            text += "\n\n" + self._int8_table()
        return text

    def _int8_table(self) -> str:
        head = ["method", "target", "int8 latency", "int8 ms", "speedup vs fp32", f"int8 {self.metric_name}",
                "int8 vs float error"]
        rows = [[p["method"], f"{p['target']:g}", f"{p['int8_latency']:.3f}", _f(p["int8_ms"]),
                 f"{p['int8_speedup']:.2f}x", _f(p.get("int8_score")), _f(p.get("int8_error"))]
                for p in self.points if "int8_ms" in p]
        w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
        return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows])

    def _table(self) -> str:
        head = ["method", "target", "latency", "ms", "FLOPs", self.metric_name, "rounds", "pareto"]
        front = {p["name"] for p in pareto(self)}
        rows = [["(base)", "-", "1.000", _f(self.base["latency_ms"]), "1.000", _f(self.base["score"]), "-", ""]]
        for p in self.points:
            if p.get("error"):
                rows.append([p["method"], f"{p['target']:g}", "-", "-", "-", "-", "-", p["error"][:60]])
                continue
            rows.append([p["method"], f"{p['target']:g}", f"{p['latency']:.3f}", _f(p["latency_ms"]),
                         f"{p['flops']:.3f}", _f(p["score"]), str(p.get("rounds") or "-"),
                         "*" if p["name"] in front else ""])
        w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w[i]) if i in (0, 7) else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
        return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows])


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def pareto(res: SweepResult) -> list[dict]:
    """The points no other point beats on both measured latency (lower) and score (the float models; the int8
    variants are plotted beside them)."""
    ok = [p for p in res.points if not p.get("error")]
    sign = 1 if res.higher_is_better else -1
    return [p for p in ok if not any(q is not p and q["latency"] <= p["latency"] and sign * q["score"] >= sign *
                                     p["score"] and (q["latency"] < p["latency"] or sign * q["score"] > sign *
                                                     p["score"]) for q in ok)]


def _check(methods, targets, kind, metric):
    if not methods or not all(isinstance(m, str) for m in methods):
        raise ConfigError("method must be a method name or a list of them, e.g. ['l1', 'id']")
    if kind not in ("latency", "flops"):
        raise ConfigError(f"kind must be 'latency' or 'flops', got {kind!r}")
    try:
        targets = [float(t) for t in targets]
    except (TypeError, ValueError):
        raise ConfigError(f"targets must be a list of fractions in (0, 1], got {targets!r}") from None
    if not targets or any(isinstance(t, bool) or not 0 < t <= 1 for t in targets):
        raise ConfigError(f"targets must be a non-empty list of fractions in (0, 1], got {targets!r}")
    if metric is not None and not callable(metric):
        raise ConfigError(f"metric must be a callable model -> float (e.g. accuracy), got {type(metric).__name__}")
    return targets


def sweep(model, example_inputs, method, targets: Sequence[float], *, metric: Optional[Callable] = None,
          metric_name: str = "score", higher_is_better: bool = True, kind: str = "latency", calib=None,
          latency_batch: int = 1, latency_threads: Optional[int] = None, latency_timer=None,
          latency_cache: Optional[str] = None, out: Optional[str] = None, progress: bool = True,
          int8: bool = False, int8_timer=None, **options) -> SweepResult:
    """Prune ``model`` with each method to each target (``kind`` "latency": target_latency, "flops":
    target_flops), time each slim model beside the original and score it with ``metric(slim_model) -> float``
    (None: no score). ``out``: a folder for sweep.json and sweep.png. ``int8``: also time and score every slim
    model after ORT's int8 quantization (needs calib; see sweep_int8). Other options go to every prune."""
    from .api import _method
    from .latency_target import latency_cost, prune_to_latency, widths_of
    from .stages import begin, check_method_options, finish
    methods = [method] if isinstance(method, str) else list(method)
    targets = _check(methods, targets, kind, metric)
    if int8 and calib is None:
        raise ConfigError("int8=True quantizes every slim model, whose activation ranges need calibration data: "
                          "pass calib=")
    if int8_timer is not None and (not int8 or getattr(int8_timer, "dtype", "float32") != "int8"):
        raise ConfigError("int8_timer= is for int8=True and must time int8 models (a timer with dtype = 'int8')")
    if out is not None:
        from .fileio import check_writable
        check_writable(os.path.join(os.fspath(out), SWEEP_JSON), "sweep JSON")
    first = _method(methods[0], training=False)
    objs = {m: _method(m, training=False) for m in methods}
    for m in methods[1:]:
        if getattr(objs[m], "needs_calib", False) and calib is None:
            from .errors import DataError
            raise DataError(f"method '{m}' needs calibration data: pass calib= (e.g. 1000 held-out training inputs)")
        check_method_options(m, objs[m], {k: v for k, v in options.items() if k in _method_keys(objs[m])})
    job = begin(model, example_inputs, methods[0], first, calib=calib, progress=progress,
                target_latency=targets[0] if kind == "latency" else None,
                target_flops=targets[0] if kind == "flops" else None, latency_batch=latency_batch,
                latency_threads=latency_threads, latency_timer=latency_timer, latency_cache=latency_cache,
                method_options={k: v for k, v in options.items() if k in _method_keys(first)},
                **{k: v for k, v in options.items() if k not in _method_keys(first)})
    if kind == "flops":  # time FLOPs points on the same axis: the same table machinery gives the timer
        lat = latency_cost(job.analysis, model, job.example, batch=latency_batch, threads=latency_threads,
                           round_to=job.opts.round_to, timer=latency_timer, cache_dir=latency_cache,
                           progress=progress).latency
    else:
        lat = job.ctx.cost.latency
    base = {"score": float(metric(model)) if metric else None, "latency_ms": lat.base_ms}
    t8 = None
    if int8:
        from . import sweep_int8
        t8 = sweep_int8.int8_timer(int8_timer, latency_threads, job.opts.calib)
    points = []
    bar = progress_bar(total=len(methods) * len(targets), desc="sweep", disable=not progress)
    try:
        for m in methods:
            mjob = replace(job, method=m, decide=objs[m],
                           method_options={k: v for k, v in options.items() if k in _method_keys(objs[m])})
            for t in targets:
                bar.set_postfix_str(f"{m} @ {t:g}")
                mjob.ctx.notes = []
                mjob.ctx.target = Target(metric=kind, value=t, round_to=job.opts.round_to)
                point = {"name": f"{m}@{t:g}", "method": m, "target": t}
                try:
                    if kind == "latency":
                        res = prune_to_latency(mjob)
                        point.update(latency=res.latency["measured"], predicted=res.latency["predicted"],
                                     rounds=len(res.latency["rounds"]), latency_ms=res.latency["slim_ms"])
                        o = res.latency["original_ms"]
                    else:
                        res = finish(mjob, mjob.decide(mjob.ctx, **mjob.method_options))
                        o, s = lat.timer.models_ms([model, res.model], job.example, latency_batch)
                        point.update(latency=s / o, latency_ms=s, rounds=None,
                                     predicted=lat.fraction(widths_of(mjob.ctx, res.decisions)))
                    if t8 is not None:
                        point.update(sweep_int8.int8_point(t8, model, res.model, job.example, latency_batch, o,
                                                           point["latency_ms"], job.opts.calib, metric))
                    point["flops"] = res.flops[1] / res.flops[0]
                    point["score"] = float(metric(res.model)) if metric else None
                    point["model"] = res.model
                except FxPruneError as e:  # one unreachable point does not end the sweep
                    point["error"] = str(e).splitlines()[0]
                points.append(point)
                bar.update()
    finally:
        bar.close()
    result = SweepResult([{k: v for k, v in p.items() if k != "model"} for p in points], base, kind, metric_name,
                         higher_is_better)
    result.models = {p["name"]: p["model"] for p in points if "model" in p}
    if out is not None:
        result.files = write(result, out)
    return result


def _method_keys(obj) -> list[str]:
    from .stages import method_option_names
    return method_option_names(obj)


def write(res: SweepResult, out) -> list[str]:
    """sweep.json and sweep.png in ``out`` (atomic; the folder is created)."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    j = atomic_write_text(os.path.join(out, SWEEP_JSON), json.dumps(res.to_dict(), indent=2) + "\n")
    p = atomic_write(os.path.join(out, SWEEP_PNG), lambda tmp: plot(res, tmp), ".png")
    return [j, p]


def plot(res: SweepResult, path, title: str = "", lines: bool = True, labels: bool = False) -> None:
    """Score vs measured latency (fraction of the original's): one series per method, the Pareto front as a
    line, the base as a star. ``lines``: join each series' points; ``labels``: name every point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scored = res.base["score"] is not None
    if scored:
        ax.scatter([1.0], [res.base["score"]], marker="*", s=220, color="black", zorder=3, label="unpruned")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, m in enumerate(dict.fromkeys(p["method"] for p in res.points)):
        pts = sorted((p for p in res.points if p["method"] == m and not p.get("error")), key=lambda p: p["latency"])
        ys = [p["score"] if scored else p["flops"] for p in pts]
        ax.plot([p["latency"] for p in pts], ys, marker=markers[i % 6], color=colors[i % 6], lw=1 if lines else 0,
                ms=7, label=m)
        q8 = [p for p in pts if "int8_ms" in p and (not scored or p.get("int8_score") is not None)]
        if q8:  # the same slim models after int8 quantization: hollow markers, dashed
            ax.plot([p["int8_latency"] for p in q8], [p["int8_score"] if scored else p["flops"] for p in q8],
                    marker=markers[i % 6], color=colors[i % 6], mfc="none", ls="--", lw=1 if lines else 0, ms=7,
                    label=f"{m} int8")
        for p, y in zip(pts, ys) if labels else ():
            ax.annotate(p["name"], (p["latency"], y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = sorted(pareto(res), key=lambda p: p["latency"]) if scored else []
    if front:
        ax.plot([p["latency"] for p in front], [p["score"] for p in front], color="black", lw=2.5, alpha=0.25,
                zorder=1, label="Pareto front")
        ax.scatter([p["latency"] for p in front], [p["score"] for p in front], s=160, facecolors="none",
                   edgecolors="black", zorder=4)
    for t in sorted({p["target"] for p in res.points}) if res.kind == "latency" else []:
        ax.axvline(t, color="grey", ls=":", lw=0.7)
    ax.set_xlabel("measured ONNX Runtime latency (fraction of the unpruned model's)")
    ax.set_ylabel(res.metric_name if scored else "FLOPs kept (fraction)")
    ax.set_title(title or f"{res.metric_name} vs measured latency ({res.kind} targets)")
    ax.grid(alpha=0.3)
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right" if res.higher_is_better else "upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def reconstruction_error(reference, data) -> Callable:
    """A metric: relative output error ||f_slim(x) - f(x)||^2 / ||f(x)||^2 on ``data`` (lower is better)."""
    import torch
    with torch.no_grad():
        want = reference.eval()(data)

    def metric(m):
        with torch.no_grad():
            got = m.eval()(data)
        return float((got - want).square().sum() / want.square().sum().clamp_min(1e-30))
    return metric


__all__ = ["sweep", "SweepResult", "pareto", "plot", "write", "reconstruction_error"]
