"""The coverage benchmark's fast subset (benchmarks/coverage.py --fast), through the benchmark's own code path:
each model built from a Hugging Face config (or the zoo) with random weights, pruned by l1 at amount 0.5 in a
child process with a time limit. Each must prune, verify against the masked reference and lose at least 20 % of
its FLOPs, and every frozen group must say why."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_coverage", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fast_subset_prunes_and_verifies_every_model():
    bench = _bench()
    rows = bench.run(bench.FAST, tp=False, timeout=300)
    assert [r["model"] for r in rows] == list(bench.FAST)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["verified"] <= 1e-4 and r["flops_kept"] <= 0.8, r
        assert r["pruned"] > 0 and r["unexplained_frozen"] == 0, r


def test_a_linear_written_as_x_at_weight_T_prunes():
    """Falcon's FalconLinear computes x @ self.weight.T (aten.numpy_T): the weight's rows are still its output
    channels. The slim model equals the full-width one with the pruned hidden channels zeroed."""
    import numpy as np
    import torch
    from torch import nn

    import fxprune

    class TLinear(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)

        def forward(self, x):
            return x @ self.weight.T

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = TLinear(8, 32), TLinear(32, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 8)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    keep = res.decisions[next(iter(res.decisions))].keep
    assert res.model.up.weight.shape == (16, 8) and res.model.down.weight.shape == (4, 16)
    x2 = torch.randn(5, 8, dtype=torch.float64)
    mask = torch.as_tensor(np.isin(np.arange(32), keep), dtype=torch.float64)
    with torch.no_grad():
        want = (torch.relu(x2 @ model.up.weight.double().T) * mask) @ model.down.weight.double().T
        got = res.model.double()(x2)
    # float64 on both sides; they differ only by the 16 zero terms of the dot products (summation order): a few
    # eps64 (2.2e-16) times |values| ~ 1, so 1e-12 leaves a factor of ~1000 on any BLAS
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
