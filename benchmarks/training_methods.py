"""The training-time methods against prune + fine-tune, with the same training budget for every row, on the real
Fashion-MNIST: C-SGD (train, then merge; no fine-tuning), AOFP and Auto-Balanced (prune while training; finalize
trims the masked channels), and L1 / ID (prune the trained model once with 1000 calibration images, then
fine-tune for the same budget).

Models: the trained bases of benchmarks/_models.py (ResNet-20 and the small VGG at 0.5 of the FLOPs, LeNet-5 at
0.1 for Auto-Balanced's headline; every method runs at every point). Every row starts from the same trained
weights and trains for the same number of steps (``--epochs`` passes over the 59000 training images, batch 128,
the same shuffled order): SGD momentum 0.9, weight decay 5e-4, learning rate 0.01 cosine to 0, 1 torch thread.
Widths are exact (round_to=None): the comparison is about accuracy at a FLOPs target, not latency.
Training-time methods run with their defaults (fxprune.prepare(..., steps=budget)); they finalize WITHOUT
calibration data (C-SGD's merge and the masked methods' trim are exact on their own); L1 and ID prune with
calib= (least-squares reconstruction and BatchNorm re-estimation, fxprune's recommended one-shot route).

Reported per row: the FLOPs kept (slim vs original, FlopCounterMode), test accuracy (10000 images) of the
unpruned model, right before and right after finalize (for L1/ID: before and after pruning), and at the end
(for the training-time methods the same as after finalize: no fine-tuning); the training wall time. Step
overhead: the same model, the same batches, with and without the pruner, measured side by side (blocks of 5
steps alternating, medians), while the method is active (AOFP: every group searching; Auto-Balanced: the first
stage's regularization; C-SGD: the whole run). DDP: examples/ddp_csgd.py (C-SGD from scratch on LeNet-5, which has
no BatchNorm, and on the small VGG, whose BatchNorms see each rank's half batch: CPU has no SyncBatchNorm) under
torchrun with 2 processes vs 1 process, the two slim models compared tensor by tensor.

    .venv/bin/python benchmarks/training_methods.py                 # full run -> benchmarks/results/training_methods.*
    .venv/bin/python benchmarks/training_methods.py --quick         # smoke run (quick base models, subsets)
    .venv/bin/python benchmarks/training_methods.py --models lenet5 --no-ddp --out /tmp/x
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fxprune
from fxprune import zoo
from fxprune.finetune import evaluate
from _common import git_commit, write_bytes_atomic, write_json_atomic, write_text_atomic
from _models import data, trained

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = {"resnet20": 0.5, "vgg-small": 0.5, "lenet5": 0.1}
TRAINING = ["csgd", "aofp", "abfp"]
ONESHOT = ["l1", "id"]
LABEL = {"csgd": "C-SGD (train, merge)", "aofp": "AOFP", "abfp": "Auto-Balanced", "l1": "L1 + fine-tune",
         "id": "ID + fine-tune"}
LR, MOMENTUM, WD, BATCH = 0.01, 0.9, 5e-4, 128
QUICK = {"train": 2560, "test": 2000}


def quiet():
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ---- the shared training loop ---------------------------------------------------------------------------------
def optimizer(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def batches(train, steps, seed=0):
    """``steps`` batches in the same shuffled order for every row."""
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            yield x[idx], y[idx]
            done += 1
            if done == steps:
                return


def train(model, opt, sched, train_data, steps, desc=""):
    model.train()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches(train_data, steps)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i % 100 == 0:
            say(f"    {desc} step {i}/{steps} loss {loss.item():.3f}")
    return time.perf_counter() - t0


def flops_kept(res) -> float:
    return res.flops[1] / res.flops[0]


# ---- rows -----------------------------------------------------------------------------------------------------
def training_row(method, base, target, d, steps, example):
    model = copy.deepcopy(base)
    opt, sched = optimizer(model, steps)
    pruner = fxprune.prepare(model, example, method, optimizer=opt, steps=steps, target_flops=target,
                             round_to=None, progress=False)
    train_s = train(model, opt, sched, d["train"], steps, method)
    status = pruner.status()
    before = evaluate(model, d["test"])
    t0 = time.perf_counter()
    res = pruner.finalize()
    fin_s = time.perf_counter() - t0
    after = evaluate(res.model, d["test"])
    return {"acc_before": before, "acc_after": after, "acc_final": after, "flops_kept": flops_kept(res),
            "train_s": train_s, "finalize_s": fin_s, "status": _short(status)}


def oneshot_row(method, base, target, d, steps, example):
    t0 = time.perf_counter()
    res = fxprune.prune(copy.deepcopy(base), example, method, target_flops=target, round_to=None,
                        calib=d["calib"], progress=False)
    prune_s = time.perf_counter() - t0
    slim = res.model
    after = evaluate(slim, d["test"])
    opt, sched = optimizer(slim, steps)
    train_s = train(slim, opt, sched, d["train"], steps, method)
    return {"acc_before": d["acc_base"], "acc_after": after, "acc_final": evaluate(slim, d["test"]),
            "flops_kept": flops_kept(res), "train_s": train_s, "finalize_s": prune_s}


def _short(status: dict) -> dict:
    keep = ("eps", "spread", "pruned_by_threshold", "pruned_by_pace", "pruned_by_fallback", "steps_per_half",
            "warmup", "search_ends", "live", "stage_ends", "strength")
    return {k: v for k, v in json.loads(json.dumps(status, default=float)).items() if k in keep}


# ---- step overhead, side by side ----------------------------------------------------------------------------------
def overhead(method, base, target, d, example, opts, block=5, rounds=4, warm=20):
    """Median seconds per step with the pruner active and without it, same model and batches, alternating."""
    def setup(with_pruner):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        pruner = (fxprune.prepare(model, example, method, optimizer=opt, steps=10**6, target_flops=target,
                                  round_to=None, progress=False, **opts) if with_pruner else None)
        model.train()
        return model, opt, pruner

    stream = batches(d["train"], 10**9, seed=1)
    xs = [next(stream) for _ in range(block)]

    def run(model, opt, k):
        t0 = time.perf_counter()
        for i in range(k):
            x, y = xs[i % block]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / k

    (ma, oa, pa), (mb, ob, _) = setup(True), setup(False)
    run(ma, oa, warm)  # AOFP: every group has started; all: caches warm
    run(mb, ob, block)
    with_p, without = [], []
    for _ in range(rounds):
        with_p.append(run(ma, oa, block))
        without.append(run(mb, ob, block))
    active = pa.status()
    assert active.get("searching", True) and active.get("stage", 0) == 0, "the method was not active while timed"
    a, b = statistics.median(with_p), statistics.median(without)
    return {"ms_with": 1e3 * a, "ms_without": 1e3 * b, "ratio": a / b}


OVERHEAD_RUNS = {"csgd": {}, "abfp": {},
                 # every group searching from step ~20 on, nothing pruned while timed (threshold ~0)
                 "aofp": {"warmup": 0, "steps_per_half": 20, "threshold": 1e-12},
                 "aofp (measure_every=1)": {"warmup": 0, "steps_per_half": 20, "threshold": 1e-12,
                                            "measure_every": 1}}


# ---- DDP ------------------------------------------------------------------------------------------------------------
def ddp_csgd(model: str, samples: int, tmp: Path) -> dict:
    """examples/ddp_csgd.py under torchrun (2 processes) and in one process; the slim models compared."""
    script = str(ROOT / "examples" / "ddp_csgd.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = ["--train-samples", str(samples), "--batch", "128", "--epochs", "1", "--model", model]
    out = {}
    for name, cmd in (("1 process", [sys.executable, script]),
                      ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", script])):
        path = tmp / f"{model}-{name.replace(' ', '_')}.pt"
        t0 = time.perf_counter()
        done = subprocess.run(cmd + common + ["--out", str(path)], env=env, capture_output=True, text=True,
                              timeout=3600)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
        acc = re.search(r"test accuracy: trained ([\d.]+)%, merged ([\d.]+)%", done.stdout)
        out[name] = {"wall_s": wall, "acc_trained": float(acc.group(1)) / 100, "acc_merged": float(acc.group(2)) / 100,
                     "path": path}
    fresh = lambda: zoo.build(model, in_channels=1, image_size=28)  # noqa: E731
    one, two = (fxprune.load(out[k]["path"], fresh()).state_dict() for k in ("1 process", "2 processes"))
    same_shapes = one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)
    diff = max(float((one[k].double() - two[k].double()).abs().max()) for k in one) if same_shapes else float("nan")
    for v in out.values():
        v.pop("path")
    return {"model": model, "samples": samples, "steps": samples // 128, "runs": out, "same_widths": same_shapes,
            "max_abs_weight_diff": diff}


# ---- outputs ----------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = [f"# Training-time methods vs prune + fine-tune ({'quick' if res['quick'] else 'full'} run)", "",
             f"Command: `{res['command']}`  ", f"Commit: `{res['commit']}`, {res['date']}, {res['threads']} torch "
             f"thread(s); budget {res['epochs']} epoch(s) = {res['steps']} steps per row (batch {BATCH}).", "",
             "| model | method | FLOPs kept | base | before finalize | after finalize | final | final - base | "
             "train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {LABEL[r['method']]} | | | | | error: {r['error']} | | |")
            continue
        lines.append(f"| {r['model']} | {LABEL[r['method']]} | {r['flops_kept']:.3f} | {100 * r['acc_base']:.2f} | "
                     f"{100 * r['acc_before']:.2f} | {100 * r['acc_after']:.2f} | {100 * r['acc_final']:.2f} | "
                     f"{100 * (r['acc_final'] - r['acc_base']):+.2f} | {r['train_s']:.0f} |")
    lines += ["", "For L1 / ID, 'before / after finalize' is before / after the one-shot prune (with calibration); "
              "'final' is after fine-tuning for the budget. Training-time methods are not fine-tuned.", "",
              "Step overhead (same model and batches, with vs without the pruner, medians of alternating blocks):", "",
              "| model | method | ms/step with | ms/step without | ratio |", "|---|---|---:|---:|---:|"]
    for o in res["overhead"]:
        lines.append(f"| {o['model']} | {o['method']} | {o['ms_with']:.1f} | {o['ms_without']:.1f} | "
                     f"{o['ratio']:.3f} |")
    if res.get("ddp"):
        lines += ["", "DDP (examples/ddp_csgd.py: C-SGD from scratch at 0.5 of the FLOPs, global batch 128, torchrun "
                      "2 processes vs 1; test accuracy on 2000 test images; LeNet-5 has no BatchNorm, the small VGG "
                      "normalizes with each rank's half batch):", "",
                  "| model | steps | run | wall s | test acc trained | test acc merged | same widths | "
                  "max weight diff |", "|---|---:|---|---:|---:|---:|---|---:|"]
        for d in res["ddp"]:
            for name, v in d["runs"].items():
                lines.append(f"| {d['model']} | {d['steps']} | {name} | {v['wall_s']:.0f} | {100 * v['acc_trained']:.2f} "
                             f"| {100 * v['acc_merged']:.2f} | {d['same_widths']} | {d['max_abs_weight_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in res["rows"]))
    methods = TRAINING + ONESHOT
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((100 * r["acc_final"] for r in res["rows"] if r["model"] == mod and r["method"] == m
                      and "acc_final" in r), 0) for mod in models]
        axes[0].bar([i + j * width for i in range(len(models))], vals, width, label=LABEL[m])
    for i, mod in enumerate(models):
        base = next(r["acc_base"] for r in res["rows"] if r["model"] == mod)
        axes[0].hlines(100 * base, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="dashed")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(models))],
                       [f"{m}\n@{TARGETS[m]:g} FLOPs" for m in models])
    lo = min(100 * r["acc_final"] for r in res["rows"] if "acc_final" in r)
    axes[0].set_ylim(max(0, lo - 5), 100)
    axes[0].set_ylabel("test accuracy % (dashed: unpruned)")
    axes[0].set_title(f"same budget: {res['epochs']} epoch(s) per row")
    axes[0].legend(fontsize=7, loc="lower right")
    ov = res["overhead"]
    labels = [f"{o['model']}\n{o['method']}" for o in ov]
    axes[1].bar(range(len(ov)), [o["ratio"] for o in ov])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(ov)), labels, fontsize=6, rotation=60, ha="right")
    axes[1].set_ylabel("time per step, with / without the pruner")
    fig.tight_layout()
    write_bytes_atomic(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def save(res: dict, out: Path):
    write_json_atomic(out / "training_methods.json", res)
    write_text_atomic(out / "training_methods.md", markdown(res))
    if res["rows"]:
        plot(res, out / "training_methods.png")


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--methods", nargs="*", default=TRAINING + ONESHOT, choices=TRAINING + ONESHOT)
    ap.add_argument("--epochs", type=float, default=1.0, help="training budget per row, in passes over the data")
    ap.add_argument("--quick", action="store_true", help="quick base models, 2560 training / 2000 test images")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--ddp-samples", type=int, default=None, help="training images of the DDP run (default 12800)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: a temp dir)")
    args = ap.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="training_methods-")) if args.quick
                                           else HERE / "results")
    splits = data()
    train_x, train_y = splits.train
    test = splits.test
    if args.quick:
        train_x, train_y, test = train_x[:QUICK["train"]], train_y[:QUICK["train"]], tuple(t[:QUICK["test"]]
                                                                                         for t in test)
    steps = max(1, int(args.epochs * (len(train_x) // BATCH)))
    res = {"command": " ".join([".venv/bin/python", "benchmarks/training_methods.py", *(argv or sys.argv[1:])]),
           "commit": git_commit(), "date": datetime.date.today().isoformat(), "threads": args.threads,
           "quick": args.quick, "epochs": args.epochs, "steps": steps, "lr": LR, "batch": BATCH,
           "train_samples": len(train_x), "test_samples": len(test[0]), "rows": [], "overhead": []}
    started = time.perf_counter()
    for name in args.models:
        base, info = trained(name, quick=args.quick, progress=False)
        example = train_x[:2]
        d = {"train": (train_x, train_y), "test": test, "calib": splits.calib[0], "acc_base": evaluate(base, test)}
        say(f"{name}: base accuracy {d['acc_base']:.2%} ({info['cache']}); {steps} steps per row")
        for method in args.methods:
            say(f"  {name} / {method} ...")
            row = {"model": name, "method": method, "target_flops": TARGETS[name], "acc_base": d["acc_base"]}
            try:
                fn = training_row if method in TRAINING else oneshot_row
                row.update(fn(method, base, TARGETS[name], d, steps, example))
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            say(f"  {name} / {method}: {json.dumps({k: v for k, v in row.items() if k != 'status'}, default=str)}")
            res["rows"].append(row)
            save(res, out)
        if not args.no_overhead:
            for label, opts in OVERHEAD_RUNS.items():
                method = label.split(" ")[0]
                if method not in args.methods:
                    continue
                o = {"model": name, "method": label, **overhead(method, base, TARGETS[name], d, example, opts)}
                say(f"  overhead {o}")
                res["overhead"].append(o)
                save(res, out)
    if not args.no_ddp:
        res["ddp"] = []
        for model in ("lenet5", "vgg-small"):
            with tempfile.TemporaryDirectory() as tmp:
                res["ddp"].append(ddp_csgd(model, args.ddp_samples or (1024 if args.quick else 12800), Path(tmp)))
            say(f"ddp: {res['ddp'][-1]}")
            save(res, out)
    res["wall_s"] = time.perf_counter() - started
    save(res, out)
    print(markdown(res))
    say(f"results in {out} ({res['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
