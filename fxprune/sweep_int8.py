"""The int8 side of a sweep: each slim model also timed and scored after ONNX Runtime's static int8 quantization.

Timing: the int8 timer (``timing.OrtTimer(dtype="int8")``, or the one the caller injects) times the original and
the slim model, both quantized, side by side. A point's ``int8_latency`` is the slim int8 model's time over the
FLOAT original's, from the same point (so fp32 and int8 points share the plot's axis; the two are separate
timing runs of one process); ``int8_speedup`` is the slim float model's time over the slim int8 model's.
Scoring: the slim model is exported with ``export_onnx(quantize="int8", calib=...)`` and the user's metric is
called on ``OrtModel``, the int8 file as a callable model (metrics that call ``model(x)`` work unchanged).

Example::

    res = fxprune.sweep(model, x, "id", targets=[0.5], calib=images, metric=acc, int8=True)
    res.points[0]["int8_latency"], res.points[0]["int8_score"]
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn


class OrtModel(nn.Module):
    """An ONNX file as a model: ``forward(*inputs)`` runs it in ONNX Runtime (CPU) and returns tensors."""

    def __init__(self, path: str, threads: int | None = None):
        super().__init__()
        from .timing import _session
        self.session = _session(path, threads)
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *xs):
        outs = self.session.run(None, {n: x.detach().cpu().float().numpy() for n, x in zip(self.names, xs)})
        outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def int8_timer(timer, threads, calib):
    if timer is not None:  # sweep() checked it times int8
        return timer
    from .timing import OrtTimer
    return OrtTimer(threads=threads, dtype="int8", calib=calib)


def int8_point(timer, model, slim, example, batch: int, fp32_original_ms: float, fp32_slim_ms: float, calib,
               metric) -> dict:
    """The int8 fields of one sweep point (see the module doc)."""
    from .export import export_onnx
    o8, s8 = timer.models_ms([model, slim], example, batch)
    out = {"int8_ms": s8, "int8_original_ms": o8, "int8_latency": s8 / fp32_original_ms,
           "int8_speedup": fp32_slim_ms / s8, "int8_score": None, "int8_error": None}
    if metric is not None:
        with tempfile.TemporaryDirectory(prefix="fxprune-sweep-int8-") as tmp:
            path = os.path.join(tmp, "slim.int8.onnx")
            rep = export_onnx(slim, example, path, quantize="int8", calib=calib)
            out["int8_error"] = rep.int8_rel_diff
            out["int8_score"] = float(metric(OrtModel(path)))
    return out
