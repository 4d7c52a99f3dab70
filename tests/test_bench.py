import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from fxprune.bench import BenchReport, benchmark
from fxprune.errors import ConfigError
from fxprune.export import export_onnx

FAST = dict(warmup=1, min_runs=3, min_time_s=0.0, progress=False)


def convnet(width):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def convnet_flops(width, side=12):
    """convnet's FLOPs for one sample by hand: 2 * MACs of the two 3x3 'same' convs and the linear layer."""
    return 2 * side * side * width * 9 * (3 + width) + 2 * width * 10


def relu_onnx(path, shape):
    """A one-node ONNX model whose input has exactly ``shape`` (ints fixed, strings symbolic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def two_models():
    wide, half = convnet(16), convnet(8)
    example = torch.randn(2, 3, 12, 12)
    report = benchmark({"wide": wide, "half": half}, example, batch_sizes=(1, 4), **FAST)
    return wide, half, example, report


def test_rows_and_ratios(two_models):
    wide, half, example, report = two_models
    assert isinstance(report, BenchReport)
    assert [(r["model"], r["batch"]) for r in report.rows] == [("wide", 1), ("wide", 4), ("half", 1), ("half", 4)]
    for r in report.rows:
        assert 0 < r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
        assert r["runs"] >= 3 and r["file_size"] > 0
        assert r["latency_ratio"] > 0
    base = [r for r in report.rows if r["model"] == "wide"]
    assert all(r["latency_ratio"] == 1.0 and r["flops_ratio"] == 1.0 for r in base)
    expected = convnet_flops(8) / convnet_flops(16)  # by hand, not by the FlopCounterMode bench uses
    for r in (r for r in report.rows if r["model"] == "half"):
        assert r["flops_ratio"] == pytest.approx(expected)
        assert 0.2 < r["flops_ratio"] < 0.5  # half the width: about a quarter of the inner conv's FLOPs
        assert r["params"] == (3 * 9 + 1) * 8 + (8 * 9 + 1) * 8 + (8 + 1) * 10
        assert r["flops"] == convnet_flops(8) == 228256


def test_table_and_dict(two_models):
    *_, report = two_models
    table = report.table()
    for token in ("wide", "half", "latency x", "FLOPs x", "intra-op"):
        assert token in table
    lines = table.splitlines()
    assert any(line.split()[:2] == ["half", "1"] for line in lines)
    assert any(line.split()[:2] == ["half", "4"] for line in lines)
    assert len({len(line) for line in lines[1:]}) == 1  # aligned: header, rule and rows share one width
    d = report.to_dict()
    assert d["baseline"] == "wide" and len(d["rows"]) == 4 and d["batch_sizes"] == [1, 4]


def test_onnx_path_and_list_naming(tmp_path, capsys):
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    path = export_onnx(net, torch.randn(2, 6), tmp_path / "mlp.onnx").path
    report = benchmark([path], batch_sizes=(1, 3), **FAST)
    assert [r["model"] for r in report.rows] == ["mlp.onnx", "mlp.onnx"]
    assert report.rows[0]["params"] == (6 + 1) * 5 + (5 + 1) * 3  # sum of initializer sizes
    assert report.rows[0]["flops"] is None
    assert report.baseline is None and "latency x" not in report.table()
    assert capsys.readouterr().out == ""


def test_module_list_is_named_by_index():
    nets = [nn.Linear(4, 4), nn.Linear(4, 2)]
    report = benchmark(nets, torch.randn(1, 4), batch_sizes=(2,), **FAST)
    assert [r["model"] for r in report.rows] == ["0:Linear", "1:Linear"]


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_honored(tmp_path, threads):
    path = relu_onnx(str(tmp_path / "relu.onnx"), ["batch", 8])
    report = benchmark({"relu": path}, batch_sizes=(2,), threads=threads, **FAST)
    if os.path.isdir("/proc/self/task"):  # the count is measured, not echoed, where Linux shows threads
        assert report.threads == threads
        assert report.rows[0]["threads"] == threads
        assert f"{threads} intra-op thread" in report.table()


def test_progress_goes_to_stderr(tmp_path, capsys):
    path = relu_onnx(str(tmp_path / "relu.onnx"), ["batch", 8])
    benchmark({"relu": path}, batch_sizes=(1,), warmup=1, min_runs=2, min_time_s=0.0, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "intra-op thread" in err


def test_errors(tmp_path):
    fixed = relu_onnx(str(tmp_path / "fixed.onnx"), [1, 8])
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        benchmark({"f": fixed}, batch_sizes=(4,), **FAST)
    benchmark({"f": fixed}, batch_sizes=(1,), **FAST)  # its own batch is fine
    ragged = relu_onnx(str(tmp_path / "ragged.onnx"), ["batch", "n"])
    with pytest.raises(ConfigError, match="dynamic dimensions"):
        benchmark({"r": ragged}, batch_sizes=(1,), **FAST)
    with pytest.raises(ConfigError, match="example_inputs"):
        benchmark({"m": nn.Linear(2, 2)}, **FAST)
    with pytest.raises(ConfigError, match="no ONNX file"):
        benchmark({"m": tmp_path / "missing.onnx"}, **FAST)
    with pytest.raises(ConfigError, match="threads"):
        benchmark({"f": fixed}, batch_sizes=(1,), threads=0, **FAST)
