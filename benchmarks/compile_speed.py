"""Compiler speed: fxprune (analysis + decide + rewrite + verify) vs Torch-Pruning (DependencyGraph + one
MagnitudePruner step), L1 filter norms, 50 % of every group's channels, on CIFAR-shape ResNet-56 and VGG-16.

How fxprune is timed: ``fxprune.prune``'s steps are replicated here with the public modules so that every stage
has its own clock (capture, analysis, decide, rewrite, verify, FLOPs count). The compared fxprune time is
analysis + decide + rewrite + verify, the same work ``prune`` does after ``capture`` and before counting FLOPs
(the FLOPs count is a report extra that Torch-Pruning does not do; it is printed on its own line, as is
capture). As a cross-check, ``fxprune.prune`` is also timed end to end (it includes a deep copy of the model,
capture and two FLOPs counts).

How Torch-Pruning is timed: ``MagnitudePruner(...)`` construction (it traces the model and builds the
DependencyGraph) + ``pruner.step()``; the final Linear is in ignored_layers, as fxprune freezes it by itself
(its outputs are the model's outputs).

Threads: torch runs with one intra-op thread by default (--threads): the machine has 2 cores shared with other
jobs, and with 2 OpenMP threads single runs of either tool were up to 10x slower at random.

Every measurement gets a fresh deep copy of one seeded model (copied outside the clock). Repeats are
interleaved: per repeat, per model, fxprune-staged, Torch-Pruning and fxprune.prune run one after the other,
and the order alternates between repeats. Medians over repeats; ratio = median fxprune / median TP.

    .venv/bin/python benchmarks/compile_speed.py                 # 5 repeats, resnet56 + vgg16
    .venv/bin/python benchmarks/compile_speed.py --repeats 3 --models resnet56
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxprune
import torch_pruning as tp
from fxprune import zoo
from fxprune.passes import magnitude
from fxprune import verify as fx_verify
from fxprune.analysis import analyze
from fxprune.capture import capture, eval_mode
from fxprune.context import PruneContext, Target
from fxprune.cost import count_flops, count_params
from fxprune.rewrite import Plan
from _common import git_commit
from _common import write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compile_speed.json"
FX_STAGES = ("analysis", "decide", "rewrite", "verify")


def quiet_torch_logs():
    # torch.export logs (to stderr) that batch size 1 specializes the batch dim; expected at (1, 3, 32, 32)
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def fx_staged(model: nn.Module, x: torch.Tensor, amount: float) -> dict:
    """api.prune's pipeline, stage by stage (no ignore list, uniform amount, method l1)."""
    t = {}
    decide_fn = magnitude.decide_l1  # the "l1" pass, imported directly
    example = (x,)
    c0 = time.perf_counter()
    gm = capture(model, example)
    c1 = time.perf_counter()
    an = analyze(gm)
    c2 = time.perf_counter()
    prunable = [g for g in an.groups if g.prunable]
    target = Target(amounts={g.gid: amount for g in prunable})
    ctx = PruneContext(analysis=an, target=target, example_inputs=example,
                       progress=False)
    decisions = decide_fn(ctx)
    c3 = time.perf_counter()
    plan = Plan(an, decisions)
    slim_gm, model = plan.slim(gm, model)
    c4 = time.perf_counter()
    inputs = fx_verify.random_like(example)
    with eval_mode(model):
        diff = fx_verify.check_against_reference(plan, gm, slim_gm, inputs)
        fx_verify.check_eager_matches_graph(model, slim_gm, inputs)
    c5 = time.perf_counter()
    t.update(capture=c1 - c0, analysis=c2 - c1, decide=c3 - c2, rewrite=c4 - c3, verify=c5 - c4)
    t["fx_compile"] = sum(t[s] for s in FX_STAGES)
    return {"times": t, "verified": diff, "groups": len(an.groups), "prunable": len(prunable),
            "pruned_groups": len(plan.decisions), "model": model}


def tp_prune(model: nn.Module, x: torch.Tensor, amount: float) -> dict:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    model.eval()
    c0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=amount, global_pruning=False, ignored_layers=[last_linear])
    c1 = time.perf_counter()
    pruner.step()
    c2 = time.perf_counter()
    return {"times": {"tp_build": c1 - c0, "tp_step": c2 - c1, "tp_total": c2 - c0}, "model": model}


def fx_whole(model: nn.Module, x: torch.Tensor, amount: float) -> dict:
    c0 = time.perf_counter()
    res = fxprune.prune(model, x, "l1", amount=amount, progress=False)
    c1 = time.perf_counter()
    return {"times": {"fx_prune_call": c1 - c0}, "result": res}


def median(xs):
    return statistics.median(xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16"], help="zoo model names")
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on 2 shared, loaded cores, 2 OpenMP threads make "
                         "single runs up to 10x slower at random, for both tools)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    quiet_torch_logs()
    torch.set_num_threads(args.threads)

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bases = {}
    for name in args.models:
        torch.manual_seed(0)
        bases[name] = zoo.build(name).eval()

    # warm-up (imports, first-call caches of torch.export / dispatcher) on a throwaway copy of each, untimed
    for name in args.models:
        fx_staged(copy.deepcopy(bases[name]), x, args.amount)
        tp_prune(copy.deepcopy(bases[name]), x, args.amount)

    samples = {n: {} for n in args.models}
    checks = {}
    runners = [("fx", fx_staged), ("tp", tp_prune), ("whole", fx_whole)]
    for r in range(args.repeats):
        for name in args.models:
            order = runners if r % 2 == 0 else runners[::-1]
            for tag, fn in order:
                m = copy.deepcopy(bases[name])
                out = fn(m, x, args.amount)
                for k, v in out["times"].items():
                    samples[name].setdefault(k, []).append(v)
                if r == 0:
                    checks.setdefault(name, {})[tag] = out
            print(f"  repeat {r + 1}/{args.repeats} {name}: fx {samples[name]['fx_compile'][-1]:.3f}s "
                  f"tp {samples[name]['tp_total'][-1]:.3f}s", file=sys.stderr, flush=True)

    rows = []
    for name in args.models:
        base = bases[name]
        fx_m, tp_m = checks[name]["fx"]["model"], checks[name]["tp"]["model"]
        with torch.no_grad():
            y_tp = tp_m.eval()(x)  # TP's slim model must still run
        med = {k: median(v) for k, v in samples[name].items()}
        p0, pfx, ptp = count_params(base), count_params(fx_m), count_params(tp_m)
        f0, ffx, ftp = count_flops(base, x), count_flops(fx_m, x), count_flops(tp_m, x)
        row = {
            "model": name,
            "median_s": med,
            "samples_s": samples[name],
            "ratio_fx_over_tp": med["fx_compile"] / med["tp_total"],
            "ratio_fx_plus_capture_over_tp": (med["fx_compile"] + med["capture"]) / med["tp_total"],
            "params": {"dense": p0, "fxprune": pfx, "torch_pruning": ptp},
            "flops": {"dense": f0, "fxprune": ffx, "torch_pruning": ftp},
            "same_param_magnitude": abs(torch.tensor(pfx / ptp).log10().item()) < 1.0,
            "fx_verified_rel_diff": checks[name]["fx"]["verified"],
            "fx_groups": checks[name]["fx"]["groups"], "fx_prunable_groups": checks[name]["fx"]["prunable"],
            "tp_output_shape": list(y_tp.shape),
        }
        rows.append(row)

    hdr = (f"{'model':<10} {'capture':>8} {'analysis':>9} {'decide':>8} {'rewrite':>8} {'verify':>8} "
           f"{'fx total':>9} | {'TP build':>9} {'TP step':>8} {'TP total':>9} | {'fx/TP':>6} {'(+cap)/TP':>9} "
           f"| {'prune()':>8}")
    print(f"\nCompile speed, L1, amount {args.amount}, input (1,3,32,32), median of {args.repeats} "
          f"interleaved repeats, seconds (torch threads {torch.get_num_threads()})")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        m = row["median_s"]
        print(f"{row['model']:<10} {m['capture']:>8.3f} {m['analysis']:>9.3f} {m['decide']:>8.3f} "
              f"{m['rewrite']:>8.3f} {m['verify']:>8.3f} {m['fx_compile']:>9.3f} | {m['tp_build']:>9.3f} "
              f"{m['tp_step']:>8.3f} {m['tp_total']:>9.3f} | {row['ratio_fx_over_tp']:>6.2f} "
              f"{row['ratio_fx_plus_capture_over_tp']:>9.2f} | {m['fx_prune_call']:>8.3f}")
    print("\nfx total = analysis + decide + rewrite + verify (capture = torch.export, on its own column; "
          "prune() = fxprune.prune end to end incl. deepcopy, capture and FLOPs counts)")
    for row in rows:
        m = row["median_s"]
        print(f"capture (torch.export) {row['model']}: {m['capture']:.3f} s")
    print("\nslim models (params / FLOPs at batch 1):")
    for row in rows:
        p, f = row["params"], row["flops"]
        print(f"  {row['model']:<10} params dense {p['dense']:,}  fxprune {p['fxprune']:,}  TP {p['torch_pruning']:,}"
              f"  (same order of magnitude: {row['same_param_magnitude']}) | FLOPs dense {f['dense']:,}  "
              f"fxprune {f['fxprune']:,}  TP {f['torch_pruning']:,} | fxprune verified rel diff "
              f"{row['fx_verified_rel_diff']:.2e}, groups {row['fx_prunable_groups']}/{row['fx_groups']} prunable")

    data = {
        "benchmark": "compile_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", "?"),
                    "python": platform.python_version()},
        "settings": {"amount": args.amount, "threads": args.threads, "method": "l1", "input": [1, 3, 32, 32], "repeats": args.repeats,
                     "fx_timing": "public modules stage by stage (api.prune replicated); fx_compile = "
                                  "analysis+decide+rewrite+verify; capture separate",
                     "tp_timing": "MagnitudePruner(...) construction (DependencyGraph build) + one step()"},
        "rows": rows,
    }
    write_json_atomic(args.out, data)
    print(f"\nwrote {args.out}")
    ok = all(r["same_param_magnitude"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
