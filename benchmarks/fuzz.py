"""Fuzzing the core: random small graphs (convs, BatchNorm, grouped and depthwise convs, residual adds, concats,
chunks, squeeze-excite, pools, flatten/pool heads; tests/test_property.py's generator) through three routes, each
checked against tests/conftest.py's consumer_reference (the original eager model in float64 with forward
pre-hooks replacing consumer inputs; written independently of fxprune.verify):

- selection: random keep sets applied by the rewrite engine (slim graph and slim eager model);
- reconstruction: random keep sets and random T per consumer input;
- prune: fxprune.prune end to end (l1 or id, random amount, calibration data: least-squares T per consumer input
  and BatchNorm re-estimation), the result compared with the reference built from its own decisions (BatchNorm
  re-estimation off there, since the reference keeps the original statistics).

Every mismatch is recorded (not only the first). CI runs 2 x 25 of the first two routes on every change, the
nightly full run 2 x 200 more (tests/test_property.py).

    .venv/bin/python benchmarks/fuzz.py --examples 2000      # per route; writes benchmarks/results/fuzz.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from _common import ROOT, git_commit, write_json_atomic, write_text_atomic

sys.path.insert(0, str(ROOT / "tests"))
import test_property as tp  # noqa: E402
from conftest import consumer_reference, randomize_bn, rel_err  # noqa: E402

import fxprune  # noqa: E402
from fxprune.console import progress_bar  # noqa: E402


def prune_route(arch, seed):
    model, desc = arch
    torch.manual_seed(seed % (2 ** 31))
    for m in model.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
    randomize_bn(model, seed % 1000).eval()
    x = torch.randn(2, 3, tp.SIDE, tp.SIDE)
    calib = torch.randn(32, 3, tp.SIDE, tp.SIDE)
    gen = torch.Generator().manual_seed(seed % (2 ** 31))
    method = "id" if torch.rand(1, generator=gen).item() < 0.5 else "l1"
    amount = float(torch.rand(1, generator=gen).item()) * 0.8
    try:
        res = fxprune.prune(model, x, method, amount=amount, round_to=None, calib=calib, recalibrate_bn=False,
                            progress=False)
    except fxprune.NothingToPruneError:
        return "nothing to prune"
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float64)
    xs = torch.randn(3, 3, tp.SIDE, tp.SIDE)
    with torch.no_grad():
        want = ref(xs.double())
        err = max(rel_err(res.graph(xs), want), rel_err(res.model.eval()(xs), want))
    assert err < 1e-4, (desc, method, amount, err)
    return method


def run(route: str, examples: int, bar) -> dict:
    stats = {"route": route, "examples": 0, "mismatches": [], "skipped": 0}

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(arch=tp.architectures(), seed=st.integers(0, 2 ** 32 - 1))
    def one(arch, seed):
        stats["examples"] += 1
        bar.update(1)
        try:
            if route == "prune":
                if prune_route(arch, seed) == "nothing to prune":
                    stats["skipped"] += 1
            else:
                tp.check(arch, seed, allow_T=route == "reconstruction")
        except Exception as exc:  # noqa: BLE001 - every mismatch is recorded, the run goes on
            stats["mismatches"].append({"arch": arch[1], "seed": seed, "error": f"{type(exc).__name__}: {exc}"[:500],
                                        "where": traceback.format_exc().splitlines()[-3:]})
    t0 = time.perf_counter()
    one()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="random graphs per route")
    ap.add_argument("--routes", default="selection,reconstruction,prune")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results", help="folder of fuzz.json / fuzz.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    routes = args.routes.split(",")
    bar = progress_bar(total=args.examples * len(routes), desc="fuzz", unit="graph", mininterval=10)
    results = [run(r, args.examples, bar) for r in routes]
    bar.close()
    commit, cmd = git_commit(), f"python benchmarks/fuzz.py --examples {args.examples} --routes {args.routes}"
    lines = ["# Fuzz: random graphs through prune + verify", "", f"- Command: `{cmd}`", f"- Commit: `{commit}`",
             f"- Date: {datetime.date.today()}", "", "| route | graphs | mismatches | skipped | time (s) | s / graph |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['route']} | {r['examples']} | {len(r['mismatches'])} | {r['skipped']} | "
                     f"{r['seconds']:.0f} | {r['seconds'] / max(r['examples'], 1):.2f} |")
    for r in results:
        for m in r["mismatches"][:20]:
            lines.append(f"- {r['route']}: {' > '.join(m['arch'])} (seed {m['seed']}): {m['error']}")
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "fuzz.json", {"command": cmd, "commit": commit, "results": results})
    write_text_atomic(args.out / "fuzz.md", md)


if __name__ == "__main__":
    main()
