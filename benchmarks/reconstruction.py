"""Issue 7's benchmark: accuracy right after pruning to a FLOPs target, with and without reconstruction and
BatchNorm re-estimation, on trained Fashion-MNIST ResNet-20, ResNet-56 and the small VGG; then after one epoch of
fine-tuning.

Base models and data: benchmarks/_models.py (trained once, cached; calibration = 1000 training images held out
with seed 0; the test split only measures accuracy). x = one calibration image (batch 1) is the example input.

Rows, each at FLOPs targets 0.7 / 0.5 / 0.3 (FLOPs kept = fxprune.cost.count_flops(slim) / count_flops(base), batch 1):
- id           fxprune.prune(base, x, "id", target_flops=t, calib=calib, round_to=None, reconstruct=True,
               recalibrate_bn=True); the two options only where fxprune.prune has them (else today's ID, noted)
- l1           fxprune.prune(base, x, "l1", target_flops=t, round_to=None)            (no calibration data)
- l1+calib     the same with calib=calib, reconstruct=True, recalibrate_bn=True       ('n/a' while fxprune lacks them)
- tp           Torch-Pruning 1.6 MagnitudePruner(GroupMagnitudeImportance(p=2), ignored_layers=[final Linear]),
               one uniform pruning_ratio for every group (TP's default, global_pruning=False; --tp-global for
               global ranking), bisected until its FLOPs are within 1 point of the target (closest if none is)
- tp+bn        the tp model after the dense BatchNorm re-estimation below
- l1+bn, id+bn the l1 / id models after the same dense re-estimation: l1+bn says what BatchNorm alone gives
               without reconstruction, id+bn cross-checks fxprune's own re-estimation once it exists
Table 2: id and l1+calib with fxprune's default round_to (16).

Dense BatchNorm re-estimation (plain torch, no fxprune): on a copy, every BatchNorm gets reset_running_stats()
and momentum=None (a cumulative average), only the BatchNorm modules are put in train mode, ONE forward of all
calibration images at once under no_grad (so the statistics are the exact mean and unbiased variance over the
calibration set), then eval mode and the old momentum again.

Fine-tuning: one epoch of fxprune.finetune.finetune (SGD lr 0.01, momentum 0.9, cosine, wd 5e-4, batch 128,
seed 0) on the 59000 training images (--ft-samples N: a fixed random subset), for id, l1, l1+calib and tp+bn.

    .venv/bin/python benchmarks/reconstruction.py                    # everything; results in benchmarks/results/
    .venv/bin/python benchmarks/reconstruction.py --quick            # smoke run (minutes), results in a temp dir
    .venv/bin/python benchmarks/reconstruction.py --models resnet20 --targets 0.7 0.5 --no-finetune
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm  # tqdm.write: prints between a live bar's updates

import fxprune
from fxprune.console import progress_bar
from _common import git_commit, write_bytes_atomic, write_text_atomic
from _models import data, default_threads, trained
from fxprune.cost import count_flops
from fxprune.errors import FxPruneError
from fxprune.finetune import evaluate, finetune
from fxprune.targets import DEFAULT_ROUND_TO

HERE = Path(__file__).resolve().parent
MODELS = ("resnet20", "resnet56", "vgg-small")
PRETTY = {"resnet20": "ResNet-20", "resnet56": "ResNet-56", "vgg-small": "small VGG"}
TARGETS = (0.7, 0.5, 0.3)
NEW_OPTIONS = ("reconstruct", "recalibrate_bn")
# row -> (label, fxprune method or None, with calib, new options wanted, round_to, post-step)
ROWS = {
    "id": ("fxprune id (calib)", "id", True, True, None, None),
    "l1": ("fxprune l1, no calib", "l1", False, False, None, None),
    "l1+calib": ("fxprune l1 + calib (reconstruct + BN)", "l1", True, True, None, None),
    "tp": ("Torch-Pruning group magnitude", None, False, False, None, None),
    "tp+bn": ("Torch-Pruning + dense BN re-est.", None, False, False, None, "bn"),
    "l1+bn": ("fxprune l1 + dense BN re-est.", "l1", False, False, None, "bn"),
    "id+bn": ("fxprune id + dense BN re-est.", "id", True, True, None, "bn"),
    "id@16": (f"fxprune id (calib), round_to={DEFAULT_ROUND_TO}", "id", True, True, DEFAULT_ROUND_TO, None),
    "l1+calib@16": (f"fxprune l1 + calib, round_to={DEFAULT_ROUND_TO}", "l1", True, True, DEFAULT_ROUND_TO, None),
}
TABLE1 = ["id", "l1", "l1+calib", "tp", "tp+bn", "l1+bn", "id+bn"]
TABLE2 = ["id@16", "l1+calib@16"]
FINETUNED = ("id", "l1", "l1+calib", "tp+bn")


class NotAvailable(Exception):
    """A row this fxprune cannot run yet (an option it does not have)."""


def quiet():
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def supported_options() -> set[str]:
    """The new options fxprune.prune names in its signature. Today prune forwards unknown keywords to the method
    pass, which ignores them silently, so asking the signature is the only way to know they do something."""
    params = inspect.signature(fxprune.prune).parameters
    return {o for o in NEW_OPTIONS if o in params}


def final_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ----------------------------------------------------------------------------------------------------------------
# the ways to prune


def prune_fx(base, x1, method, target, calib, with_calib, new_opts, round_to, options_here):
    kw = {"target_flops": target, "round_to": round_to, "progress": False}
    if with_calib:
        kw["calib"] = calib
    note = ""
    if new_opts:
        missing = [o for o in NEW_OPTIONS if o not in options_here]
        if missing and method != "id":  # l1 + calib means nothing without them
            raise NotAvailable(f"fxprune.prune has no {' / '.join(missing)} option yet")
        if missing:
            note = f"today's ID: fxprune.prune has no {' / '.join(missing)} option yet"
        kw.update({o: True for o in NEW_OPTIONS if o in options_here})
    try:
        res = fxprune.prune(base, x1, method, **kw)
    except TypeError as e:  # an option the signature names but the call refuses
        raise NotAvailable(f"fxprune.prune refused the options: {e}") from e
    return res.model.eval(), note


def tp_prune(base, ratio, x1, global_pruning):
    import torch_pruning as tp
    m = copy.deepcopy(base).eval()
    pruner = tp.pruner.MagnitudePruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=global_pruning,
                                       ignored_layers=[final_linear(m)])
    pruner.step()
    return m.eval()


def tp_at_flops(base, target, x1, base_flops, global_pruning, tol=0.01, steps=16):
    """Bisect TP's pruning_ratio until FLOPs kept is within tol of target; the closest model if no ratio is."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        m = tp_prune(base, ratio, x1, global_pruning)
        kept = count_flops(m, x1) / base_flops
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (m, kept, ratio)
        if abs(kept - target) <= tol:
            break
        lo, hi = (ratio, hi) if kept > target else (lo, ratio)
    m, kept, ratio = best
    note = f"pruning_ratio {ratio:.4f}" + ("" if abs(kept - target) <= tol else f"; no ratio within {tol:.2f}")
    return m, note


@torch.no_grad()
def recalibrate_bn_dense(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(model).eval()
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    saved = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
        b.train()
    m(calib)  # one batch of every calibration image: exact mean and unbiased variance
    for b, mom in zip(bns, saved):
        b.momentum = mom
    return m.eval()


# ----------------------------------------------------------------------------------------------------------------
# one model


def run_model(name, args, splits, options_here, out_dir, res):
    base, info = trained(name, progress=not args.no_progress, quick=args.quick)
    calib, test = splits["calib"], splits["test"]
    x1 = calib[:1]
    base_flops = count_flops(base, x1)
    base_acc = 100 * evaluate(base, test)
    tqdm.write(f"{name}: base test accuracy {base_acc:.2f} % ({'trained now' if info['trained_now'] else 'cached'}, "
               f"{info['cache']})")
    entry = {"base_acc": base_acc, "base_flops": base_flops, "train": info, "command": res["command"],
             "commit": res["commit"], "date": res["date"], "rows": {}}
    res["models"][name] = entry
    rows = [r for r in TABLE1 + TABLE2 if r in args.rows]
    models = {}  # (row, target) -> (slim model, note), so the +bn rows reuse their source row's pruning
    bar = progress_bar(total=len(rows) * len(args.targets), desc=f"{name} rows", unit="row", disable=args.no_progress)
    for target in args.targets:
        for row in rows:
            bar.set_postfix_str(f"{target} {row}")
            label, method, with_calib, new_opts, round_to, post = ROWS[row]
            v = {"target": target, "acc": None, "flops_kept": None, "acc_ft": None, "note": ""}
            t0 = time.perf_counter()
            try:
                src = row[:-3] if post == "bn" else row
                if post == "bn" and (src, target) in models:
                    slim, v["note"] = models[(src, target)]
                elif method is None:
                    slim, v["note"] = tp_at_flops(base, target, x1, base_flops, args.tp_global)
                else:
                    slim, v["note"] = prune_fx(base, x1, method, target, calib, with_calib, new_opts, round_to,
                                               options_here)
                models[(src, target)] = slim, v["note"]
                if post == "bn":
                    slim = recalibrate_bn_dense(slim, calib)
                v["prune_s"] = time.perf_counter() - t0
                v["flops_kept"] = count_flops(slim, x1) / base_flops
                v["acc"] = 100 * evaluate(slim, test)
                if row in args.ft_rows and not args.no_finetune:
                    ft = copy.deepcopy(slim)
                    t1 = time.perf_counter()
                    finetune(ft, splits["ft"], epochs=1, lr=0.01, progress=not args.no_progress, seed=0,
                             desc=f"FT {name} {target} {row}")
                    v["ft_s"] = time.perf_counter() - t1
                    v["acc_ft"] = 100 * evaluate(ft, test)
            except NotAvailable as e:
                v["note"] = f"n/a: {e}"
            except FxPruneError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                v["note"] = f"error: {type(e).__name__}: {first}"
            entry["rows"].setdefault(row, []).append(v)
            bar.update()
            tqdm.write(f"  {target:.2f} {label:<42} acc {fmt(v['acc'])}  FLOPs {fmt(v['flops_kept'], 3)}  "
                       f"after FT {fmt(v['acc_ft'])}  {v['note']}")
        for k in [k for k in models if k[1] == target]:
            del models[k]
        save(res, out_dir)  # partial results survive an interrupted run
    bar.close()


# ----------------------------------------------------------------------------------------------------------------
# report


def fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def cell(row_entry, target):
    return next((v for v in row_entry if abs(v["target"] - target) < 1e-9), None)


def check_targets(res: dict) -> list[dict]:
    out = []

    def acc(model, row, target):
        m = res["models"].get(model)
        v = m and cell(m["rows"].get(row, []), target)
        return None if not v else v["acc"]

    for model, row, target, need in (("resnet20", "id", 0.7, 89.0), ("resnet20", "id", 0.5, 80.0),
                                     ("vgg-small", "id", 0.5, 90.0)):
        a = acc(model, row, target)
        what = f"{PRETTY[model]}: id >= {need:g} % at {target} of the FLOPs (before fine-tuning)"
        out.append({"what": what, "met": None if a is None else a >= need,
                    "detail": "not measured in this run" if a is None else f"{a:.2f} %"})
    gaps = []
    for model, m in res["models"].items():
        for a_row, b_row in (("id", "l1+calib"), ("id@16", "l1+calib@16")):
            for target in res["targets_flops"]:
                a, b = acc(model, a_row, target), acc(model, b_row, target)
                if a is not None and b is not None:
                    gaps.append((a - b, f"{PRETTY[model]} {target} {a_row}"))
    worst = min(gaps) if gaps else None
    out.append({"what": "id never below l1+calib by more than 0.5 points (every model, target, round_to)",
                "met": None if worst is None else worst[0] >= -0.5,
                "detail": "not measurable: no l1+calib numbers (fxprune has no reconstruct option yet)"
                if worst is None else f"worst {worst[0]:+.2f} pt ({worst[1]}) over {len(gaps)} pairs"})
    for model, m in res["models"].items():  # the long-run aim, reported, not a target
        a = acc(model, "id", 0.5)
        if a is not None:
            out.append({"what": f"{PRETTY[model]} id within 2 points of the unpruned model at 0.5",
                        "met": m["base_acc"] - a <= 2.0, "detail": f"{a:.2f} vs {m['base_acc']:.2f} %",
                        "aim": True})
    return out


def verdict(t):
    return "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")


def render_md(res: dict) -> str:
    L = ["# Reconstruction and BatchNorm re-estimation (issue 7)", ""]
    L.append(f"- command: `{res['command']}`")
    L.append(f"- commit `{res['commit']}`, {res['date']}, {res['machine']}, torch threads {res['threads']}")
    present = ", ".join(res["options_present"]) or "none of " + ", ".join(NEW_OPTIONS)
    L.append(f"- fxprune.prune options present: {present}")
    L.append(f"- calibration: {res['calib_samples']} held-out training images; accuracy on {res['test_samples']} test "
             "images; FLOPs kept = count_flops(slim) / count_flops(base), batch 1")
    L.append(f"- BatchNorm re-estimation of the tp+bn / l1+bn / id+bn rows: {res['bn_method']}")
    L.append(f"- Torch-Pruning: {res['tp_method']}")
    L.append(f"- fine-tuning: {res['ft_note']}")
    L.append("- cells: accuracy % before fine-tuning / FLOPs kept / accuracy % after one epoch of fine-tuning")
    L.append("")
    for name, m in res["models"].items():
        tr = m["train"]
        L.append(f"## {PRETTY.get(name, name)}: unpruned {m['base_acc']:.2f} %  (recipe: {tr['recipe']['epochs']} "
                 f"epochs, lr {tr['recipe']['lr']}, batch {tr['recipe']['batch']}, {tr['train_samples']} images, "
                 f"trained in {tr['train_s'] / 60:.1f} min)")
        if m.get("command", res["command"]) != res["command"]:
            L += ["", f"measured by `{m['command']}`, commit `{m['commit']}`, {m['date']}"]
        for title, rows in ((f"round_to=None (exact widths)", TABLE1),
                            (f"fxprune's default round_to={DEFAULT_ROUND_TO}", TABLE2)):
            rows = [r for r in rows if r in m["rows"]]
            if not rows:
                continue
            L += ["", f"{title}:", "", "| method | " + " | ".join(f"{t:g}" for t in res["targets_flops"]) + " |",
                  "|---|" + "---:|" * len(res["targets_flops"])]
            notes = {}  # (row, note) -> targets, so a note shared by every target is printed once
            for r in rows:
                cells = []
                for t in res["targets_flops"]:
                    v = cell(m["rows"][r], t)
                    if v is None:
                        cells.append("")
                    elif v["acc"] is None:
                        cells.append("n/a" if v["note"].startswith("n/a") else "error")
                    else:
                        cells.append(f"{fmt(v['acc'])} / {fmt(v['flops_kept'], 3)}"
                                     + (f" / {fmt(v['acc_ft'])}" if v["acc_ft"] is not None else ""))
                    if v is not None and v["note"]:
                        notes.setdefault((r, v["note"]), []).append(t)
                L.append(f"| {ROWS[r][0]} | " + " | ".join(cells) + " |")
            if notes:
                L += [""] + [f"- {r} at {', '.join(f'{t:g}' for t in ts)}: {n}" for (r, n), ts in notes.items()]
        L.append("")
    L += ["## Targets (before fine-tuning)", ""]
    L += [f"- {'(aim) ' if t.get('aim') else ''}{verdict(t)}: {t['what']}: {t['detail']}" for t in res["targets"]]
    L.append("")
    return "\n".join(L)


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.4), squeeze=False)
    style = {"id": ("C0", "o", "-"), "l1": ("C1", "^", "-"), "l1+calib": ("C2", "s", "-"), "tp": ("C3", "v", "-"),
             "tp+bn": ("C3", "v", "--"), "l1+bn": ("C1", "^", "--"), "id+bn": ("C0", "o", ":"),
             "id@16": ("C0", "o", "-."), "l1+calib@16": ("C2", "s", "-.")}
    for ax, name in zip(axes.flat, names):
        m = res["models"][name]
        for r, (c, mk, ls) in style.items():
            pts = sorted((v["flops_kept"], v["acc"]) for v in m["rows"].get(r, []) if v["acc"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=mk, ls=ls, ms=5, label=ROWS[r][0])
        ax.axhline(m["base_acc"], color="k", lw=0.8, ls=":", label="unpruned")
        ax.set_xlabel("FLOPs kept (slim / base, batch 1)")
        ax.set_ylabel("test accuracy % before fine-tuning")
        ax.set_title(f"{PRETTY.get(name, name)} (unpruned {m['base_acc']:.1f} %)", fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Fashion-MNIST: accuracy right after pruning (no fine-tuning) vs FLOPs kept", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
    write_bytes_atomic(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def save(res: dict, out_dir: Path):
    res["targets"] = check_targets(res)
    write_text_atomic(out_dir / "reconstruction.json", json.dumps(res, indent=1) + "\n")


def keep_models(res: dict, path: Path, replaced) -> None:
    """--append: the earlier run's other models go into res (each keeps its own command, commit and date)."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("targets_flops") != res["targets_flops"] or old.get("quick") != res["quick"]:
        raise SystemExit(f"--append: {path} was run with targets {old.get('targets_flops')} (quick "
                         f"{old.get('quick')}), this run with {res['targets_flops']} (quick {res['quick']})")
    for name, m in old["models"].items():
        if name not in replaced:
            m.setdefault("command", old["command"])
            m.setdefault("commit", old["commit"])
            m.setdefault("date", old["date"])
            res["models"][name] = m


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: quick base models (_models.py), targets 0.7 0.5, 2000 test / 300 calib / 2000 "
                         "fine-tuning images, results in a temp dir")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=None,
                    help="FLOPs kept (default 0.7 0.5 0.3; 0.7 0.5 with --quick)")
    ap.add_argument("--rows", nargs="+", default=TABLE1 + TABLE2, choices=TABLE1 + TABLE2)
    ap.add_argument("--tp-global", action="store_true", help="Torch-Pruning with global_pruning=True")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--ft-rows", nargs="+", default=list(FINETUNED), choices=list(FINETUNED),
                    help="rows fine-tuned for one epoch (default: all of %(default)s)")
    ap.add_argument("--ft-samples", type=int, default=0, help="fine-tune on a fixed random subset (0: all 59000)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 if load < 2, else 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redo the .md and .png from the JSON in --out")
    ap.add_argument("--append", action="store_true",
                    help="keep the other models of the JSON already in --out (same targets), replace these")
    args = ap.parse_args(argv)
    args.targets = args.targets or ([0.7, 0.5] if args.quick else list(TARGETS))
    if any(not 0 < t <= 1 for t in args.targets):
        ap.error(f"--targets must be in (0, 1], got {args.targets}")
    quiet()
    if args.replot:
        out_dir = args.out or HERE / "results"
        res = json.loads((out_dir / "reconstruction.json").read_text())
        res["targets"] = check_targets(res)
        write_text_atomic(out_dir / "reconstruction.md", render_md(res))
        plot(res, out_dir / "reconstruction.png")
        return 0
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="reconstruction_quick_")) if args.quick else HERE / "results")
    t_start = time.perf_counter()

    d = data()
    calib, test, ft = d.calib[0], d.test, d.train
    n_ft = 2000 if args.quick else args.ft_samples
    if n_ft:
        idx = torch.randperm(len(ft[0]), generator=torch.Generator().manual_seed(3))[:n_ft].sort().values
        ft = (ft[0][idx], ft[1][idx])
    if args.quick:
        calib, test = calib[:300], (test[0][:2000], test[1][:2000])
    splits = {"calib": calib, "test": test, "ft": ft}
    options_here = supported_options()
    res = {"command": "python benchmarks/reconstruction.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                      f"torch {torch.__version__}", "threads": threads, "quick": args.quick,
           "options_present": sorted(options_here), "targets_flops": args.targets,
           "calib_samples": len(calib), "test_samples": len(test[0]),
           "bn_method": "dense recomputation: reset_running_stats(), momentum=None, only BatchNorm modules in train "
                        f"mode, one forward of all {len(calib)} calibration images under no_grad",
           "tp_method": f"MagnitudePruner(GroupMagnitudeImportance(p=2), global_pruning={args.tp_global}, "
                        "ignored_layers=[final Linear]), pruning_ratio bisected to the FLOPs target (tol 0.01)",
           "ft_note": "skipped" if args.no_finetune else
           f"one epoch on {len(ft[0])} training images, SGD lr 0.01 cosine, rows {', '.join(args.ft_rows)}",
           "models": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.append:
        keep_models(res, out_dir / "reconstruction.json", args.models)
    for name in args.models:
        run_model(name, args, splits, options_here, out_dir, res)
    res["total_s"] = time.perf_counter() - t_start
    save(res, out_dir)
    md = render_md(res)
    write_text_atomic(out_dir / "reconstruction.md", md)
    plot(res, out_dir / "reconstruction.png")
    print(md)
    print(f"wrote {out_dir}/reconstruction.json, .md, .png ({res['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
