"""The ONNX Runtime timer behind the latency model (``latency.Timer``): single layers built directly as ONNX
graphs, whole models exported with ``export_onnx`` and timed interleaved.

Layer times exclude ORT's per-run overhead (the time of an Identity graph on a small tensor), which a whole
model pays once but a sum of single-layer runs would pay per layer. Medians throughout; thread spinning is off
so an idle session never steals cycles from the one being timed (the machine may be shared).

Example::

    t = OrtTimer(threads=1)
    t.models_ms([model, slim], (x,), batch=1)   # [ms, ms], timed in alternation
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np

from .latency import LayerSig

CALIB_TIMING_SAMPLES = 64  # calibration samples for an int8 file that is only timed


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _session(path_or_bytes, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def _median_ms(session, feeds, min_runs: int, min_time_s: float, warmup: int = 2, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        session.run(None, feeds)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = clock()
        session.run(None, feeds)
        times.append(clock() - t0)
    return float(np.median(times)) * 1e3


class OrtTimer:
    """``latency.Timer`` on ONNX Runtime's CPU provider. ``threads`` None: ORT's default intra-op threads.

    ``clock``: "wall" (perf_counter), or "cpu": the CPU time of the calling thread, which with ``threads=1`` is
    the thread that runs every op (ORT has no pool then). On a shared machine wall time measures the scheduler's
    share as much as the model (measured here under a load of 20 on 2 cores: the same file 3.5 ms and 34-48 ms at
    batch 64 in different minutes); the one thread's CPU time is what the model costs when it has the core.
    "auto" (default): "cpu" with threads=1, else "wall".

    ``dtype`` "int8": every layer and model is quantized with ORT's static quantization (``quantize.quantize_int8``,
    the same QDQ per-channel export users get) before it is timed; whole models calibrate on ``calib`` (what
    the ranges are changes no kernel, so a few batches do), single layers on their own random input."""

    def __init__(self, threads: int | None = None, *, layer_time_s: float = 0.04, model_time_s: float = 1.5,
                 repeats: int = 7, clock: str = "auto", dtype: str = "float32", calib=None):
        self.threads, self.layer_time_s, self.model_time_s, self.repeats = threads, layer_time_s, model_time_s, \
            repeats
        if dtype not in ("float32", "int8"):
            raise ValueError(f"dtype must be 'float32' or 'int8', got {dtype!r}")
        if dtype == "int8" and calib is None:
            raise ValueError("dtype='int8' needs calib= (the calibration data of the int8 ranges)")
        self.dtype, self.calib = dtype, calib
        if clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"clock must be 'auto', 'wall' or 'cpu', got {clock!r}")
        self.clock_name = ("cpu" if threads == 1 else "wall") if clock == "auto" else clock
        if self.clock_name == "cpu" and threads != 1:
            raise ValueError("clock='cpu' measures one thread: use it with threads=1")
        self.clock = time.thread_time if self.clock_name == "cpu" else time.perf_counter
        self._overhead: float | None = None
        self._first = None  # (model, folder, exported file) of the last first model timed

    def machine_key(self) -> dict:
        import onnxruntime as ort
        return {"machine": f"{cpu_model()} x{os.cpu_count()}", "ort": ort.__version__,
                "threads": self.threads or "default", "clock": self.clock_name}

    # ---- layers -----------------------------------------------------------------------------------------
    def overhead_ms(self) -> float:
        if self._overhead is None:
            from onnx import TensorProto, helper
            g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
            s = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                         self.threads)
            self._overhead = _median_ms(s, {"x": np.zeros((1, 8), np.float32)}, 50, 0.05, clock=self.clock)
        return self._overhead

    def layer_ms(self, sig: LayerSig, c_in: int, c_out: int, batch: int) -> float:
        model, feeds = _layer_graph(sig, c_in, c_out, batch)
        data = model.SerializeToString()
        if self.dtype == "int8":
            from .quantize import quantize_int8
            with tempfile.TemporaryDirectory(prefix="fxprune-latency-") as tmp:
                src, dst = os.path.join(tmp, "layer.onnx"), os.path.join(tmp, "layer.int8.onnx")
                with open(src, "wb") as f:
                    f.write(data)
                quantize_int8(src, dst, [feeds])
                with open(dst, "rb") as f:
                    data = f.read()
        s = _session(data, self.threads)
        t = _median_ms(s, feeds, 5, self.layer_time_s, clock=self.clock)
        return max(t - self.overhead_ms(), 0.05 * t)

    # ---- whole models -----------------------------------------------------------------------------------
    def models_ms(self, models: list, example: tuple, batch: int) -> list[float]:
        """The first model (the original, timed again every round) is exported once per timer and kept."""
        from .export import export_onnx, resize_batch
        with tempfile.TemporaryDirectory(prefix="fxprune-latency-") as tmp:
            paths = []
            for i, m in enumerate(models):
                if i == 0 and self._first is not None and self._first[0] is m:
                    paths.append(self._first[2])
                    continue
                path = os.path.join(tmp, f"{i}.onnx")
                export_onnx(m, example, path)
                if i == 0:
                    keep = tempfile.mkdtemp(prefix="fxprune-latency-")
                    self._first = (m, keep, os.path.join(keep, "original.onnx"))
                    os.replace(path, self._first[2])
                    path = self._first[2]
                paths.append(path)
            if self.dtype == "int8":
                paths = [self._int8(p, example, tmp, i) for i, p in enumerate(paths)]
            return self.files_ms(paths, resize_batch(example, batch))

    def _int8(self, path: str, example: tuple, tmp: str, i: int) -> str:
        """The int8 file of a float one (the original's is kept beside it, quantized once per timer)."""
        from .quantize import feeds, quantize_int8
        out = path[:-len(".onnx")] + ".int8.onnx" if i == 0 and self._first is not None \
            and path == self._first[2] else os.path.join(tmp, f"{i}.int8.onnx")
        if not os.path.exists(out):
            quantize_int8(path, out, feeds(path, self.calib, example, CALIB_TIMING_SAMPLES))
        return out

    def __del__(self):
        if getattr(self, "_first", None) is not None:
            import shutil
            shutil.rmtree(self._first[1], ignore_errors=True)

    def files_ms(self, paths: list[str], inputs: tuple) -> list[float]:
        """Each ONNX file's median, timed in ``repeats`` alternating blocks (slow drifts of a shared machine hit
        every file alike)."""
        sessions = [_session(p, self.threads) for p in paths]
        feeds = [{i.name: t.detach().cpu().numpy() for i, t in zip(s.get_inputs(), inputs)} for s in sessions]
        for s, f in zip(sessions, feeds):
            _median_ms(s, f, 1, 0.0, warmup=1)
        blocks = [[] for _ in paths]
        for _ in range(self.repeats):
            for j, (s, f) in enumerate(zip(sessions, feeds)):
                blocks[j].append(_median_ms(s, f, 1, self.model_time_s / self.repeats, warmup=0, clock=self.clock))
        return [float(np.median(b)) for b in blocks]


def _layer_graph(sig: LayerSig, c_in: int, c_out: int, batch: int):
    """One conv (or linear) at the given widths as an ONNX model, with random weights and input."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    if sig.kind == "conv":
        kh, kw = sig.kernel
        xs = [batch, c_in, *sig.spatial]
        w = rng.standard_normal((c_out, c_in // sig.groups, kh, kw)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kh, kw], strides=list(sig.stride),
                                pads=[*sig.padding, *sig.padding], dilations=list(sig.dilation), group=sig.groups)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(c_out, np.float32), "b")]
        nodes = [node]
    else:
        xs = [batch, *sig.spatial, c_in]
        w = rng.standard_normal((c_in, c_out)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(c_out, np.float32), "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": rng.standard_normal(xs).astype(np.float32)}
