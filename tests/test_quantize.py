"""INT8 export: ORT's static QDQ quantization of the verified float file, checked against torch."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fxprune.errors import ConfigError, DataError
from fxprune.export import export_onnx
from test_export import conv_bn_linear, leftovers


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8), torch.randn(200, 3, 8, 8)


def test_int8_file_loads_and_is_close_to_float(tmp_path):
    net, (x, calib) = conv_bn_linear().eval(), _inputs()
    path = str(tmp_path / "net.int8.onnx")
    report = export_onnx(net, x, path, quantize="int8", calib=calib)
    assert report.quantize == "int8" and os.path.isfile(path)
    assert leftovers(tmp_path) == ["net.int8.onnx"]  # no temp files left behind
    graph = onnx.load(path).graph
    kinds = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert int8_weights, "weights should be stored as int8"
    per_channel = [t for t in graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1]
    assert per_channel, "weights should have one scale per output channel"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    held_out = torch.randn(16, 3, 8, 8)
    got = session.run(None, {session.get_inputs()[0].name: held_out.numpy()})[0]
    with torch.no_grad():
        ref = net(held_out).double().numpy()
    # Each quantized tensor (activation or weight) rounds to half a step of its range, 1/254 relative; through
    # this near-homogeneous (ReLU) net those relative errors add at most linearly at the output: one 1/127 per
    # quantizer is a bound with room to spare, and far below what a wrong scale or a float file would give.
    quantizers = kinds.count("QuantizeLinear") + len(int8_weights)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= quantizers / 127, (err, quantizers)
    assert err > 1e-6  # really quantized, not the float model again
    # ORT's fused int8 kernels against the same file evaluated exactly, op by op (onnx.reference, numpy): they
    # may differ only by requantization rounding. AVX2-only CPUs saturate 8-bit weights in vpmaddubsw (0.07 of
    # the range here, against 0.01 for quantization itself) unless fxprune chose 7-bit weights for them.
    from onnx.reference import ReferenceEvaluator
    model = onnx.load(path)
    exact = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: held_out.numpy()})[0]
    assert np.abs(got - exact).max() / np.abs(ref).max() <= quantizers / 127 / 4
    assert report.int8_rel_diff == pytest.approx(report.int8_rel_diff) and 0 < report.int8_rel_diff <= quantizers / 127
    assert "int8 steps" in report.int8_note


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"quantize": "int4", "calib": "x"}, ConfigError, "quantize must be None or 'int8'"),
    ({"quantize": "int8"}, ConfigError, "needs calibration data"),
    ({"calib": "x"}, ConfigError, "only used with quantize='int8'"),
    ({"quantize": "int8", "calib": torch.randn(10, 3, 4, 4)}, DataError, "shape"),
    ({"quantize": "int8", "calib": "x", "calib_samples": 0}, ConfigError, "calib_samples"),
])
def test_bad_quantize_arguments_are_one_line(tmp_path, kwargs, error, needle):
    net, (x, calib) = conv_bn_linear().eval(), _inputs()
    if kwargs.get("calib") == "x":
        kwargs = {**kwargs, "calib": calib}
    path = tmp_path / "net.onnx"
    with pytest.raises(error) as info:
        export_onnx(net, x, path, **kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


def test_bench_times_float_and_int8_side_by_side(tmp_path, capsys):
    from fxprune import cli
    net, (x, calib) = conv_bn_linear().eval(), _inputs()
    export_onnx(net, x, tmp_path / "net.onnx")
    torch.save(calib, tmp_path / "calib.pt")
    code = cli.main(["bench", str(tmp_path / "net.onnx"), "--int8", str(tmp_path / "calib.pt"), "--batch", "1",
                     "--min-time", "0", "--json", str(tmp_path / "lat.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "net.onnx int8" in out and "int8 max error" in err
    import json
    rows = json.loads((tmp_path / "lat.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["net.onnx", "net.onnx int8"]
    assert sorted(os.listdir(tmp_path)) == ["calib.pt", "lat.json", "net.onnx"]  # the int8 file was temporary
