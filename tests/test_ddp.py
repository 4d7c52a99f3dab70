"""Under torchrun (2 processes, gloo, CPU) both ranks build the same slim model, equal to one process with the
same global batch: C-SGD, AOFP and Auto-Balanced in a DistributedDataParallel loop, ID with each rank holding half
the calibration data.
The worker is tests/ddp_worker.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _run(cmd, tmp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    assert TORCHRUN, "torchrun (installed with torch) not found beside the Python interpreter"
    tmp = tmp_path_factory.mktemp("ddp")
    worker = str(HERE / "ddp_worker.py")
    _run([sys.executable, worker, str(tmp), "--single"], tmp)
    _run([TORCHRUN, "--standalone", "--nproc_per_node=2", worker, str(tmp)], tmp)
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
    return load("rank0-of-1.pt"), load("rank0-of-2.pt"), load("rank1-of-2.pt")


@pytest.mark.parametrize("method", ["csgd", "aofp", "abfp", "id"])
def test_ranks_agree_with_each_other_and_with_one_process(runs, method):
    single, r0, r1 = (r[method] for r in runs)
    assert r0["keep"] == r1["keep"] == single["keep"]
    assert r0["keep"], "nothing was pruned"
    assert r0.get("status") == r1.get("status")  # the same masks / clusters on both ranks
    for name, t in r0["state"].items():
        assert torch.equal(t, r1["state"][name]), f"{method}: ranks differ in {name}"
        torch.testing.assert_close(t, single["state"][name], rtol=1e-4, atol=1e-5, msg=f"{method}: {name}")


def test_the_torchrun_example_runs_and_saves_a_loadable_slim_model(tmp_path):
    out = tmp_path / "slim.pt"
    _run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(HERE.parent / "examples" / "ddp_csgd.py"),
          "--train-samples", "1024", "--batch", "64", "--out", str(out)], tmp_path)
    from fxprune import load, zoo
    slim = load(out, zoo.build("vgg-small", in_channels=1, image_size=28))
    full = zoo.build("vgg-small", in_channels=1, image_size=28)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in full.parameters())
    assert slim.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
