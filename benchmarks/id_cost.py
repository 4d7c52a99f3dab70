"""Cost of fxprune's ID pass (streamed float64 Gram per group + pivoted Cholesky) against the dense reference
(materialize the full activation matrix Z of every group over all calibration images, then column-pivoted QR per
group, LAPACK geqp3 through fxprune/passes/_id_math.id_dense), on CIFAR-shape VGG-16 and ResNet-56.

Setup (identical for both routes): the zoo model (seed 0, random weights, BatchNorm statistics warmed on random
batches), 1000 random N(0, 1) calibration images 3x32x32, ID at amount=0.5 (one round: amount mode measures the
unpruned model once), 100 images per calibration batch.

Routes, each in a FRESH subprocess (so peak memory is that route's own):
- fxprune: ``fxprune.prune(model, x, "id", amount=0.5, calib=images, calib_samples=1000, rounds=1,
  round_to=None, verify=True)`` (exact widths, the same k as the dense route). Timed: the ID pass alone (``decide``, wrapped in the pass registry) and prune() end to end
  (capture, analysis, decide, rewrite, verification, FLOPs counts).
- dense: capture + analysis (fxprune's, to know the groups and where each group's Z lives, the same definition
  of Z as the pass: the fold point, else every consumer's input source), then one torch.fx Interpreter pass per
  calibration batch over the captured graph keeping every group's Z, concatenated into full (rows, n) float32
  matrices for all groups at once, then id_dense (float64 geqp3) per group. Timed: Z materialization + QR, and
  the whole route including capture + analysis.

Memory: peak RSS of the child (getrusage(RUSAGE_SELF).ru_maxrss at the end) minus its current RSS
(/proc/self/statm) just before the route starts (imports, model, images and warm-up done; the warm-up includes
capturing a tiny model, so torch.export's lazy imports are not charged to either route). tracemalloc would
not see torch's allocations. The parent also records getrusage(RUSAGE_CHILDREN).ru_maxrss.

Same channels: for every pruned group, fxprune's kept set vs the dense QR's kept set.

A third child runs the fxprune route under cProfile; the top functions (by own time, and by cumulative time
inside fxprune/ and fxprune/passes/) go to the results.

Threads: one intra-op torch thread by default (--threads), as in benchmarks/compile_speed.py: the machine has
2 cores shared with other jobs. LAPACK/BLAS threads are left at their defaults, the same for both routes.

    .venv/bin/python benchmarks/id_cost.py                      # vgg16 + resnet56, 1000 images
    .venv/bin/python benchmarks/id_cost.py --models resnet56 --samples 300 --no-profile   # quick look
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import logging
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from _common import write_text_atomic as atomic_write
from _common import git_commit as git_rev

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_JSON = HERE / "results" / "id_cost.json"
RESULTS_MD = HERE / "results" / "id_cost.md"
AMOUNT = 0.5
BATCH = 100


# ----------------------------------------------------------------------------------------------------------------
# helpers


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def quiet():
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------------------------
# child: one route


def setup(model_name: str, samples: int, threads: int):
    import torch
    from torch import nn

    from fxprune import zoo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = zoo.build(model_name).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():  # BatchNorm running statistics from random batches (cumulative average)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32, generator=gen))
        for m in bns:
            m.momentum = 0.1
        model.eval()
    images = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x = images[:2].clone()
    return model, x, images


def route_fxprune(model, x, images, samples):
    import fxprune
    from fxprune import passes

    passes.get("id")  # load the registry
    inner = passes.REGISTRY["id"]
    clock = {}

    def timed(ctx, **kw):
        t0 = time.perf_counter()
        try:
            return inner(ctx, **kw)
        finally:
            clock["decide_s"] = time.perf_counter() - t0
            clock["peak_after_decide_mb"] = rss_peak_mb()

    passes.REGISTRY["id"] = timed
    try:
        t0 = time.perf_counter()
        res = fxprune.prune(model, x, "id", amount=AMOUNT, calib=images, calib_samples=samples, rounds=1,
                            round_to=None, progress=False, verify=True)
        total = time.perf_counter() - t0
    finally:
        passes.REGISTRY["id"] = inner
    keeps = {str(g): d.keep.tolist() for g, d in res.decisions.items()}
    widths = {str(g): res.analysis.groups[g].width for g in res.decisions}
    return {"time_s": clock["decide_s"], "total_s": total, "keeps": keeps, "widths": widths,
            "peak_after_decide_mb": clock["peak_after_decide_mb"], "verified": res.verified,
            "flops": list(res.flops)}


def route_dense(model, x, images, samples):
    import torch
    from fxprune.passes import _id_math as idm
    from fxprune.passes.interpolative import _columns, _sources
    from torch.fx import Interpreter

    from fxprune.analysis import analyze
    from fxprune.capture import capture
    from fxprune.targets import uniform_widths

    t0 = time.perf_counter()
    gm = capture(model, (x,))
    an = analyze(gm)
    prunable = [g for g in an.groups if g.prunable]
    widths = uniform_widths(an, {g.gid: AMOUNT for g in prunable}, None)
    # where each group's Z lives: the pass's own definition (the fold point, else every consumer's input source)
    view = SimpleNamespace(analysis=an, groups=an.groups)
    where: dict[int, list] = {}
    for g in prunable:
        for src in _sources(view, g.gid):
            cols = _columns(an, src, g.gid, g.width)
            if cols is not None:
                where.setdefault(g.gid, []).append((src, *cols))
    nodes = {s for w in where.values() for s, _, _ in w}
    t1 = time.perf_counter()

    class Keep(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in nodes:
                self.kept[n.name] = out
            return out

    chunks: dict[int, list] = {g: [] for g in where}
    with torch.no_grad():
        for i in range(0, samples, BATCH):
            it = Keep(gm)
            it.kept = {}
            it.run(images[i:i + BATCH])
            for g, lst in where.items():
                for name, dim, P in lst:
                    a = it.kept[name].movedim(dim, -1)
                    a = a.reshape(-1, a.shape[-1])[:, torch.as_tensor(P.reshape(-1))]
                    chunks[g].append(a.reshape(-1, P.shape[1]).clone())
            del it
    Z = {g: torch.cat(c) for g, c in chunks.items()}  # every group's full Z, all held at once
    del chunks
    t2 = time.perf_counter()
    z_mb = sum(z.numel() * z.element_size() for z in Z.values()) / 2**20
    keeps = {}
    for g, z in Z.items():
        k = int(widths[g])
        if k >= an.groups[g].width:
            continue
        keeps[str(g)] = idm.id_dense(z, k).keep.tolist()
    t3 = time.perf_counter()
    return {"time_s": t3 - t1, "materialize_s": t2 - t1, "qr_s": t3 - t2, "total_s": t3 - t0,
            "capture_analysis_s": t1 - t0, "z_mb_float32": z_mb, "keeps": keeps,
            "rows": {str(g): int(z.shape[0]) for g, z in Z.items()}}


def child(args):
    quiet()
    model, x, images = setup(args.model, args.samples, args.threads)
    import torch

    with torch.no_grad():  # warm-up of the kernels both routes use (outside the clocks)
        model(images[:BATCH])
    # torch.export imports a lot lazily (hundreds of MB of RSS): both routes capture, so pay that before the
    # baseline with a tiny model, and the deltas measure the routes' own work and data
    from torch import nn

    from fxprune.analysis import analyze
    from fxprune.capture import capture
    analyze(capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval(), (x,)))
    base = rss_now_mb()
    peak0 = rss_peak_mb()
    if args.route == "fxprune-profile":
        prof = cProfile.Profile()
        prof.enable()
        out = route_fxprune(model, x, images, args.samples)
        prof.disable()
        out["profile"] = profile_summary(prof)
    elif args.route == "fxprune":
        out = route_fxprune(model, x, images, args.samples)
    else:
        out = route_dense(model, x, images, args.samples)
    out.update(rss_base_mb=base, rss_peak_mb=rss_peak_mb(), peak_before_mb=peak0)
    out["peak_delta_mb"] = out["rss_peak_mb"] - base
    atomic_write(Path(args.out), json.dumps(out))


def profile_summary(prof, top=25) -> dict:
    st = pstats.Stats(prof)
    rows = []
    for (fn, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"func": f"{_short(fn)}:{line}({name})", "calls": nc, "tottime": tt, "cumtime": ct,
                     "ours": ("/fxprune/" in fn)})
    total = max(r["cumtime"] for r in rows)
    by_tot = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cum_ours = sorted([r for r in rows if r["ours"]], key=lambda r: -r["cumtime"])[:top]
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return {"total_s": total, "by_tottime": by_tot, "ours_by_cumtime": by_cum_ours}


def _short(fn: str) -> str:
    for key in ("/site-packages/", "/work/main/"):
        if key in fn:
            return fn.split(key, 1)[1]
    return fn


# ----------------------------------------------------------------------------------------------------------------
# parent


def run_child(route: str, model: str, args) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--route", route, "--model", model,
               "--samples", str(args.samples), "--threads", str(args.threads), "--out", str(out)]
        before = rss_peak_mb(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-4000:])
            raise RuntimeError(f"{route} on {model} failed (exit {p.returncode})")
        res = json.loads(out.read_text())
        res["child_wall_s"] = wall
        res["children_maxrss_mb"] = rss_peak_mb(resource.RUSAGE_CHILDREN)
        res["children_maxrss_before_mb"] = before
        return res


def compare_keeps(a: dict, b: dict) -> dict:
    groups = sorted(set(a) | set(b), key=int)
    same = [g for g in groups if a.get(g) == b.get(g)]
    diff = {}
    for g in groups:
        if a.get(g) != b.get(g):
            sa, sb = set(a.get(g, [])), set(b.get(g, []))
            diff[g] = {"fxprune_only": sorted(sa - sb), "dense_only": sorted(sb - sa), "k": len(sa)}
    return {"groups": len(groups), "same": len(same), "differ": diff}


def fmt_md(results: dict) -> str:
    L = ["# ID pass cost: fxprune (streamed Gram) vs dense reference (full Z + pivoted QR)", ""]
    L.append(f"- commit `{results['commit']}`, {results['date']}, {results['machine']}")
    L.append(f"- command: `{results['command']}`")
    L.append(f"- setup: random weights, BN warmed on random batches, {results['samples']} random 3x32x32 "
             f"calibration images, amount={AMOUNT} (one round), torch threads={results['threads']}; each route in a "
             "fresh subprocess; peak memory = child's peak RSS minus its RSS just before the route")
    L.append("")
    L.append("| model | route | pass time s | whole route s | peak RSS delta MB | same channels |")
    L.append("|---|---|---:|---:|---:|---|")
    for m, r in results["models"].items():
        fx, de = r["fxprune"], r["dense"]
        same = f"{r['keeps']['same']}/{r['keeps']['groups']} groups"
        L.append(f"| {m} | fxprune ID (decide) | {fx['time_s']:.2f} | {fx['total_s']:.2f} (prune(), incl. capture,"
                 f" rewrite, verify) | {fx['peak_delta_mb']:.0f} | {same} |")
        L.append(f"| {m} | dense (materialize Z + QR) | {de['time_s']:.2f} (Z {de['materialize_s']:.2f} + QR "
                 f"{de['qr_s']:.2f}) | {de['total_s']:.2f} (incl. capture+analysis) | {de['peak_delta_mb']:.0f} "
                 f"(Z alone {de['z_mb_float32']:.0f} MB float32) | |")
        L.append(f"| {m} | **ratio fxprune/dense** | **{r['time_ratio']:.2f}x** (target <= 0.5) | "
                 f"{r['total_ratio']:.2f}x | **{r['mem_ratio']:.3f}** (target <= 0.1) | |")
    L.append("")
    L.append("## Targets")
    L.append("")
    for m, r in results["models"].items():
        L.append(f"- {m}: time {'HIT' if r['time_ratio'] <= 0.5 else 'MISS'} ({r['time_ratio']:.2f}x <= 0.5x), "
                 f"peak memory {'HIT' if r['mem_ratio'] <= 0.1 else 'MISS'} ({r['mem_ratio']:.3f} <= 0.1), "
                 f"same kept channels in {r['keeps']['same']} of {r['keeps']['groups']} groups"
                 + ("" if not r["keeps"]["differ"] else f" (differ: {r['keeps']['differ']})"))
    L.append("")
    for m, r in results["models"].items():
        if "fxprune-profile" not in r:
            continue
        prof = r["fxprune-profile"]["profile"]
        L.append(f"## Where fxprune's time goes: {m} (prune() under cProfile, {prof['total_s']:.1f} s)")
        L.append("")
        L.append("| own time s | calls | function |")
        L.append("|---:|---:|---|")
        for row in prof["by_tottime"][:12]:
            L.append(f"| {row['tottime']:.2f} | {row['calls']} | `{row['func']}` |")
        L.append("")
        L.append("| cumulative s | own s | calls | fxprune / passes function |")
        L.append("|---:|---:|---:|---|")
        for row in prof["ours_by_cumtime"][:14]:
            L.append(f"| {row['cumtime']:.2f} | {row['tottime']:.2f} | {row['calls']} | `{row['func']}` |")
        L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg16", "resnet56"])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile child")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--route", choices=["fxprune", "dense", "fxprune-profile"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tqdm.auto import tqdm  # tqdm.write: prints between a live bar's updates

    from fxprune.console import progress_bar

    results = {"commit": git_rev(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "command": "python benchmarks/id_cost.py " + " ".join(sys.argv[1:]), "samples": args.samples,
               "threads": args.threads, "amount": AMOUNT, "models": {}}
    routes = ["fxprune", "dense"] + ([] if args.no_profile else ["fxprune-profile"])
    bar = progress_bar(total=len(args.models) * len(routes), desc="id_cost", unit="run")
    for m in args.models:
        r = {}
        for route in routes:
            bar.set_postfix_str(f"{m} {route}")
            r[route] = run_child(route, m, args)
            bar.update()
        fx, de = r["fxprune"], r["dense"]
        r["keeps"] = compare_keeps(fx["keeps"], de["keeps"])
        r["time_ratio"] = fx["time_s"] / de["time_s"]
        r["total_ratio"] = fx["total_s"] / de["total_s"]
        r["mem_ratio"] = fx["peak_delta_mb"] / de["peak_delta_mb"]
        for route in ("fxprune", "dense"):
            r[route].pop("keeps")
        results["models"][m] = r
        tqdm.write(f"{m}: pass {fx['time_s']:.2f}s vs dense {de['time_s']:.2f}s (ratio {r['time_ratio']:.2f}); "
                   f"peak RSS delta {fx['peak_delta_mb']:.0f} MB vs {de['peak_delta_mb']:.0f} MB "
                   f"(ratio {r['mem_ratio']:.3f}); same channels in {r['keeps']['same']}/{r['keeps']['groups']} "
                   "groups")
        if "fxprune-profile" in r:
            prof = r["fxprune-profile"]["profile"]
            tqdm.write(f"  profile (prune() under cProfile {prof['total_s']:.1f}s), top own time:")
            for row in prof["by_tottime"][:8]:
                tqdm.write(f"    {row['tottime']:7.2f}s  {row['calls']:6d}  {row['func']}")
    bar.close()
    md = fmt_md(results)
    print(md)
    if not args.no_write:
        atomic_write(RESULTS_JSON, json.dumps(results, indent=1))
        atomic_write(RESULTS_MD, md + "\n")  # the reading is appended by hand after a full run


if __name__ == "__main__":
    main()
