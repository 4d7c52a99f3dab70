"""Export a model to one self-contained, verified ONNX file with a dynamic batch dimension.

The file is written atomically: it is exported to a temporary file beside ``path``, checked with
``onnx.checker``, run once in ONNX Runtime at a batch size different from the example's and compared with torch;
only then is it moved onto ``path``. On any failure nothing new is left at ``path`` and an ``ExportError`` says
what went wrong and what to try. The exporters' console output is captured and shown only when export fails.

Example::

    >>> import torch, torch.nn as nn
    >>> from fxprune.export import export_onnx
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    >>> report = export_onnx(net, torch.randn(2, 1, 28, 28), "net.onnx")
    >>> report.rel_diff < 1e-4
    True
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .console import CapturedOutput
from .cost import Inputs, as_input_tuple, eval_mode
from .errors import ConfigError, ExportError


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how closely ONNX Runtime agreed with torch."""

    path: str
    max_abs_diff: float
    rel_diff: float  # max over outputs of max|ort - torch| / max(max|torch|, tiny)
    file_size: int  # bytes
    exporter: str = "dynamo"  # "dynamo" or "legacy" (the fallback)
    checked_batch: int = 0  # the batch size the ORT check ran at
    quantize: Optional[str] = None  # "int8": the file is ORT's static QDQ int8 model of the verified float one
    int8_rel_diff: Optional[float] = None  # max|int8 - float| / max|float| on the calibration data
    int8_note: str = ""


def resize_batch(inputs: Sequence[torch.Tensor], batch: int) -> tuple:
    """Inputs like ``inputs`` with dim 0 of size ``batch``, made by cycling the example rows.

    Repeating real rows (instead of drawing random values) keeps inputs valid for models that need it:
    token ids, masks, positive-only inputs.
    """
    out = []
    for t in inputs:
        idx = torch.arange(batch, device=t.device) % t.shape[0]
        out.append(t.detach()[idx].clone())
    return tuple(out)


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path,
    *,
    tolerance: float = 1e-4,
    opset: Optional[int] = None,
    quantize: Optional[str] = None,
    calib=None,
    calib_samples: int = 512,
) -> ExportReport:
    """Export ``model`` to ``path`` (one .onnx file, dim 0 of every input and output dynamic) and verify it.

    ``tolerance`` is relative: max|ort - torch| / max(max|torch|, tiny), per output. ``opset`` None takes the
    exporter's default. The model runs in eval mode during export; its training flags are restored afterwards.
    ``quantize="int8"`` writes ONNX Runtime's static int8 (QDQ, per-channel weights) model of the verified float
    file instead, its activation ranges calibrated on ``calib`` (up to ``calib_samples`` samples); the int8
    error against the float file is reported (``int8_rel_diff``, ``int8_note``), not enforced.
    """
    from .quantize import check_quantize_args
    check_quantize_args(quantize, calib)
    if quantize is not None:
        return _export_int8(model, example_inputs, path, tolerance, opset, calib, calib_samples)
    inputs = as_input_tuple(example_inputs)
    if not tolerance > 0:
        raise ConfigError(f"tolerance must be > 0, got {tolerance}")
    if any(t.dim() == 0 or t.shape[0] == 0 for t in inputs):
        raise ConfigError("every example input needs a batch dimension (dim 0) of size >= 1")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot export to {path}: folder {folder} does not exist; create it first")
    with eval_mode(model):
        _check_outputs(model, inputs)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp.onnx")
        os.close(fd)
    except OSError as e:
        raise ExportError(f"cannot write to folder {folder}: {e}; choose a writable folder") from e

    attempts = []  # (exporter, exception, captured console output) for each failed try
    try:
        with eval_mode(model):
            for exporter in ("dynamo", "legacy"):
                with CapturedOutput() as captured:
                    try:
                        _run_exporter(exporter, model, inputs, tmp, opset)
                        max_abs, rel, batch = _verify(model, inputs, tmp, tolerance)
                    except Exception as e:  # any exporter failure is a reason to try the other one
                        attempts.append((exporter, e, captured))
                        _remove(tmp + ".data")
                        continue
                break
            else:
                raise _failure(path, attempts) from None  # .cause: the first exporter's exception
        _remove(tmp + ".data")  # external_data=False should write none; never leave one behind
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; the final file gets the usual permissions
            os.replace(tmp, path)
        except OSError as e:
            raise ExportError(f"exported and verified, but could not move the file onto {path}: {e}") from e
    except BaseException:
        _remove(tmp)
        _remove(tmp + ".data")
        raise
    return ExportReport(path, max_abs, rel, os.path.getsize(path), exporter, batch)


def _export_int8(model, example_inputs, path, tolerance, opset, calib, calib_samples) -> ExportReport:
    """The verified float file in a temp, ORT's int8 model of it in another, the check, then the move."""
    from . import quantize as q
    if isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 1:
        raise ConfigError(f"calib_samples must be a positive int, got {calib_samples!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot export to {path}: folder {folder} does not exist; create it first")
    inputs = as_input_tuple(example_inputs)
    with q.temp_path(folder, ".fp32.onnx") as fp32:
        report = export_onnx(model, inputs, fp32, tolerance=tolerance, opset=opset)
        rel = q.quantize_file(fp32, path, calib, inputs, calib_samples)
    return ExportReport(path, report.max_abs_diff, report.rel_diff, os.path.getsize(path), report.exporter,
                        report.checked_batch, "int8", rel, q.note(rel))


def _check_outputs(model: nn.Module, inputs: tuple) -> None:
    """Every output must be a tensor with the batch as dim 0 (the file's batch is dynamic); say which is not
    before the exporters fail on it with messages about something else."""
    name = type(model).__name__
    try:
        with torch.no_grad(), CapturedOutput():
            out = model(*inputs)
    except Exception as e:  # noqa: BLE001 - the user's forward
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExportError(f"{name} fails on the example inputs ({type(e).__name__}: {first}); check their "
                          "shapes and dtypes", cause=e) from None
    leaves = torch.utils._pytree.tree_leaves(out)
    if not leaves:
        raise ExportError(f"{name}'s forward returned no tensors ({type(out).__name__}); there is nothing to export")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            what = "None" if leaf is None else f"a {type(leaf).__name__}"
            raise ExportError(f"output {i} of {name} is {what}, not a tensor; an ONNX model "
                              "returns tensors only: return tensors from forward, or export a wrapper module that "
                              "drops the rest")
        if leaf.dim() == 0:
            raise ExportError(f"output {i} of {name} is a scalar (a 0-dim tensor, e.g. a loss or a sum over the "
                              "batch); the ONNX file's batch size is dynamic, so every output needs the batch as "
                              "dim 0: return per-sample values (e.g. y.sum(dim=1)), or export a wrapper without it")


class _Mismatch(ExportError):
    """The file was written but does not behave like the model at another batch size."""


def _run_exporter(exporter: str, model: nn.Module, inputs: tuple, tmp: str, opset: Optional[int]) -> None:
    kwargs = {} if opset is None else {"opset_version": opset}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")  # a named Dim also works for an example batch of 1 (no 0/1 trap)
        torch.onnx.export(
            model, inputs, tmp, dynamo=True, external_data=False,
            dynamic_shapes=tuple({0: batch} for _ in inputs), **kwargs,
        )
        return
    with torch.no_grad():
        n_out = len(_leaves(model(*inputs)))
    in_names = [f"input_{i}" for i in range(len(inputs))]
    out_names = [f"output_{i}" for i in range(n_out)]
    torch.onnx.export(
        model, inputs, tmp, dynamo=False, input_names=in_names, output_names=out_names,
        dynamic_axes={name: {0: "batch"} for name in in_names + out_names}, **kwargs,
    )


def _verify(model: nn.Module, inputs: tuple, onnx_path: str, tolerance: float):
    """Check the file, confirm dim 0 is symbolic everywhere, and compare ORT with torch at another batch size."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx_path)
    graph = onnx.load(onnx_path, load_external_data=False).graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if not dims or not dims[0].dim_param:
                raise _Mismatch(
                    f"the exported {kind} {v.name!r} has a fixed batch dimension "
                    f"({dims[0].dim_value if dims else 'scalar'}); the model's forward probably hard-codes the "
                    "batch size (a view/reshape with a constant size): use x.flatten(1) or x.view(x.size(0), -1)"
                )

    batch = inputs[0].shape[0] + 1
    check = resize_batch(inputs, batch)
    try:
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in _leaves(model(*check))]
    except Exception as e:
        raise _Mismatch(f"the torch model itself fails at batch {batch}: {e}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one quick run; no thread pool worth spinning up
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(check):
        raise ExportError(f"the ONNX model takes {len(names)} inputs but torch's forward took {len(check)}")
    got = session.run(None, {n: t.cpu().numpy() for n, t in zip(names, check)})
    del session
    if len(got) != len(expected):
        raise ExportError(f"the ONNX model returns {len(got)} outputs but torch returned {len(expected)}")

    max_abs, rel = 0.0, 0.0
    for i, (a, b) in enumerate(zip(got, expected)):
        if a.shape != b.shape:
            raise _Mismatch(f"output {i} has shape {a.shape} in ONNX Runtime but {b.shape} in torch at batch {batch}")
        a, b = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a - b)
        diff[np.isnan(a) & np.isnan(b)] = 0.0
        if diff.size == 0:
            continue
        d = float(np.max(diff)) if not np.isnan(diff).any() else float("inf")
        scale = max(float(np.nanmax(np.abs(b))) if not np.isnan(b).all() else 0.0, np.finfo(np.float32).tiny)
        max_abs, rel = max(max_abs, d), max(rel, d / scale)
    if not rel <= tolerance:
        raise _Mismatch(
            f"ONNX Runtime disagrees with torch at batch {batch}: max|ort - torch| = {max_abs:.3g}, "
            f"relative {rel:.3g} > tolerance {tolerance:g}"
        )
    return max_abs, rel, batch


def _leaves(out) -> list:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ExportError("the model's forward returned no tensors; there is nothing to export")
    return leaves


def _failure(path: str, attempts) -> ExportError:
    lines = [f"could not export a verified ONNX file to {path}."]
    for exporter, err, _ in attempts:
        kind = "check failed" if isinstance(err, _Mismatch) else type(err).__name__
        lines.append(f"  {exporter} exporter: {kind}: {_summary(err)[:400]}")
    if any(isinstance(e, _Mismatch) for _, e, _ in attempts):
        lines.append(
            "Try: make the forward independent of the batch size (x.flatten(1) rather than a fixed view), or pass "
            "a larger tolerance= if the difference is only float rounding."
        )
    else:
        lines.append(
            "Try: replace or rewrite the unsupported op, pass a newer opset=, or run "
            "torch.onnx.export(model, args, dynamo=True, report=True) for the exporter's full report."
        )
    log = "\n".join(c.text() for _, _, c in attempts).strip()
    if log:
        tail = "\n".join(_plain(log).splitlines()[-40:])
        lines.append("Exporter output (last lines):\n" + tail)
    return ExportError("\n".join(lines), cause=attempts[0][1])


def _summary(err: Exception) -> str:
    """One informative line: the dynamo exporter puts the real cause under "## Exception summary"."""
    text = _plain(str(err))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _remove(p: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(p)
