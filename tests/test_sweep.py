"""fxprune.sweep with the deterministic fake timer of test_latency: points, files, Pareto front, bad input."""

import json

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.sweeps import SweepResult, pareto
from test_latency import X, FakeTimer, net, true_fraction


def score(m):
    """A score that falls as the model shrinks (its parameter count), known without fxprune."""
    return float(sum(p.numel() for p in m.parameters()))


@pytest.mark.parametrize("kind", ["latency", "flops"])
def test_sweep_writes_json_and_png(tmp_path, kind):
    timer = FakeTimer()
    res = fxprune.sweep(net(), X, ["l1", "l2"], targets=[0.7, 0.4], kind=kind, metric=score, metric_name="params",
                        latency_timer=timer, latency_cache=str(tmp_path / "cache"), out=str(tmp_path / "out"),
                        progress=False)
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    png = (tmp_path / "out" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert [p["name"] for p in data["points"]] == ["l1@0.7", "l1@0.4", "l2@0.7", "l2@0.4"]
    assert data["base"]["score"] == score(net())
    for p in data["points"]:
        slim = res.models[p["name"]]
        assert p["score"] == score(slim)
        assert p["latency"] == pytest.approx(true_fraction(type("R", (), {"model": slim}), timer))
        if kind == "latency":
            assert p["latency"] <= p["target"] + 1e-9
        else:
            assert p["flops"] <= p["target"] + 1e-9
    assert set(data["pareto"]) <= {p["name"] for p in data["points"]}
    assert "pareto" in res.table() and "l1" in res.table()


def test_sweep_measures_the_table_once(tmp_path):
    timer = FakeTimer()
    fxprune.sweep(net(), X, "l1", targets=[0.8, 0.6, 0.4], latency_timer=timer, latency_cache=str(tmp_path),
                  progress=False)
    again = FakeTimer()
    fxprune.sweep(net(), X, "l1", targets=[0.5], latency_timer=again, latency_cache=str(tmp_path), progress=False)
    assert timer.layer_calls > 0 and again.layer_calls == 0


def test_pareto_front_by_hand():
    pts = [{"name": n, "method": "m", "target": 0, "latency": lat, "score": s}
           for n, lat, s in [("a", 0.3, 0.80), ("b", 0.5, 0.85), ("c", 0.6, 0.84), ("d", 0.7, 0.90)]]
    res = SweepResult(pts, {"score": 0.91, "latency_ms": 1.0}, "latency")
    assert [p["name"] for p in pareto(res)] == ["a", "b", "d"]  # c: slower than b and worse
    res.higher_is_better = False  # lower score better: a (fastest, lowest) dominates everything slower
    assert [p["name"] for p in pareto(res)] == ["a"]


@pytest.mark.parametrize("kw, needle", [
    ({"targets": []}, "targets must be a non-empty list"),
    ({"targets": [0.5, 1.5]}, "targets must be a non-empty list"),
    ({"targets": ["x"]}, "targets must be a list"),
    ({"targets": [0.5], "kind": "params"}, "kind must be 'latency' or 'flops'"),
    ({"targets": [0.5], "metric": 3}, "metric must be a callable"),
])
def test_sweep_bad_input(tmp_path, kw, needle):
    timer = FakeTimer()
    with pytest.raises(ConfigError) as info:
        fxprune.sweep(net(), X, "l1", latency_timer=timer, latency_cache=str(tmp_path), progress=False, **kw)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert timer.layer_calls == timer.model_calls == 0


@pytest.mark.parametrize("args, needle", [
    (["--method", "l1", "--targets", "1.5"], "--targets"),
    (["--method", "nope", "--targets", "0.5"], "unknown method"),
    (["--method", "l1", "--targets", "0.5", "--kind", "params"], "--kind"),
])
def test_cli_sweep_bad_input(capsys, args, needle):
    from fxprune import cli
    code = cli.main(["sweep", "lenet5", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_demo_accuracy_latency_plot_and_best_row(tmp_path):
    from fxprune.demo_latency import best_row, plot_accuracy_latency
    rows = [{"method": "base", "acc_base": 0.9, "acc_finetuned": None, "latency_b64_ms": 10.0},
            {"method": "l1", "acc_finetuned": 0.85, "latency_b64_ms": 6.0, "schedule": "one-shot"},
            {"method": "id", "acc_finetuned": 0.88, "latency_b64_ms": 6.5, "schedule": "one-shot"},
            {"method": "id @ 50% latency", "acc_finetuned": 0.87, "latency_b64_ms": 4.9, "schedule": "one-shot"},
            {"method": "bad", "error": "TargetError: x"}]
    assert best_row(rows)["method"] == "id"
    rows.append({"method": "id int8", "acc_finetuned": 0.879, "latency_b64_ms": 3.0, "schedule": "int8"})
    path = tmp_path / "p.png"
    plot_accuracy_latency({"rows": rows, "config": {"model": "m"}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_int8_points(tmp_path):
    """int8=True: every point also carries the int8 model's time (the int8 fake timer's numbers, checked by hand
    against the fp32 fake's original) and its score, computed on the real ORT int8 file."""
    from test_latency import FakeInt8Timer, int8_fraction
    fp32, i8 = FakeTimer(), FakeInt8Timer()
    # more calibration samples than the 768 inputs of the Linear the slim model's reconstruction refits: with 64
    # its least squares is underdetermined, its weights grow (max 12 against 0.03) and int8 error reaches 0.1-0.9
    calib = torch.randn(1024, 3, 16, 16)
    ref = net()
    with torch.no_grad():
        want = ref(X)

    def err(m):  # works on the torch model and on the int8 file alike (it only calls m(x))
        with torch.no_grad():
            return float((m(X) - want).square().sum() / want.square().sum())
    res = fxprune.sweep(net(), X, "l1", targets=[0.6], metric=err, higher_is_better=False, calib=calib,
                        latency_timer=fp32, int8=True, int8_timer=i8, latency_cache=str(tmp_path / "cache"),
                        out=str(tmp_path / "out"), progress=False)
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    (p,) = data["points"]
    slim = res.models[p["name"]]
    o8, s8 = i8._model(net(), (X,), 1), i8._model(slim, (X,), 1)
    assert s8 / o8 == pytest.approx(int8_fraction(slim, i8))
    assert p["int8_latency"] == pytest.approx(s8 / fp32._model(net(), (X,), 1))
    assert p["int8_speedup"] == pytest.approx(fp32._model(slim, (X,), 1) / s8)
    # int8 changes outputs by a few quantization steps; its score stays near the float slim model's
    assert p["int8_error"] < 0.2 and abs(p["int8_score"] - p["score"]) < 0.2 + p["score"]
    assert "int8 latency" in res.table()
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_int8_needs_calib(tmp_path):
    with pytest.raises(ConfigError, match="int8=True quantizes every slim model"):
        fxprune.sweep(net(), X, "l1", targets=[0.5], int8=True, latency_timer=FakeTimer(),
                      latency_cache=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="int8_timer= is for int8=True"):
        fxprune.sweep(net(), X, "l1", targets=[0.5], int8=True, calib=torch.randn(8, 3, 16, 16),
                      int8_timer=FakeTimer(), latency_timer=FakeTimer(), latency_cache=str(tmp_path), progress=False)
