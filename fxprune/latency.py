"""A latency model measured, not assumed: the model's own layers timed in ONNX Runtime at candidate widths.

HALP's idea (Shen et al. 2022): what removing a unit of channels saves is T(width) - T(width - unit) of the
layers it touches, measured on the target runtime. Every conv2d and linear of the captured graph is one term;
its time at c_in x c_out kept channels is taken as separable, T(C, C') * a(c_in) * b(c_out), with a and b
measured along the aligned widths the width policy allows (c_in at full c_out, c_out at full c_in; ORT's CPU
kernels block input and output channels independently, so padding effects separate too) and interpolated
linearly between measured points. Everything else (BatchNorm, activations, pooling, adds) is the rest: the whole
model's measured time minus its layers', scaled by the fraction of activation elements kept. At full width the
prediction is the measured model time by construction; ``prediction error`` is what the slim models show.

Measurements are cached on disk (one JSON file per machine, ORT version, thread count and batch; one entry per
layer signature and width), written atomically, so a sweep, a second run or a benchmark reads them back.

The timer is a parameter (``Timer`` protocol): ``timing.OrtTimer`` measures, tests pass a deterministic fake.

Example::

    lat = LatencyModel(an, OrtTimer(threads=1), batch=1, round_to=16)
    lat.fraction(widths)   # predicted slim latency / measured full latency
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from . import distributed
from .console import progress_bar
from .errors import ConfigError
from .fileio import atomic_write_text
from .ops import node_handler
from .targets import CostModel, width_step

MAX_POINTS = 24  # measured widths per layer dimension; finer grids are subsampled evenly (ends kept)


@dataclass(frozen=True)
class LayerSig:
    """What a layer's time depends on besides its two widths (and the table's batch / threads)."""
    kind: str                  # "conv" | "linear"
    c_in: int                  # full-width input channels (features, for linear)
    c_out: int
    spatial: tuple = ()        # conv: input (H, W); linear: leading dims between batch and features
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    dtype: str = "float32"

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Timer(Protocol):
    """Times one layer at given widths, and whole models side by side (interleaved). A timer that times the
    int8-quantized layers and models has ``dtype = "int8"`` (absent: float32)."""

    def machine_key(self) -> dict:
        """What the measurements depend on besides the layer: machine, runtime version, threads."""

    def layer_ms(self, sig: LayerSig, c_in: int, c_out: int, batch: int) -> float:
        """Milliseconds of the layer alone at these widths, per-run overhead of the runtime excluded (a timer
        may also offer ``overhead_ms()``: that per-run cost, which every model run pays whatever its widths)."""

    def models_ms(self, models: list, example: tuple, batch: int) -> list[float]:
        """Milliseconds of each model (nn.Module) at this batch, timed interleaved; medians."""


def default_cache_dir() -> str:
    return os.environ.get("FXPRUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxprune")


class LatencyTable:
    """Measured layer times on disk: {layer signature: {"c_in,c_out": ms}} for one (machine, ORT, threads,
    batch). A missing entry is measured with the timer and the file rewritten atomically."""

    def __init__(self, timer: Timer, batch: int, cache_dir: str | None = None):
        self.timer, self.batch = timer, int(batch)
        self.key = {**timer.machine_key(), "batch": self.batch}
        dtype = getattr(timer, "dtype", "float32")  # a timer that quantizes says so; float32 tables keep their key
        if dtype != "float32":
            self.key["dtype"] = dtype
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        folder = os.path.join(cache_dir or default_cache_dir(), "latency")
        self.path = os.path.join(folder, f"{digest}.json")
        self.entries: dict[str, dict[str, float]] = {}
        self.measured = 0  # measurements taken in this process (0: everything came from disk)
        self._dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("key") == self.key:
                self.entries = data.get("layers", {})
        except (OSError, ValueError):
            pass  # no table yet, or a damaged one: measure again

    def get(self, sig: LayerSig, c_in: int, c_out: int) -> float:
        row = self.entries.setdefault(sig.key(), {})
        k = f"{int(c_in)},{int(c_out)}"
        if k not in row:
            row[k] = float(self.timer.layer_ms(sig, int(c_in), int(c_out), self.batch))
            self.measured += 1
            self._dirty = True
        return row[k]

    def save(self) -> None:
        if not self._dirty:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "layers": self.entries}, sort_keys=True))
        self._dirty = False


@dataclass
class _Term:
    sig: LayerSig
    fin: tuple     # (const, coef): kept input fraction = const + coef . (widths / n)
    fout: tuple
    ci: np.ndarray     # measured input widths (ascending) and a(c_in) there
    a: np.ndarray
    co: np.ndarray
    b: np.ndarray
    full_ms: float


class LatencyModel:
    """Predicted ORT latency of the model as a function of every group's kept width (see the module doc)."""

    def __init__(self, an, timer: Timer, model: torch.nn.Module, example: tuple, *, batch: int = 1,
                 round_to: int | None = 16, cache_dir: str | None = None, progress: bool = True,
                 cost: CostModel | None = None):
        self.an, self.timer, self.batch, self.round_to = an, timer, int(batch), round_to
        self.cost = cost or CostModel(an)
        self.n = self.cost.n
        self.table = LatencyTable(timer, batch, cache_dir)
        state = self._build(model, example, progress) if distributed.rank() == 0 else None
        self.base_ms, self.terms, self.fixed_ms = distributed.broadcast_object(state)  # one table on every rank
        self.act_terms = self._activations()
        layer_ms = sum(t.full_ms for t in self.terms)
        # the runtime's per-run cost stays whatever is pruned; the rest scales with the activations kept
        self.fixed_ms = min(self.fixed_ms, max(self.base_ms - layer_ms, 0.0))
        self.scale, self.rest_ms = 1.0, self.base_ms - layer_ms - self.fixed_ms
        if self.rest_ms < 0 and layer_ms > 0:  # layers alone timed slower than the whole model (fusion, cache)
            self.scale, self.rest_ms = (self.base_ms - self.fixed_ms) / layer_ms, 0.0

    def _build(self, model, example, progress: bool):
        base_ms = float(self.timer.models_ms([model], example, self.batch)[0])
        layers = list(self._layers())
        terms = []
        bar = progress_bar(total=len(layers), desc="latency table", disable=not progress, leave=False)
        try:
            for sig, fin, fout, gin, gout in layers:
                terms.append(self._measure(sig, fin, fout, gin, gout))
                bar.update()
        finally:
            bar.close()
            self.table.save()
        overhead = getattr(self.timer, "overhead_ms", None)
        return base_ms, terms, float(overhead()) if overhead is not None else 0.0

    # ---- building ---------------------------------------------------------------------------------------
    def _layers(self):
        """(signature, input fraction, output fraction, input grid group, output grid group) per conv2d /
        linear whose widths fxprune can change."""
        for node in self.an.gm.graph.nodes:
            h = node_handler(node)
            if h is None or h.family not in ("conv", "linear"):
                continue
            sig = _signature(node, h.family)
            if sig is None:
                continue
            src, out = self.an.cmap(self.an.data_input(node)), self.an.cmap(node)
            fin = self.cost._fraction(src) if src is not None else (1.0, np.zeros_like(self.n))
            fout = self.cost._fraction(out) if out is not None else (1.0, np.zeros_like(self.n))
            if sig.groups > 1 or (fin[1].sum() == 0 and fout[1].sum() == 0):
                continue  # grouped/depthwise convs scale with the activations (the rest); fixed layers are rest
            yield sig, fin, fout, _single_group(fin), _single_group(fout)

    def _grid(self, full: int, fr, gid) -> np.ndarray:
        """The widths of one layer dimension worth measuring: those the width policy lets its group take."""
        const, coef = fr
        if gid is not None:
            g = self.an.groups[gid]
            u = width_step(g, self.round_to)
            ks = sorted(set(range(u, g.width + 1, u)) | {g.width})
            vals = [full * (const + coef[gid] * k / g.width) for k in ks]
        else:
            vals = [full * (const + coef.sum() * f) for f in np.linspace(1 / 8, 1, 8)]
        vals = sorted({max(1, int(round(v))) for v in vals} | {full})
        if len(vals) > MAX_POINTS:
            idx = np.unique(np.round(np.linspace(0, len(vals) - 1, MAX_POINTS)).astype(int))
            vals = [vals[i] for i in idx]
        return np.asarray(vals, dtype=np.int64)

    def _measure(self, sig, fin, fout, gin, gout) -> _Term:
        ci = self._grid(sig.c_in, fin, gin) if fin[1].sum() > 0 else np.array([sig.c_in])
        co = self._grid(sig.c_out, fout, gout) if fout[1].sum() > 0 else np.array([sig.c_out])
        full = max(self.table.get(sig, sig.c_in, sig.c_out), 1e-9)
        a = np.array([self.table.get(sig, c, sig.c_out) for c in ci]) / full
        b = np.array([self.table.get(sig, sig.c_in, c) for c in co]) / full
        return _Term(sig, fin, fout, ci, a, co, b, full)

    def _activations(self):
        terms = []
        for node in self.an.gm.graph.nodes:
            cm, val = self.an.cmap(node), node.meta.get("val")
            if cm is None or not isinstance(val, torch.Tensor):
                continue
            terms.append((float(val.numel()), self.cost._fraction(cm)))
        return terms

    # ---- prediction -------------------------------------------------------------------------------------
    def predict_ms(self, widths) -> float:
        ratio = np.asarray(widths, dtype=np.float64) / self.n
        total = 0.0
        for t in self.terms:
            ci = t.sig.c_in * (t.fin[0] + t.fin[1] @ ratio)
            co = t.sig.c_out * (t.fout[0] + t.fout[1] @ ratio)
            total += t.full_ms * np.interp(ci, t.ci, t.a) * np.interp(co, t.co, t.b)
        if self.rest_ms and self.act_terms:
            kept = sum(m * (fr[0] + fr[1] @ ratio) for m, fr in self.act_terms)
            total_m = sum(m for m, _ in self.act_terms)
            rest = self.rest_ms * kept / total_m
        else:
            rest = self.rest_ms
        return float(self.scale * total + rest + self.fixed_ms)

    def fraction(self, widths) -> float:
        return self.predict_ms(widths) / max(self.base_ms, 1e-12)


class LatencyCost(CostModel):
    """The cost model the target solvers see: FLOPs / params as before, and metric "latency" predicted by a
    LatencyModel (fraction of the full model's measured time)."""

    def __init__(self, an, latency: LatencyModel):
        self.__dict__.update(latency.cost.__dict__)  # the FLOPs/params terms, computed once
        self.latency = latency

    def fraction(self, widths, metric: str) -> float:
        if metric == "latency":
            return self.latency.fraction(widths)
        return super().fraction(widths, metric)


def _single_group(fr) -> int | None:
    """The group a layer dimension follows alone (its width is that group's width times a constant), if any."""
    const, coef = fr
    nz = np.flatnonzero(coef)
    return int(nz[0]) if len(nz) == 1 and const == 0 else None


def _ints(v, n: int) -> tuple:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _signature(node, family: str) -> LayerSig | None:
    x, w = node.args[0], node.args[1]
    xv, wv = x.meta.get("val"), w.meta.get("val") if isinstance(w, torch.fx.Node) else None
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        return None
    dtype = str(xv.dtype).replace("torch.", "")
    if family == "linear":
        if xv.dim() < 2 or wv.dim() != 2:
            return None
        return LayerSig("linear", int(wv.shape[1]), int(wv.shape[0]), tuple(int(s) for s in xv.shape[1:-1]),
                        dtype=dtype)
    if xv.dim() != 4 or wv.dim() != 4:
        return None  # conv1d / conv3d: timed as part of the rest
    args = list(node.args) + [None] * 9
    name = str(node.target)
    if "convolution" in name:  # aten.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)
        if args[6]:
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    elif "conv2d" in name and "transpose" not in name:
        stride, padding, dilation, groups = (args[3] or 1), (args[4] or 0), (args[5] or 1), (args[6] or 1)
    else:
        return None
    if isinstance(padding, str):
        return None  # "same"/"valid" padding: rest
    return LayerSig("conv", int(xv.shape[1]), int(wv.shape[0]), (int(xv.shape[2]), int(xv.shape[3])),
                    tuple(int(s) for s in wv.shape[2:]), _ints(stride, 2), _ints(padding, 2), _ints(dilation, 2),
                    int(groups or 1), dtype)


LATENCY_DTYPES = ("float32", "int8")


def check_latency_options(target_latency, latency_batch, latency_threads, latency_dtype="float32",
                          calib=None) -> None:
    """One-line errors for bad latency options, before anything is captured."""
    if latency_dtype not in LATENCY_DTYPES:
        raise ConfigError(f"latency_dtype must be 'float32' or 'int8' (the model timed for target_latency: as "
                          f"exported, or after ONNX Runtime's static int8 quantization), got {latency_dtype!r}")
    if target_latency is None:
        if latency_dtype != "float32":
            raise ConfigError(f"latency_dtype={latency_dtype!r} applies to target_latency=; pass target_latency "
                              "or drop latency_dtype")
        return
    if latency_dtype == "int8" and calib is None:
        raise ConfigError("latency_dtype='int8' times the model after int8 quantization, whose activation ranges "
                          "need calibration data: pass calib= (e.g. a few hundred training inputs)")
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) \
            or not 0.0 < float(target_latency) <= 1.0:
        raise ConfigError(f"target_latency must be a number in (0, 1] (the fraction of the model's measured ONNX "
                          f"Runtime latency kept), got {target_latency!r}")
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ConfigError(f"latency_batch must be a positive int (the batch size latency is measured at), got "
                          f"{latency_batch!r}")
    if latency_threads is not None and (isinstance(latency_threads, bool) or not isinstance(latency_threads, int)
                                        or latency_threads < 1):
        raise ConfigError(f"latency_threads must be a positive int or None (ONNX Runtime's default), got "
                          f"{latency_threads!r}")
