"""Realized speedup: ONNX Runtime latency ratio (slim / original) against FLOPs ratio, for CIFAR-shape ResNet-56
and VGG-16 pruned by fxprune's magnitude pass ("l1") at several FLOPs targets and width-rounding policies, next
to Torch-Pruning's MagnitudePruner (L1, round_to=8) at comparable FLOPs ratios.

What is built, per architecture (one seeded, randomly initialised zoo model; input (1, 3, 32, 32)):
  * the original;
  * ``fxprune.prune(model, x, "l1", target_flops=F, round_to=R)`` for every F in --targets and R in --round-to.
    R is ``none``, an int (8, 16), or ``8>32``: "round to 8 only the groups wider than 32 channels, leave the
    narrower ones unrounded". fxprune's API has no such option; it is expressed here, for this experiment only,
    by swapping ``fxprune.targets.unit`` (the step every group's width moves in, for rounding and the greedy
    fill alike) for the duration of that one prune call. A policy whose floor is above F (every group at its
    minimum rounded width still costs more) is reported as unreachable, with the floor;
  * Torch-Pruning 1.6 ``MagnitudePruner(importance=MagnitudeImportance(p=1), pruning_ratio=r, round_to=8,
    ignored_layers=[final Linear])`` + ``step()``, with r searched (a shared grid of r, 1 - sqrt(F), then secant
    steps on the measured FLOPs ratio) so its FLOPs ratio lands as near F as its rounding allows. (On ResNet-56
    it cannot land near 0.7: any r > 0 takes the 16/32/64 stages to at most 8/24/56, FLOPs ratio 0.52.)

Variants with identical parameter shapes are the same network for ONNX Runtime's purposes; they are exported and
timed once and share the row's numbers (the table says "= <other>").

How it is timed: every model is exported with ``fxprune.export.export_onnx`` (verified against torch), with
fxprune.bench's session settings (intra-op threads = --threads, thread spinning off). Default timer
("interleaved"): all sessions of one architecture stay alive (spinning is off, so idle ones cost nothing) and each
cycle runs every model once, in a fresh random order; at batch 1 at least 60 cycles (and up to 20 s), at batch 64
at least 8 (and up to 60 s). A model's latency ratio is the median over cycles of (its time / the original's time
in the same cycle). Why not rounds of fxprune.bench.benchmark (still available: --timer bench): that times models
one after another, and on this shared 2-core machine (load average 6-11 while this was written) per-round ratios
of one model spread from 0.3x to 2.5x; run-by-run interleaving brings the batch-1 interquartile range to about
+-5 %. FLOPs are counted with torch.utils.flop_counter (fxprune.cost.count_flops) at batch 1 on the eager modules,
for fxprune and Torch-Pruning alike.

Diagnostics per model: the op counts of the graph ONNX Runtime really runs (NCHWc convs / plain convs / layout
reorders, from its optimized-model dump) and a "padded FLOPs" ratio: FLOPs with conv channels padded the way
ORT's NCHWc layout pads them (to 16 with AVX-512, 8 with AVX2).

Checks (the issue's targets): latency ratio <= 1.15 x FLOPs ratio at batch 64 on VGG-16, <= 1.3 x on ResNet-56;
at batch 1 the fxprune latency ratio no worse than Torch-Pruning's (round_to=8) at the same target.

    .venv/bin/python benchmarks/speedup.py                       # everything: ~10 min on 2 quiet cores, ~20 loaded
    .venv/bin/python benchmarks/speedup.py --quick --models resnet56 --targets 0.5 --round-to none,8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxprune
import fxprune.targets as fx_targets
from fxprune import zoo
from fxprune.bench import benchmark
from fxprune.cost import count_flops, count_params
from fxprune.errors import TargetError
from fxprune.export import export_onnx
from _common import git_commit as git_head
from _common import write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speedup.json"
LIMITS = {"vgg16": 1.15, "resnet56": 1.3}  # latency ratio / FLOPs ratio at batch 64 must stay within this
TIE = 0.03  # batch-1 comparison with Torch-Pruning: worse by less than this counts as a tie (noise)


# ----------------------------------------------------------------------------------------------- width policies
def parse_policy(text: str):
    """'none' -> None; '8' -> 8; '8>32' -> (8, 32): round to 8 the groups wider than 32 only."""
    t = text.strip().lower()
    if t in ("none", "0", "1", ""):
        return None
    if ">" in t:
        step, above = t.split(">", 1)
        return (int(step), int(above))
    return int(t)


def policy_name(p) -> str:
    if p is None:
        return "none"
    if isinstance(p, tuple):
        return f"{p[0]}>{p[1]}"
    return str(p)


@contextlib.contextmanager
def round_only_wide(above: int):
    """Make fxprune's width solver round only the groups whose full width exceeds ``above``.

    fxprune.targets moves every group's width in steps of ``width_step(group, round_to)`` (rounding and the greedy
    fill alike); for the narrow groups this swaps in the unit of round_to=None. (Older fxprune.targets, without
    ``unit``: round_width(k, n, round_to) is swapped instead.)"""
    name = "unit" if hasattr(fx_targets, "unit") else "round_width"
    original = getattr(fx_targets, name)

    def width_of(g):
        return g if isinstance(g, int) else g.width

    def patched(a, b, round_to=None):
        if name == "width_step":  # width_step(group, round_to)
            return original(a, b if width_of(a) > above else None)
        return original(a, b, round_to if width_of(b) > above else None)  # round_width(k, n, round_to)

    setattr(fx_targets, name, patched)
    try:
        yield
    finally:
        setattr(fx_targets, name, original)


def prune_fx(model, x, target, policy, verify):
    if isinstance(policy, tuple):
        with round_only_wide(policy[1]):
            return fxprune.prune(model, x, "l1", target_flops=target, round_to=policy[0], verify=verify,
                                 progress=False)
    return fxprune.prune(model, x, "l1", target_flops=target, round_to=policy, verify=verify, progress=False)


# ----------------------------------------------------------------------------------------------- Torch-Pruning
def final_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune_tp(base, x, ratio):
    import torch_pruning as tp

    model = copy.deepcopy(base)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, round_to=8, ignored_layers=[final_linear(model)])
    pruner.step()
    return model.eval()


def fit_tp(base, x, f0, target, tries, cache):
    """Search TP's pruning_ratio r so its FLOPs ratio lands near target. Returns (r, model, flops ratio).

    TP's round_to floors each layer's kept count to a multiple of 8, and a layer whose kept count floors to 0 is
    not pruned at all, so FLOPs(r) is a staircase and not even monotone (ResNet-56's 16-channel stage is either
    16 or 8 wide). A coarse grid of r (cached, shared by all targets) finds the right step; secant steps in
    sqrt-space (FLOPs ~ (1 - r)^2) then refine it. Nearest means smallest |log(FLOPs ratio / target)|."""

    def at(r):
        r = round(min(max(r, 0.0), 0.95), 4)
        if r not in cache:
            m = prune_tp(base, x, r)
            cache[r] = (m, count_flops(m, (x,)) / f0)
        return r, cache[r][0], cache[r][1]

    def dist(c):
        return abs(math.log(c[2] / target))

    for r in (0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        at(r)
    best = min((at(r) for r in list(cache)), key=dist)
    best = min([best, at(1 - math.sqrt(target))], key=dist)
    for _ in range(tries):
        if dist(best) <= 0.02:
            break
        r, _, f = best
        guess = 1 - (1 - r) * math.sqrt(target / max(f, 1e-6))
        if round(min(max(guess, 0.0), 0.95), 4) in cache:
            break
        best = min([best, at(guess)], key=dist)
    return best


# ----------------------------------------------------------------------------------------------- helpers
def conv_widths(model: nn.Module) -> list:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def shape_key(model: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def nchwc_block() -> int:
    """MLAS's NCHWc block: 16 channels with AVX-512F, 8 with AVX2 (what ONNX Runtime pads conv channels to)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def padded_flops(model: nn.Module, x, block: int) -> tuple:
    """(conv+linear FLOPs, the same with conv channels padded the way ORT's NCHWc layout pads them).

    ORT (1.31) turns a Conv into an NCHWc Conv when its channel counts are multiples of 4 (and the filters are
    constant); output channels are padded up to the block, input channels too unless fewer than one block
    (then it reads plain NCHW). Other convs run unpadded in NCHW (im2col + GEMM). Measured on this build with
    one-conv models: 20, 24, 36 channels stay NCHWc; 17 and 63 fall back to plain Conv; 8 and 12 (< 16) get a
    reorder after every conv."""
    raw, pad = [0], [0]

    def up(c):
        return -(-c // block) * block

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            cin, cout = m.in_channels // m.groups, m.out_channels
            per = 2 * m.kernel_size[0] * m.kernel_size[1] * out.shape[-1] * out.shape[-2]
            raw[0] += per * cin * cout
            nchwc = m.groups == 1 and cin % 4 == 0 and cout % 4 == 0 or cin < 4
            pin = (up(cin) if cin >= block else cin) if nchwc else cin
            pad[0] += per * pin * (up(cout) if nchwc else cout)
        elif isinstance(m, nn.Linear):
            raw[0] += 2 * m.in_features * m.out_features
            pad[0] += 2 * m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hs:
            h.remove()
    return raw[0], pad[0]


def ort_graph_ops(path: str, threads: int) -> dict:
    """Op counts of the graph ONNX Runtime actually runs (after its optimizers, NCHWc transformer included)."""
    import collections

    import onnx
    import onnxruntime as ort

    opt = path + ".optimized.onnx"
    o = ort.SessionOptions()
    o.optimized_model_filepath = opt
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    del sess
    counts = collections.Counter(("nchwc." if n.domain.endswith("nchwc") else "") + n.op_type
                                 for n in onnx.load(opt).graph.node)
    os.remove(opt)
    return {"nchwc_conv": counts.get("nchwc.Conv", 0),
            "plain_conv": counts.get("Conv", 0) + counts.get("FusedConv", 0),
            "reorders": counts.get("nchwc.ReorderInput", 0) + counts.get("nchwc.ReorderOutput", 0),
            "all": dict(counts)}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))]


def _ort_session(path: str, threads: int):
    """The session options fxprune.bench uses: given intra-op threads, spinning off (so idle sessions cost
    nothing and several can stay alive while their runs interleave)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def time_interleaved(paths: dict, args, timing) -> tuple:
    """Run-by-run interleaving: every model's session stays alive; each cycle runs every model once, in a fresh
    random order, so all models see the same stretch of machine load. Returns ({name: {batch: [seconds per
    cycle]}}, threads) with the lists aligned by cycle."""
    import random

    import numpy as np

    rng = random.Random(args.seed)
    sessions, used = {}, args.threads
    for n, p in paths.items():
        # as fxprune.bench does: a session's pool holds n - 1 workers, the calling thread is the n-th (counted on
        # the last session, after ORT's process-wide setup has started whatever threads it starts once)
        before = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
        sessions[n] = _ort_session(p, args.threads)
        if before is not None:
            used = len(os.listdir("/proc/self/task")) - before + 1
    out = {n: {} for n in paths}
    try:
        for b in args.batch_sizes:
            feeds = {}
            for n, s in sessions.items():
                i = s.get_inputs()[0]
                feeds[n] = {i.name: np.random.default_rng(0).standard_normal([b] + list(i.shape[1:]))
                            .astype(np.float32)}
                for _ in range(timing["warmup"]):
                    s.run(None, feeds[n])
                out[n][b] = []
            big = b > 1
            min_cycles = timing["min_cycles_big" if big else "min_cycles_small"]
            budget = timing["budget_big_s" if big else "budget_small_s"]
            start, cycles = time.perf_counter(), 0
            order = list(sessions)
            while cycles < min_cycles or (time.perf_counter() - start < budget and cycles < 2000):
                rng.shuffle(order)
                for n in order:
                    t = time.perf_counter()
                    sessions[n].run(None, feeds[n])
                    out[n][b].append(time.perf_counter() - t)
                cycles += 1
    finally:
        sessions.clear()
    return out, used


def time_bench_rounds(paths: dict, args, timing) -> tuple:
    """Rounds of ONE fxprune.bench.benchmark call each over every model (order rotated per round); a sample is
    a model's median of one round. Coarser than time_interleaved: models are timed one after another."""
    names = list(paths)
    out = {n: {b: [] for b in args.batch_sizes} for n in names}
    threads = None
    for rnd in range(timing["rounds"]):
        k = (rnd * max(1, len(names) // timing["rounds"] + 1)) % len(names)
        order = names[k:] + names[:k]
        if rnd % 2:
            order = order[::-1]
        rep = benchmark({n: paths[n] for n in order}, batch_sizes=tuple(args.batch_sizes), threads=args.threads,
                        warmup=timing["warmup"], min_runs=timing["min_runs"], min_time_s=timing["min_time_s"],
                        progress=False)
        for r in rep.rows:
            out[r["model"]][r["batch"]].append(r["median_ms"] / 1e3)
        threads = rep.threads
    return out, threads


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------------------------- one architecture
def run_arch(arch, args, policies, timing):
    torch.manual_seed(args.seed)
    base = zoo.build(arch).eval()
    x = zoo.example_input(arch, batch=1)
    f0 = count_flops(base, (x,))
    variants = []  # dicts: name, kind, target, round_to, model (or None), flops_ratio, ...
    variants.append({"name": "original", "kind": "original", "target": 1.0, "round_to": "-", "model": base,
                     "flops": f0, "flops_ratio": 1.0, "params": count_params(base), "widths": conv_widths(base)})

    for target in args.targets:
        for pol in policies:
            name = f"fx t={target:g} r={policy_name(pol)}"
            row = {"name": name, "kind": "fxprune", "target": target, "round_to": policy_name(pol)}
            if isinstance(pol, tuple) and pol[0] in policies and min(conv_widths(base)[1:]) > pol[1]:
                # every prunable width is above the threshold: the policy is plain round_to=pol[0]
                twin = next(v for v in variants if v.get("target") == target and v.get("round_to") == str(pol[0]))
                row.update({k: v for k, v in twin.items() if k not in ("name", "round_to", "same_as")})
                row["kind"], row["note"] = "fxprune", f"every group is wider than {pol[1]}: same as round_to={pol[0]}"
                variants.append(row)
                continue
            t0 = time.perf_counter()
            try:
                res = prune_fx(base, x, target, pol, args.verify)
            except TargetError as e:
                msg = str(e)
                row.update(model=None, unreachable=msg[:msg.find(" of the flops") + 13] if " of the flops" in msg
                           else msg.splitlines()[0])
                log(f"{arch} {name}: unreachable ({row['unreachable']})")
                variants.append(row)
                continue
            m = res.model.eval()
            f = count_flops(m, (x,))
            row.update(model=m, flops=f, flops_ratio=f / f0, params=count_params(m), widths=conv_widths(m),
                       prune_s=time.perf_counter() - t0, verified_rel_diff=res.verified)
            log(f"{arch} {name}: FLOPs ratio {f / f0:.3f} ({row['prune_s']:.1f}s)")
            variants.append(row)

    if not args.no_tp:
        cache = {}
        for target in args.targets:
            t0 = time.perf_counter()
            r, m, fr = fit_tp(base, x, f0, target, args.tp_tries, cache)
            name = f"tp t={target:g} r=8"
            variants.append({"name": name, "kind": "torch_pruning", "target": target, "round_to": "8", "model": m,
                             "tp_pruning_ratio": r, "flops": round(fr * f0), "flops_ratio": fr,
                             "params": count_params(m), "widths": conv_widths(m),
                             "prune_s": time.perf_counter() - t0})
            log(f"{arch} {name}: pruning_ratio {r:.4f} -> FLOPs ratio {fr:.3f}")

    # dedupe by parameter shapes, export the distinct ones
    tmp_dir = tempfile.TemporaryDirectory(prefix="fxprune-speedup-")  # removed when run_arch returns
    tmp = tmp_dir.name
    distinct, by_key = {}, {}
    for v in variants:
        if v.get("model") is None:
            continue
        key = shape_key(v["model"])
        if key in by_key:
            v["same_as"] = by_key[key]
            continue
        by_key[key] = v["name"]
        t0 = time.perf_counter()
        path = os.path.join(tmp, f"{len(distinct)}.onnx")
        rep = export_onnx(v["model"], x, path)
        v.update(onnx_exporter=rep.exporter, onnx_rel_diff=rep.rel_diff, onnx_bytes=rep.file_size,
                 export_s=time.perf_counter() - t0)
        distinct[v["name"]] = path
        v["ort_graph"] = ort_graph_ops(path, args.threads)
    log(f"{arch}: {len(distinct)} distinct models exported")

    names = list(distinct)
    t0 = time.perf_counter()
    with tmp_dir:
        if args.timer == "bench":
            samples, timing_threads = time_bench_rounds(distinct, args, timing)
        else:
            samples, timing_threads = time_interleaved(distinct, args, timing)
    log(f"{arch}: timed {len(names)} models in {time.perf_counter() - t0:.0f}s ({args.timer}; "
        + ", ".join(f"b{b}: {len(samples['original'][b])} samples each" for b in args.batch_sizes) + ")")

    block = nchwc_block()
    base_pad = padded_flops(base, x, block)[1]
    rows = []
    for v in variants:
        out = {k: val for k, val in v.items() if k != "model"}
        out["model"] = arch
        out["variant"] = v["name"]
        del out["name"]
        src = v.get("same_as", v["name"])
        if v.get("model") is not None:
            out["odd_widths"] = sum(1 for w in v["widths"] if w % 8)
            out["params_ratio"] = v["params"] / variants[0]["params"]
            out["ort_graph"] = next(w for w in variants if w["name"] == src)["ort_graph"]
            pad = padded_flops(v["model"], x, block)[1]
            out["nchwc_padded_flops_ratio"] = pad / base_pad
            for b in args.batch_sizes:
                mine, base_t = samples[src][b], samples["original"][b]
                ratios = [m / o for m, o in zip(mine, base_t)]  # paired: same cycle / round
                med = statistics.median(ratios)
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [med, med, med]
                out[f"latency_ms_b{b}"] = statistics.median(mine) * 1e3
                out[f"latency_ratio_b{b}"] = med
                out[f"latency_ratio_b{b}_iqr"] = [q[0], q[2]]
                out[f"latency_ratio_b{b}_p10"] = _pct(mine, 10) / _pct(base_t, 10)
                out[f"latency_over_flops_b{b}"] = med / v["flops_ratio"]
                out[f"samples_b{b}"] = len(ratios)
        rows.append(out)

    # checks
    tp_by_target = {r["target"]: r for r in rows if r["kind"] == "torch_pruning"}
    for r in rows:
        if r["kind"] != "fxprune" or "latency_ratio_b64" not in r:
            continue
        if 64 in args.batch_sizes:
            r["check_b64"] = r["latency_over_flops_b64"] <= LIMITS.get(arch, 1.15)
        tp = tp_by_target.get(r["target"])
        if tp is not None and 1 in args.batch_sizes:
            # Same FLOPs (within 5 %): compare latency ratios. Otherwise TP could not land near the target (its
            # rounding floors whole stages) and latency per FLOP is the fair comparison. "tie": worse by less than
            # TIE (the batch-1 interquartile range of one model's paired ratios is about +-4 % here).
            same = abs(math.log(r["flops_ratio"] / tp["flops_ratio"])) <= 0.05
            key = "latency_ratio_b1" if same else "latency_over_flops_b1"
            rel = r[key] / tp[key]
            r["tp_latency_ratio_b1"] = tp["latency_ratio_b1"]
            r["tp_flops_ratio"] = tp["flops_ratio"]
            r["b1_vs_tp_basis"] = "latency ratio" if same else "latency per FLOP"
            r["b1_vs_tp_rel"] = rel
            r["check_b1_vs_tp"] = "ok" if rel <= 1.0 else "tie" if rel <= 1.0 + TIE else "worse"
    originals = {b: statistics.median(samples["original"][b]) * 1e3 for b in args.batch_sizes}
    return {"model": arch, "flops": f0, "nchwc_block": block, "original_ms": originals, "threads_used": timing_threads, "rows": rows}


def table(results, batch_sizes) -> str:
    head = ["model", "variant", "target", "round_to", "FLOPs x", "params x"]
    head += [f"lat x b{b}" for b in batch_sizes] + [f"lat/FLOPs b{b}" for b in batch_sizes]
    head += ["pad FLOPs x", "odd w", "ORT nchwc/plain/reorder", "check b64", "b1 vs TP"]
    body = []
    for res in results:
        for r in res["rows"]:
            if r.get("unreachable"):
                floor = re.search(r"still keeps ([0-9.]+)", r["unreachable"])
                body.append([r["model"], r["kind"], f"{r['target']:g}", r["round_to"],
                             f"unreachable (floor {floor.group(1)})" if floor else "unreachable"]
                            + [""] * (2 * len(batch_sizes) + 6))
                continue
            line = [r["model"], r["kind"] + (f" (= {r['same_as']})" if r.get("same_as") else ""),
                    f"{r['target']:g}", r["round_to"], fmt(r["flops_ratio"], 3), fmt(r.get("params_ratio"), 3)]
            line += [fmt(r.get(f"latency_ratio_b{b}"), 3) for b in batch_sizes]
            line += [fmt(r.get(f"latency_over_flops_b{b}")) for b in batch_sizes]
            line.append(fmt(r.get("nchwc_padded_flops_ratio"), 3))
            line.append(str(r.get("odd_widths", "")))
            g = r.get("ort_graph") or {}
            line.append(f"{g.get('nchwc_conv', '-')}/{g.get('plain_conv', '-')}/{g.get('reorders', '-')}")
            line.append({True: "ok", False: "MISS"}.get(r.get("check_b64"), ""))
            c = r.get("check_b1_vs_tp")
            line.append("" if c is None else f"{c} {r['b1_vs_tp_rel']:.2f}" + ("" if r["b1_vs_tp_basis"].startswith(
                "latency ratio") else "/F"))
            body.append(line)
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head] + body]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("lat x = median over cycles (rounds) of ORT latency / the original's in the same cycle; lat/FLOPs = lat x / "
                 "FLOPs x; pad FLOPs x = FLOPs ratio with conv channels padded as ORT's NCHWc layout pads them; "
                 "odd w = conv widths not a multiple of 8; ORT = op counts in the optimized graph ORT runs; b1 vs TP = "
                 "fxprune's b1 latency ratio / Torch-Pruning's at the same target (/F: per FLOP, used when their "
                 f"FLOPs ratios differ by > 5 %); tie = worse by < {TIE:.0%}.")
    for res in results:
        lines.append(f"{res['model']}: original " + ", ".join(
            f"b{b} {ms:.2f} ms" for b, ms in res["original_ms"].items()) + f"; {res['flops'] / 1e6:.1f} MFLOPs (b=1)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet56,vgg16", help="comma-separated zoo names")
    ap.add_argument("--targets", default="0.7,0.5,0.3,0.1", help="comma-separated FLOPs fractions kept")
    ap.add_argument("--round-to", default="none,8,16,8>32",
                    help="comma-separated width policies: none, an int, or S>N (round to S only groups wider than N)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2: 2 cores)")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--timer", choices=("interleaved", "bench"), default="interleaved",
                    help="interleaved: all sessions alive, one run of every model per cycle in random order "
                         "(default); bench: rounds of one fxprune.bench.benchmark call each")
    ap.add_argument("--cycles", default=None,
                    help="interleaved: min cycles at batch 1 and at larger batches, e.g. 60,8 (quick 5,2)")
    ap.add_argument("--budget", default=None,
                    help="interleaved: seconds per architecture to keep cycling, batch 1 and larger, e.g. 20,60 "
                         "(quick 0,0)")
    ap.add_argument("--rounds", type=int, default=None, help="bench timer: rounds (default 4; --quick 1)")
    ap.add_argument("--min-runs", type=int, default=None, help="bench timer: runs per measurement (default 5)")
    ap.add_argument("--min-time", type=float, default=None, help="bench timer: seconds per measurement (0.2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per measurement (default 2; quick 1)")
    ap.add_argument("--tp-tries", type=int, default=2,
                    help="Torch-Pruning secant refinements per target after a shared 10-point grid of ratios")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--verify", action="store_true",
                    help="also run fxprune's masked-reference verification in every prune (slower; the ONNX "
                         "export is checked against torch either way)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few cycles / runs: a smoke test, not a measurement")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = [parse_policy(p) for p in args.round_to.split(",")]
    quick = args.quick
    timing = {
        "rounds": args.rounds or (1 if quick else 4),
        "min_runs": args.min_runs or (3 if quick else 5),
        "min_time_s": args.min_time if args.min_time is not None else (0.0 if quick else 0.2),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "timer": args.timer,
    }
    cyc = [int(c) for c in (args.cycles or ("5,2" if quick else "60,8")).split(",")]
    bud = [float(c) for c in (args.budget or ("0,0" if quick else "20,60")).split(",")]
    timing.update(min_cycles_small=cyc[0], min_cycles_big=cyc[-1], budget_small_s=bud[0], budget_big_s=bud[-1])
    torch.set_num_threads(max(1, args.threads))
    warnings.filterwarnings("ignore")
    logging.getLogger("torch_pruning").setLevel(logging.ERROR)

    started = time.perf_counter()
    commit = git_head()  # at the start: others may commit while this runs
    results = []
    for arch in args.models:
        results.append(run_arch(arch, args, policies, timing))
    text = table(results, args.batch_sizes)
    print(text)
    import onnxruntime as ort
    import torch_pruning as tp

    data = {
        "benchmark": "speedup",
        "command": "python benchmarks/speedup.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit,
        "commit_at_end": git_head(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "torch_pruning": tp.__version__},
        "settings": {"models": args.models, "targets": args.targets,
                     "round_to": [policy_name(p) for p in policies], "threads": args.threads,
                     "batch_sizes": args.batch_sizes, "timing": timing, "verify": args.verify, "seed": args.seed,
                     "quick": quick, "input": [1, 3, 32, 32], "method": "l1",
                     "limits_b64_latency_over_flops": LIMITS},
        "results": results,
        "table": text,
    }
    write_json_atomic(Path(args.out), data)
    log(f"wrote {args.out} ({data['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
