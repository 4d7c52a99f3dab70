"""Time models side by side in ONNX Runtime on the CPU, with FLOPs, parameters and file size beside the latency.

Modules are exported (and verified) with ``export_onnx`` first; ``.onnx`` files are timed as they are. Only one
ONNX Runtime session is alive at a time and thread spinning is off, so one model's idle worker threads never
steal cycles from the next one's measurement. With two or more models, the first is the baseline and the table
shows each other model's latency and FLOPs ratios to it at the same batch size. This machine is shared and noisy:
compare ratios from one run rather than absolute numbers from different runs.

Example::

    >>> import torch, torch.nn as nn
    >>> from fxprune.bench import benchmark
    >>> wide = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> slim = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    >>> report = benchmark({"dense": wide, "slim": slim}, torch.randn(1, 64), progress=False)
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from torch import nn

from .console import progress_bar
from .cost import Inputs, as_input_tuple, count_flops, count_params
from .errors import ConfigError
from .report import fmt_count
from .export import export_onnx, resize_batch

ModelLike = Union[nn.Module, str, "os.PathLike[str]"]

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class BenchReport:
    """Per (model, batch) rows, the ONNX Runtime thread count actually used, and a printable table."""

    rows: List[dict]
    threads: Optional[int]  # intra-op threads ONNX Runtime actually ran with (None if it could not be seen)
    batch_sizes: tuple
    ort_version: str = ""
    baseline: Optional[str] = None
    models: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ort_version": self.ort_version, "threads": self.threads, "batch_sizes": list(self.batch_sizes),
            "baseline": self.baseline, "models": list(self.models), "rows": [dict(r) for r in self.rows],
        }

    def table(self) -> str:
        """An aligned text table, grouped by batch size so each model sits under the baseline it is compared to."""
        head = ["model", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "FLOPs(b=1)", "params", "size"]
        ratios = self.baseline is not None
        if ratios:
            head += ["latency x", "FLOPs x"]
        body = []
        order = {name: i for i, name in enumerate(self.models)}
        for r in sorted(self.rows, key=lambda r: (r["batch"], order.get(r["model"], 0))):
            line = [
                r["model"], str(r["batch"]), _ms(r["median_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]),
                f"{r['throughput']:.1f}", fmt_count(r["flops"]), fmt_count(r["params"]), _bytes(r["file_size"]),
            ]
            if ratios:
                line += [_ratio(r["latency_ratio"]), _ratio(r["flops_ratio"])]
            body.append(line)
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        threads = "?" if self.threads is None else str(self.threads)
        title = f"ONNX Runtime {self.ort_version} CPU, {threads} intra-op thread(s)"
        if ratios:
            title += f"; ratios are model / baseline ({self.baseline}) at the same batch"
        rule = "-" * len(fmt(head))
        return "\n".join([title, fmt(head), rule] + [fmt(row) for row in body])


def benchmark(
    models: Union[Dict[str, ModelLike], Sequence[ModelLike]],
    example_inputs: Optional[Inputs] = None,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: Optional[int] = None,
    warmup: int = 10,
    min_runs: int = 30,
    min_time_s: float = 1.0,
    progress: bool = True,
) -> BenchReport:
    """Time each model at each batch size in ONNX Runtime (CPU) and return a ``BenchReport``.

    ``models`` maps names to modules or .onnx paths (a list is named by index for modules, by file name for
    paths). Modules need ``example_inputs``; the timed input at batch b has the example's shape with dim 0 = b.
    ``threads`` sets ONNX Runtime's intra-op threads (None: its default). Each measurement runs at least
    ``min_runs`` times and at least ``min_time_s`` seconds after ``warmup`` untimed runs.
    """
    import onnxruntime as ort

    entries = _named(models)
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None (ONNX Runtime's default), got {threads!r}")
    if warmup < 0 or min_runs < 1 or min_time_s < 0:
        raise ConfigError("need warmup >= 0, min_runs >= 1 and min_time_s >= 0")
    inputs = None
    if any(isinstance(m, nn.Module) for _, m in entries):
        if example_inputs is None:
            raise ConfigError("example_inputs is required to export the nn.Module entries to ONNX")
        inputs = as_input_tuple(example_inputs)

    rows, threads_seen = [], None
    bar = progress_bar(total=len(entries) * len(batch_sizes), desc="benchmark", file=sys.stderr,
                       disable=not progress)
    try:
        with tempfile.TemporaryDirectory(prefix="fxprune-bench-") as tmp:
            for index, (name, model) in enumerate(entries):
                if isinstance(model, nn.Module):
                    bar.set_postfix_str(f"{name}: export")
                    path = export_onnx(model, inputs, os.path.join(tmp, f"{index}.onnx")).path
                    flops = count_flops(model, tuple(t[:1] for t in inputs))
                    params = count_params(model)
                else:
                    path, flops, params = model, None, _onnx_params(model)
                size = _file_size(path)
                session, used = _session(ort, path, threads)
                threads_seen = threads_seen if threads_seen is not None else used
                if progress and index == 0:
                    bar.write(f"onnxruntime {ort.__version__}: {_threads_text(used)}", file=sys.stderr)
                try:
                    for batch in batch_sizes:
                        bar.set_postfix_str(f"{name}: batch {batch}")
                        feeds = _feeds(session, name, inputs if isinstance(model, nn.Module) else None, batch)
                        times = _time(session, feeds, warmup, min_runs, min_time_s)
                        median, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
                        rows.append({
                            "model": name, "batch": batch, "median_ms": float(median), "p90_ms": float(p90),
                            "p99_ms": float(p99), "throughput": batch / (median / 1e3), "runs": len(times),
                            "flops": flops, "params": params, "file_size": size, "threads": used,
                            "latency_ratio": None, "flops_ratio": None,
                        })
                        bar.update()
                finally:
                    del session  # one live session at a time: its threads must be gone before the next starts
    finally:
        bar.close()

    names = [n for n, _ in entries]
    baseline = names[0] if len(names) >= 2 else None
    if baseline is not None:
        base = {r["batch"]: r for r in rows if r["model"] == baseline}
        for r in rows:
            b = base[r["batch"]]
            r["latency_ratio"] = r["median_ms"] / b["median_ms"]
            r["flops_ratio"] = r["flops"] / b["flops"] if r["flops"] is not None and b["flops"] else None
    return BenchReport(rows, threads_seen, batch_sizes, ort.__version__, baseline, names)


def _named(models) -> list:
    if isinstance(models, dict):
        items = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, (list, tuple)):
        items = []
        for i, m in enumerate(models):
            label = f"{i}:{type(m).__name__}" if isinstance(m, nn.Module) else os.path.basename(os.fspath(m))
            if any(label == n for n, _ in items):
                label = f"{i}:{label}"
            items.append((label, m))
    else:
        raise ConfigError("models must be a dict name -> (nn.Module or .onnx path), or a list of them")
    if not items:
        raise ConfigError("models is empty: give at least one nn.Module or .onnx path")
    out = []
    for name, m in items:
        if not isinstance(m, nn.Module):
            try:
                m = os.fspath(m)
            except TypeError:
                raise ConfigError(f"model {name!r} is a {type(m).__name__}, not an nn.Module or a path") from None
            if not os.path.isfile(m):
                raise ConfigError(f"model {name!r}: no ONNX file at {m}")
        out.append((name, m))
    return out


def _session(ort, path: str, threads: Optional[int]):
    """Create the session and see how many intra-op threads ONNX Runtime really started.

    ORT has no API that reports its default thread count, so on Linux count the threads the session adds
    (its pool holds n - 1 workers; the calling thread is the n-th).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    # Spinning workers would keep burning CPU between runs and skew whatever is measured next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    before = _thread_count()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    after = _thread_count()
    used = max(1, after - before + 1) if before is not None and after is not None else threads
    return session, used


def _thread_count() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _threads_text(used: Optional[int]) -> str:
    return "ONNX Runtime's default intra-op threads" if used is None else f"{used} intra-op thread(s)"


def _feeds(session, name: str, inputs, batch: int) -> dict:
    specs = session.get_inputs()
    if inputs is not None:  # an exported module: cycle the example rows up to the batch size
        return {s.name: t.detach().cpu().numpy() for s, t in zip(specs, resize_batch(inputs, batch))}
    rng = np.random.default_rng(0)
    feeds = {}
    for s in specs:
        shape = list(s.shape)
        if not shape:
            raise ConfigError(f"model {name!r}: input {s.name!r} is a scalar; there is no batch dimension to vary")
        if isinstance(shape[0], int) and shape[0] != batch:
            raise ConfigError(
                f"model {name!r}: input {s.name!r} has a fixed batch of {shape[0]}; pass batch_sizes=({shape[0]},) "
                "or re-export it with a dynamic batch dimension (fxprune.export.export_onnx does)"
            )
        if any(not isinstance(d, int) for d in shape[1:]):
            raise ConfigError(
                f"model {name!r}: input {s.name!r} has shape {shape} with dynamic dimensions beyond the batch; "
                "re-export it with fixed sizes there, or benchmark the nn.Module with example_inputs"
            )
        dtype = _NUMPY_TYPES.get(s.type)
        if dtype is None:
            raise ConfigError(f"model {name!r}: input {s.name!r} has type {s.type}, which benchmark cannot fill")
        shape[0] = batch
        if np.issubdtype(dtype, np.floating):
            feeds[s.name] = rng.standard_normal(shape).astype(dtype)
        else:  # ids/masks: zeros are always in range
            feeds[s.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _time(session, feeds: dict, warmup: int, min_runs: int, min_time_s: float) -> np.ndarray:
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def _onnx_params(path: str) -> int:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph  # sizes come from dims; no need to read the data
    return int(sum(int(np.prod(t.dims)) for t in graph.initializer))


def _file_size(path: str) -> int:
    """The .onnx file plus its external-data side file, if it has one: what a deployment must ship."""
    size = os.path.getsize(path)
    if os.path.isfile(path + ".data"):
        size += os.path.getsize(path + ".data")
    return size


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _bytes(n: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"
