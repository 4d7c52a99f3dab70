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
