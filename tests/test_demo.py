"""The demo: the --quick run end to end (JSON table, PNG plot, cached base weights), and its helpers.

Everything runs with XDG_CACHE_HOME in a temporary folder, so the user's own cache is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxprune import demo
from fxprune.data import data_dir
from fxprune.errors import ConfigError, DataError

SCRIPT = Path(sys.executable).with_name("fxprune")
HAVE_DATA = any((data_dir() / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@needs_data
def test_quick_demo_writes_table_json_and_plot(tmp_path):
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fxprune.cli"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "out"
    r = subprocess.run(cmd + ["demo", "--quick", "--methods", "l1", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    results = json.loads((out / demo.RESULTS_JSON).read_text())
    assert results["columns"] == demo.COLUMNS
    for col in ("method", "params", "flops", "acc_base", "acc_pruned", "acc_finetuned", "latency_b1_ms",
                "latency_b64_ms", "speedup_b64"):
        assert col in results["columns"]
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["base", "l1"]
    for row in rows.values():
        assert set(demo.COLUMNS) <= set(row)
        assert row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > 0 and row["speedup_b64"] > 0
    base, l1 = rows["base"], rows["l1"]
    assert base["speedup_b64"] == 1.0
    assert 0.4 <= l1["flops_kept"] <= 0.5 + 1e-9 and l1["flops"] < base["flops"] and l1["params"] < base["params"]
    for key in ("acc_base", "acc_pruned", "acc_finetuned"):
        assert 0.0 <= l1[key] <= 1.0
    assert results["config"]["quick"] and results["config"]["train_samples"] == demo.QUICK["train_samples"]
    assert results["config"]["test_samples"] == demo.QUICK["test_samples"]
    assert set(results["onnx"]) == {"base", "l1"} and all(Path(p).is_file() for p in results["onnx"].values())

    assert (out / demo.PLOT_PNG).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    table = r.stdout
    assert "method" in table and "speedup b=64" in table and "\nbase " in table and "\nl1 " in table

    cached = list((tmp_path / "cache" / "fxprune").glob("demo-vgg-small-half-*.pt"))
    assert len(cached) == 1
    saved = torch.load(cached[0], weights_only=True)
    assert saved["model"] == "vgg-small-half" and "state_dict" in saved


def test_train_or_load_caches_and_recovers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))

    model, cached, path = demo.train_or_load("lenet5", train, epochs=1, seed=3, n_calib=10, progress=False)
    assert not cached and path == demo.cache_path("lenet5", 1, 3, 64, 10) and path.is_file()
    assert path.parent == tmp_path / "fxprune"
    again, cached, _ = demo.train_or_load("lenet5", train, epochs=1, seed=3, n_calib=10, progress=False)
    assert cached
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k

    assert demo.cache_path("lenet5", 2, 3, 64, 10) != path  # epochs, seed and sizes key the cache
    assert demo.cache_path("lenet5", 1, 4, 64, 10) != path
    assert demo.cache_path("lenet5", 1, 3, 65, 10) != path

    path.write_bytes(b"not a checkpoint")  # a damaged cache file is retrained over, with a warning
    capsys.readouterr()
    model2, cached, _ = demo.train_or_load("lenet5", train, epochs=1, seed=3, n_calib=10, progress=False)
    assert not cached and "unusable" in capsys.readouterr().err
    assert torch.load(path, weights_only=True)["format"] == "fxprune-demo-base"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "fxprune"
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert demo.cache_dir() == Path("/somewhere/fxprune")


def test_bad_options_fail_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="not a folder"):
        demo.run_demo(out=tmp_path / "file", quick=True)
    with pytest.raises(Exception, match="not a folder"):
        demo.run_demo(out=tmp_path / "file" / "sub", quick=True)
    with pytest.raises(ConfigError, match="unknown method"):
        demo.run_demo(methods=["nope"], out=tmp_path / "o", quick=True)
    with pytest.raises(ConfigError, match="unknown demo model"):
        demo.run_demo(model="alexnet", out=tmp_path / "o", quick=True)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        demo.run_demo(data_dir="/nonexistent", out=tmp_path / "o", quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_table_and_plot_from_results(tmp_path):
    results = {
        "columns": demo.COLUMNS,
        "config": {"model": "m", "target_flops": 0.5, "epochs": 1, "finetune_epochs": 1, "distill": False,
                   "train_samples": 10, "test_samples": 5},
        "bench": {"ort_version": "x", "threads": 2},
        "rows": [
            {"method": "base", "params": 1000, "flops": 2_000_000, "flops_kept": 1.0, "acc_base": 0.9,
             "acc_pruned": None, "acc_finetuned": None, "latency_b1_ms": 1.0, "latency_b64_ms": 20.0,
             "speedup_b64": 1.0},
            {"method": "l1", "params": 500, "flops": 1_000_000, "flops_kept": 0.5, "acc_base": 0.9,
             "acc_pruned": 0.5, "acc_finetuned": 0.85, "latency_b1_ms": 0.6, "latency_b64_ms": 11.0,
             "speedup_b64": 1.82},
            {"method": "broken", "acc_base": 0.9, "error": "TargetError: cannot reach the target",
             **{c: None for c in demo.COLUMNS if c not in ("method", "acc_base")}},
        ],
    }
    text = demo.format_table(results)
    assert "1.82x" in text and "85.00" in text and "failed: TargetError" in text
    demo.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
