"""INT8 after pruning: ONNX Runtime's own static quantization of a verified float ONNX file.

``onnxruntime.quantization.quantize_static`` in QDQ format with per-channel int8 weights and int8 activations,
their ranges calibrated (min/max) on the user's data; fxprune only feeds the calibration batches and checks the
result. The check compares the int8 file with the float one on the calibration data and REPORTS the error: int8
changes the outputs by design, so a large error is a note, not a failure. Its yardstick is the output's own
quantization step: an int8 output carries max|y| / 127 per step, and ``INT8_STEPS`` such steps of error are what
a few layers of rounding add up to; more than that usually means a range badly calibrated (too few samples,
outliers).

On an x86 CPU without VNNI (AVX2 only), ORT's int8 kernels multiply with ``vpmaddubsw``, whose 16-bit pair sums
saturate for 8-bit weights: measured on conv-BN-linear, 0.066 of the output range against 0.010 for the same file
evaluated exactly (onnx.reference). ORT's documented remedy is 7-bit weights (``reduce_range``), used here when
this machine has no VNNI (``needs_reduce_range``): 0.014 there.

Example::

    report = fxprune.export_onnx(slim, x, "slim.int8.onnx", quantize="int8", calib=images)
    print(report.int8_rel_diff, report.int8_note)
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from .calibrate import batches
from .console import CapturedOutput
from .errors import ConfigError, ExportError

QUANTIZE_CHOICES = ("int8",)
INT8_STEPS = 8       # error yardstick: this many output quantization steps (max|y| / 127 each)
CHECK_SAMPLES = 256  # calibration samples the int8-vs-float check reads


def check_quantize_args(quantize, calib) -> None:
    """Refuse a bad quantize= / calib= combination before anything is exported."""
    if quantize is None:
        if calib is not None:
            raise ConfigError("calib= is only used with quantize='int8' (the calibration data of int8 ranges); "
                              "drop calib= or pass quantize='int8'")
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be None or 'int8', got {quantize!r}")
    if calib is None:
        raise ConfigError("quantize='int8' needs calibration data for the activation ranges: pass calib= (e.g. a "
                          "few hundred training inputs as a tensor, or a DataLoader)")


def feeds(path: str, calib, example: tuple | None, samples: int) -> list[dict]:
    """The calibration data as ORT feed dicts for the file's inputs (``example`` None: shaped like them)."""
    import onnxruntime as ort
    import torch
    specs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()
    names = [i.name for i in specs]
    if example is None:
        if any(not isinstance(d, int) for s in specs for d in s.shape[1:]):
            raise ConfigError(f"{path} has inputs with dynamic dimensions beyond the batch; int8 calibration "
                              "needs fixed shapes there")
        example = tuple(torch.zeros([1, *s.shape[1:]]) for s in specs)
    out = []
    for xs in batches(calib, example, samples):
        out.append({n: t.detach().cpu().numpy() for n, t in zip(names, xs)})
    return out


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, items: list[dict]):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def quantize_int8(fp32_path: str, out_path: str, calib_feeds: list[dict]) -> None:
    """Write the static QDQ int8 version of ``fp32_path`` to ``out_path`` (not atomically; the caller's temp)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib_feeds)
    with tempfile.TemporaryDirectory(prefix="fxprune-int8-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        with CapturedOutput() as captured:
            try:
                try:  # ORT's recommended preprocessing (shape inference, graph optimization) when it applies
                    quant_pre_process(fp32_path, pre, skip_symbolic_shape=False)
                    src = pre
                except Exception:  # noqa: BLE001 - some graphs defeat symbolic shape inference; quantize as is
                    src = fp32_path
                quantize_static(src, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=needs_reduce_range(),
                                weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            except Exception as e:  # noqa: BLE001 - report ORT's reason with its output
                log = "\n".join(captured.text().strip().splitlines()[-20:])
                raise ExportError(f"ONNX Runtime's int8 quantization failed: {type(e).__name__}: "
                                  f"{str(e).strip()[:300]}" + (f"\n{log}" if log else "")) from e


def needs_reduce_range() -> bool:
    """Whether this machine's int8 kernels saturate 8-bit weights: an x86 CPU without a VNNI instruction
    (AVX512_VNNI, AVX_VNNI or AMX), read from /proc/cpuinfo; elsewhere (ARM, unreadable flags on x86) the
    conservative answer for x86 and False for the rest."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return not any(v in flags.split() for v in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_file(fp32_path: str, path: str, calib, example: tuple | None = None, samples: int = 512):
    """Quantize a float ONNX file onto ``path`` (atomically); return the int8-vs-float error on the calibration
    data (see ``compare``)."""
    from .fileio import umask
    folder = os.path.dirname(os.path.abspath(path))
    calib_feeds = feeds(fp32_path, calib, example, samples)
    with temp_path(folder, ".int8.onnx") as tmp:
        quantize_int8(fp32_path, tmp, calib_feeds)
        rows = max(len(next(iter(calib_feeds[0].values()))), 1)
        rel = compare(fp32_path, tmp, calib_feeds[: max(1, CHECK_SAMPLES // rows)])
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    return rel


def compare(fp32_path: str, int8_path: str, calib_feeds: list[dict]) -> float:
    """max over outputs of max|int8 - fp32| / max|fp32| on the calibration feeds."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a = ort.InferenceSession(fp32_path, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(int8_path, opts, providers=["CPUExecutionProvider"])
    num, den = None, None
    for f in calib_feeds:
        ya, yb = a.run(None, f), b.run(None, f)
        d = [float(np.max(np.abs(p.astype(np.float64) - q))) if p.size else 0.0 for p, q in zip(ya, yb)]
        s = [float(np.max(np.abs(p))) if p.size else 0.0 for p in ya]
        num = d if num is None else [max(x, y) for x, y in zip(num, d)]
        den = s if den is None else [max(x, y) for x, y in zip(den, s)]
    return max(n / max(s, np.finfo(np.float32).tiny) for n, s in zip(num, den))


def note(rel: float) -> str:
    """A line for the report: the error in output quantization steps, and what it means."""
    steps = rel * 127
    text = f"int8 vs float on the calibration data: max error {rel:.3g} of the output range ({steps:.1f} int8 steps)"
    if needs_reduce_range():
        text += "; 7-bit weights (reduce_range: this CPU has no VNNI, whose int8 kernels saturate 8-bit ones)"
    if steps > INT8_STEPS:
        text += (f"; more than {INT8_STEPS} steps: check accuracy on held-out data, and calibrate on more or more "
                 "typical samples")
    return text


@contextlib.contextmanager
def temp_path(folder: str, suffix: str):
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fxprune-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
