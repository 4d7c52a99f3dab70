"""Under torchrun (2 processes, gloo, CPU) both ranks build the same slim model, equal to one process with the
same global batch: C-SGD, AOFP and Auto-Balanced in a DistributedDataParallel loop, ID with each rank holding half
the calibration data (tests/ddp_worker.py). With BatchNorm, each rank's own statistics and unequal calibration
shards (ID with a FLOPs target: probes and candidates measured on every rank's data) the slim models are still
bitwise identical; a rank that diverges (other weights, another decision, a failure of its own) is one clear
error on every rank, never a hang or an abort (tests/ddp_agree_worker.py)."""

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


def _run(cmd, tmp, ok: bool = True, timeout: int = 600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


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


AGREE = str(HERE / "ddp_agree_worker.py")


@pytest.fixture(scope="module")
def agreed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp-agree")
    _run([sys.executable, AGREE, str(tmp), "agree", "--single"], tmp)
    _run([TORCHRUN, "--standalone", "--nproc_per_node=2", AGREE, str(tmp), "agree"], tmp)
    load = lambda name: torch.load(tmp / name, weights_only=True)  # noqa: E731
    return load("agree-rank0-of-1.pt"), load("agree-rank0-of-2.pt"), load("agree-rank1-of-2.pt")


@pytest.mark.parametrize("method", ["id", "csgd", "aofp", "abfp"])
def test_ranks_with_their_own_data_and_batchnorm_statistics_build_bitwise_the_same_slim_model(agreed, method):
    r0, r1 = (r[method] for r in agreed[1:])
    assert r0["keep"] and r0["keep"] == r1["keep"]
    assert r0["flops"][1] <= 0.5 * r0["flops"][0]
    assert r0["state"].keys() == r1["state"].keys()
    for name, t in r0["state"].items():
        assert torch.equal(t, r1["state"][name]), f"{method}: ranks differ in {name}"
    assert r0["verified"] == r1["verified"]


def test_id_with_a_target_on_unequal_shards_equals_one_process_with_all_the_data(agreed):
    # every measurement is a sum over samples (Grams, probe errors, reconstruction, BatchNorm statistics), so the
    # ranks' 40 + 24 samples give one process's 64 up to the float64 summation order
    single, r0, _ = (r["id"] for r in agreed)
    assert r0["keep"] == single["keep"]
    for name, t in r0["state"].items():
        torch.testing.assert_close(t, single["state"][name], rtol=1e-4, atol=1e-5, msg=f"id: {name}")


def test_a_diverging_rank_is_one_clear_error_on_every_rank_not_a_hang(tmp_path):
    done = _run([TORCHRUN, "--standalone", "--nproc_per_node=2", AGREE, str(tmp_path), "diverge"], tmp_path,
                ok=False, timeout=300)
    assert done.returncode != 0
    errors = [torch.load(tmp_path / f"diverge-rank{r}-of-2.pt", weights_only=True) for r in (0, 1)]
    assert errors[0] == errors[1], "the ranks raised different errors"
    says = {"weights": "DistributedError: ranks hold different weights (parameters or buffers): rank 1 differs "
                       "from rank 0 in 1 tensor(s) (3.weight)",
            "decision": "DistributedError: ranks disagree on ID's widths in round 1",
            "sizes": "DistributedError: ranks disagree on",  # the first collective whose sizes differ
            "fail": "DistributedError: rank 1 of 2 failed: VerificationError: planted"}
    for case, text in says.items():
        assert errors[0][case] is not None and errors[0][case].startswith(text), (case, errors[0][case])
    assert "a sum of shape" in errors[0]["sizes"]  # caught at the sizes, before the payload is sent


def test_fingerprints_follow_content_not_layout():
    from fxprune.distributed import fingerprint
    a = torch.arange(12.0).reshape(3, 4)
    assert fingerprint(a) == fingerprint(a.clone()) == fingerprint(a.numpy().copy(order="F"))
    b = a.clone()
    b[1, 2] = torch.nextafter(b[1, 2], torch.tensor(100.0))  # one ulp
    assert fingerprint(b) != fingerprint(a)
    assert fingerprint(a.T) != fingerprint(a) and fingerprint(a.double()) != fingerprint(a)
    assert fingerprint({0: 4, 1: 8}) == fingerprint({1: 8, 0: 4}) != fingerprint({0: 4, 1: 6})
